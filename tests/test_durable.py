"""Sessions that outlive the process: restart survival on the sqlite store, kill -9 under each --state-sync
policy, migration with the last distribution and step count (real rnn-serve processes, loopback)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


class Server:
    """rnn-serve in its own process, with its log; `stub` talks to it."""

    def __init__(self, repo: Path, work: Path, *flags: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port_file = work / f"port-{time.monotonic_ns()}.json"
        self.log = work / "server.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(repo), "--host", "127.0.0.1",
                                          "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                                          "--port-file", str(self.port_file), *flags],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rnn-serve did not start"
            time.sleep(0.05)
        self.port = json.loads(self.port_file.read_text())["port"]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RnnServeStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process and wait for it (SIGKILL for a crash)."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@contextmanager
def server(repo: Path, work: Path, *flags: str) -> Iterator[Server]:
    s = Server(repo, work, *flags)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


def open_session(stub, model: str = "tiny") -> str:
    return stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=model)))).session_id


def step(stub, sid: str, ids: list[int]) -> pb.FeedResult:
    return stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=ids), output=pb.OUTPUT_LAST,
                                                                 logits=True))).result


def vocab(repo: Path, name: str = "tiny") -> int:
    return len(json.loads((repo / name / "1" / "model.json").read_text())["vocab"])


def test_sigterm_with_1000_sessions_then_a_new_server_continues_each_exactly(tiny_repo: Path, tmp_path: Path) -> None:
    """1,000 sessions on the sqlite store; SIGTERM; a new server on the same folder has every one (state,
    last logits, steps bit for bit), and each continues exactly as a session imported with SetState does."""
    rng = np.random.default_rng(0)
    V, state_dir = vocab(tiny_repo), tmp_path / "state"
    exported = {}
    with server(tiny_repo, tmp_path, "--state-dir", str(state_dir), "--grace", "5") as a:
        for _ in range(1000):
            sid = open_session(a.stub)
            step(a.stub, sid, rng.integers(0, V, int(rng.integers(1, 4))).tolist())
            exported[sid] = a.stub.GetState(pb.GetStateRequest(session_id=sid))
        assert a.stop() == 0
        assert "released 1000 to" in a.log.read_text()
    probe = [int(t) for t in rng.integers(0, V, 1000)]
    with server(tiny_repo, tmp_path, "--state-dir", str(state_dir)) as b, \
            server(tiny_repo, tmp_path / "ref", "--session-store", "memory") as ref:
        for (sid, before), tok in zip(exported.items(), probe):
            after = b.stub.GetState(pb.GetStateRequest(session_id=sid))
            assert (after.state, after.logits, after.steps) == (before.state, before.logits, before.steps), sid
            twin = open_session(ref.stub)
            ref.stub.SetState(pb.SetStateRequest(session_id=twin, state=before.state, logits=before.logits,
                                                 steps=before.steps))
            got, want = step(b.stub, sid, [tok]), step(ref.stub, twin, [tok])
            assert got.distributions[0].logits == want.distributions[0].logits and got.steps == want.steps


def test_migration_carries_the_last_distribution_so_a_moved_session_generates_at_once(tiny_repo: Path,
                                                                                       tmp_path: Path) -> None:
    """GetState on one server, SetState on another: the copy generates the same text at once (no feed)."""
    with server(tiny_repo, tmp_path / "a", "--session-store", "memory") as a, \
            server(tiny_repo, tmp_path / "b", "--session-store", "memory") as b:
        src = open_session(a.stub)
        step(a.stub, src, [1, 2, 3, 4])
        st = a.stub.GetState(pb.GetStateRequest(session_id=src))
        assert len(st.logits) == vocab(tiny_repo) and st.steps == 4
        dst = open_session(b.stub)
        back = b.stub.SetState(pb.SetStateRequest(session_id=dst, state=st.state, logits=st.logits, steps=st.steps))
        assert back.steps == 4 and back.logits == st.logits

        def generate(stub, sid: str) -> list[int]:
            q: list = [pb.SessionRequest(request_id=1, resume=pb.Resume(session_id=sid)),
                       pb.SessionRequest(request_id=2, generate=pb.Generate(max_tokens=20, temperature=0.9, seed=3))]
            toks = []
            for r in stub.Session(iter(q), timeout=30):
                if r.WhichOneof("kind") == "chunk":
                    toks += r.chunk.tokens
                    if r.chunk.done:
                        break
                assert r.WhichOneof("kind") != "error", r
            return toks

        assert generate(b.stub, dst) == generate(a.stub, src)
        with pytest.raises(grpc.RpcError) as e:  # a distribution of the wrong length is refused
            b.stub.SetState(pb.SetStateRequest(session_id=dst, state=st.state, logits=[0.0] * 3))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in e.value.details()


def _load(stub, sids: list[str], V: int, seconds: float, acks: dict, stop: threading.Event) -> None:
    """Ping-pong on every session in turn; acks[sid] = [(time acked, steps, tokens so far)]."""
    rng = np.random.default_rng(1)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        for sid in sids:
            tok = int(rng.integers(0, V))
            try:
                res = step(stub, sid, [tok])
            except grpc.RpcError:
                return
            hist = acks.setdefault(sid, [(0.0, 0, [])])
            hist.append((time.monotonic(), res.steps, hist[-1][2] + [tok]))


@pytest.mark.parametrize("policy, bound", [("step", 0.25), ("200ms", 0.5), ("detach", None)])
def test_kill_9_loses_at_most_what_the_policy_allows_and_corrupts_nothing(tiny_repo: Path, tmp_path: Path,
                                                                          policy: str, bound: float | None) -> None:
    """kill -9 during ping-pong: each session comes back at a step count its policy allows (step: what was
    acknowledged up to a moment before the kill; 200ms: up to 200 ms + slack before; detach: the open),
    and its state is exactly what its first `steps` tokens give (a consistent prefix, never a mix)."""
    V, state_dir = vocab(tiny_repo), tmp_path / "state"
    acks: dict = {}
    with server(tiny_repo, tmp_path, "--state-dir", str(state_dir), "--state-sync", policy) as a:
        sids = [open_session(a.stub) for _ in range(8)]
        stop = threading.Event()
        t = threading.Thread(target=_load, args=(a.stub, sids, V, 1.5, acks, stop))
        t.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        stop.set()
        t.join()
    with server(tiny_repo, tmp_path, "--state-dir", str(state_dir)) as b, \
            server(tiny_repo, tmp_path / "ref", "--session-store", "memory") as ref:
        for sid in sids:
            got = b.stub.GetState(pb.GetStateRequest(session_id=sid))
            hist = acks[sid]
            acked = max(s for when, s, _ in hist if when <= killed_at)
            assert got.steps <= acked + 1, (policy, got.steps, acked)  # never ahead of what was asked
            if bound is None:
                assert got.steps == 0
            else:
                floor = max(s for when, s, _ in hist if when <= killed_at - bound)
                assert got.steps >= floor, (policy, got.steps, floor, acked)
            tokens = next((toks for _, s, toks in hist if s == got.steps), None)
            if tokens is None:  # a step acknowledged just as the kill landed: one more than the last ack
                tokens = hist[-1][2][:got.steps]
            twin = open_session(ref.stub)
            for tok in tokens:
                step(ref.stub, twin, [tok])
            want = ref.stub.GetState(pb.GetStateRequest(session_id=twin))
            np.testing.assert_allclose(got.state, want.state, atol=1e-5, err_msg=f"{policy}: {sid} corrupted")


def test_a_second_server_on_the_same_state_folder_is_refused_clearly(tiny_repo: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with server(tiny_repo, tmp_path, "--state-dir", str(state_dir)):
        r = subprocess.run([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--host", "127.0.0.1", "--port",
                            "0", "--metrics-port", "-1", "--state-dir", str(state_dir)],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and str(state_dir) in r.stderr and "--state-dir" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_the_session_cap_and_idle_expiry_hold_across_a_restart(tiny_repo: Path, tmp_path: Path) -> None:
    """--max-sessions counts the sessions in the store, not only those loaded; a session idle past
    --idle-timeout while the server was down is gone after the restart."""
    state_dir = tmp_path / "state"
    flags = ("--state-dir", str(state_dir), "--max-sessions", "3", "--idle-timeout", "2")
    with server(tiny_repo, tmp_path, *flags) as a:
        sids = [open_session(a.stub) for _ in range(3)]
        assert a.stop() == 0
    with server(tiny_repo, tmp_path, *flags) as b:
        with pytest.raises(grpc.RpcError) as e:
            open_session(b.stub)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions" in e.value.details()
        step(b.stub, sids[0], [1])  # restored on use: its idle clock starts again
        assert b.stop() == 0
    time.sleep(2.5)
    with server(tiny_repo, tmp_path, *flags) as c:
        for sid in sids:
            with pytest.raises(grpc.RpcError) as e:
                c.stub.GetState(pb.GetStateRequest(session_id=sid))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, sid
        open_session(c.stub)  # the expired ones no longer count
