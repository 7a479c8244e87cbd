"""How the aggregator's handlers meet the bytes: strict request decoding, pre-serialized responses.

Requests that do not decode get INVALID_ARGUMENT, not gRPC Python's INTERNAL. gRPC Python parses each request with the handler's ``request_deserializer`` before any servicer
code runs, and answers a parse failure with ``INTERNAL "Exception deserializing request!"`` - the
code for a server bug, for what is the client's fault. This interceptor swaps every handler for one
that receives the raw bytes and parses them itself (the same parser, in the same thread), so that a
message that does not decode ends the call with ``INVALID_ARGUMENT`` naming the method and the
message's position in the stream. Nothing else changes: the servicer sees the same request objects.

Responses: a handler may yield ``bytes`` that are already a serialized response message (the
FetchRound chunks, encoded once per round by ``wire.iter_chunk_messages``); they are sent as they
are, every other response is serialized as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from fedgradnorm.reasons import Reason
from fedgradnorm.services.refusals import refuse

MAX_ERROR_TEXT = 200


class UndecodableRequest(Exception):
    """Raised inside the handler by the request iterator when a streamed message does not decode."""


def _describe(method: str, index: int | None, error: Exception) -> str:
    where = "the request" if index is None else f"message {index} of the request stream"
    text = str(error) or type(error).__name__
    return f"bad_message: {where} of {method} is not a valid protobuf message ({text[:MAX_ERROR_TEXT]})"


def _decoder(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception as e:  # protobuf's DecodeError, or a parser's own error on hostile bytes
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_STREAM, _describe(method, None, e))

    return decode


def _decoding(parse: Callable[[bytes], Any], method: str, raw: Iterator[bytes]) -> Iterator[Any]:
    for index, blob in enumerate(raw):
        try:
            message = parse(blob)
        except Exception as e:
            raise UndecodableRequest(_describe(method, index, e)) from e
        yield message


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serialize_or_pass(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_or_pass


def _strict(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    serialize = _passing_bytes(handler.response_serializer)
    decode = _decoder(parse, method)

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
            return inner_uu(decode(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)

    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
            responses: Iterator[Any] = inner_us(decode(raw, context), context)
            return responses

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            try:
                return inner_su(_decoding(parse, method, raw), context)
            except UndecodableRequest as e:
                refuse(context, grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_STREAM, str(e))

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

    inner_ss = handler.stream_stream

    def stream_stream(raw: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from inner_ss(_decoding(parse, method, raw), context)
        except UndecodableRequest as e:
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_STREAM, str(e))

    return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)


class WireCodec(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Parse requests inside the handler (INVALID_ARGUMENT when one does not decode); send
    responses a handler yields as bytes as they are."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _strict(handler, handler_call_details.method)
