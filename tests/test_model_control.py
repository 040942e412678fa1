"""Model control: the KServe repository RPCs (index, load, unload) through the real tritonclient, in both
--model-control modes, and `rnn-export --load` through the console script against a live server."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc
from conftest import TINY_TEXT, save_tiny_checkpoint, tiny_model
from rnnserve.server.settings import parse
from test_kserve import Served, StreamCollector, status_of, tokens_input
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

BIN = Path(sys.executable).parent
POLL = 0.2


def index(client: tc.InferenceServerClient, ready: bool = False, repository: str = "") -> dict:
    """RepositoryIndex as {(name, version): (state, reason)}: tritonclient's call, or (for `ready` and a
    repository name, which it does not pass) its stub with Triton's own request message."""
    if ready or repository:
        models = client._client_stub.RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=ready, repository_name=repository)).models
    else:
        models = client.get_model_repository_index().models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def until(cond, what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def refused(call, *args, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kw)
    return e.value


@pytest.fixture()
def repo(tmp_path: Path, tiny_repo: Path) -> Path:
    out = tmp_path / "repo"
    shutil.copytree(tiny_repo, out)
    return out


def test_explicit_mode_loads_named_models_then_only_on_request(repo: Path) -> None:
    """--load-model tiny: only tiny is READY, the others are UNAVAILABLE saying how to load them; a new folder is
    not picked up without a load; load serves it at once; unload retires a model under a live sequence, which
    runs to its end, then unloads (its statistics go with it); errors name the problem."""
    s = Served(repo, model_control="explicit", load_models="tiny", poll_interval=POLL)
    c = s.client
    try:
        assert "model_repository" in c.get_server_metadata().extensions
        idx = index(c)
        assert idx[("tiny", "1")][0] == "READY" and idx[("tiny", "1")][1].startswith("default for new sessions")
        assert idx[("tiny-gru", "")] == ("UNAVAILABLE",
                                         "not loaded (--model-control explicit: RepositoryModelLoad loads it)")
        assert set(index(c, ready=True)) == {("tiny", "1")}
        assert c.is_model_ready("tiny") and not c.is_model_ready("tiny-gru")

        shutil.copytree(repo / "tiny-lstm", repo / "late")  # a new folder: explicit mode does not poll
        time.sleep(3 * POLL)
        assert not c.is_model_ready("late") and index(c)[("late", "")][0] == "UNAVAILABLE"
        c.load_model("late")  # answers once it is served
        assert c.is_model_ready("late") and index(c)[("late", "1")][0] == "READY"
        c.infer("late", [tokens_input([1, 2])])
        c.load_model("tiny-gru")
        assert c.is_model_ready("tiny-gru")

        col = StreamCollector()  # a live sequence on tiny, then tiny is unloaded under it
        c.start_stream(callback=col)
        try:
            c.async_stream_infer("tiny", [tokens_input([1, 2])], request_id="a", sequence_id=5, sequence_start=True)
            assert col.take(1)[0][1] is None
            assert c.get_inference_statistics("tiny").model_stats[0].inference_stats.success.count == 1
            c.unload_model("tiny")
            assert not c.is_model_ready("tiny")
            assert index(c)[("tiny", "1")][0] == "UNLOADING"
            e = refused(c.infer, "tiny", [tokens_input([1])])
            assert "NOT_FOUND" in status_of(e) and "unloaded" in e.message()
            c.async_stream_infer("tiny", [tokens_input([3])], request_id="b", sequence_id=5)  # runs on
            c.async_stream_infer("tiny", [tokens_input([4])], request_id="c", sequence_id=5, sequence_end=True)
            assert [err for _, err in col.take(2)] == [None, None]
        finally:
            c.stop_stream()
        until(lambda: index(c).get(("tiny", "")) == ("UNAVAILABLE", "unloaded"), "tiny to unload after its sequence")
        e = refused(c.get_inference_statistics, "tiny")
        assert "NOT_FOUND" in status_of(e)
        c.load_model("tiny")  # back, from zero
        st = c.get_inference_statistics("tiny").model_stats[0]
        assert st.inference_stats.success.count == 0 and st.execution_count == 0

        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / "2")  # reload picks up a new version
        meta = json.loads((repo / "tiny" / "2" / "model.json").read_text())
        (repo / "tiny" / "2" / "model.json").write_text(json.dumps({**meta, "version": 2}))
        c.load_model("tiny")
        assert list(c.get_model_metadata("tiny").versions) == ["2"]

        (repo / "broken" / "1").mkdir(parents=True)  # a folder whose only version does not load
        (repo / "broken" / "1" / "model.json").write_text("{not json")
        e = refused(c.load_model, "broken")
        assert "FAILED_PRECONDITION" in status_of(e) and "version 1 did not load" in e.message()
        assert "not valid JSON" in e.message() and "no version of it is loaded" in e.message()
        assert index(c)[("broken", "1")][0] == "UNAVAILABLE" and "not valid JSON" in index(c)[("broken", "1")][1]
        for call, name, code, needle in ((c.load_model, "nope", "NOT_FOUND", "no model folder 'nope'"),
                                         (c.load_model, "../tiny", "INVALID_ARGUMENT", "not a model folder name"),
                                         (c.unload_model, "nope", "NOT_FOUND", "no model folder 'nope'")):
            e = refused(call, name)
            assert code in status_of(e) and needle in e.message(), e
        e = refused(c.load_model, "tiny", config=json.dumps({"max_batch_size": 8}))
        assert "INVALID_ARGUMENT" in status_of(e) and "'config'" in e.message()
        c.unload_model("tiny-gru", unload_dependents=True)  # Triton's one unload parameter is accepted
        until(lambda: not c.is_model_ready("tiny-gru"), "tiny-gru to unload")
    finally:
        s.close()


def test_poll_mode_load_rescans_and_unload_is_refused(repo: Path) -> None:
    """poll (the default): everything loads; RepositoryModelLoad scans now (no wait for a poll); Unload is
    FAILED_PRECONDITION naming the mode (Triton refuses both in poll mode: we keep Load as a rescan)."""
    s = Served(repo)  # poll_interval 0: no watcher, so only the load can have loaded the new folder
    c = s.client
    try:
        assert {n for n, _ in index(c, ready=True)} == {"tiny", "tiny-gru", "tiny-lstm"}
        shutil.copytree(repo / "tiny-gru", repo / "fresh")
        assert not c.is_model_ready("fresh")
        c.load_model("fresh")
        assert c.is_model_ready("fresh")
        e = refused(c.unload_model, "tiny")
        assert "FAILED_PRECONDITION" in status_of(e) and "--model-control poll" in e.message()
        assert c.is_model_ready("tiny")
        with pytest.raises(grpc.RpcError) as e:
            index(c, repository="elsewhere")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown repository" in e.value.details()
        assert index(c) == index(c, repository=repo.name)
    finally:
        s.close()


def test_only_the_control_principals_may_load_and_unload(repo: Path, tmp_path: Path) -> None:
    """With --auth-tokens, Load/Unload are for --control-principals (PERMISSION_DENIED naming the flag for
    anyone else); the index and the statistics stay open to every authenticated caller."""
    from rnnserve.server.auth import digest

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"principal": "ops", "sha256": digest("ops-secret")},
                                             {"principal": "app", "sha256": digest("app-secret")}]}))
    s = Served(repo, model_control="explicit", load_models="tiny", auth_tokens=tokens, control_principals="ops")
    ops, app = {"authorization": "Bearer ops-secret"}, {"authorization": "Bearer app-secret"}
    try:
        for call in (s.client.load_model, s.client.unload_model):
            e = refused(call, "tiny-gru", headers=app)
            assert "PERMISSION_DENIED" in status_of(e) and "--control-principals" in e.message(), e
        assert s.client.get_model_repository_index(headers=app).models
        assert s.client.get_inference_statistics("tiny", headers=app).model_stats
        s.client.load_model("tiny-gru", headers=ops)
        assert s.client.is_model_ready("tiny-gru", headers=app)
        e = refused(s.client.load_model, "tiny-gru")  # no credentials at all
        assert "UNAUTHENTICATED" in status_of(e)
    finally:
        s.close()


def test_model_control_settings() -> None:
    """Triton's rules for the flags: names only in explicit mode, '*' alone, folder names; one process."""
    s = parse(["--model-control", "explicit", "--load-model", "a", "--load-model", "b"], {})
    assert s.load_model_names() == ["a", "b"]
    assert parse([], {"RNNSERVE_MODEL_CONTROL": "explicit", "RNNSERVE_LOAD_MODELS": "a, b"}).load_model_names() == \
        ["a", "b"]
    assert parse([], {}).model_control == "poll"
    assert parse(["--control-principals", "ops, ci"], {}).control_principal_names() == ["ops", "ci"]
    for argv in (["--load-model", "a"], ["--model-control", "explicit", "--load-model", "*", "--load-model", "a"],
                 ["--model-control", "sometimes"], ["--model-control", "explicit", "--load-model", "../x"],
                 ["--model-control", "explicit", "--workers", "2"]):
        with pytest.raises(SystemExit) as e:
            parse(argv, {})
        assert e.value.code == 2, argv


# ----------------------------------------------------------------------------- rnn-export --load
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rnn_export_load_asks_the_server_and_says_when_it_cannot(tmp_path: Path, repo: Path) -> None:
    """`rnn-export CKPT --load HOST:PORT` publishes, then the (explicit-mode) server loads it and the command
    says so; with no server there it still publishes and exits 1 saying the version was published, not loaded."""
    vocab = sorted(set(TINY_TEXT))
    ckpt = save_tiny_checkpoint(tmp_path / "fresh.pt", tiny_model("gru", 16, 1, "zeros", 9, len(vocab)),
                                val_loss=2.5, steps=1)
    s = Served(repo, model_control="explicit", load_models="tiny")
    try:
        assert not s.client.is_model_ready("fresh")
        r = subprocess.run([str(BIN / "rnn-export"), str(ckpt), "--repo", str(repo), "--load", s.url],
                           check=False, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[0])
        assert out["name"] == "fresh" and out["version"] == 1 and out["promoted"] is True
        assert f"loaded on {s.url}: fresh version 1 is READY; default for new sessions: version 1" in r.stdout
        assert s.client.is_model_ready("fresh", "1")
        shutil.copytree(repo / "fresh" / "1", repo / "fresh" / "2")  # published by hand, then promoted by hand
        meta = json.loads((repo / "fresh" / "2" / "model.json").read_text())
        (repo / "fresh" / "2" / "model.json").write_text(json.dumps({**meta, "version": 2}))
        r = subprocess.run([str(BIN / "rnn-export"), "promote", str(repo), "fresh", "2", "--load", s.url],
                           check=False, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "fresh version 2 is READY; default for new sessions: version 2 (promoted by hand" in r.stdout
        assert list(s.client.get_model_metadata("fresh").versions) == ["2"]
        shutil.rmtree(repo / "fresh" / "2")
    finally:
        s.close()
    dead = f"127.0.0.1:{_free_port()}"
    r = subprocess.run([str(BIN / "rnn-export"), str(ckpt), "--repo", str(repo), "--load", dead,
                        "--load-timeout", "5"], check=False, capture_output=True, text=True, timeout=240)
    assert r.returncode == 1
    assert json.loads(r.stdout.splitlines()[0])["version"] == 2  # published first
    assert (repo / "fresh" / "2" / "model.json").is_file()
    assert f"version 2 of fresh was published (promoted), but not loaded on {dead}: cannot reach {dead}" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([str(BIN / "rnn-export"), str(ckpt), "--repo", str(repo), "--load", dead, "--tls-ca",
                        str(tmp_path / "missing.pem")], check=False, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "--tls-ca" in r.stderr and "missing.pem" in r.stderr
    assert not (repo / "fresh" / "3").exists()  # a bad flag is refused before anything is published
