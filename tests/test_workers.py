"""`rnn-serve --workers N`: processes sharing one port and their sessions, restarted when they die, and
sessions kept across a restart of the whole server (a real supervisor, workers and redis-server)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rnnserve.client import Client

BIN = Path(sys.executable).parent


def start(repo: Path, work: Path, *flags: str) -> tuple[subprocess.Popen, dict]:
    port_file = work / "port.json"
    port_file.unlink(missing_ok=True)
    log = (work / "server.log").open("ab")
    proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(repo), "--host", "127.0.0.1", "--port", "0",
                             "--metrics-port", "-1", "--poll-interval", "0", "--state-dir", str(work / "state"),
                             "--port-file", str(port_file), "--grace", "2", *flags],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not port_file.exists():
        assert proc.poll() is None, (work / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "rnn-serve --workers did not start"
        time.sleep(0.1)
    return proc, json.loads(port_file.read_text())


def test_workers_share_the_port_and_the_sessions_and_survive_restarts(tiny_repo: Path, tmp_path: Path) -> None:
    proc, ports = start(tiny_repo, tmp_path, "--workers", "2")
    try:
        assert len(ports["workers"]) == 2
        target = f"127.0.0.1:{ports['port']}"
        sids, steps = [], {}
        for i in range(8):  # a new connection each: the kernel spreads them over the two workers
            with Client(target) as c:
                s = c.session("tiny")
                s.feed([1, 2, i % 5], output="none")
                sids.append(s.session_id)
                s.detach()
        for sid in sids:  # and each resumes from any connection, wherever it lands
            with Client(target) as c:
                steps[sid] = c.step(sid, [4]).steps
        assert set(steps.values()) == {4}

        victim = ports["workers"][0]["pid"]  # a worker killed: started again, sessions still there
        time.sleep(0.5)  # --state-sync step writes behind the answers: let the last ones land before the kill
        os.kill(victim, signal.SIGKILL)
        time.sleep(4)  # its heartbeat lapses (3 s): others may claim its sessions from their last write
        for sid in sids:
            with Client(target) as c:
                assert c.step(sid, [5]).steps == 5, sid

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 2 + 1 + 2  # grace + margin + the private redis-server's own exit
        log = (tmp_path / "server.log").read_text()
        assert "worker 0 exited with -9: starting it again" in log, log[-3000:]

        proc, ports = start(tiny_repo, tmp_path, "--workers", "2")  # the same state folder: the same sessions
        target = f"127.0.0.1:{ports['port']}"
        for sid in sids:
            with Client(target) as c:
                assert c.get_state(sid).steps == 5, sid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_workers_refuse_a_store_they_cannot_share(tiny_repo: Path, tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--port", "0", "--metrics-port", "-1",
                        "--state-dir", str(tmp_path), "--workers", "2", "--session-store", "memory"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--workers needs a store all workers share" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
