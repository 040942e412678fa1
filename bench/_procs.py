"""For the serving benches: pick the model to serve, start rnn-serve or a ceiling server, wait for its port, stop it."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rnnserve.server.settings import EVENT_LOOPS

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def count(text: str) -> int:
    """argparse type of a count flag (rounds, sessions, calls...): an integer >= 1, or a usage error naming it."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type of a duration flag: a finite number of seconds > 0, or a usage error naming it."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def find_model(repo: Path, name: str | None = None) -> tuple[dict, Path] | None:
    """(model.json, version folder) of the model a bench serves; None if there is none.

    The named model if `name` is given, else an Elman one first, then by name: the same model the
    benches have always measured, whatever else the repository holds.
    """
    found = []
    for meta_file in sorted(repo.glob("*/*/model.json")):
        if meta_file.parent.name.isdigit():
            meta = json.loads(meta_file.read_text())
            if name is None or meta["name"] == name:
                found.append((meta, meta_file.parent))
    found.sort(key=lambda mf: (mf[0].get("cell") != "elman", mf[0]["name"]))  # stable: versions keep path order
    return found[0] if found else None


@dataclass
class ServerProc:
    """A server running in its own process, reachable at 127.0.0.1:port."""

    name: str
    proc: subprocess.Popen
    port: int
    workdir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """The process's resident set size (VmRSS) in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"no VmRSS for pid {self.proc.pid}")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; removes its temp folder."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_port(proc: subprocess.Popen, port_file: Path, log_file: Path, timeout: float = 90.0) -> int:
    """Wait for the server to write its port file (it does so once serving)."""
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start within {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.05)
    return int(json.loads(port_file.read_text())["port"])


def start(name: str, argv: list[str], port_file_flag: str = "--port-file") -> ServerProc:
    """Run argv + [port_file_flag, FILE] with output to a log file; return once it is serving."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    argv = [a.replace("{workdir}", str(workdir)) for a in argv]
    port_file, log_file = workdir / "port.json", workdir / "server.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen([*argv, port_file_flag, str(port_file)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    try:
        port = _wait_port(proc, port_file, log_file)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return ServerProc(name, proc, port, workdir)


def start_ceiling(kind: str, event_loop: str = "auto", model_dir: Path | None = None) -> ServerProc:
    """A ceiling server of bench/_ceilings.py (echo, nothing, or onnxruntime on model_dir), on the event loop
    rnn-serve's --event-loop names."""
    model = ["--model", str(model_dir)] if model_dir is not None else []
    return start(kind, [sys.executable, str(HERE / "_ceilings.py"), kind, "--event-loop", event_loop, *model])


def add_event_loop_flag(parser: argparse.ArgumentParser, ceiling: str) -> None:
    """--event-loop of a bench: rnn-serve's loop, and its ceiling server's (one loop for both, so a ratio never
    compares two loops)."""
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help=f"rnn-serve's --event-loop, and the {ceiling} loop (default auto: uvloop if installed)")


def start_rnn_serve(models: Path, *extra: str, event_loop: str = "auto") -> ServerProc:
    """rnn-serve on a model repository, on 127.0.0.1 with an ephemeral port and no metrics/polling."""
    exe = Path(sys.executable).with_name("rnn-serve")
    argv = [str(exe), "--models", str(models), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
            "--poll-interval", "0", "--log-level", "WARNING", "--state-dir", "{workdir}/state",
            "--event-loop", event_loop, *extra]
    return start("rnn-serve", argv)
