"""Generate the protobuf and gRPC stubs in ``fedgradnorm/_proto`` from ``proto/`` (``make proto``).

The layout follows Flower's: the proto path is the proto package, so
``proto/fedgradnorm/v1/aggregator.proto`` (``package fedgradnorm.v1``) becomes
``fedgradnorm/_proto/fedgradnorm/v1/aggregator_pb2.py`` (plus ``_pb2.pyi`` and ``_pb2_grpc.py``),
imported as ``fedgradnorm._proto.fedgradnorm.v1.aggregator_pb2``. The stubs are committed.

protoc writes imports relative to the proto root (``from fedgradnorm.v1 import tensor_pb2``) and
registers the messages under that module name; both are rewritten to the absolute module path
under ``fedgradnorm._proto``, so the stubs are an ordinary subpackage and nothing touches
``sys.path``. The servicer base class's default for an unimplemented method becomes a single
``context.abort(UNIMPLEMENTED, ...)`` (same status, no exception of its own). The descriptors keep
their proto file names (``fedgradnorm/v1/aggregator.proto``),
so reflection and other languages' stubs see the usual names.

Usage::

    python -m fedgradnorm.protogen           # regenerate fedgradnorm/_proto
    python -m fedgradnorm.protogen --check   # exit 1, listing stale files, if the committed stubs
                                             # differ from what proto/ generates
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PROTO_DIR = REPO_ROOT / "proto"
OUT_DIR = PACKAGE_DIR / "_proto"
OUT_MODULE = "fedgradnorm._proto"

_INIT_TEMPLATE = '"""Generated protobuf and gRPC stubs: {package}. Do not edit; run ``make proto``."""\n'
_GRPC_VERSION_RE = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'", re.MULTILINE)


class ProtogenError(RuntimeError):
    """protoc failed, or the proto tree is missing."""


def _proto_files(proto_dir: Path) -> list[Path]:
    if not proto_dir.is_dir():
        raise ProtogenError(f"proto directory not found: {proto_dir} (protogen runs from a source checkout)")
    files = sorted(proto_dir.rglob("*.proto"))
    if not files:
        raise ProtogenError(f"no .proto files under {proto_dir}")
    return files


def _run_protoc(proto_dir: Path, files: Sequence[Path], out: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(f) for f in files),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ProtogenError(f"protoc failed ({proc.returncode}):\n{proc.stderr.strip()}")


def _rewrite(text: str, roots: Sequence[str]) -> str:
    """Point protoc's root-relative module names at ``fedgradnorm._proto``."""
    alternatives = "|".join(re.escape(r) for r in roots)
    text = re.sub(
        rf"^(\s*)from ({alternatives})((?:\.\w+)*) import ",
        rf"\1from {OUT_MODULE}.\2\3 import ",
        text,
        flags=re.MULTILINE,
    )
    # The module name the message classes are registered under (their __module__).
    text = re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:{alternatives})(?:\.\w+)*)'",
        rf"\1{OUT_MODULE}.\2'",
        text,
    )
    leftover = re.search(rf"^\s*import ({alternatives})\b.*$", text, flags=re.MULTILINE)
    if leftover:
        raise ProtogenError(f"cannot rewrite import {leftover.group(0).strip()!r}")
    return _UNIMPLEMENTED_RE.sub(_UNIMPLEMENTED_ABORT, text)


# grpc_tools' servicer base class answers a method nobody implemented by setting UNIMPLEMENTED and
# raising NotImplementedError (which gRPC Python then also logs as a server error); the same answer
# in one call, without the exception: context.abort(UNIMPLEMENTED, ...). Nothing else changes.
_UNIMPLEMENTED_RE = re.compile(
    r"^(\s*)context\.set_code\(grpc\.StatusCode\.UNIMPLEMENTED\)\n"
    r"\s*context\.set_details\('Method not implemented!'\)\n"
    r"\s*raise[ ]NotImplementedError\('Method not implemented!'\)$",
    re.MULTILINE,
)
_UNIMPLEMENTED_ABORT = r"\1context.abort(grpc.StatusCode.UNIMPLEMENTED, 'Method not implemented!')"


def render(proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """The complete contents of the stub tree: relative POSIX path -> file bytes."""
    files = _proto_files(proto_dir)
    relative = [f.relative_to(proto_dir) for f in files]
    roots = sorted({rel.parts[0] for rel in relative if len(rel.parts) > 1})
    out: dict[str, bytes] = {"__init__.py": _INIT_TEMPLATE.format(package=OUT_MODULE).encode()}
    with tempfile.TemporaryDirectory(prefix="fedgradnorm-protogen-") as tmp:
        tmp_dir = Path(tmp)
        _run_protoc(proto_dir, files, tmp_dir)
        for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp_dir)
            out[rel.as_posix()] = _rewrite(path.read_text(encoding="utf-8"), roots).encode()
            for depth in range(1, len(rel.parts)):
                package = rel.parts[:depth]
                init = "/".join((*package, "__init__.py"))
                name = ".".join((OUT_MODULE, *package))
                out.setdefault(init, _INIT_TEMPLATE.format(package=name).encode())
    return dict(sorted(out.items()))


def _existing(out_dir: Path) -> dict[str, bytes]:
    if not out_dir.is_dir():
        return {}
    return {
        p.relative_to(out_dir).as_posix(): p.read_bytes()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.relative_to(out_dir).parts
    }


def stale_files(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Differences between the stub tree in ``out_dir`` and what ``proto_dir`` generates.

    Each entry is ``"<status>: <path relative to out_dir>"`` with status ``modified``,
    ``missing`` (would be generated, is absent) or ``extra`` (present, would not be generated).
    """
    expected = render(proto_dir)
    actual = _existing(out_dir)
    problems = [f"missing: {p}" for p in expected if p not in actual]
    problems += [f"modified: {p}" for p in expected if p in actual and actual[p] != expected[p]]
    problems += [f"extra: {p}" for p in actual if p not in expected]
    return sorted(problems, key=lambda s: s.split(": ", 1)[1])


def write(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Regenerate the stub tree in ``out_dir``; returns the paths written or removed."""
    expected = render(proto_dir)
    actual = _existing(out_dir)
    changed: list[str] = []
    for rel, content in expected.items():
        if actual.get(rel) != content:
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            changed.append(rel)
    for rel in actual.keys() - expected.keys():
        (out_dir / rel).unlink()
        changed.append(rel)
    for directory in sorted((d for d in out_dir.rglob("*") if d.is_dir()), reverse=True):
        if directory.name != "__pycache__" and not any(directory.iterdir()):
            directory.rmdir()
    return sorted(changed)


def _version_hint(out_dir: Path) -> str | None:
    """Explain a staleness caused by a different grpcio-tools rather than by an edited .proto."""
    installed = metadata.version("grpcio-tools")
    for path in sorted(out_dir.rglob("*_pb2_grpc.py")):
        found = _GRPC_VERSION_RE.search(path.read_text(encoding="utf-8"))
        if found and found.group(1) != installed:
            return (
                f"note: the committed stubs were generated by grpcio-tools {found.group(1)}, "
                f"the installed one is {installed}; regenerate or install grpcio-tools=={found.group(1)}"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedgradnorm.protogen",
        description="Regenerate or check the stubs in fedgradnorm/_proto.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help="root of the .proto tree")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the stubs live")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale_files(args.out_dir, args.proto_dir)
            if problems:
                print(f"stale protobuf stubs in {args.out_dir} (run `make proto`):", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                hint = _version_hint(args.out_dir)
                if hint:
                    print(hint, file=sys.stderr)
                return 1
            print(f"stubs in {args.out_dir} are up to date")
            return 0
        changed = write(args.out_dir, args.proto_dir)
    except ProtogenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rel in changed:
        path = args.out_dir / rel
        print(f"wrote {path}" if path.exists() else f"removed {path}")
    if not changed:
        print(f"stubs in {args.out_dir} are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
