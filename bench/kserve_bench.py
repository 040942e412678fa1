"""Ping-pong and unary ModelInfer over the Open Inference Protocol: our KServe endpoint against its ceiling.

Three servers, each in its own process, driven by the same load generator (this process):
  - null:   a do-nothing server of the same protocol (answers ModelStreamInfer and unary ModelInfer
            at once with zero logits);
  - null+ort: the same server running the model's model.onnx once per token on its event loop (one
            intra-op thread, as rnn-serve; from the initial state, nothing kept) and answering its logits:
            what a server that runs this model one call at a time could reach, a bound at one sequence
            and for unary calls (rnn-serve batches streams, so at 64 sequences it is no bound);
  - kserve: rnn-serve's KServe endpoint (Triton sequence ids, real model and batcher);
  - native: rnn-serve's own protocol (rnnserve.v1 Session streams) on the same server (stream mode only).
Two modes, each at several concurrencies:
  - stream (--sessions, default 64 and 1): each sequence on its own ModelStreamInfer stream sends
    one token per request and waits for its logits before sending the next;
  - unary (--clients, default 16 and 64): each client runs one sequence of unary ModelInfer calls
    (sequence_id; sequence_start on the first, sequence_end on the last), one call at a time, as the
    KServe Python SDK and perf_analyzer's non-streaming mode do.
Both servers stay up; the kinds run in turn for several rounds (a busy shared machine then slows all
of them alike). Prints, per point, the median rate, p50/p99 latency, the server's CPU per call, and
kserve / null (goals: unary >= 0.7x; stream >= 0.9x at 64 sequences and >= 0.8x at 1).

    .venv/bin/python bench/kserve_bench.py --models models [--model NAME] [--mode stream|unary|both]
        [--sessions 64 1] [--clients 16 64] [--rounds 5] [--serve-args "--session-store memory"]
        [--event-loop auto|uvloop|asyncio]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _ceilings
import _procs
from rnnserve.server import loops

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
GOALS = {("stream", 64): 0.9, ("stream", 1): 0.8, ("unary", 16): 0.7, ("unary", 64): 0.7}


# ----------------------------------------------------------------------------- null server
async def serve_null(vocab: int, port_file: Path, model_dir: Path | None = None) -> None:
    """A do-nothing server of the KServe protocol: parses each request, answers zero logits (or, with
    model_dir, the logits of one onnxruntime step per token)."""
    import grpc
    from rnnserve.server.kserve.codec import read_tokens
    from rnnserve.server.kserve.descriptors import SERVICE, messages

    pb = messages()
    req_cls, resp_cls, stream_cls = pb.ModelInferRequest, pb.ModelInferResponse, pb.ModelStreamInferResponse
    steps = _ceilings.step_per_token(model_dir) if model_dir is not None else None

    def answer(req, r) -> None:
        tokens = read_tokens(req)  # T ids
        r.model_name, r.id = req.model_name, req.id
        out = r.outputs.add()
        out.name, out.datatype = "logits", "FP32"
        out.shape.extend((1, len(tokens), vocab))
        r.raw_output_contents.append(b"".join(x.tobytes() for x in steps(tokens)) if steps is not None
                                     else bytes(4 * vocab * len(tokens)))

    async def stream(requests, context):
        async for req in requests:
            resp = stream_cls()
            answer(req, resp.infer_response)
            yield resp

    async def unary(req, context):
        resp = resp_cls()
        answer(req, resp)
        return resp

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=req_cls.FromString, response_serializer=stream_cls.SerializeToString),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=req_cls.FromString, response_serializer=resp_cls.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port}))
    tmp.replace(port_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


# ----------------------------------------------------------------------------- clients
def _request(model: str, seq_id: int, i: int, steps: int, token: int):
    """One Triton request: a 1-token INT64 input and the sequence parameters of step i of `steps`."""
    from tritonclient.grpc import service_pb2 as tpb

    req = tpb.ModelInferRequest(model_name=model, id=str(i))
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend((1, 1))
    req.raw_input_contents.append(np.array([token], "<i8").tobytes())
    req.parameters["sequence_id"].int64_param = seq_id
    req.parameters["sequence_start"].bool_param = i == 0
    req.parameters["sequence_end"].bool_param = i == steps - 1
    return req


async def kserve_worker(channel, model: str, seq_id: int, steps: int, vocab: int,
                        lat: list[float], start_evt: asyncio.Event) -> None:
    """One sequence on its own ModelStreamInfer stream: send a token, wait for its answer, repeat."""
    from tritonclient.grpc import service_pb2 as tpb

    call = channel.stream_stream(STREAM_INFER, request_serializer=tpb.ModelInferRequest.SerializeToString,
                                 response_deserializer=tpb.ModelStreamInferResponse.FromString)()
    rng = np.random.default_rng(seq_id)
    await start_evt.wait()
    for i in range(steps):
        req = _request(model, seq_id, i, steps, int(rng.integers(vocab)))
        t0 = time.perf_counter()
        await call.write(req)
        resp = await call.read()
        lat.append(time.perf_counter() - t0)
        if resp.error_message:
            raise RuntimeError(f"sequence {seq_id} step {i}: {resp.error_message}")
    await call.done_writing()


async def unary_worker(channel, model: str, seq_id: int, steps: int, vocab: int,
                       lat: list[float], start_evt: asyncio.Event) -> None:
    """One sequence as unary ModelInfer calls, one at a time (a failed call raises its AioRpcError)."""
    from tritonclient.grpc import service_pb2 as tpb

    call = channel.unary_unary(INFER, request_serializer=tpb.ModelInferRequest.SerializeToString,
                               response_deserializer=tpb.ModelInferResponse.FromString)
    rng = np.random.default_rng(seq_id)
    await start_evt.wait()
    for i in range(steps):
        req = _request(model, seq_id, i, steps, int(rng.integers(vocab)))
        t0 = time.perf_counter()
        resp = await call(req)
        lat.append(time.perf_counter() - t0)
        if len(resp.raw_output_contents) != 1:
            raise RuntimeError(f"sequence {seq_id} step {i}: no logits in {resp}")


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


WORKERS = {"native": native_worker, "stream": kserve_worker, "unary": unary_worker}


async def drive(worker, port: int, model: str, sessions: int, steps: int, vocab: int) -> dict:
    """Run `sessions` workers against 127.0.0.1:port, one call at a time each; calls/s and latency."""
    import grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(sessions, 8))]
    for ch in channels:
        await ch.channel_ready()
    lat: list[float] = []
    start = asyncio.Event()
    tasks = [asyncio.create_task(worker(channels[i % len(channels)], model, 1000 + i, steps, vocab,
                                        lat, start)) for i in range(sessions)]
    await asyncio.sleep(0.3)  # let the streams open
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"rate": len(lat) / wall, "lat_ms": np.asarray(lat) * 1e3}


# ----------------------------------------------------------------------------- orchestration
def start_null(vocab: int, event_loop: str = "auto", model_dir: Path | None = None) -> _procs.ServerProc:
    """The do-nothing KServe server of this file (null+ort with model_dir), in its own process, on rnn-serve's
    event loop."""
    model = ["--null-model", str(model_dir)] if model_dir is not None else []
    return _procs.start("null+ort" if model else "null",
                        [sys.executable, __file__, "--vocab", str(vocab), "--event-loop", event_loop, *model],
                        port_file_flag="--serve-null")


def report(mode: str, n: int, runs: dict[str, list[dict]], steps: int, rounds: int) -> tuple[str, bool]:
    """Print one point's table; return its summary line and whether it met its goal."""
    unit = "calls" if mode == "unary" else "steps"
    what = (f"{n} clients, unary ModelInfer" if mode == "unary"
            else f"{n} sequence(s), one ModelStreamInfer/Session stream each")
    print(f"\n{what}, 1 token per call; {rounds} rounds x {steps} calls per {'client' if mode == 'unary' else 'sequence'}")
    print(f"{'server':<8} {unit + '/s (median)':>17} {'min':>7} {'max':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU us/' + unit[:-1]:>19}")
    med = {}
    for kind, rs in runs.items():
        rates = [r["rate"] for r in rs]
        med[kind] = float(np.median(rates))
        lat = np.concatenate([r["lat_ms"] for r in rs])
        print(f"{kind:<8} {med[kind]:>17.0f} {min(rates):>7.0f} {max(rates):>7.0f} "
              f"{np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f} "
              f"{np.median([r['server_cpu_us'] for r in rs]):>19.0f}")
    ratio, goal = med["kserve"] / med["null"], GOALS.get((mode, n))
    per_round = ", ".join(f"{k['rate'] / z['rate']:.2f}" for k, z in zip(runs["kserve"], runs["null"]))
    extra = f"; kserve / native = {med['kserve'] / med['native']:.2f}" if "native" in med else ""
    bound = f"; null+ort / null {med['null+ort'] / med['null']:.2f}" if "null+ort" in med else ""
    print(f"kserve / null = {ratio:.2f} (per round: {per_round}){extra}{bound}")
    ok = goal is None or ratio >= goal
    want = f"goal >= {goal:.2f}" if goal else "no goal"
    return f"{mode:<6} @{n:<4} kserve / null {ratio:5.2f}  ({want}: {'PASS' if ok else 'MISS'}){bound}", ok


def main(argv: list[str] | None = None) -> int:
    """CLI: start both servers, alternate the kinds of every point for several rounds, print medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default=None, help="model name (default: an Elman one first, then by name)")
    ap.add_argument("--mode", choices=("stream", "unary", "both"), default="both")
    ap.add_argument("--sessions", type=_procs.count, nargs="+", default=[64, 1], help="stream mode: sequences")
    ap.add_argument("--clients", type=_procs.count, nargs="+", default=[16, 64], help="unary mode: concurrent clients")
    ap.add_argument("--calls", type=_procs.count, default=6400, help="calls per point per kind per round (all clients)")
    ap.add_argument("--rounds", type=_procs.count, default=5, help="rounds; each runs every kind of every point in turn")
    ap.add_argument("--serve-args", default="", help="extra rnn-serve flags, e.g. \"--session-store memory\"")
    _procs.add_event_loop_flag(ap, "do-nothing server's")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--serve-null", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--null-model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_null:
        loops.run(lambda: serve_null(args.vocab, args.serve_null, args.null_model), args.event_loop)
        return 0
    found = _procs.find_model(args.models, args.model)
    if found is None:
        raise SystemExit(f"no model {args.model or ''} under {args.models}")
    model, vocab = found[0]["name"], len(found[0]["vocab"])
    points = ([("stream", n) for n in args.sessions] if args.mode != "unary" else []) + \
             ([("unary", n) for n in args.clients] if args.mode != "stream" else [])
    kinds = {"stream": ("null", "null+ort", "kserve", "native"), "unary": ("null", "null+ort", "kserve")}
    runs = {p: {k: [] for k in kinds[p[0]]} for p in points}
    steps = {p: max(2, args.calls // p[1]) for p in points}
    print(f"model {model} (vocab {vocab}); event loop {loops.loop_factory(args.event_loop)[0]} (both servers); "
          f"cpus={os.cpu_count()}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    servers: dict[str, _procs.ServerProc] = {}
    try:
        servers["null"] = start_null(vocab, args.event_loop)
        servers["null+ort"] = start_null(vocab, args.event_loop, found[1])
        servers["kserve"] = _procs.start_rnn_serve(args.models, *shlex.split(args.serve_args),
                                                   event_loop=args.event_loop)
        for _ in range(args.rounds):  # alternating, so load from neighbours hits all kinds alike
            for p in points:
                for kind in kinds[p[0]]:
                    srv = servers[kind if kind.startswith("null") else "kserve"]
                    worker = WORKERS["native" if kind == "native" else p[0]]
                    cpu0 = srv.cpu_s()
                    r = asyncio.run(drive(worker, srv.port, model, p[1], steps[p], vocab))
                    r["server_cpu_us"] = (srv.cpu_s() - cpu0) / len(r["lat_ms"]) * 1e6
                    runs[p][kind].append(r)
    finally:
        for srv in servers.values():
            srv.stop()
    lines = [report(mode, n, runs[mode, n], steps[mode, n], args.rounds) for mode, n in points]
    print(f"\nsummary (load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    for line, _ in lines:
        print("  " + line)
    return 1 if args.strict and not all(ok for _, ok in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
