"""protobuf <-> domain values, for both services: the one place that knows both shapes.

The edge node builds a :class:`Submission` once from its client step and sends it with
:func:`submit_header` + the gradient's chunks; the aggregator turns the header and the reassembled
gradient back into the same :class:`Submission` (:func:`submission`) and hands it on as is. The
registration and the state view go the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType
from fedgradnorm.algorithm import ClientConfig
from fedgradnorm.models import Architecture
from fedgradnorm.services.aggregator.config import CoordinatorConfig
from fedgradnorm.services.domain import Phase, Registration, StateView, Submission, WeightsOffer

PHASES = {
    Phase.WAITING: pb.PHASE_WAITING_FOR_NODES,
    Phase.OPEN: pb.PHASE_ROUND_OPEN,
    Phase.STEPPING: pb.PHASE_STEPPING,
    Phase.DONE: pb.PHASE_DONE,
    Phase.HALTED: pb.PHASE_HALTED,
}


# -- SubmitUpdate -------------------------------------------------------------------------------


def submit_header(sub: Submission, session_token: str, dtype: DType) -> pb.SubmitHeader:
    """The header that announces ``sub`` (its gradient follows as chunks in ``dtype``)."""
    specs = wire.tensor_specs(sub.gradient, dtype)
    header = pb.SubmitHeader(
        node_id=sub.node_id,
        session_token=session_token,
        round=sub.round,
        tensors=specs,
        total_bytes=wire.payload_nbytes(specs),
        loss=sub.loss,
        initial_loss=sub.initial_loss,
        loss_ratio=sub.loss_ratio,
        num_samples=sub.num_samples,
        test_metrics=dict(sub.test_metrics),
    )
    if sub.test_loss is not None:
        header.test_loss = sub.test_loss
    return header


def submission(h: pb.SubmitHeader, gradient: Mapping[str, torch.Tensor]) -> Submission:
    """The update a header and its reassembled gradient describe."""
    return Submission(
        node_id=h.node_id,
        round=h.round,
        gradient=gradient,
        loss=h.loss,
        initial_loss=h.initial_loss,
        loss_ratio=h.loss_ratio,
        num_samples=h.num_samples,
        test_loss=h.test_loss if h.HasField("test_loss") else None,
        test_metrics=dict(h.test_metrics),
    )


# -- Register -----------------------------------------------------------------------------------


def register_response(
    reg: Registration,
    cfg: CoordinatorConfig,
    *,
    omega_tilde: tuple[str, ...],
    wire_dtype: DType,
    accepted_dtypes: tuple[DType, ...],
    max_chunk_bytes: int,
    max_update_bytes: int,
) -> pb.RegisterResponse:
    resp = pb.RegisterResponse(
        node_id=reg.node_id,
        session_token=reg.session_token,
        network=cfg.network,
        algorithm=cfg.algorithm,
        omega_tilde=list(omega_tilde),
        round_config=pb.RoundConfig(tau_h=cfg.tau_h, tau_omega=cfg.tau_omega, beta=cfg.beta, batch_size=cfg.batch_size),
        seed=cfg.seed,
        wire_dtype=wire_dtype,
        accepted_dtypes=list(accepted_dtypes),
        max_chunk_bytes=max_chunk_bytes,
        max_update_bytes=max_update_bytes,
        heartbeat_interval_seconds=cfg.heartbeat_interval,
        weight=reg.weight,
        resumed=reg.resumed,
        network_fingerprint=cfg.spec.architecture.fingerprint,
    )
    if reg.initial_loss is not None:
        resp.initial_loss = reg.initial_loss
    return resp


def network_architecture(arch: Architecture) -> pb.NetworkArchitecture:
    return pb.NetworkArchitecture(
        fingerprint=arch.fingerprint,
        parameters=[pb.ParameterShape(name=n, shape=list(shape), dtype=d) for n, shape, d in arch.parameters],
    )


@functools.lru_cache(maxsize=8)
def federation_network(federation: str) -> pb.NetworkArchitecture:
    """The shared network of a federation (a shipped name or a spec file) as a Register carries it."""
    from fedgradnorm.federation import load_federation

    return network_architecture(load_federation(federation).architecture)


def architecture(msg: pb.NetworkArchitecture) -> Architecture:
    """The node's network as it declared it (the caller bounds the sizes first: see Membership)."""
    return Architecture(
        fingerprint=msg.fingerprint,
        parameters=tuple((p.name, tuple(int(d) for d in p.shape), p.dtype) for p in msg.parameters),
    )


def round_config(rc: pb.RoundConfig) -> ClientConfig:
    """The client hyperparameters an aggregator announced."""
    return ClientConfig(tau_h=rc.tau_h, tau_omega=rc.tau_omega, beta=rc.beta, batch_size=rc.batch_size)


# -- GetState -----------------------------------------------------------------------------------


def hyperparameters(cfg: CoordinatorConfig) -> pb.Hyperparameters:
    return pb.Hyperparameters(
        gamma=cfg.gamma,
        alpha=cfg.alpha,
        beta=cfg.beta,
        tau_h=cfg.tau_h,
        tau_omega=cfg.tau_omega,
        batch_size=cfg.batch_size,
        min_nodes=cfg.min_nodes,
        round_timeout_seconds=cfg.round_timeout,
    )


def state_response(view: StateView, cfg: CoordinatorConfig) -> pb.GetStateResponse:
    nodes = []
    for n in view.nodes:
        m = n.record
        node = pb.NodeState(
            node_id=m.node_id,
            node_name=m.name,
            task=m.task,
            weight=n.weight,
            loss_ratio=m.loss_ratio or 0.0,
            grad_norm=m.grad_norm or 0.0,
            train_loss=m.train_loss or 0.0,
            test_metrics=m.test_metrics,
            num_samples=m.num_samples,
            active=m.registered,
            last_round=m.last_round,
            registered_unix_seconds=m.registered_unix,
            relay=m.relay,
        )
        if m.initial_loss is not None:
            node.initial_loss = m.initial_loss
        if m.test_loss is not None:
            node.test_loss = m.test_loss
        nodes.append(node)
    return pb.GetStateResponse(
        round=view.round,
        phase=PHASES[view.phase],
        algorithm=cfg.algorithm,
        federation=cfg.spec.name,
        network=cfg.network,
        network_fingerprint=cfg.spec.architecture.fingerprint,
        hyperparameters=hyperparameters(cfg),
        nodes=nodes,
        halted_reason=view.halted_reason,
        last_committed_round=view.last_committed_round,
        next_page_token=view.next_after,
        total_nodes=view.total_nodes,
    )


# -- Uplink (relay <-> aggregator) ----------------------------------------------------------------


def relay_members(members: list[tuple[str, str, float | None]]) -> list[rpb.RelayMember]:
    out = []
    for node_id, token_sha256, f0 in members:
        m = rpb.RelayMember(node_id=node_id, token_sha256=token_sha256)
        if f0 is not None:
            m.initial_loss = f0
        out.append(m)
    return out


def members_of(msgs: Iterable[rpb.RelayMember]) -> dict[str, str]:
    """node id -> hash of its session token, as a relay keeps them."""
    return {m.node_id: m.token_sha256 for m in msgs}


def relay_participants(participants: Mapping[str, float | None]) -> list[rpb.RelayParticipant]:
    out = []
    for node_id, f0 in sorted(participants.items()):
        p = rpb.RelayParticipant(node_id=node_id)
        if f0 is not None:
            p.initial_loss = f0
        out.append(p)
    return out


def participants_of(msgs: Iterable[rpb.RelayParticipant]) -> dict[str, float | None]:
    return {p.node_id: (p.initial_loss if p.HasField("initial_loss") else None) for p in msgs}


def relayed_update(sub: Submission) -> rpb.RelayedUpdate:
    """The scalars of an update a relay accepted (its gradient stays at the relay)."""
    u = rpb.RelayedUpdate(
        node_id=sub.node_id,
        loss=sub.loss,
        initial_loss=sub.initial_loss,
        loss_ratio=sub.loss_ratio,
        num_samples=sub.num_samples,
        test_metrics=dict(sub.test_metrics),
        norm=sub.norm,
        tilde_norm=sub.tilde_norm,
    )
    if sub.test_loss is not None:
        u.test_loss = sub.test_loss
    return u


def relayed_submission(u: rpb.RelayedUpdate, round_: int) -> Submission:
    return Submission(
        node_id=u.node_id,
        round=round_,
        gradient={},
        loss=u.loss,
        initial_loss=u.initial_loss,
        loss_ratio=u.loss_ratio,
        num_samples=u.num_samples,
        test_loss=u.test_loss if u.HasField("test_loss") else None,
        test_metrics=dict(u.test_metrics),
        norm=u.norm,
        tilde_norm=u.tilde_norm,
    )


def weights_response(offer: WeightsOffer) -> rpb.FetchWeightsResponse:
    if offer.ready:
        status = rpb.WEIGHTS_STATUS_READY
    elif offer.closed:
        status = rpb.WEIGHTS_STATUS_CLOSED
    else:
        status = rpb.WEIGHTS_STATUS_NOT_YET
    return rpb.FetchWeightsResponse(
        status=status,
        attempt=offer.attempt,
        scales=[rpb.NodeScale(node_id=n, scale=sc, weight=w) for n, sc, w in offer.scales],
    )


def weights_offer(resp: rpb.FetchWeightsResponse) -> WeightsOffer:
    return WeightsOffer(
        ready=resp.status == rpb.WEIGHTS_STATUS_READY,
        closed=resp.status == rpb.WEIGHTS_STATUS_CLOSED,
        attempt=resp.attempt,
        scales=tuple((s.node_id, s.scale, s.weight) for s in resp.scales),
    )
