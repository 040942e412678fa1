"""Batch export speed: 100 checkpoints of one architecture exported and verified end to end.

Setup (not timed): N seeded random checkpoints written with trainer.checkpoint.save.
Timed: `rnn-export batch` as a subprocess (process start, torch import, every check of the single
export: onnx.checker, step and sequence parity against PyTorch, the written folder verified), then
every published version verified again with verify_version_dir as a server would, then a rerun that
must skip everything. Goal (issue 6): export + verify <= 60 s on the 2-core machine.
Reference measured in the same run: one traced torch.onnx.export (TorchScript, step graph only, no
checks) of the same architecture, times N: what "trace per checkpoint" would cost at the least.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
from rnnserve.server.contract import verify_version_dir
from rnnserve.trainer import checkpoint
from rnnserve.trainer.model import ModelConfig, RNNModel

VOCAB = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
GOAL_S = 60.0


def make_checkpoints(folder: Path, n: int, config: ModelConfig) -> list[Path]:
    """n seeded random checkpoints of one architecture."""
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = RNNModel(config)
        paths.append(checkpoint.save(folder / f"ckpt-{i:03d}.pt", {
            "config": config.to_dict(), "vocab": VOCAB, "model": model.state_dict(),
            "metrics": {"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0}}))
    return paths


def traced_reference(config: ModelConfig) -> float:
    """Seconds of one warm TorchScript-traced export of the step graph alone (no sequence graph, no checks)."""
    import warnings

    model = RNNModel(config).eval()

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, tokens: torch.Tensor, state: torch.Tensor):
            return self.m.step(tokens, state)

    args = (torch.zeros(2, dtype=torch.long), torch.zeros(2, model.state_size))
    best = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.onnx.export(Step(), args, io.BytesIO(), dynamo=False, opset_version=17,
                              input_names=["tokens", "state"], output_names=["logits", "state_out"],
                              dynamic_axes={"tokens": {0: "batch"}, "state": {0: "batch"}})
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=100, help="checkpoints (default 100)")
    p.add_argument("--cell", choices=("elman", "gru", "lstm"), default="elman")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-reference", action="store_true", help="skip the traced-export reference")
    a = p.parse_args()
    for flag, value in (("-n", a.n), ("--hidden", a.hidden), ("--layers", a.layers), ("--jobs", a.jobs)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    config = ModelConfig(vocab_size=len(VOCAB), cell=a.cell, hidden_size=a.hidden, layers=a.layers, embed_size=64)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        work = Path(tmp)
        paths = make_checkpoints(work / "ckpts", a.n, config)
        listing = work / "list.txt"
        listing.write_text("".join(f"{q}\n" for q in paths))
        repo, report = work / "repo", work / "report.json"
        cmd = [str(Path(sys.executable).parent / "rnn-export"), "batch", "--from-file", str(listing),
               "--repo", str(repo), "--jobs", str(a.jobs), "--name", "bench", "--no-progress"]
        t0 = time.perf_counter()
        r = subprocess.run([*cmd, "--report", str(report)], capture_output=True, text=True, check=False)
        export_s = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            return 1
        rows = json.loads(report.read_text())["results"]
        t0 = time.perf_counter()
        for row in rows:
            verify_version_dir(row["path"])
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r2 = subprocess.run([*cmd, "--report", str(report)], capture_output=True, text=True, check=False)
        rerun_s = time.perf_counter() - t0
        skipped = json.loads(report.read_text())["counts"]["skipped"]
    total = export_s + verify_s
    in_worker = sorted(row["seconds"] for row in rows)
    ref = None if a.no_reference else traced_reference(config)
    out = {"checkpoints": a.n, "arch": f"{a.cell} H={a.hidden} layers={a.layers} V={len(VOCAB)}", "jobs": a.jobs,
           "export_s": round(export_s, 2), "verify_s": round(verify_s, 2), "total_s": round(total, 2),
           "goal_s": GOAL_S, "total_over_goal": round(total / GOAL_S, 3),
           "per_export_median_s": round(in_worker[len(in_worker) // 2], 3),
           "worker_busy_s": round(sum(in_worker), 2),
           "rerun_s": round(rerun_s, 2), "rerun_skipped": skipped, "rerun_rc": r2.returncode,
           "traced_step_only_s_each": None if ref is None else round(ref, 3),
           "traced_step_only_x_n_s": None if ref is None else round(ref * a.n, 2)}
    print(json.dumps(out))
    print(f"export + verify of {a.n} checkpoints ({out['arch']}, --jobs {a.jobs}): {total:.1f} s "
          f"= {total / GOAL_S:.2f}x the {GOAL_S:.0f} s goal ({'met' if total <= GOAL_S else 'MISSED'}); "
          f"median {out['per_export_median_s'] * 1000:.0f} ms per export in a worker; rerun {rerun_s:.1f} s "
          f"({skipped}/{a.n} skipped)")
    if ref is not None:
        print(f"reference, same run: one traced torch.onnx.export of the step graph alone takes {ref * 1000:.0f} ms "
              f"(x{a.n} = {ref * a.n:.1f} s, before any sequence graph or check)")
    return 0 if total <= GOAL_S and skipped == a.n and r2.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
