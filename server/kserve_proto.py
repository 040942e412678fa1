"""The Open Inference Protocol's messages, built at run time from a private descriptor pool.

tritonclient's generated stubs register `inference.*` in protobuf's default pool; stubs of
our own would define the same full names from other files and clash ("duplicate symbol")
in any process importing both (our tests, users embedding the server). So the protos under
protos/inference/ are compiled to one serialized FileDescriptorSet (grpc_service.desc,
committed beside them) and loaded here into a pool of our own.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PROTO_FILES = ("inference/model_config.proto", "inference/grpc_service.proto")
DESC_NAME = "grpc_service.desc"
DESC_PATH = PROTOS / "inference" / DESC_NAME
SERVICE = "inference.GRPCInferenceService"


def generate(out: Path, src: Path = PROTOS) -> Path:
    """Compile the inference protos (with imports) into out/grpc_service.desc; returns its path."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    target = out / DESC_NAME
    args = ["protoc", f"-I{src}", f"-I{include}", "--include_imports",
            f"--descriptor_set_out={target}", *PROTO_FILES]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return target


def _desc_bytes() -> bytes:
    """The committed descriptor set, from the installed `inference` package or the source tree."""
    try:
        from importlib.resources import files

        return (files("inference") / DESC_NAME).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return DESC_PATH.read_bytes()


@dataclass(frozen=True)
class Messages:
    """The message classes of the protocol, from the private pool, looked up by short name."""

    pool: descriptor_pool.DescriptorPool
    classes: dict[str, type]

    def __getattr__(self, name: str) -> Any:
        """Message class by its short name (e.g. pb.ModelInferRequest)."""
        try:
            return self.classes[name]
        except KeyError:
            raise AttributeError(name) from None

    def method_types(self, method: str) -> tuple[type, type, bool, bool]:
        """(request class, response class, client streaming, server streaming) of one RPC."""
        m = self.pool.FindServiceByName(SERVICE).methods_by_name[method]
        return (message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
                m.client_streaming, m.server_streaming)

    def method_names(self) -> list[str]:
        """Every RPC the service declares, in declaration order."""
        return [m.name for m in self.pool.FindServiceByName(SERVICE).methods]


@functools.cache
def messages() -> Messages:
    """Load the descriptor set into a fresh private pool (once per process) and build the classes."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(_desc_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    classes: dict[str, type] = {}
    for f in fds.file:
        fd = pool.FindFileByName(f.name)
        for name, desc in fd.message_types_by_name.items():
            classes[name] = message_factory.GetMessageClass(desc)
    return Messages(pool=pool, classes=classes)


def stale() -> bool:
    """True when the committed descriptor set differs from a fresh compile of the protos."""
    with tempfile.TemporaryDirectory() as tmp:
        return generate(Path(tmp)).read_bytes() != DESC_PATH.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate protos/inference/grpc_service.desc (or into --out)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DESC_PATH.parent, help="output folder")
    args = ap.parse_args(argv)
    print(generate(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
