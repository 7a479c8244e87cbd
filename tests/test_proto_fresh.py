"""The committed gRPC stubs match proto/, and the stub package imports the way services use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedgradnorm import protogen


def test_committed_stubs_are_fresh() -> None:
    problems = protogen.stale_files()
    assert not problems, "stale stubs in fedgradnorm/_proto; run `make proto`:\n" + "\n".join(problems)


def test_check_reports_modified_missing_and_extra_files(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    assert protogen.main(["--out-dir", str(out)]) == 0
    assert protogen.stale_files(out) == []
    assert protogen.main(["--check", "--out-dir", str(out)]) == 0

    stub = out / "fedgradnorm" / "v1" / "aggregator_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (out / "fedgradnorm" / "v1" / "tensor_pb2.pyi").unlink()
    (out / "fedgradnorm" / "v1" / "old_pb2.py").write_text("# from a deleted .proto\n")
    assert protogen.stale_files(out) == [
        "modified: fedgradnorm/v1/aggregator_pb2.py",
        "extra: fedgradnorm/v1/old_pb2.py",
        "missing: fedgradnorm/v1/tensor_pb2.pyi",
    ]
    assert protogen.main(["--check", "--out-dir", str(out)]) == 1

    assert protogen.main(["--out-dir", str(out)]) == 0
    assert protogen.stale_files(out) == []
    assert not (out / "fedgradnorm" / "v1" / "old_pb2.py").exists()


def test_check_fails_cleanly_without_a_proto_tree(tmp_path: Path) -> None:
    assert protogen.main(["--check", "--proto-dir", str(tmp_path / "nowhere")]) == 2


def test_stubs_form_a_package_under_fedgradnorm() -> None:
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2

    assert aggregator_pb2.RegisterResponse.__module__ == "fedgradnorm._proto.fedgradnorm.v1.aggregator_pb2"
    assert aggregator_pb2.DESCRIPTOR.name == "fedgradnorm/v1/aggregator.proto"
    assert aggregator_pb2.DESCRIPTOR.package == "fedgradnorm.v1"
    assert tensor_pb2.DESCRIPTOR.name == "fedgradnorm/v1/tensor.proto"
    assert aggregator_pb2.RoundHeader.DESCRIPTOR.fields_by_name["tensors"].message_type is (
        tensor_pb2.TensorSpec.DESCRIPTOR
    )
    assert hasattr(aggregator_pb2_grpc, "AggregatorServicer")
    assert "fedgradnorm.v1" not in sys.modules  # nothing imported under protoc's root-relative name


def test_stubs_import_in_a_fresh_interpreter_from_elsewhere(tmp_path: Path) -> None:
    repo = Path(protogen.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    code = (
        "from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as g, aggregator_pb2 as a\n"
        "m = a.RegisterResponse(initial_loss=2.0)\n"
        "assert m.HasField('initial_loss') and a.RegisterResponse.FromString(m.SerializeToString()) == m\n"
        "print(g.AggregatorStub.__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "AggregatorStub"


@pytest.mark.parametrize("proto", ["aggregator.proto", "tensor.proto"])
def test_proto_files_declare_the_path_package(proto: str) -> None:
    text = (protogen.PROTO_DIR / "fedgradnorm" / "v1" / proto).read_text()
    assert "package fedgradnorm.v1;" in text


def test_the_base_servicer_answers_unimplemented() -> None:
    """protogen turns the generated default into context.abort(UNIMPLEMENTED): same answer on the wire."""
    from concurrent import futures

    import grpc

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServicer_to_server(pb_grpc.AggregatorServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AggregatorStub(channel)
            for call in (
                lambda: stub.GetState(pb.GetStateRequest(), timeout=10),
                lambda: list(stub.FetchRound(pb.FetchRoundRequest(), timeout=10)),
                lambda: stub.SubmitUpdate(iter([pb.SubmitUpdateRequest()]), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
                assert err.value.details() == "Method not implemented!"
    finally:
        server.stop(0).wait()
