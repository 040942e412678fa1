"""Regenerate the Python protobuf/gRPC stubs beside the native protos under protos/rnnserve/,
and the descriptor set of the Open Inference Protocol protos under protos/inference/.

The `inference` protos get no _pb2 modules on purpose: tritonclient registers the same
full names in protobuf's default pool, so server/kserve_proto.py loads them into a private
pool from a descriptor set instead. `make protos` runs this; tests compare a fresh run
against the committed files, so they can never go stale silently.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


STUB_PACKAGES = ("rnnserve",)  # protos/<package>/**.proto get _pb2 stubs


def proto_files(src: Path = PROTOS) -> list[Path]:
    """The .proto files that get Python stubs, relative to src, in a stable order."""
    return sorted(p.relative_to(src) for pkg in STUB_PACKAGES for p in (src / pkg).rglob("*.proto"))


def generate(out: Path, src: Path = PROTOS) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto under src, writing stubs to out."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files(src)]
    args = [
        "protoc",
        f"-I{src}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return sorted(p.relative_to(out) for p in out.rglob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate the stubs in place (or into --out)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=PROTOS, help="output folder (default: protos/ itself)")
    args = ap.parse_args(argv)
    if args.out != PROTOS and args.out.exists():
        shutil.rmtree(args.out)
    made = generate(args.out)
    sys.path.insert(0, str(ROOT))
    from server import kserve_proto

    made.append(kserve_proto.generate(args.out / "inference").relative_to(args.out))
    for p in made:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
