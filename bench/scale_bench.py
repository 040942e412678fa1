"""Throughput growth with processes: rnn-serve --workers 1, 2 and 4 at 64 and 256 sessions, against one process.

Run with `.venv/bin/python bench/scale_bench.py [--quick] [--json out.json]`. Every server runs in its own
processes (bench/_procs.py): the do-nothing rnnserve.v1 server (ping-pong ceiling), `rnn-serve --workers 1`
(plain rnn-serve, sqlite store) and `--workers 2|4` (a supervisor, N workers on one port via SO_REUSEPORT,
sessions shared through a private redis-server). The load generator is 2 processes (multiprocessing, spawn),
each with its own asyncio loop and one channel (= one TCP connection: a local subchannel pool) per
--per-channel sessions, because the kernel spreads connections, not requests, over the workers.
Ping-pong: each session feeds one token and waits for its top-5 before the next (as serve_bench).
Generation: each session generates 64-token runs in a loop (chunk_tokens 32). Server CPU is the sum of
/proc/PID/stat of the workers named in the port file (the private redis-server is reported apart), so CPU
per step and the scaling efficiency (CPU/step of 1 process / CPU/step of N) are far steadier than rates on
a shared box. Windows are interleaved over the servers; the best rate and the median CPU/step are kept.

On a 2-core machine the load generator competes with the workers for the same two cores, so throughput
cannot grow much with workers here: what scales is measured as CPU per step, and the output derives what a
16-core machine would reach from it (cores / (server + redis + generator CPU per step)).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs

TOP_K = 5
GEN_PROCS = 2
EFFICIENCY_GOAL = 0.9
SPEEDUP_GOAL = 1.3  # 2 workers / 1 worker at 256 sessions
REPLY_TIMEOUT_S = 120.0
# opens in flight per generator process: more than 100 at once on one worker overflow its redis-py connection
# pool (redis-py 8 asyncio: max_connections 100, no waiting), and the open fails with UNAVAILABLE
OPEN_CONCURRENCY = 32


# --- the load generator (one of GEN_PROCS processes) -------------------------------------------------------

def gen_main(conn: Connection) -> None:
    """Process entry: serve the parent's setup/go/quit commands on one asyncio loop."""
    asyncio.run(_gen_loop(conn))


async def _gen_loop(conn: Connection) -> None:
    import grpc.aio
    from rnnserve.client.aio import AsyncClient
    from rnnserve.client.connection import DEFAULT_OPTIONS

    loop = asyncio.get_running_loop()
    clients: list[AsyncClient] = []
    sessions: list[Any] = []
    job: dict[str, Any] = {}
    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        try:
            if cmd == "quit":
                return
            if cmd == "setup":
                job = arg
                opts = [*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
                n_ch = max(1, math.ceil(job["sessions"] / job["per_channel"]))
                clients = [AsyncClient(job["target"], channel=grpc.aio.insecure_channel(job["target"], options=opts))
                           for _ in range(n_ch)]
                sessions = await asyncio.wait_for(
                    _bounded([clients[i % n_ch].session(job["model"]) for i in range(job["sessions"])]), 60)
                warm = [s.feed([1], output="last", top_k=TOP_K) if job["mode"] == "pingpong"
                        else s.feed(s.model.vocab[0], output="none") for s in sessions]
                await asyncio.wait_for(asyncio.gather(*warm), 60)
                conn.send(("ready", None))
            elif cmd == "go":
                start, end = arg
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                t = os.times()
                lats: list[float] = []
                body = (_pingpong(s, end, lats) if job["mode"] == "pingpong"
                        else _generate(s, end, job["max_tokens"], job["chunk_tokens"]) for s in sessions)
                counts = await asyncio.wait_for(asyncio.gather(*body), end - time.monotonic() + 60)
                t2 = os.times()
                conn.send(("done", {"count": sum(counts), "cpu": t2.user + t2.system - t.user - t.system,
                                    "lats": lats}))
                await _teardown(sessions, clients)
                sessions, clients = [], []
        except Exception as e:  # noqa: BLE001 - whatever it is, the parent must hear of it and stop the run
            await _teardown(sessions, clients)
            sessions, clients = [], []
            conn.send(("error", f"{type(e).__name__}: {e}"))


async def _bounded(aws: list[Any], **kw: Any) -> list[Any]:
    """Await them all, OPEN_CONCURRENCY at a time."""
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(aw: Any) -> Any:
        async with sem:
            return await aw
    return await asyncio.gather(*(one(aw) for aw in aws), **kw)


async def _teardown(sessions: list[Any], clients: list[Any]) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_bounded([s.close() for s in sessions], return_exceptions=True), 30)
    for c in clients:
        await c.close()


async def _pingpong(s: Any, end: float, lats: list[float]) -> int:
    n, token = 0, 1
    while (t0 := time.monotonic()) < end:
        token = (await s.feed([token], output="last", top_k=TOP_K)).distributions[0].top_ids[0]
        t1 = time.monotonic()
        if t1 <= end:
            n += 1
            lats.append((t1 - t0) * 1e3)
    return n


async def _generate(s: Any, end: float, max_tokens: int, chunk_tokens: int) -> int:
    n = 0
    while time.monotonic() < end:  # a generation under way at the deadline runs to its end, uncounted
        async for chunk in s.generate_chunks(max_tokens, temperature=1.0, chunk_tokens=chunk_tokens):
            if time.monotonic() <= end:
                n += len(chunk.tokens)
    return n


class Generators:
    """GEN_PROCS load-generator processes driven over pipes; every window starts them at the same instant."""

    def __init__(self, n: int = GEN_PROCS) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process holding gRPC state
        self.pipes: list[Connection] = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=gen_main, args=(child,), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def _replies(self, timeout: float) -> list[Any]:
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"a load generator did not answer within {timeout:.0f} s")
            kind, val = pipe.recv()
            if kind == "error":
                raise RuntimeError(f"load generator: {val}")
            out.append(val)
        return out

    def window(self, srv: Served, model: str, mode: str, sessions: int, seconds: float,
               args: argparse.Namespace) -> Sample:
        """One measured window of `mode` with `sessions` sessions spread over the generators."""
        k = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send(("setup", {"target": srv.target, "model": model, "mode": mode,
                                 "sessions": sessions // k + (i < sessions % k), "per_channel": args.per_channel,
                                 "max_tokens": args.max_tokens, "chunk_tokens": args.chunk_tokens}))
        self._replies(REPLY_TIMEOUT_S)
        start = time.monotonic() + 0.2
        for pipe in self.pipes:
            pipe.send(("go", (start, start + seconds)))
        time.sleep(max(0.0, start - time.monotonic()))
        w0, r0, x0 = srv.cpu()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        w1, r1, x1 = srv.cpu()
        done = self._replies(seconds + REPLY_TIMEOUT_S)
        count = sum(d["count"] for d in done)
        lats = sorted(x for d in done for x in d["lats"])
        return Sample(count / seconds, [b - a for a, b in zip(w0, w1)], r1 - r0, sum(d["cpu"] for d in done),
                      count, _pct(lats, 50), _pct(lats, 99), x1 - x0)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("quit", None))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))] if xs else float("nan")


# --- servers and figures ------------------------------------------------------------------------------------

def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Served:
    """A server under test: its process(es) and where to find their CPU."""

    name: str
    srv: _procs.ServerProc
    pids: list[int]  # the processes that serve (the workers, or the one server)
    redis_pid: int | None = None

    target = property(lambda self: self.srv.target)

    @classmethod
    def of(cls, name: str, srv: _procs.ServerProc) -> Served:
        info = json.loads((srv.workdir / "port.json").read_text())
        if "workers" not in info:
            return cls(name, srv, [srv.proc.pid])
        sup = srv.proc.pid
        kids = Path(f"/proc/{sup}/task/{sup}/children").read_text().split()
        redis = [int(k) for k in kids if "redis" in Path(f"/proc/{k}/comm").read_text()]
        return cls(name, srv, [w["pid"] for w in info["workers"]], redis[0] if redis else None)

    def cpu(self) -> tuple[list[float], float, int]:
        """So far: CPU seconds of each worker, of the private redis-server (0 if none), and the workers' context
        switches (voluntary: a thread waited, e.g. the event loop for work; involuntary: preempted)."""
        switches = sum(int(line.split()[1]) for pid in self.pids for task in Path(f"/proc/{pid}/task").iterdir()
                       for line in (task / "status").read_text().splitlines() if "ctxt_switches:" in line)
        return [_proc_cpu(p) for p in self.pids], _proc_cpu(self.redis_pid) if self.redis_pid else 0.0, switches


@dataclass
class Sample:
    """One window."""

    rate: float
    worker_cpu: list[float]  # CPU seconds of each worker in the window
    redis_cpu: float
    gen_cpu: float
    count: int
    p50: float
    p99: float
    switches: int  # context switches of the serving processes (all threads)


@dataclass
class Point:
    """The windows of one (mode, server, sessions), summarized."""

    best: float = 0.0
    median: float = 0.0
    cpu_step_us: float = 0.0  # server (workers) CPU per step or token, median over windows
    redis_step_us: float = 0.0
    gen_step_us: float = 0.0
    balance: float = 1.0  # busiest worker's CPU / the mean worker's (1 = even)
    csw_step: float = 0.0  # context switches of the serving processes per step or token
    p50: float = float("nan")
    p99: float = float("nan")
    windows: list[float] = field(default_factory=list)


def summarize(samples: list[Sample]) -> Point:
    best = max(samples, key=lambda s: s.rate)

    def med(f: Callable[[Sample], float]) -> float:
        return statistics.median(f(s) for s in samples)

    def per(x: float, s: Sample) -> float:
        return x / s.count * 1e6 if s.count else float("nan")
    return Point(best.rate, med(lambda s: s.rate), med(lambda s: per(sum(s.worker_cpu), s)),
                 med(lambda s: per(s.redis_cpu, s)), med(lambda s: per(s.gen_cpu, s)),
                 med(lambda s: max(s.worker_cpu) / (sum(s.worker_cpu) / len(s.worker_cpu) or 1)),
                 med(lambda s: s.switches / s.count if s.count else float("nan")),
                 best.p50, best.p99, [s.rate for s in samples])


def _f(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Start the servers and generators, measure every point interleaved, print the tables; the figures."""
    extra = shlex.split(args.serve_args)
    servers: dict[str, Served] = {}
    gens = Generators()
    samples: dict[tuple[str, str, int], list[Sample]] = {}
    try:
        servers["nothing"] = Served.of("nothing", _procs.start_ceiling("nothing"))
        for n in args.workers:
            servers[f"w{n}"] = Served.of(f"w{n}", _procs.start_rnn_serve(args.models, "--workers", str(n), *extra))
        plan = [("pingpong", name) for name in servers] + [("generate", name) for name in servers if name != "nothing"]
        for r in range(args.rounds):
            for n_sess in args.sessions:
                for mode, name in plan:
                    s = gens.window(servers[name], "nothing" if name == "nothing" else model, mode, n_sess,
                                    args.seconds, args)
                    samples.setdefault((mode, name, n_sess), []).append(s)
                    print(f"  round {r + 1}/{args.rounds} {mode:<8} {name:<7} @{n_sess:<4} {s.rate:>9,.0f}/s  "
                          f"server cpu {sum(s.worker_cpu) / args.seconds:4.0%}  redis {s.redis_cpu / args.seconds:4.0%}"
                          f"  generator {s.gen_cpu / args.seconds:4.0%}", flush=True)
    finally:
        gens.close()
        for s in servers.values():
            s.srv.stop()
    points = {k: summarize(v) for k, v in samples.items()}
    return report(args, points)


def report(args: argparse.Namespace, points: dict[tuple[str, str, int], Point]) -> dict[str, Any]:
    """Print the tables, the goals and the 16-core projection; the figures for --json."""
    one = f"w{args.workers[0]}"
    goals: list[dict[str, Any]] = []
    for mode, unit in (("pingpong", "steps/s"), ("generate", "tokens/s")):
        print(f"\n{mode}: {unit}, best of {args.rounds} windows of {args.seconds:g} s; CPU in µs and context "
              f"switches (csw) of the serving processes per {'step' if mode == 'pingpong' else 'token'} (median)")
        print(f"{'sessions':>8} {'server':<8} {'best':>9} {'median':>9} {'vs ' + one:>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'srv µs':>7} {'redis µs':>8} {'gen µs':>7} {'effic.':>7} {'balance':>7} {'csw':>5}")
        for n_sess in args.sessions:
            base = points.get((mode, one, n_sess))
            for name in (["nothing"] if mode == "pingpong" else []) + [f"w{n}" for n in args.workers]:
                p = points[mode, name, n_sess]
                eff = base.cpu_step_us / p.cpu_step_us if name != "nothing" else float("nan")
                print(f"{n_sess:>8} {name:<8} {p.best:>9,.0f} {p.median:>9,.0f} {p.best / base.best:>6.2f}x "
                      f"{_f(p.p50):>7} {_f(p.p99):>7} {p.cpu_step_us:>7.1f} {p.redis_step_us:>8.1f} "
                      f"{p.gen_step_us:>7.1f} {_f(eff):>7} {p.balance:>7.2f} {p.csw_step:>5.2f}")
        for n in args.workers[1:]:
            big = max(args.sessions)
            p, b = points[mode, f"w{n}", big], points[mode, one, big]
            eff = b.cpu_step_us / p.cpu_step_us
            eff_r = (b.cpu_step_us + b.redis_step_us) / (p.cpu_step_us + p.redis_step_us)
            goals.append({"name": f"{mode} @{big}: scaling efficiency, {n} workers", "value": eff,
                          "goal": EFFICIENCY_GOAL, "ok": eff >= EFFICIENCY_GOAL, "with_redis": eff_r})
            if n == 2:
                sp = p.best / b.best
                need = SPEEDUP_GOAL * b.best * (p.cpu_step_us + p.redis_step_us + p.gen_step_us) * 1e-6
                goals.append({"name": f"{mode} @{big}: throughput 2 workers / 1", "value": sp,
                              "goal": SPEEDUP_GOAL, "ok": sp >= SPEEDUP_GOAL, "cores_needed": need})
    big = max(args.sessions)
    nothing, w1 = points["pingpong", "nothing", big], points["pingpong", one, big]
    print(f"\nping-pong @{big}: 1 worker reaches {w1.best / nothing.best:.2f}x of the do-nothing server "
          f"({nothing.best:,.0f} steps/s, itself one process)")
    print("\ngoals" + " " * 46 + "value    goal")
    for g in goals:
        extra = f"   (with redis CPU counted: {g['with_redis']:.2f})" if "with_redis" in g else ""
        if "cores_needed" in g:
            extra = (f"   ({SPEEDUP_GOAL:g}x needs {g['cores_needed']:.2f} cores for workers + redis + generator "
                     f"at the measured CPU per unit; this machine has {os.cpu_count()})")
        print(f"{g['name']:<50} {g['value']:>6.2f}  >= {g['goal']:.2f}  {'✔ PASS' if g['ok'] else '✘ MISS'}{extra}")
    projection = project(args, points)
    return {"argv": sys.argv, "points": {f"{m}/{s}/{n}": asdict(p) for (m, s, n), p in points.items()},
            "goals": goals, "projection": projection, "load_average": os.getloadavg()[0]}


def project(args: argparse.Namespace, points: dict[tuple[str, str, int], Point]) -> dict[str, Any]:
    """What a 16-core machine would reach, from the CPU per step measured with the most workers."""
    n, big, cores = args.workers[-1], max(args.sessions), args.project_cores
    out: dict[str, Any] = {}
    print(f"\nthis machine has {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}: shared): the 2 "
          "generator processes compete with the workers for them, so throughput growth is bounded here;")
    print(f"what scales is CPU per step. Projection to {cores} cores from the {n}-worker figures @{big} "
          "(CPU-bound, perfect packing, one worker per core):")
    for mode, unit in (("pingpong", "steps/s"), ("generate", "tokens/s")):
        p = points[mode, f"w{n}", big]
        s, r, g = (x * 1e-6 for x in (p.cpu_step_us, p.redis_step_us, p.gen_step_us))
        same_host = cores / (s + r + g)
        gen_cores = cores * g / (s + r + g)
        remote = cores / (s + r)
        redis_cap = 1 / r if r else float("inf")
        used_here = p.best * (s + r + g)
        out[mode] = {"same_host": same_host, "generator_cores": gen_cores, "clients_elsewhere": remote,
                     "redis_ceiling": redis_cap, "cores_used_here": used_here}
        print(f"  {mode:<8}: server {s * 1e6:.0f} + redis {r * 1e6:.0f} + generator {g * 1e6:.0f} µs CPU per unit; "
              f"here the best window used {used_here:.2f} of {os.cpu_count()} cores")
        print(f"    generator on the same {cores}-core host: {cores} / {(s + r + g) * 1e6:.0f} µs = "
              f"{same_host:,.0f} {unit} (the generator takes {gen_cores:.1f} cores, the workers and redis the rest)")
        print(f"    clients on other machines, {cores} workers: {cores} / {(s + r) * 1e6:.0f} µs = {remote:,.0f} {unit}, "
              f"capped by the one-threaded redis-server at 1 / {r * 1e6:.0f} µs = {redis_cap:,.0f} {unit}")
    print(f"  (CPU per unit measured at {big // n} sessions per worker: {cores} workers need about {big // n * cores:,} "
          "sessions to batch as well; fewer sessions per worker cost more CPU per step, see the tables)")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 whatever the goals (a benchmark, not a test) unless --strict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=_procs.ROOT / "models", help="model repository")
    ap.add_argument("--model", help="model name (default: the one _procs.find_model picks)")
    ap.add_argument("--workers", type=_procs.count, nargs="+", default=[1, 2, 4], help="worker counts (first = baseline)")
    ap.add_argument("--sessions", type=_procs.count, nargs="+", default=[64, 256], help="concurrent sessions")
    ap.add_argument("--seconds", type=_procs.seconds, default=4.0, help="one measured window (default 4 s)")
    ap.add_argument("--rounds", type=_procs.count, default=3, help="interleaved windows per point (default 3)")
    ap.add_argument("--per-channel", type=_procs.count, default=8, help="sessions per channel (= connection)")
    ap.add_argument("--max-tokens", type=_procs.count, default=64, help="tokens per generate request")
    ap.add_argument("--chunk-tokens", type=_procs.count, default=32, help="tokens per streamed chunk")
    ap.add_argument("--project-cores", type=_procs.count, default=16, help="cores of the machine to project to")
    ap.add_argument("--serve-args", default="", help="extra rnn-serve flags for every worker count")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s windows (about a minute)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    found = _procs.find_model(args.models, args.model)
    if found is None:
        print(f"no model {args.model or ''} in {args.models}")
        return 2
    print(f"model {found[0]['name']}; workers {args.workers}; sessions {args.sessions}; {args.rounds} rounds of "
          f"{args.seconds:g} s windows; {GEN_PROCS} generator processes, {args.per_channel} sessions per channel; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    out = run(args, found[0]["name"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if args.strict and not all(g["ok"] for g in out["goals"]) else 0


if __name__ == "__main__":
    sys.exit(main())
