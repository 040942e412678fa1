"""Generation benchmark: server-side generated tokens/s against two onnxruntime ceilings, and the prefix cache.

Run with `make bench` or `.venv/bin/python bench/gen_bench.py`. For each shipped model (the Elman and the
LSTM of models/) one rnn-serve process runs on 127.0.0.1 and this process is the load generator (one
asyncio loop). At 1, 16, 64 and 256 concurrent sessions, each generating `--max-tokens` at a time, the
server's tokens/s is set against, in the same run and at the same batch size:
- a plain onnxruntime loop of model.onnx (argmax fed back, state fed back): the ceiling of one token per
  call, what serving could reach before generate.onnx;
- generate.onnx called directly, K = the server's chunk, fed exactly as the server feeds it (state, last
  logits, uniforms (B, K), temperature, top_k, top_p): the ceiling of the graph the server runs.
Each ceiling is the better of onnxruntime's default threading and one thread. Windows are interleaved
(server, ceilings, server, ...) and the best of `--rounds` is reported. Then the prefix-state cache: 64 new
sessions open, feed the same 4,000-character prompt and generate one token, a cold wave (the prompt never
seen) then a warm one (a second wave of new sessions, same prompt); time to first token counts from the
open. The server's /metrics confirms every cold session missed the cache and every warm one hit it.
Time to first token is set against the path the server took before generate.onnx: a second rnn-serve on a
copy of the same version without that graph (versions exported before it still generate that way: one
token per step call, sampled in numpy), in windows of their own interleaved with the others at 1, 16 and 64
sessions, each generate asking 32 tokens (many first tokens a window); the p99 of every window's first
tokens pooled, against the issue's goal of no worse than that path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs
from rnnserve.client.aio import AsyncClient
from rnnserve.server.contract import GENERATE_FILE, STEP_FILE
from rnnserve.server.settings import Settings
from serve_bench import Point, generation

SESSIONS = (1, 16, 64, 256)
PREFIX_SESSIONS = 64
PROMPT_CHARS = 4000
CORPUS = _procs.ROOT / "data" / "tinyshakespeare.txt"
MODELS = ("shakespeare", "shakespeare-lstm")
# (sessions, goal vs the model.onnx loop) of the goals; the other points are reported as info
PLAIN_GOALS = {1: 0.5, 64: 0.7}
PREFIX_GOAL = 0.1  # warm p50 / cold p50 at most
TTFT_SESSIONS = (1, 16, 64)  # where time to first token is also measured on the step path
TTFT_GOAL = 1.0  # p99 with generate.onnx / p99 on the step path at most
TTFT_TOKENS = 32  # tokens per generate in the time-to-first-token windows
TEMPERATURE = 1.0  # of every generate (serve_bench.generation samples at 1.0)


# --- ceilings -------------------------------------------------------------------------------------------

def _session(path: Path, threads: int) -> ort.InferenceSession:
    """As the server opens its graphs (server/repository.py _options): intra-op threads, one inter-op."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads  # 0 = onnxruntime's default, one per core
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Ceilings:
    """onnxruntime alone on one model version: a model.onnx step loop and a generate.onnx loop."""

    THREADS = (0, 1)

    def __init__(self, model_dir: Path, k: int, temperature: float) -> None:
        self.meta = json.loads((model_dir / "model.json").read_text())
        self.k = k
        self.temperature = temperature
        self.step = {t: _session(model_dir / STEP_FILE, t) for t in self.THREADS}
        self.gen = {t: _session(model_dir / GENERATE_FILE, t) for t in self.THREADS}

    def _start(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens (B,), state (B, S) and logits (B, V) after one step from the initial state."""
        tokens = np.random.default_rng(0).integers(0, len(self.meta["vocab"]), size=batch, dtype=np.int64)
        state = np.tile(np.asarray(self.meta["initial_state"], np.float32), (batch, 1))  # (B, S)
        logits, state = self.step[1].run(None, {"tokens": tokens, "state": state})  # (B, V), (B, S)
        return tokens, state, logits

    def plain(self, batch: int, seconds: float) -> tuple[float, int]:
        """(tokens/s, threads) of the better threading: model.onnx, the argmax of each step fed back."""
        best = (0.0, 0)
        for threads, sess in self.step.items():
            _, state, logits = self._start(batch)
            for _ in range(3):
                logits, state = sess.run(None, {"tokens": logits.argmax(axis=1), "state": state})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(self.step):
                logits, state = sess.run(None, {"tokens": logits.argmax(axis=1), "state": state})  # (B, V), (B, S)
                n += 1
            best = max(best, (n * batch / (time.perf_counter() - t0), threads))
        return best

    def graph(self, batch: int, seconds: float) -> tuple[float, int]:
        """(tokens/s, threads) of the better threading: generate.onnx with K tokens a call, state and logits
        fed back, fresh uniforms each call (the server draws them from each row's generator)."""
        rng = np.random.default_rng(0)
        fixed = {"temperature": np.full(batch, self.temperature, np.float32),
                 "top_k": np.zeros(batch, np.int64), "top_p": np.zeros(batch, np.float32)}
        best = (0.0, 0)
        outs = ["tokens", "state_out", "logits_out"]
        for threads, sess in self.gen.items():
            _, state, logits = self._start(batch)
            for _ in range(2):
                feeds = {"state": state, "logits": logits, "uniforms": rng.random((batch, self.k), np.float32)}
                _, state, logits = sess.run(outs, {**feeds, **fixed})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(self.gen):
                feeds = {"state": state, "logits": logits,
                         "uniforms": rng.random((batch, self.k), np.float32)}  # (B, S), (B, V), (B, K)
                _, state, logits = sess.run(outs, {**feeds, **fixed})  # tokens (B, K), state, logits
                n += 1
            best = max(best, (n * batch * self.k / (time.perf_counter() - t0), threads))
        return best


def step_path_repo(model_dir: Path, root: Path) -> None:
    """Add model_dir's version to the repository at root, without generate.onnx (the step path)."""
    meta = json.loads((model_dir / "model.json").read_text())
    meta["files"].pop(GENERATE_FILE, None)
    meta["checks"] = {k: v for k, v in meta.get("checks", {}).items() if not k.startswith("generate_")}
    out = root / meta["name"] / str(meta["version"])
    out.mkdir(parents=True)
    for name in meta["files"]:  # model.onnx and sequence.onnx
        shutil.copyfile(model_dir / name, out / name)
    (out / "model.json").write_text(json.dumps(meta))


# --- prefix cache ---------------------------------------------------------------------------------------

def prompt_for(vocab: list[str], index: int) -> str:
    """A 4,000-character slice of the shipped corpus in the model's vocabulary, from the start of a line
    (a prompt never begins with a newline, which a one-token feed may have cached); `index` picks which."""
    chars = set(vocab)
    text = "".join(c for c in CORPUS.read_text(encoding="utf-8") if c in chars)
    start = (index * PROMPT_CHARS) % (len(text) - 2 * PROMPT_CHARS)
    start = text.index("\n", start) + 1
    while text[start] == "\n":
        start += 1
    return text[start:start + PROMPT_CHARS]


def prefix_counts(metrics_port: int) -> tuple[float, float, float]:
    """(hits, misses, tokens saved) of the server's prefix cache, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("rnnserve_prefix_cache_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return (values.get("rnnserve_prefix_cache_hits_total", 0.0),
            values.get("rnnserve_prefix_cache_misses_total", 0.0),
            values.get("rnnserve_prefix_cache_tokens_saved", 0.0))


async def prefix_wave(target: str, model: str, prompt: str, n: int) -> list[float]:
    """n new sessions at once, each opening, feeding `prompt` and generating one token: ms to that token."""
    async with AsyncClient(target) as client:
        await client.list_models()  # the channel is connected before the clock starts

        async def one():
            t0 = time.perf_counter()
            s = await client.session(model)
            await s.feed(prompt, output="none")
            ms = None
            async for _ in s.generate_chunks(1, temperature=TEMPERATURE):
                if ms is None:  # the first chunk holds the token
                    ms = (time.perf_counter() - t0) * 1e3
            s.detach()
            return ms, s.session_id

        done = await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.gather(*(client.close_session(sid) for _, sid in done))
    return [ms for ms, _ in done]


@dataclass
class Wave:
    """One wave of new sessions: times to first token (ms) and what the cache counted meanwhile."""

    ttft: list[float]
    hits: float
    misses: float
    saved: float  # prompt tokens not fed thanks to the cache

    @property
    def p50(self) -> float:
        return _pct(self.ttft, 50)


async def prefix_cache(srv: _procs.ServerProc, metrics_port: int, model: str, vocab: list[str],
                       rounds: int, first_prompt: int) -> list[tuple[Wave, Wave]]:
    """(cold, warm) waves, `rounds` times with a new prompt each, so that each cold wave is really cold."""
    out = []
    for r in range(rounds):
        prompt = prompt_for(vocab, first_prompt + r)
        waves = []
        for _ in ("cold", "warm"):
            before = prefix_counts(metrics_port)
            ttft = await prefix_wave(srv.target, model, prompt, PREFIX_SESSIONS)
            after = prefix_counts(metrics_port)
            waves.append(Wave(ttft, *(a - b for a, b in zip(after, before))))
        out.append((waves[0], waves[1]))
    return out


# --- report ---------------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary_line(name: str, value: float, ceiling: float, goal: float | None, unit: str,
                 at_most: bool = False) -> tuple[str, bool]:
    """One summary row: measured, ceiling, ratio, goal (>= or, with at_most, <=), PASS | MISS | info."""
    ratio = value / ceiling if ceiling else float("nan")
    if goal is None:
        verdict, want = "info", ""
    else:
        ok = ratio <= goal if at_most else ratio >= goal
        verdict, want = ("PASS" if ok else "MISS"), f"{'<=' if at_most else '>='} {goal:.2f}x"
    fmt = ",.1f" if unit == "ms" else ",.0f"
    return (f"{name:<50} {value:>10{fmt}} {unit:<9} {ceiling:>10{fmt}} {ratio:>7.2f}x  {want:<9} {verdict}",
            verdict != "MISS")


THREADS = {0: "def", 1: "1"}  # how the tables name onnxruntime's default threading and one thread


async def generation_points(args: argparse.Namespace, srv: _procs.ServerProc, step_srv: _procs.ServerProc,
                            name: str, model_dir: Path) -> list[tuple[str, bool]]:
    """Server, step-path server and ceilings at each session count, interleaved; prints the table, returns
    summary rows."""
    ceil = Ceilings(model_dir, args.chunk_tokens, TEMPERATURE)
    ttft: dict[tuple[str, int], list[float]] = {}  # (server, sessions) -> every window's first tokens, ms
    gen: dict[int, Point] = {}
    plain: dict[int, tuple[float, int]] = {}
    graph: dict[int, tuple[float, int]] = {}
    print(f"generation: {args.max_tokens} tokens per generate, temperature {TEMPERATURE:g}; ceilings at the "
          f"same batch: model.onnx loop, generate.onnx K={args.chunk_tokens} (thr: the better of default/1)")
    print(f"{'sessions':>8}  {'tokens/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'model.onnx':>11} {'thr':>3} "
          f"{'ratio':>6} {'generate.onnx':>13} {'thr':>3} {'ratio':>6} {'srv cpu':>8} {'cli cpu':>8}")
    for n in SESSIONS:
        for _ in range(args.rounds):  # interleaved, best window of each: contention only slows things
            p = await generation(srv.target, name, n, args.seconds, args.max_tokens, server_cpu=srv.cpu_s)
            if n not in gen or p.rate > gen[n].rate:
                gen[n] = p
            if n in TTFT_SESSIONS:
                for kind, s in (("graph", srv), ("step", step_srv)):
                    q = await generation(s.target, name, n, args.seconds, TTFT_TOKENS, server_cpu=s.cpu_s)
                    ttft.setdefault((kind, n), []).extend(q.lat_ms)
            plain[n] = max(plain.get(n, (0.0, 0)), ceil.plain(n, args.seconds))
            graph[n] = max(graph.get(n, (0.0, 0)), ceil.graph(n, args.seconds))
        p = gen[n]
        print(f"{n:>8}  {p.rate:>9,.0f} {p.pct(50):>7.1f}ms {p.pct(99):>7.1f}ms {plain[n][0]:>11,.0f} "
              f"{THREADS[plain[n][1]]:>3} {p.rate / plain[n][0]:>5.2f}x {graph[n][0]:>13,.0f} "
              f"{THREADS[graph[n][1]]:>3} {p.rate / graph[n][0]:>5.2f}x {p.cpu:>8.0%} {p.client_cpu:>8.0%}")
    rows = [summary_line(f"{name} gen @{n} vs model.onnx loop", gen[n].rate, plain[n][0], PLAIN_GOALS.get(n),
                         "tokens/s") for n in SESSIONS]
    rows += [summary_line(f"{name} gen @{n} vs generate.onnx direct", gen[n].rate, graph[n][0], None, "tokens/s")
             for n in SESSIONS]
    for n in TTFT_SESSIONS:
        g, st = ttft[("graph", n)], ttft[("step", n)]
        print(f"time to first token @{n}, {TTFT_TOKENS} tokens a generate, every window pooled: generate.onnx "
              f"p50 {_pct(g, 50):.1f} ms, "
              f"p99 {_pct(g, 99):.1f} ms ({len(g)} tokens); step path p50 {_pct(st, 50):.1f} ms, p99 "
              f"{_pct(st, 99):.1f} ms ({len(st)})")
        rows.append(summary_line(f"{name} ttft p99 @{n} vs the step path", _pct(g, 99), _pct(st, 99), TTFT_GOAL,
                                 "ms", at_most=True))
    return rows


async def prefix_points(args: argparse.Namespace, srv: _procs.ServerProc, metrics_port: int, name: str,
                        vocab: list[str], index: int) -> list[tuple[str, bool]]:
    """Cold and warm prefix-cache waves; prints each round, returns the summary row."""
    waves = await prefix_cache(srv, metrics_port, name, vocab, args.rounds, first_prompt=index * 100)
    print(f"prefix cache: {PREFIX_SESSIONS} new sessions x ({PROMPT_CHARS:,}-char prompt, 1 generated token), "
          f"time to first token from open; per round (a new prompt each): cold wave, then warm wave")
    exact = True  # every cold session missed and every warm one started from the whole cached prompt
    for r, (cold, warm) in enumerate(waves):
        print(f"  round {r + 1}:  cold p50 {cold.p50:8.1f} ms  p99 {_pct(cold.ttft, 99):8.1f} ms  "
              f"({cold.misses:.0f} misses, {cold.hits:.0f} hits)   warm p50 {warm.p50:6.1f} ms  "
              f"p99 {_pct(warm.ttft, 99):6.1f} ms  ({warm.hits:.0f} hits, {warm.saved:,.0f} tokens saved)")
        exact &= (cold.misses == PREFIX_SESSIONS and cold.hits == 0 and warm.hits == PREFIX_SESSIONS
                  and warm.saved == PREFIX_SESSIONS * PROMPT_CHARS)
    if not exact:
        print(f"  WARNING: expected {PREFIX_SESSIONS} misses per cold wave and {PREFIX_SESSIONS} hits of "
              f"{PROMPT_CHARS} tokens per warm wave")
    cold_p50 = min(c.p50 for c, _ in waves)  # the best of each, as for the generation points
    warm_p50 = min(w.p50 for _, w in waves)
    text, ok = summary_line(f"{name} prefix warm p50 vs cold p50", warm_p50, cold_p50, PREFIX_GOAL, "ms",
                            at_most=True)
    return [(text if exact else text + " (cache counts off)", ok and exact)]


async def run(args: argparse.Namespace) -> int:
    """Every model's points on one server, then the summary; 1 on a missed goal only with --strict."""
    found = []
    for name in args.model:
        f = _procs.find_model(args.models, name)
        if f is None:
            raise SystemExit(f"--model {name}: no such model in {args.models}")
        if not (f[1] / GENERATE_FILE).is_file():
            raise SystemExit(f"{f[1]}: no {GENERATE_FILE} (export the model again with a current rnn-export)")
        found.append(f)
    print(f"best of {args.rounds} interleaved {args.seconds:g} s windows per point, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    flags = ("--chunk-tokens", str(args.chunk_tokens), *shlex.split(args.serve_args))
    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-step-path-"))
    srv = step_srv = None
    try:
        for _, model_dir in found:
            step_path_repo(model_dir, tmp)
        srv = _procs.start_rnn_serve(args.models, "--metrics-port", "0", *flags)
        step_srv = _procs.start_rnn_serve(tmp, *flags)
        metrics_port = int(json.loads((srv.workdir / "port.json").read_text())["metrics_port"])
        rows = []
        for i, (meta, model_dir) in enumerate(found):
            print(f"\n== {meta['name']}: {meta['cell']} H={meta['hidden_size']} x{meta['layers']} layers, "
                  f"state {meta['state_size']}, vocab {len(meta['vocab'])} ({model_dir})")
            rows += await generation_points(args, srv, step_srv, meta["name"], model_dir)
            rows += await prefix_points(args, srv, metrics_port, meta["name"], meta["vocab"], i)
    finally:
        for server in (srv, step_srv):
            if server is not None:
                server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary" + " " * 44 + "   measured             ceiling   ratio  goal      result")
    for text, _ in rows:
        print(text)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end: other processes share these cores)")
    return 1 if args.strict and not all(ok for _, ok in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=_procs.ROOT / "models", help="model repository")
    parser.add_argument("--model", action="append", default=None,
                        help=f"model to measure, repeatable (default: {', '.join(MODELS)})")
    parser.add_argument("--seconds", type=_procs.seconds, default=1.0, help="duration of one measured window")
    parser.add_argument("--rounds", type=_procs.count, default=3,
                        help="interleaved windows per point (and prefix-cache rounds); the best is reported")
    parser.add_argument("--max-tokens", type=_procs.count, default=256, help="tokens per generate request")
    parser.add_argument("--chunk-tokens", type=_procs.count, default=Settings().chunk_tokens,
                        help="the server's --chunk-tokens, and K of the generate.onnx ceiling")
    parser.add_argument("--serve-args", default="", help="extra rnn-serve flags, e.g. '--ort-gen-threads 1'")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    args.model = args.model or list(MODELS)
    if args.seconds <= 0 or args.rounds < 1 or args.max_tokens < 1 or args.chunk_tokens < 1:
        parser.error("--seconds must be > 0 and --rounds, --max-tokens, --chunk-tokens >= 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
