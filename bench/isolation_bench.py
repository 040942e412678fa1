"""Latency isolation: ping-pong step latency alone vs while another client floods 200,000-token feeds.

Run with `.venv/bin/python bench/isolation_bench.py [--rounds 3 --window 3.5 --server-args "..."]`.
rnn-serve runs in its own process (bench/_procs.py). This process runs the 16 ping-pong sessions on one asyncio
loop and one channel, as serve_bench does. The flood client runs in a separate *process* (multiprocessing,
spawn: no fork of a process holding gRPC state) with its own channel and loop: building and serializing a
200,000-id Feed holds the GIL for ~8 ms per message here (more on a busy core): in a thread it would stall
the ping-pong loop, so the latencies would partly measure the load generator instead of the server.
Its own connection also keeps its bytes off the ping-pong HTTP/2 connection: what is measured is the
server's isolation. Windows run interleaved (alone, flood, alone, flood, ...) and medians are reported
because the box is a shared, noisy 2-core one; before each alone window the flood's last feed must have
been answered. Server RSS is sampled from /proc every 50 ms by a thread while flooding. Exit status is 0
whether or not a goal is met: this is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs
from rnnserve.client.aio import AsyncClient, AsyncSession
from rnnserve.client.core import RnnServeError

if TYPE_CHECKING:
    from typing_extensions import Self

RATIO_GOAL = 3.0  # p99 under flood / p99 alone
PEAK_GOAL_MB = 200.0  # peak RSS during the flood minus idle RSS
AFTER_GOAL_MB = 50.0  # RSS a few seconds after the flood minus idle RSS ("back near idle")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


# --- the flood client (its own process) -----------------------------------------------------------------

def flood_main(target: str, model: str, n_tokens: int, conn: Connection, go: Event, busy: Event,
               quit_: Event) -> None:
    """Process entry: feed n_tokens ids with output="none", back to back, while `go` is set."""
    asyncio.run(_flood(target, model, n_tokens, conn, go, busy, quit_))


async def _flood(target: str, model: str, n_tokens: int, conn: Connection, go: Event, busy: Event,
                 quit_: Event) -> None:
    """The flood loop; sends "ready" once warm, its totals when `quit_` is set."""
    client = AsyncClient(target, channel=grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))
    s = await client.session(model)
    ids = np.random.default_rng(1).integers(0, len(s.model.vocab), n_tokens).tolist()
    await s.feed(ids[:64], output="none")  # warm the sequence path with a small feed only: idle RSS stays idle
    conn.send("ready")
    stats: dict[str, Any] = {"tokens": 0, "feeds": 0, "errors": 0, "feed_s": 0.0, "max_feed_s": 0.0,
                             "first_error": None}
    while not quit_.is_set():
        busy.set()  # before checking go: the main process clears go, then waits for busy to clear
        if not go.is_set():
            busy.clear()
            await asyncio.sleep(0.01)
            continue
        t0 = time.perf_counter()
        try:
            await s.feed(ids, output="none")
            stats["tokens"] += n_tokens
            stats["feeds"] += 1
        except RnnServeError as err:  # e.g. a --max-feed-tokens or --max-inflight-tokens refusal
            stats["errors"] += 1
            stats["first_error"] = stats["first_error"] or str(err)[:300]
            if s.core.ended:
                s = await client.session(model)
            await asyncio.sleep(0.05)
        finally:
            dt = time.perf_counter() - t0
            stats["feed_s"] += dt
            stats["max_feed_s"] = max(stats["max_feed_s"], dt)
            busy.clear()
    await s.close()
    await client.close()
    conn.send(stats)


# --- measuring ------------------------------------------------------------------------------------------

class RssPeak:
    """A thread sampling the server's RSS every `period` s; `.peak` is the largest seen (MB)."""

    def __init__(self, srv: _procs.ServerProc, period: float = 0.05) -> None:
        self.srv, self.period, self.peak = srv, period, srv.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.peak = max(self.peak, self.srv.rss_mb())
            except (OSError, RuntimeError):  # the server died: the ping-pong side reports it
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def pingpong(sessions: list[AsyncSession], seconds: float, top_k: int) -> dict[str, float]:
    """Each session: feed one token, output="last", wait for its top-k, repeat until the deadline."""
    lats: list[float] = []

    async def worker(s: AsyncSession, deadline: float) -> int:
        n, token = 0, 1
        while (t0 := time.perf_counter()) < deadline:
            token = (await s.feed([token], output="last", top_k=top_k)).distributions[0].top_ids[0]
            lats.append((time.perf_counter() - t0) * 1e3)
            n += 1
        return n

    t0 = time.perf_counter()
    steps = sum(await asyncio.gather(*(worker(s, t0 + seconds) for s in sessions)))
    wall = time.perf_counter() - t0  # a step begun before the deadline is waited for, however long
    return {"steps_s": steps / wall, "p50_ms": float(np.percentile(lats, 50)),
            "p99_ms": float(np.percentile(lats, 99)), "max_ms": max(lats), "steps": steps, "wall_s": wall}


async def wait_for(event: Event, state: bool, timeout: float) -> bool:
    """Poll an mp.Event until it is `state` (without blocking the loop); False on timeout."""
    deadline = time.monotonic() + timeout
    while event.is_set() != state:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def measure(args: argparse.Namespace, srv: _procs.ServerProc, model: str) -> dict[str, Any]:
    """Warm up, take idle RSS, run the interleaved windows, take RSS after; returns every figure."""
    ctx = mp.get_context("spawn")
    go, busy, quit_ = ctx.Event(), ctx.Event(), ctx.Event()
    parent, child = ctx.Pipe()
    flood = ctx.Process(target=flood_main, args=(srv.target, model, args.tokens, child, go, busy, quit_),
                        daemon=True)
    flood.start()
    client = AsyncClient(srv.target, timeout=args.drain_timeout)
    try:
        sessions = list(await asyncio.gather(*(client.session(model) for _ in range(args.sessions))))
        await pingpong(sessions, 0.5, args.top_k)  # warm-up
        if not await asyncio.to_thread(parent.poll, 120):
            raise RuntimeError("flood client did not get ready within 120 s")
        parent.recv()
        await asyncio.sleep(1.0)
        idle = srv.rss_mb()
        print(f"server RSS idle after warm-up: {idle:.0f} MB")
        rounds: list[dict[str, Any]] = []
        for r in range(1, args.rounds + 1):
            alone = await pingpong(sessions, args.window, args.top_k)
            with RssPeak(srv) as rss:
                go.set()
                await wait_for(busy, True, 5.0)  # the first big feed is on its way
                flooded = await pingpong(sessions, args.window, args.top_k)
                go.clear()
                t_drain = time.perf_counter()
                drained = await wait_for(busy, False, args.drain_timeout)
            flooded["peak_rss_mb"] = rss.peak
            flooded["drain_s"] = time.perf_counter() - t_drain
            rounds.append({"alone": alone, "flood": flooded})
            for name, w in (("alone", alone), ("flood", flooded)):
                extra = (f"  peak RSS {w['peak_rss_mb']:>6.0f} MB  last feed answered "
                         f"{w['drain_s']:.1f} s after the window" if name == "flood" else "")
                print(f"round {r} {name:<5} {w['steps_s']:>8,.0f} steps/s  p50 {w['p50_ms']:>8.2f} ms  "
                      f"p99 {w['p99_ms']:>9.2f} ms  max {w['max_ms']:>9.1f} ms{extra}")
            if not drained:
                print(f"  the flood's feed was still running {args.drain_timeout:g} s after the window: stopping")
                break
        await asyncio.sleep(args.settle)
        after = srv.rss_mb()
        quit_.set()
        stats = parent.recv() if await asyncio.to_thread(parent.poll, args.drain_timeout) else {}
        await asyncio.gather(*(s.close() for s in sessions))
    finally:
        go.clear()
        quit_.set()
        await client.close()
        flood.join(timeout=5)
        if flood.is_alive():
            flood.terminate()
            flood.join()
    return {"idle_rss_mb": idle, "after_rss_mb": after, "rounds": rounds, "flood": stats}


# --- report ---------------------------------------------------------------------------------------------

def summarize(res: dict[str, Any], settle: float) -> dict[str, Any]:
    """Medians over rounds, the ratio, the RSS deltas; prints the summary with goals; returns the figures."""
    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in res["rounds"])

    fl = res["flood"]
    out = {f"{kind}_{key}": med(kind, key) for kind in ("alone", "flood") for key in ("p50_ms", "p99_ms", "steps_s")}
    out["ratio_p99"] = out["flood_p99_ms"] / out["alone_p99_ms"]
    out["worst_step_ms"] = max(r["flood"]["max_ms"] for r in res["rounds"])
    out["flood_tokens_s"] = fl["tokens"] / fl["feed_s"] if fl.get("feed_s") else float("nan")
    out["peak_rss_mb"] = max(r["flood"]["peak_rss_mb"] for r in res["rounds"])
    out.update(idle_rss_mb=res["idle_rss_mb"], after_rss_mb=res["after_rss_mb"])
    print(f"\nsummary (median of {len(res['rounds'])} rounds){'':<14}{'alone':>12} {'flood':>12}")
    for key, label in (("p50_ms", "step latency p50 (ms)"), ("p99_ms", "step latency p99 (ms)"),
                       ("steps_s", "steps/s")):
        print(f"  ping-pong {label:<30} {out['alone_' + key]:>12,.2f} {out['flood_' + key]:>12,.2f}")
    print(f"  worst step under flood {out['worst_step_ms']:,.0f} ms; flood {out['flood_tokens_s']:,.0f} tokens/s "
          f"({fl.get('feeds', 0)} feeds, {fl.get('errors', 0)} refused, longest {fl.get('max_feed_s', 0):.1f} s)")
    if fl.get("first_error"):
        print(f"  first flood error: {fl['first_error']}")
    print(f"  server RSS: idle {out['idle_rss_mb']:.0f} MB, peak {out['peak_rss_mb']:.0f} MB during the flood, "
          f"{out['after_rss_mb']:.0f} MB {settle:g} s after it")
    goals = [("p99 under flood / p99 alone", out["ratio_p99"], RATIO_GOAL, "x"),
             ("peak RSS - idle RSS", out["peak_rss_mb"] - out["idle_rss_mb"], PEAK_GOAL_MB, " MB"),
             ("RSS after flood - idle RSS", out["after_rss_mb"] - out["idle_rss_mb"], AFTER_GOAL_MB, " MB")]
    print("\ngoals")
    out["goals"] = {}
    for name, value, goal, unit in goals:
        ok = value <= goal
        out["goals"][name] = {"value": value, "goal": goal, "met": ok}
        print(f"  {'✔' if ok else '✘'} {name:<30} {value:>10,.2f}{unit:<4} goal <= {goal:g}{unit}  "
              f"{'PASS' if ok else 'MISS'}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: start rnn-serve, measure, print (and optionally write JSON); always exits 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=_procs.ROOT / "models", help="model repository")
    p.add_argument("--model", help="model name (default: the one _procs.find_model picks)")
    p.add_argument("--rounds", type=_procs.count, default=3, help="alone+flood window pairs (default 3)")
    p.add_argument("--window", type=_procs.seconds, default=3.5, help="seconds of one window (default 3.5)")
    p.add_argument("--sessions", type=_procs.count, default=16, help="ping-pong sessions (default 16)")
    p.add_argument("--top-k", type=int, default=5, help="top-k of each ping-pong step (default 5)")
    p.add_argument("--tokens", type=_procs.count, default=200_000, help="token ids per flood feed (default 200,000)")
    p.add_argument("--settle", type=_procs.seconds, default=3.0, help="seconds after the flood before RSS 'after'")
    p.add_argument("--drain-timeout", type=_procs.seconds, default=300.0,
                   help="longest wait for a flood feed or ping-pong step to be answered (s)")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="one extra rnn-serve flag, repeatable: --server-flag=--max-feed-tokens=262144")
    p.add_argument("--server-args", default="", help="extra rnn-serve flags as one string")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    found = _procs.find_model(args.models, args.model)
    if found is None:
        print(f"no model {args.model or ''} in {args.models}")
        return 0
    meta, model_dir = found
    flags = [*args.server_flag, *shlex.split(args.server_args)]
    print(f"model {meta['name']} ({model_dir}); {args.sessions} ping-pong sessions vs {args.tokens:,}-token "
          f"feeds; {args.rounds} rounds of {args.window:g} s windows; server flags: {shlex.join(flags) or '(none)'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    try:
        srv = _procs.start_rnn_serve(args.models, *flags)
    except RuntimeError as err:  # a flag this server does not know, a model that does not load
        print(f"rnn-serve did not start with flags {flags}: {err}")
        return 2
    try:
        res = asyncio.run(measure(args, srv, meta["name"]))
    finally:
        srv.stop()
    out = summarize(res, args.settle)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end: other processes share these cores)")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "server_flags": flags, **out, **res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
