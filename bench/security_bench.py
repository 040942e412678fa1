"""Security's price: ping-pong with bearer tokens over TLS, as a ratio to the same server with neither.

Run with `make bench` or `.venv/bin/python bench/security_bench.py`. Four servers in their own processes
on 127.0.0.1 serve the shipped model: plain, tokens only (--auth-tokens), TLS only (certificates made
now with trustme), and tokens over TLS. This process is the load generator: 64 sessions (default), each
feeding one token and waiting for its top-5 before the next, in interleaved windows; each figure is the
median of its rounds. Server CPU per step says where the cost goes. Goal: tokens over TLS >= 0.9x plain.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs
from rnnserve.client.aio import AsyncClient
from rnnserve.server.auth import digest
from serve_bench import TOP_K, Window, _pingpong_worker

log = logging.getLogger("security_bench")
TOKEN = "bench-token-0123456789abcdef"


def credentials(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a tokens file, written under folder."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem",
             "tokens": folder / "tokens.json"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    files["tokens"].write_text(json.dumps({"tokens": [{"principal": "bench", "sha256": digest(TOKEN)}]}))
    return files


def configs(f: dict[str, Path]) -> dict[str, tuple[list[str], dict]]:
    """name -> (server flags, client keyword arguments)."""
    tls_flags, auth_flags = ["--tls-cert", str(f["cert"]), "--tls-key", str(f["key"])], ["--auth-tokens", str(f["tokens"])]
    tls_client = {"ca": f["ca"], "server_name": "localhost"}
    return {"plain": ([], {}), "tokens": (auth_flags, {"token": TOKEN}), "tls": (tls_flags, tls_client),
            "tokens+tls": (tls_flags + auth_flags, {**tls_client, "token": TOKEN})}


async def pingpong(target: str, model: str, sessions: int, seconds: float, client_kw: dict, server_cpu) -> tuple:
    """steps/s, server CPU s per step, p50 and p99 latency (ms) of `sessions` ping-pong sessions."""
    lats: list[float] = []
    async with AsyncClient(target, **client_kw) as client:
        opened = await asyncio.gather(*(client.session(model) for _ in range(sessions)))

        def stepper(s):
            async def step(token: int) -> int:
                return (await s.feed([token], output="last", top_k=TOP_K)).distributions[0].top_ids[0]
            return step
        steps = [stepper(s) for s in opened]
        await asyncio.gather(*(s(1) for s in steps))
        win = Window(server_cpu)
        counts = await asyncio.gather(*(_pingpong_worker(s, win.t0 + seconds, lats) for s in steps))
        point = win.point(sum(counts), lats)
        await asyncio.gather(*(s.close() for s in opened))
    return point.rate, point.cpu / max(point.rate, 1e-9), point.pct(50), point.pct(99)


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 0 whatever the goal says (a benchmark, not a test)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=_procs.ROOT / "models")
    ap.add_argument("--sessions", type=_procs.count, default=64)
    ap.add_argument("--window", type=_procs.seconds, default=3.0)
    ap.add_argument("--rounds", type=_procs.count, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    found = _procs.find_model(args.models)
    if found is None:
        print(f"no model in {args.models}")
        return 1
    model = found[0]["name"]
    folder = Path(tempfile.mkdtemp(prefix="bench-security-"))
    cfgs = configs(credentials(folder))
    servers = {name: _procs.start_rnn_serve(args.models, "--session-store", "memory", *flags)
               for name, (flags, _) in cfgs.items()}
    results: dict[str, list[tuple]] = {name: [] for name in cfgs}
    try:
        for r in range(args.rounds):
            for name, (_, kw) in cfgs.items():
                srv = servers[name]
                res = asyncio.run(pingpong(srv.target, model, args.sessions, args.window, kw, srv.cpu_s))
                results[name].append(res)
                print(f"round {r + 1} {name:10} {res[0]:9,.0f} steps/s  {res[1] * 1e6:6.1f} us CPU/step  "
                      f"p50 {res[2]:5.2f} ms  p99 {res[3]:5.2f} ms", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    med = {name: [float(np.median([x[i] for x in rs])) for i in range(4)] for name, rs in results.items()}
    base = med["plain"]
    print(f"\nsummary ({args.sessions} sessions, median of {args.rounds} rounds)")
    for name, (rate, cpu, p50, p99) in med.items():
        print(f"  {name:10} {rate:9,.0f} steps/s  {rate / base[0]:5.2f}x plain  {cpu * 1e6:6.1f} us CPU/step "
              f"({(cpu - base[1]) * 1e6:+5.1f})  p50 {p50:5.2f} ms  p99 {p99:5.2f} ms")
    ratio = med["tokens+tls"][0] / base[0]
    print(f"\ngoal\n  {'✔' if ratio >= 0.9 else '✘'} tokens over TLS / plain  {ratio:.2f}x  goal >= 0.9x  "
          f"{'PASS' if ratio >= 0.9 else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"medians": med, "rounds": results, "time": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
