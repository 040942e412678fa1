"""The client library, rnn-client and rnn-health against a real rnn-serve on 127.0.0.1 (port 0)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import rnn_serve
from rnnserve.client import AsyncClient, Client, RnnServeError

BIN = Path(sys.executable).parent
LABEL = re.compile(r"\[session (\S+) · (\S+) v(\d+) · (\d+) steps\]")


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """rnn-serve on the tiny repository, ephemeral port, no metrics, no polling."""
    work = tmp_path_factory.mktemp("client-server")
    with rnn_serve(tiny_repo, work, "--state-dir", str(work / "state")) as target:
        yield target


@pytest.fixture(scope="module")
def vocab(tiny_repo: Path) -> list[str]:
    return json.loads((tiny_repo / "tiny" / "1" / "model.json").read_text())["vocab"]


@pytest.fixture
def closed_port() -> str:
    """A 127.0.0.1 address nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def cli(*args: str, stdin: str = "", env_target: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    if env_target:
        env["RNNSERVE_TARGET"] = env_target
    return subprocess.run([str(BIN / args[0]), *args[1:]], input=stdin, capture_output=True, text=True,
                          timeout=30, env=env, check=False)


def test_generate_cli_streams_text_in_the_vocab(server: str, vocab: list[str]) -> None:
    prompt = "".join(vocab[1:4])
    r = cli("rnn-client", "--target", server, "generate", "--model", "tiny", "--prompt", prompt,
            "--max-tokens", "60", "--seed", "7")
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1]  # the trailing newline the CLI adds
    assert text.startswith(prompt) and len(text) == len(prompt) + 60
    assert set(text) <= set(vocab), set(text) - set(vocab)
    # the target also comes from RNNSERVE_TARGET; the same seed gives the same text
    again = cli("rnn-client", "generate", "--model", "tiny", "--prompt", prompt, "--max-tokens", "60",
                "--seed", "7", env_target=server)
    assert again.returncode == 0 and again.stdout == r.stdout


def test_chat_carries_state_and_session_resumes(server: str, vocab: list[str]) -> None:
    lines = ["".join(vocab[2:6]), "".join(vocab[5:8])]
    r = cli("rnn-client", "--target", server, "chat", "--model", "tiny", "--max-tokens", "12",
            "--temperature", "0", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    labels = LABEL.findall(r.stderr)
    assert len(labels) == 3  # opened, after line 1, after line 2
    sid = labels[0][0]
    assert {lab[0] for lab in labels} == {sid}
    assert f"--session {sid}" in r.stderr
    # the answers are what one session fed both lines gives (greedy): the state was carried across lines
    nl = "\n" if "\n" in vocab else ""
    with Client(server) as c, c.session("tiny") as s:
        want = []
        for line in lines:
            s.feed(line + nl, output="none")
            want.append("".join(s.generate(12, temperature=0, stop=["\n\n"])))
    assert r.stdout == "".join(w + "\n" for w in want), (r.stdout, want)
    steps = [int(lab[3]) for lab in labels]
    fed = [len(line + nl) for line in lines]
    assert steps == [0, fed[0] + len(want[0]), fed[0] + fed[1] + len(want[0] + want[1])]
    # --session resumes the same state: the steps go on from where the chat stopped
    more = cli("rnn-client", "--target", server, "generate", "--session", sid, "--max-tokens", "5",
               "--temperature", "0")
    assert more.returncode == 0, more.stderr
    (label,) = LABEL.findall(more.stderr)
    assert label[0] == sid and int(label[3]) == steps[2] + 5
    back = cli("rnn-client", "--target", server, "chat", "--session", sid, "--max-tokens", "4",
               "--temperature", "0", stdin=lines[0] + "\n")
    assert back.returncode == 0 and f"resumed [session {sid}" in back.stderr, back.stderr
    after = int(LABEL.findall(back.stderr)[-1][3])
    assert after > steps[2] + 5 + len(lines[0])
    with Client(server) as c:
        assert c.get_state(sid).steps == after
        c.close_session(sid)


def test_cli_errors_name_the_problem(server: str, closed_port: str) -> None:
    r = cli("rnn-client", "--target", server, "generate", "--session", "no-such-session", "--max-tokens", "3")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    r = cli("rnn-client", "--target", closed_port, "models")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    r = cli("rnn-client", "--target", server, "generate", "--model", "no-such-model", "--max-tokens", "3")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "no-such-model" in r.stderr
    r = cli("rnn-client", "--target", server, "models")
    assert r.returncode == 0 and {"tiny", "tiny-lstm", "tiny-gru"} <= set(re.findall(r"^(\S+)", r.stdout, re.MULTILINE))


def test_health_probe(server: str, closed_port: str) -> None:
    r = cli("rnn-health", "--target", server)
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    r = cli("rnn-health", "--target", closed_port, "--timeout", "2")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    r = cli("rnn-health", "--target", server, "--service", "no.such.Service")
    assert r.returncode == 1 and "unknown service" in r.stderr


def test_library_errors_carry_codes_and_leave_the_session_usable(server: str, vocab: list[str]) -> None:
    outside = next(ch for ch in "~@#$%^&*|ÿ" if ch not in vocab)
    with Client(server) as c:
        with c.session("tiny") as s:
            first = s.feed(vocab[1], top_k=3)
            assert first.steps == 1 and len(first.distributions[0].top_ids) == 3
            for bad, code in ((outside, grpc.StatusCode.INVALID_ARGUMENT),
                              ([len(vocab)], grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(RnnServeError) as exc:
                    s.feed(bad)
                assert exc.value.code == code and exc.value.session_id == s.session_id
            assert s.feed(vocab[2], output="none").steps == 2  # unchanged by the bad feeds, still usable
            state = c.get_state(s.session_id)
            with pytest.raises(RnnServeError) as exc:
                c.set_state(s.session_id, list(state.state) + [0.0])
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RnnServeError) as exc:
            c.resume(s.session_id)  # closed by the with block
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RnnServeError) as exc:
            c.step("nope", vocab[1])
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RnnServeError) as exc:
            c.session("no-such-model")
        assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_async_client_round_trip(server: str, vocab: list[str]) -> None:
    async def go() -> tuple[str, str, int]:
        async with AsyncClient(server) as c:
            models = {m.name for m in await c.list_models()}
            assert "tiny" in models
            s = await c.session("tiny")
            await s.feed("".join(vocab[1:4]), "none")
            text = "".join([t async for t in s.generate(20, temperature=0, chunk_tokens=4)])
            with pytest.raises(RnnServeError) as exc:
                await s.feed([-1])
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
            s.detach()
            again = await c.resume(s.session_id)  # survives a dropped stream
            steps = again.steps
            await again.close()
            opened = await c.open_session("tiny")
            unary = (await c.step(opened.session_id, "".join(vocab[1:4]), "none")).steps
            await c.close_session(opened.session_id)
            return text, s.session_id, steps + unary
    text, sid, steps = asyncio.run(go())
    assert len(text) == 20 and set(text) <= set(vocab) and sid and steps == 23 + 3
