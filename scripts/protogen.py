"""Regenerate what protoc makes of protos/: the Python stubs of the native protocol beside its .proto
files (protos/rnnserve/v1, the package `rnnserve.v1`), and the descriptor set of the Open Inference
Protocol protos (server/kserve/grpc_service.desc, package data of `rnnserve.server.kserve`).

The `inference` protos get no _pb2 modules on purpose: tritonclient registers the same full names in
protobuf's default pool, so the server loads them into a private pool from the descriptor set instead.
`make protos` runs this; tests compare a fresh run against the committed files, so they can never go
stale silently. This is the only place that runs protoc.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
STUB_PACKAGES = ("rnnserve",)  # protos/<package>/**.proto get _pb2 stubs
INFERENCE_PROTOS = ("inference/model_config.proto", "inference/grpc_service.proto")
DESC_PATH = ROOT / "server" / "kserve" / "grpc_service.desc"


def _protoc(args: list[str]) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    argv = ["protoc", f"-I{PROTOS}", f"-I{include}", *args]
    rc = protoc.main(argv)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(argv)}")


def proto_files(src: Path = PROTOS) -> list[Path]:
    """The .proto files that get Python stubs, relative to src, in a stable order."""
    return sorted(p.relative_to(src) for pkg in STUB_PACKAGES for p in (src / pkg).rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """The native protocol's stubs (_pb2, _pb2_grpc, .pyi) under out; returns their paths relative to out."""
    out.mkdir(parents=True, exist_ok=True)
    _protoc([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
             *[str(p) for p in proto_files()]])
    return sorted(p.relative_to(out) for p in out.rglob("*_pb2*.py*"))


def generate_descriptors(target: Path) -> Path:
    """The inference protos (with their imports) as one FileDescriptorSet at target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _protoc(["--include_imports", f"--descriptor_set_out={target}", *INFERENCE_PROTOS])
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate the stubs and the descriptor set in place (or under --out)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write everything under this folder instead")
    args = ap.parse_args(argv)
    if args.out is not None and args.out.exists():
        shutil.rmtree(args.out)
    stubs_out = PROTOS if args.out is None else args.out
    desc = DESC_PATH if args.out is None else args.out / DESC_PATH.name
    for p in generate(stubs_out):
        print(stubs_out / p)
    print(generate_descriptors(desc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
