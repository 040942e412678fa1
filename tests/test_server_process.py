"""rnn-serve as a real subprocess (port file, SIGTERM drain), settings parsing, repository checks."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.repository import Repository
from rnnserve.server.settings import Settings, parse

BIN = Path(sys.executable).parent


def test_settings_flags_override_env_override_defaults(tmp_path: Path, capsys) -> None:
    assert parse([], {}) == Settings()
    env = {"RNNSERVE_PORT": "9001", "RNNSERVE_IDLE_TIMEOUT": "0", "RNNSERVE_SERVE_VERSIONS": "all",
           "RNNSERVE_MODELS": str(tmp_path)}
    s = parse(["--port", "0", "--max-batch", "8"], env)
    assert (s.port, s.idle_timeout, s.serve_versions, s.models, s.max_batch) == (0, 0.0, 0, tmp_path, 8)
    assert parse(["--serve-versions", "3"], {}).serve_versions == 3
    for bad in (["--device", "tpu"], ["--max-batch", "0"], ["--serve-versions", "0"], ["--grace", "-1"]):
        with pytest.raises(SystemExit):
            parse(bad, {})
    for bad, said in ((["--port", "70000"], "--port must be 0"),  # gRPC would bind 70000 - 65536 = 4464
                      (["--metrics-port", "-2"], "--metrics-port must be -1")):
        with pytest.raises(SystemExit) as e:
            parse(bad, {})
        assert e.value.code == 2 and said in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        parse([], {"RNNSERVE_PORT": "eighty"})


def test_a_missing_model_repository_is_a_usage_error(tmp_path: Path) -> None:
    """rnn-serve --models on a folder that does not exist stops at once (exit 2) naming the flag and the path,
    rather than serving nothing; an empty folder is fine (models published into it are picked up)."""
    r = subprocess.run([str(BIN / "rnn-serve"), "--models", str(tmp_path / "nope"), "--session-store", "memory"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.strip() == (f"rnn-serve: error: --models {tmp_path / 'nope'}: no such folder (the model "
                                "repository; it may be empty, and models published into it later are picked up)")


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_names_the_flag_and_exits_cleanly(tiny_repo: Path, flag: str) -> None:
    """A port already taken stops the start with exit 1 and one error naming the flags, and whatever had
    started (the gRPC server, the models) is stopped: no traceback from a server left behind."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        r = subprocess.run([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--session-store", "memory",
                            other, "0", flag, str(port)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1, (r.returncode, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    host = "--host 127.0.0.1" if flag == "--port" else "--metrics-host 127.0.0.1"
    assert len(errors) == 1 and f"cannot start: {host} {flag} {port}: cannot listen there" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_a_broken_version_is_skipped_once_with_its_reason(tiny_repo: Path, tmp_path: Path, caplog) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    shutil.copytree(tiny_repo / "tiny" / "1", repo / "tiny" / "2")
    meta = json.loads((repo / "tiny/2/model.json").read_text())
    meta["version"] = 2
    (repo / "tiny/2/model.json").write_text(json.dumps(meta))
    (repo / "tiny/2/model.onnx").write_bytes(b"\0corrupt" + (repo / "tiny/2/model.onnx").read_bytes()[8:])
    r = Repository(repo, ["CPUExecutionProvider"], serve_versions=1)
    with caplog.at_level(logging.ERROR, logger="rnnserve.server.repository"):
        added, _ = r.scan()
        r.scan()
    assert [m.key for m in added] == ["tiny:1"] and r.get("tiny").version == 1
    errors = [rec.getMessage() for rec in caplog.records]
    assert len(errors) == 1 and "tiny/2" in errors[0] and "sha256" in errors[0], errors


def test_sigterm_drains_a_generation_and_exits_zero(tiny_repo: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port.json"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "-1", "--poll-interval", "0", "--grace", "1",
                             "--state-dir", str(tmp_path / "state"), "--port-file", str(port_file)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "rnn-serve did not start"
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RnnServeStub(ch)

            def reqs():
                yield pb.SessionRequest(request_id=1, open=pb.Open(model=pb.ModelRef(name="tiny")))
                yield pb.SessionRequest(request_id=2, feed=pb.Feed(tokens=pb.TokenIds(ids=[1])))
                yield pb.SessionRequest(request_id=3, generate=pb.Generate(max_tokens=4096, temperature=1.0,
                                                                          chunk_tokens=4))
                time.sleep(30)  # keep the stream open; the server must end the call itself

            last = None
            for resp in stub.Session(reqs()):
                if resp.WhichOneof("kind") == "chunk":
                    if last is None:
                        proc.send_signal(signal.SIGTERM)
                    last = resp
                    if resp.chunk.done:
                        break
        assert last is not None and last.chunk.done
        assert last.chunk.finish_reason in (pb.FINISH_REASON_CANCELLED, pb.FINISH_REASON_LENGTH)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "server.log").read_text()
    assert "provider: CPUExecutionProvider" in out and "draining" in out and "Traceback" not in out, out
    assert "event loop: uvloop" in out, out  # the default (auto) with uvloop installed, as the package requires


def test_the_event_loop_is_chosen_by_flag_and_a_missing_uvloop_is_named(tiny_repo: Path, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    """--event-loop asyncio serves on asyncio's own loop (stepped for real here; the default, uvloop, serves
    every other process test); uvloop asked for but not importable is a usage error naming the flag, and
    auto falls back to asyncio's loop; an unknown value is refused by name."""
    from rnnserve.server import loops

    name, factory = loops.loop_factory("asyncio")
    made = factory()
    try:  # asyncio's own loop even where a policy (uvloop.install(), say) would hand out another
        assert name == "asyncio" and type(made).__module__.startswith("asyncio."), type(made)
    finally:
        made.close()
    assert loops.loop_factory("auto")[0] == loops.loop_factory("uvloop")[0] == "uvloop"
    with pytest.raises(SystemExit) as e:
        parse(["--event-loop", "tokio"], {})
    assert e.value.code == 2 and "--event-loop must be auto, uvloop or asyncio, got 'tokio'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loops.loop_factory("auto")[0] == "asyncio"
    with pytest.raises(loops.LoopUnavailable, match="--event-loop uvloop: uvloop does not import"):
        loops.loop_factory("uvloop")
    monkeypatch.undo()
    code = ("import sys; sys.modules['uvloop'] = None; from rnnserve.server.main import main; "
            f"sys.exit(main(['--models', {str(tiny_repo)!r}, '--event-loop', 'uvloop']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("rnn-serve: error: --event-loop uvloop: uvloop does not "
                                                     "import"), (r.returncode, r.stderr)
    port_file = tmp_path / "port.json"
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--port", "0",
                                 "--metrics-port", "-1", "--poll-interval", "0", "--session-store", "memory",
                                 "--event-loop", "asyncio", "--port-file", str(port_file)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{json.loads(port_file.read_text())['port']}") as ch:
            stub = pb_grpc.RnnServeStub(ch)
            opened = stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"))))
            fed = stub.Step(pb.StepRequest(session_id=opened.session_id, feed=pb.Feed(
                tokens=pb.TokenIds(ids=[1, 2]), output=pb.OUTPUT_LAST, logits=True)))
        assert fed.result.fed == 2 and len(fed.result.distributions[0].logits) == len(opened.model.vocab)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "server.log").read_text()
    assert "event loop: asyncio" in out and "Traceback" not in out, out


def test_provider_choice_is_quiet_and_says_why(capfd) -> None:
    from rnnserve.server import providers

    assert providers.choose("cpu") == (["CPUExecutionProvider"], "--device cpu")
    chosen, why = providers.choose("auto")
    assert chosen[-1] == "CPUExecutionProvider" and why
    ok, _ = providers.cuda_usable()
    assert (chosen[0] == "CUDAExecutionProvider") == ok
    if not ok:
        with pytest.raises(RuntimeError, match="CUDA is not usable"):
            providers.choose("cuda")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
