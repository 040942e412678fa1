"""Streaming throughput of a vector model: frames/s with 64 and 1,000 concurrent devices, against a plain
onnxruntime loop of its step graph (model.onnx) at the same batch size, in the same run.

Each device is one sequence that sends one frame per request and waits for the answer before sending the
next (a device streaming its readings), over two protocols on the same rnn-serve process:
  - kserve: its own ModelStreamInfer stream, `inputs` FP32 [1, 1, F] with Triton's sequence parameters,
    answered with `probabilities` (or a forecaster's `mean`, `spread`);
  - native: its own rnnserve.v1 Session stream, Feed.frames of one frame, OUTPUT_LAST.
The ceiling is onnxruntime alone running model.onnx on B rows per call (B = the device count), the state
fed back: what the server would reach if nothing but the graph cost anything. The frames are the test
split of the shipped model's data (device i streams utterance i, cycling its frames). The server runs in
its own process; this process is the load generator (one asyncio loop). Each point is run --rounds times,
the protocols interleaved; the best round is reported (contention from neighbours only slows things).

    .venv/bin/python bench/series_bench.py [--models models] [--model japanese-vowels]
        [--devices 64 1000] [--frames 6400] [--chunk 1] [--rounds 3] [--serve-args "..."]

--chunk K sends K frames per request instead (a device that buffers): the per-request cost is shared by K.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _procs
from kserve_bench import STREAM_INFER
from serve_bench import OrtLoop, _own_cpu

NATIVE_SESSION = "/rnnserve.v1.RnnServe/Session"


class VectorOrtLoop(OrtLoop):
    """OrtLoop (both threadings, the better counting) for a vector model: `inputs` (B, F) float32 frames."""

    def rate(self, batch: int, seconds: float, frames: np.ndarray | None = None) -> float:
        """Frames/s of model.onnx at `batch` rows per call, the state fed back, `seconds` in all."""
        F = self.meta["input"]["features"]
        x = frames[np.arange(batch) % len(frames)] if frames is not None else np.zeros((batch, F), np.float32)
        best = 0.0
        for sess in self.sessions:
            state = np.tile(np.asarray(self.meta["initial_state"], np.float32), (batch, 1))  # (B, S)
            for _ in range(3):
                _, state = sess.run(None, {"inputs": x, "state": state})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(self.sessions):
                _, state = sess.run(None, {"inputs": x, "state": state})  # outputs (B, O), state (B, S)
                n += 1
            best = max(best, n * batch / (time.perf_counter() - t0))
        return best


def device_frames(csv: Path, features: int) -> list[np.ndarray]:
    """The utterances of the test split, (T_i, F) float32 each (the client's CSV reader: no trainer import)."""
    from rnnserve.client.frames_csv import read_csv

    series = [s.frames for s in read_csv(csv).series]
    if series[0].shape[1] != features:
        raise SystemExit(f"{csv} has {series[0].shape[1]} features, the model takes {features}")
    return series


def payloads(frames: np.ndarray, requests: int, chunk: int) -> list[np.ndarray]:
    """A device's requests' frames, (chunk, F) each: its utterance's frames in order, cycling."""
    return [frames[np.arange(i * chunk, (i + 1) * chunk) % len(frames)] for i in range(requests)]


def kserve_requests(model: str, seq_id: int, sends: list[np.ndarray]) -> list:
    """A device's ModelInferRequests, one per payload: START on the first and END on the last."""
    from tritonclient.grpc import service_pb2 as tpb

    out = []
    for i, x in enumerate(sends):
        req = tpb.ModelInferRequest(model_name=model, id=str(i))
        t = req.inputs.add()
        t.name, t.datatype = "inputs", "FP32"
        t.shape.extend((1, *x.shape))
        req.raw_input_contents.append(x.astype("<f4").tobytes())
        req.parameters["sequence_id"].int64_param = seq_id
        req.parameters["sequence_start"].bool_param = i == 0
        req.parameters["sequence_end"].bool_param = i == len(sends) - 1
        out.append(req)
    return out


async def kserve_device(channel, model: str, seq_id: int, sends: list[np.ndarray], lat: list[float],
                        ready, start: asyncio.Event) -> None:
    """One device on its own ModelStreamInfer stream: a frame, its answer, the next frame."""
    from tritonclient.grpc import service_pb2 as tpb

    reqs = kserve_requests(model, seq_id, sends)
    call = channel.stream_stream(STREAM_INFER, request_serializer=tpb.ModelInferRequest.SerializeToString,
                                 response_deserializer=tpb.ModelStreamInferResponse.FromString)()
    for i, req in enumerate(reqs):
        if i == 1:  # the sequence is started (its first frame answered) before the clock, as a native open is
            ready()
            await start.wait()
        t0 = time.perf_counter()
        await call.write(req)
        resp = await call.read()
        if i:
            lat.append(time.perf_counter() - t0)
        if resp.error_message or not resp.infer_response.raw_output_contents:
            raise RuntimeError(f"kserve device {seq_id} frame {i}: {resp.error_message or resp}")
    await call.done_writing()


async def native_device(channel, model: str, seq_id: int, sends: list[np.ndarray], lat: list[float],
                        ready, start: asyncio.Event) -> None:
    """One device on its own native Session stream: open, then a frame, its answer, the next frame; close."""
    from rnnserve.v1 import rnnserve_pb2 as pb

    call = channel.stream_stream(NATIVE_SESSION, request_serializer=pb.SessionRequest.SerializeToString,
                                 response_deserializer=pb.SessionResponse.FromString)()
    reqs = [pb.SessionRequest(request_id=i + 1, feed=pb.Feed(
        frames=pb.Frames(values=x.reshape(-1).tolist(), features=x.shape[1]), output=pb.OUTPUT_LAST))
        for i, x in enumerate(sends)]
    await call.write(pb.SessionRequest(request_id=0, open=pb.Open(model=pb.ModelRef(name=model))))
    opened = await call.read()
    if opened.WhichOneof("kind") != "opened":
        raise RuntimeError(f"native device {seq_id}: open failed: {opened}")
    for i, req in enumerate(reqs):
        if i == 1:  # opened and its first frame answered before the clock, as the KServe sequences
            ready()
            await start.wait()
        t0 = time.perf_counter()
        await call.write(req)
        resp = await call.read()
        if i:
            lat.append(time.perf_counter() - t0)
        if resp.WhichOneof("kind") != "fed":
            raise RuntimeError(f"native device {seq_id} frame {i}: {resp}")
    await call.write(pb.SessionRequest(request_id=len(reqs) + 1, close=pb.Close()))
    await call.read()
    await call.done_writing()


async def drive(worker, srv: _procs.ServerProc, model: str, utterances: list[np.ndarray], devices: int,
                steps: int, chunk: int, base_id: int) -> dict:
    """`devices` workers, each on its own stream sending `steps` timed requests of `chunk` frames (after
    one untimed request that starts its sequence); the clock starts once every stream is open."""
    import grpc

    channels = [grpc.aio.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(16, math.ceil(devices / 64)))]
    for ch in channels:
        await ch.channel_ready()
    lat: list[float] = []
    start, all_ready, n_ready = asyncio.Event(), asyncio.Event(), [0]

    def ready() -> None:
        n_ready[0] += 1
        if n_ready[0] == devices:
            all_ready.set()

    tasks = [asyncio.create_task(worker(channels[i % len(channels)], model, base_id + i,
                                        payloads(utterances[i % len(utterances)], steps + 1, chunk), lat,
                                        ready, start))
             for i in range(devices)]
    waiting = asyncio.create_task(all_ready.wait())
    done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:  # a worker ended before the start: it failed while opening
        waiting.cancel()
        await asyncio.gather(*tasks)
    cpu0, own0, t0 = srv.cpu_s(), _own_cpu(), time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    out = {"rate": len(lat) * chunk / wall, "lat_ms": np.asarray(lat) * 1e3,
           "server_cpu": (srv.cpu_s() - cpu0) / wall, "client_cpu": (_own_cpu() - own0) / wall}
    for ch in channels:
        await ch.close()
    return out


WORKERS = {"kserve": kserve_device, "native": native_device}


def main(argv: list[str] | None = None) -> int:
    """Start rnn-serve, run every point for several rounds, measure the onnxruntime ceiling, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="japanese-vowels", help="a vector model (default japanese-vowels)")
    ap.add_argument("--csv", type=Path, default=ROOT / "data" / "japanese_vowels" / "test.csv",
                    help="frames the devices stream (default: the shipped model's test split)")
    ap.add_argument("--devices", type=_procs.count, nargs="+", default=[64, 1000], help="concurrent devices per point")
    ap.add_argument("--frames", type=_procs.count, default=6400,
                    help="frames per point per protocol per round, all devices together (at least 8 requests a device)")
    ap.add_argument("--chunk", type=_procs.count, default=1,
                    help="frames per request (default 1: a device sends each frame as it comes)")
    ap.add_argument("--rounds", type=_procs.count, default=3, help="rounds; each runs both protocols of every point")
    ap.add_argument("--seconds", type=_procs.seconds, default=1.0, help="onnxruntime ceiling: seconds per batch size")
    ap.add_argument("--serve-args", default="", help="extra rnn-serve flags, e.g. \"--max-wait-ms 1\"")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    found = _procs.find_model(args.models, args.model)
    if found is None:
        raise SystemExit(f"no model {args.model} under {args.models}")
    meta, model_dir = found
    if meta.get("input", {}).get("kind") != "vector":
        raise SystemExit(f"{args.model} is not a vector model")
    F = meta["input"]["features"]
    utterances = device_frames(args.csv, F)
    steps = {n: max(8, args.frames // (n * args.chunk)) for n in args.devices}
    print(f"model {meta['name']}:{meta['version']} ({meta['cell']} H={meta['hidden_size']}, {F} features, "
          f"task {meta['task']['kind']}); cpus={os.cpu_count()}; load average {os.getloadavg()[0]:.2f}")
    runs: dict[tuple[str, int], list[dict]] = {(k, n): [] for n in args.devices for k in WORKERS}
    t_start = time.perf_counter()
    srv = _procs.start_rnn_serve(args.models, "--session-store", "memory", *shlex.split(args.serve_args))
    try:
        for r in range(args.rounds):
            for n in args.devices:
                for kind, worker in WORKERS.items():
                    runs[kind, n].append(asyncio.run(drive(worker, srv, meta["name"], utterances, n, steps[n],
                                                           args.chunk, 1 + r * 100_000 + n * 10)))
        rss = srv.rss_mb()
    finally:
        srv.stop()
    ort_loop = VectorOrtLoop(model_dir)
    pool = np.concatenate(utterances)
    ceiling = {n: max(ort_loop.rate(n, args.seconds, pool) for _ in range(2)) for n in args.devices}

    print(f"\n{args.chunk} frame(s) per request per device, each waiting for its answer; best of {args.rounds} "
          f"rounds (server RSS {rss:.0f} MB at the end)")
    print(f"{'devices':>7}  {'protocol':<8} {'frames/s':>9} {'median':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'server cpu':>10} {'us/frame':>8} {'client cpu':>10} {'ort loop':>10} {'ratio':>6}")
    summary, figures = [], {}
    for n in args.devices:
        for kind in WORKERS:
            rs = runs[kind, n]
            best = max(rs, key=lambda x: x["rate"])
            med = float(np.median([x["rate"] for x in rs]))
            ratio = best["rate"] / ceiling[n]
            print(f"{n:>7}  {kind:<8} {best['rate']:>9,.0f} {med:>8,.0f} {np.percentile(best['lat_ms'], 50):>7.2f} "
                  f"{np.percentile(best['lat_ms'], 99):>7.2f} {best['server_cpu']:>10.0%} "
                  f"{best['server_cpu'] / best['rate'] * 1e6:>8.0f} {best['client_cpu']:>10.0%} "
                  f"{ceiling[n]:>10,.0f} {ratio:>5.3f}x")
            summary.append(f"{kind + ' @' + str(n) + ' devices':<22} {best['rate']:>9,.0f} frames/s  vs onnxruntime "
                           f"batch {n}: {ceiling[n]:>11,.0f}  = {ratio:.3f}x  (p99 "
                           f"{np.percentile(best['lat_ms'], 99):.1f} ms; no goal set)")
            figures[f"{kind}@{n}"] = {"frames_per_s": best["rate"], "median_frames_per_s": med,
                                      "p50_ms": float(np.percentile(best["lat_ms"], 50)),
                                      "p99_ms": float(np.percentile(best["lat_ms"], 99)),
                                      "server_cpu": best["server_cpu"], "client_cpu": best["client_cpu"],
                                      "server_cpu_us_per_frame": best["server_cpu"] / best["rate"] * 1e6,
                                      "ort_frames_per_s": ceiling[n], "ratio": ratio}
    print(f"\nsummary ({time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end)")
    for line in summary:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
