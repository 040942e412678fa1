"""Regenerate the Python protobuf/gRPC stubs beside every .proto under protos/.

`make protos` runs this; tests/test_protos.py runs it into a temporary folder and
compares, so committed stubs can never go stale silently.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def proto_files(src: Path = PROTOS) -> list[Path]:
    """All .proto files under src, relative to it, in a stable order."""
    return sorted(p.relative_to(src) for p in src.rglob("*.proto"))


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
    for p in made:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
