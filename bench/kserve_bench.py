"""Ping-pong over the Open Inference Protocol: our KServe endpoint against its ceiling, same run.

64 sequences (by default), each on its own ModelStreamInfer stream, send one token per
request and wait for its logits before sending the next. Three servers, each in its own
process, driven by the same load generator (this process):
  - null:   a do-nothing server of the same protocol (answers at once with zero logits);
  - kserve: rnn-serve's KServe endpoint (Triton sequence ids, real model and batcher);
  - native: rnn-serve's own protocol (rnnserve.v1 Session streams) on the same server.
Both servers stay up; the kinds run in turn for several rounds (a busy shared machine then
slows all of them alike). Prints the median steps/s, p50/p99 latency of each, and
kserve / null (goal >= 0.7).

    .venv/bin/python bench/kserve_bench.py --models models [--model NAME] [--sessions 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _procs


# ----------------------------------------------------------------------------- null server
async def serve_null(vocab: int, port_file: Path) -> None:
    """A do-nothing server of the KServe protocol: parses each request, answers zero logits."""
    import grpc
    from rnnserve.server.kserve.codec import read_tokens
    from rnnserve.server.kserve.descriptors import SERVICE, messages

    pb = messages()
    req_cls, resp_cls = pb.ModelInferRequest, pb.ModelStreamInferResponse

    async def stream(requests, context):
        async for req in requests:
            tokens = read_tokens(req)  # (T,)
            resp = resp_cls()
            r = resp.infer_response
            r.model_name, r.id = req.model_name, req.id
            out = r.outputs.add()
            out.name, out.datatype = "logits", "FP32"
            out.shape.extend((1, tokens.shape[0], vocab))
            r.raw_output_contents.append(bytes(4 * vocab * tokens.shape[0]))
            yield resp

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=req_cls.FromString,
            response_serializer=resp_cls.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(json.dumps({"port": port}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


# ----------------------------------------------------------------------------- clients
async def kserve_worker(channel, model: str, seq_id: int, steps: int, vocab: int,
                        lat: list[float], start_evt: asyncio.Event) -> None:
    """One sequence on its own ModelStreamInfer stream: send a token, wait for its answer, repeat."""
    from tritonclient.grpc import service_pb2 as tpb

    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=tpb.ModelInferRequest.SerializeToString,
        response_deserializer=tpb.ModelStreamInferResponse.FromString)()
    rng = np.random.default_rng(seq_id)
    await start_evt.wait()
    for i in range(steps):
        req = tpb.ModelInferRequest(model_name=model, id=str(i))
        t = req.inputs.add()
        t.name, t.datatype = "tokens", "INT64"
        t.shape.extend((1, 1))
        req.raw_input_contents.append(np.array([rng.integers(vocab)], "<i8").tobytes())
        req.parameters["sequence_id"].int64_param = seq_id
        req.parameters["sequence_start"].bool_param = i == 0
        req.parameters["sequence_end"].bool_param = i == steps - 1
        t0 = time.perf_counter()
        await call.write(req)
        resp = await call.read()
        lat.append(time.perf_counter() - t0)
        if resp.error_message:
            raise RuntimeError(f"sequence {seq_id} step {i}: {resp.error_message}")
    await call.done_writing()


async def native_worker(channel, model: str, seq_id: int, steps: int, vocab: int,
                        lat: list[float], start_evt: asyncio.Event) -> None:
    """One session on the native Session stream: feed a token, wait for its logits, repeat."""
    from rnnserve.v1 import rnnserve_pb2 as pb

    call = channel.stream_stream(
        "/rnnserve.v1.RnnServe/Session",
        request_serializer=pb.SessionRequest.SerializeToString,
        response_deserializer=pb.SessionResponse.FromString)()
    await call.write(pb.SessionRequest(request_id=0, open=pb.Open(model=pb.ModelRef(name=model))))
    opened = await call.read()
    if opened.WhichOneof("kind") != "opened":
        raise RuntimeError(f"native open failed: {opened}")
    rng = np.random.default_rng(seq_id)
    await start_evt.wait()
    for i in range(steps):
        req = pb.SessionRequest(request_id=i + 1, feed=pb.Feed(
            tokens=pb.TokenIds(ids=[int(rng.integers(vocab))]), output=pb.OUTPUT_LAST, logits=True))
        t0 = time.perf_counter()
        await call.write(req)
        resp = await call.read()
        lat.append(time.perf_counter() - t0)
        if resp.WhichOneof("kind") != "fed":
            raise RuntimeError(f"native session {seq_id} step {i}: {resp}")
    await call.write(pb.SessionRequest(request_id=steps + 1, close=pb.Close()))
    await call.done_writing()


async def drive(kind: str, port: int, model: str, sessions: int, steps: int, vocab: int) -> dict:
    """Run `sessions` ping-pong workers of one kind against 127.0.0.1:port; steps/s and latency."""
    import grpc

    worker = native_worker if kind == "native" else kserve_worker
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(sessions, 8))]
    lat: list[float] = []
    start = asyncio.Event()
    tasks = [asyncio.create_task(worker(channels[i % len(channels)], model, 1000 + i, steps, vocab,
                                        lat, start)) for i in range(sessions)]
    await asyncio.sleep(0.5)  # let the streams open
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    ms = np.asarray(lat) * 1e3
    return {"kind": kind, "steps_per_s": len(lat) / wall, "lat_ms": ms}


# ----------------------------------------------------------------------------- orchestration
def start_process(cmd: list[str], port_file: Path, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start a server process and wait for it to write its port file."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())["port"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a server process and wait for it."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    """CLI: start both servers, alternate the three kinds for several rounds, print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default=None, help="model name (default: an Elman one first, then by name)")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="tokens per sequence per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs null, kserve, native in turn")
    ap.add_argument("--serve-null", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_null:
        asyncio.run(serve_null(args.vocab, args.serve_null))
        return 0
    found = _procs.find_model(args.models, args.model)
    if found is None:
        raise SystemExit(f"no model {args.model or ''} under {args.models}")
    model, vocab = found[0]["name"], len(found[0]["vocab"])
    kinds = ("null", "kserve", "native")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        null_pf, serve_pf = Path(tmp) / "null.json", Path(tmp) / "serve.json"
        env = {**os.environ, "RNNSERVE_LOG_LEVEL": "WARNING"}
        procs = []
        try:
            p, null_port = start_process([sys.executable, __file__, "--serve-null", str(null_pf),
                                          "--vocab", str(vocab)], null_pf)
            procs.append(p)
            p, port = start_process([sys.executable, "-m", "rnnserve.server.main", "--models", str(args.models),
                                     "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                                     "--port-file", str(serve_pf)], serve_pf, env)
            procs.append(p)
            ports = {"null": null_port, "kserve": port, "native": port}
            pids = {"null": procs[0].pid, "kserve": procs[1].pid, "native": procs[1].pid}
            for _ in range(args.rounds):  # alternating, so load from neighbours hits all kinds alike
                for kind in kinds:
                    cpu0 = cpu_seconds(pids[kind])
                    r = asyncio.run(drive(kind, ports[kind], model, args.sessions, args.steps, vocab))
                    r["server_cpu_us"] = (cpu_seconds(pids[kind]) - cpu0) / len(r["lat_ms"]) * 1e6
                    runs[kind].append(r)
        finally:
            for p in procs:
                stop_process(p)
    print(f"model {model} (vocab {vocab}), {args.sessions} sequences, one ModelStreamInfer/Session stream "
          f"each, ping-pong 1 token; {args.rounds} rounds x {args.steps} steps per sequence; "
          f"cpus={os.cpu_count()}")
    print(f"{'server':<8} {'steps/s (median)':>17} {'min':>7} {'max':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU us/step':>19}")
    med = {}
    for kind in kinds:
        rates = [r["steps_per_s"] for r in runs[kind]]
        med[kind] = float(np.median(rates))
        lat = np.concatenate([r["lat_ms"] for r in runs[kind]])
        print(f"{kind:<8} {med[kind]:>17.0f} {min(rates):>7.0f} {max(rates):>7.0f} "
              f"{np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f} "
              f"{np.median([r['server_cpu_us'] for r in runs[kind]]):>19.0f}")
    per_round = [k["steps_per_s"] / n["steps_per_s"] for k, n in zip(runs["kserve"], runs["null"])]
    print(f"kserve / null = {med['kserve'] / med['null']:.2f} (goal >= 0.70; per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}); kserve / native = {med['kserve'] / med['native']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
