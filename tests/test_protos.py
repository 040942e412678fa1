"""The committed rnnserve.v1 stubs are exactly what `make protos` generates from the .proto."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _protogen():
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "scripts" / "protogen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    made = _protogen().generate(tmp_path)
    assert made, "protogen generated nothing"
    names = {str(p) for p in made}
    assert {"rnnserve/v1/rnnserve_pb2.py", "rnnserve/v1/rnnserve_pb2_grpc.py", "rnnserve/v1/rnnserve_pb2.pyi"} <= names
    stale = [p for p in made if (tmp_path / p).read_bytes() != (ROOT / "protos" / p).read_bytes()]
    assert not stale, f"stale stubs, run `make protos`: {', '.join(map(str, stale))}"
