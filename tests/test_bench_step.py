"""bench/step_bench.py runs against the server as it is: it drives the engine and both servicers in process
through their own entry points, which a refactor of the serving path could break without any other test
noticing (the benches are not run by `make test`)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("onnxruntime", "engine", "native", "kserve", "onnxruntime@64", "engine@64")


def test_step_bench_reports_every_path(tiny_repo: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_bench.py"), "--models", str(tiny_repo),
                          "--model", "tiny", "--steps", "64", "--rounds", "1"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"^(\S+)\s+([\d.]+) us\s+(-?[\d.]+) us\s+[\d.]+x$", out.stdout, re.MULTILINE)}
    assert set(rows) == set(PATHS), out.stdout
    assert all(cpu > 0 for cpu, _ in rows.values()), out.stdout
    assert rows["onnxruntime"][1] == 0.0 and rows["onnxruntime@64"][1] == 0.0  # each ceiling against itself
