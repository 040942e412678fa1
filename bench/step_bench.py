"""What one step costs inside the server, without the network: CPU per step of each serving path, in process,
against onnxruntime alone running the same call.

Run with `make bench` or `.venv/bin/python bench/step_bench.py`. The end-to-end benches (serve_bench.py,
kserve_bench.py) compare whole servers over gRPC, where the load generator shares the cores and one run
differs from the next by more than a change to the step path saves. This one runs the engine and the
servicers in this process on the shipped model and reads the process's CPU clock around N steps, so what
it reports is the Python the server adds per step:
- onnxruntime: the served `model.onnx` session called with one row (the ceiling);
- engine: `Engine.feed` of one token, output last, top-k 5 (the ping-pong step below the protocols);
- native: the rnnserve.v1 servicer's feed, a `pb.Feed` in, a `FeedResult` message out, serialised;
- kserve: `ModelInfer` of one token on a sequence (Triton's unary call), the response serialised;
- engine@64: 64 sessions feeding one token each at once (one batched call), per step, against
  onnxruntime's batch-64 call per row.
Each figure is the best of --rounds rounds; the ratio is onnxruntime ÷ the path (1.0: no Python at all).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rnnserve.v1.rnnserve_pb2 as pb
from rnnserve.server import kserve, loops
from rnnserve.server.engine import Engine
from rnnserve.server.metrics import Metrics
from rnnserve.server.servicer import RnnServeServicer
from rnnserve.server.settings import parse

TOP_K = 5


def cpu_per_call(fn, n: int, rounds: int) -> float:
    """Best over rounds of the process CPU seconds per call of a synchronous fn."""
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c) / n)
    return best


async def acpu_per_call(fn, n: int, rounds: int, per: int = 1) -> float:
    """Best over rounds of the process CPU seconds per unit (per: units a call of the coroutine fn does)."""
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for _ in range(n):
            await fn()
        best = min(best, (time.process_time() - c) / (n * per))
    return best


async def main(args: argparse.Namespace) -> dict[str, float]:
    settings = parse(["--models", str(args.models), "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                      "--session-store", "memory"], {})
    engine = Engine(settings, Metrics())
    await engine.start()
    try:
        return await measure(engine, settings, args)
    finally:
        await engine.stop()


async def measure(engine: Engine, settings, args: argparse.Namespace) -> dict[str, float]:
    from tritonclient.grpc import service_pb2 as tpb  # the request bytes a Triton client sends

    n, rounds = args.steps, args.rounds
    mv = engine.model(args.model)
    sid = (await engine.open(args.model)).session_id
    native = RnnServeServicer(engine)
    ks = kserve.KServeServicer(engine, settings, None)
    feed = pb.Feed(tokens=pb.TokenIds(ids=[3]), output=pb.OUTPUT_LAST, top_k=TOP_K)

    def infer_request(start: bool):
        req = tpb.ModelInferRequest(model_name=args.model)
        t = req.inputs.add()
        t.name, t.datatype = "tokens", "INT64"
        t.shape.extend((1, 1))
        req.raw_input_contents.append(np.array([3], "<i8").tobytes())
        req.parameters["sequence_id"].int64_param = 7
        req.parameters["sequence_start"].bool_param = start
        return kserve.messages().ModelInferRequest.FromString(req.SerializeToString())

    await ks.ModelInfer(infer_request(True), None)
    req = infer_request(False)
    state = np.zeros((1, mv.state_size), np.float32)
    tok = np.array([3], np.int64)
    names = [mv.io_names[1], "state_out"]

    async def engine_step():
        await engine.feed(sid, [3], "last", top_k=TOP_K, logits=False)

    async def native_step():
        (await native._feed(sid, feed)).SerializeToString()

    async def kserve_step():
        (await ks.ModelInfer(req, None)).SerializeToString()

    for f in (engine_step, native_step, kserve_step):  # warm up every path
        for _ in range(200):
            await f()
    out = {"onnxruntime": cpu_per_call(lambda: mv.step.run(names, {"tokens": tok, "state": state}), n, rounds)}
    out["engine"] = await acpu_per_call(engine_step, n, rounds)
    out["native"] = await acpu_per_call(native_step, n, rounds)
    out["kserve"] = await acpu_per_call(kserve_step, n, rounds)

    sids = [(await engine.open(args.model)).session_id for _ in range(64)]

    async def batch_step():
        await asyncio.gather(*(engine.feed(s, [3], "last", top_k=TOP_K, logits=False) for s in sids))

    for _ in range(20):
        await batch_step()
    state64, tok64 = np.zeros((64, mv.state_size), np.float32), np.full(64, 3, np.int64)
    out["onnxruntime@64"] = cpu_per_call(lambda: mv.step.run(names, {"tokens": tok64, "state": state64}),
                                         max(1, n // 64), rounds) / 64
    out["engine@64"] = await acpu_per_call(batch_step, max(1, n // 64), rounds, per=64)
    return out


def report(out: dict[str, float]) -> None:
    print(f"{'path':16s} {'CPU per step':>13s} {'over onnxruntime':>17s} {'onnxruntime / path':>19s}")
    for name in ("onnxruntime", "engine", "native", "kserve", "onnxruntime@64", "engine@64"):
        ceiling = out["onnxruntime@64" if name.endswith("@64") else "onnxruntime"]
        print(f"{name:16s} {out[name] * 1e6:10.1f} us {(out[name] - ceiling) * 1e6:14.1f} us "
              f"{ceiling / out[name]:18.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="model repository (the shipped one)")
    ap.add_argument("--model", default="shakespeare", help="model to step (default: the shipped Elman)")
    ap.add_argument("--steps", type=int, default=3000, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each figure is the best")
    a = ap.parse_args()
    report(loops.run(lambda: main(a), "auto"))
