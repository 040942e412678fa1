"""rnn-client and rnn-health as console scripts against a real rnn-serve: flag validation naming the flag,
errors on a line of their own, the chat's interrupt and end-of-input hints, per-turn chat seeds, the
health probe's target variables, the exit-code convention, and the GPU override's bounded restarts."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rnnserve.client import Client

BIN = Path(sys.executable).parent
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
MAX_GENERATE = 9000  # the server's --max-generate-tokens: a larger request is rejected after the prompt is fed
HINT = re.compile(r"^session (\S+) kept: resume with `rnn-client chat --session \1`$", re.MULTILINE)


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """rnn-serve (sessions in memory, ephemeral port, no metrics, no polling) on the tiny repository plus
    `flat/1`, a tiny model whose vocabulary has no newline: every newline on stdout is then the CLI's."""
    from conftest import TINY_TEXT, rnn_serve, tiny_model
    from rnnserve.trainer.export import export_model

    work = tmp_path_factory.mktemp("cli-server")
    repo = work / "repo"
    shutil.copytree(tiny_repo, repo)
    flat = TINY_TEXT.replace("\n", " ")
    vocab = sorted(set(flat))
    export_model(tiny_model("elman", 16, 1, "zeros", 4, len(vocab)), vocab, repo, "flat", version=1,
                 eval_text=flat, metrics={"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0},
                 source={"fixture": "tests/test_cli.py"})
    with rnn_serve(repo, work, "--session-store", "memory", "--max-generate-tokens", str(MAX_GENERATE)) as target:
        yield target


@pytest.fixture
def closed_port() -> str:
    """A 127.0.0.1 address nobody listens on: a command that reaches the network fails there with exit 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env.update(extra)
    return env


def cli(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """Run a console script (stdout and stderr apart); `env` adds RNNSERVE_* variables."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], input=stdin, capture_output=True, text=True,
                          timeout=30, env=_env(**env), check=False)


# -- usage errors: exit 2, naming the flag, before anything is sent --------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--max-tokens", "-5"], ("rnn-client generate: error: argument --max-tokens: "
                                         "must be a positive integer, got -5")),
    (["chat", "--max-tokens", "0"], "argument --max-tokens: must be a positive integer, got 0"),
    (["generate", "--max-tokens", "4294967296"], "argument --max-tokens: must be at most 4294967295"),
    (["generate", "--max-tokens", "ten"], "argument --max-tokens: must be a positive integer, got 'ten'"),
    (["--timeout", "0", "models"], ("rnn-client: error: argument --timeout: must be a positive number of "
                                   "seconds, got 0")),
    (["--timeout", "nan", "models"], "argument --timeout: must be a positive number of seconds, got nan"),
    (["generate", "--top-k", "-1"], "argument --top-k: must be an integer >= 0 (0 = no top-k filter)"),
    (["generate", "--top-p", "1.5"], "argument --top-p: must be a number from 0 to 1 (0 = no nucleus filter)"),
    (["chat", "--temperature", "-0.1"], "argument --temperature: must be a number >= 0 (0 = greedy)"),
    (["generate", "--temperature", "inf"], "argument --temperature: must be a number >= 0"),
    (["chat", "--seed", "-1"], "argument --seed: must be an integer from 0 to 18446744073709551615"),
    (["generate", "--version", "-1"], "argument --version: must be an integer >= 0 (0 = the default version)"),
    (["--target", "127.0.0.1:70000", "models"],  # gRPC itself would dial 70000 - 65536 = 4464
     "rnn-client: error: target 127.0.0.1:70000: the port must be a number from 1 to 65535, got '70000'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_name_the_flag(closed_port: str, argv: list[str], message: str) -> None:
    # against a closed port: exit 1 would mean the value got as far as the network
    r = cli("rnn-client", "--target", closed_port, *argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr.splitlines()[-1], r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_help_shows_defaults_and_what_zero_means() -> None:
    gen = cli("rnn-client", "generate", "--help")
    chat = cli("rnn-client", "chat", "--help")
    top = cli("rnn-client", "--help")
    assert gen.returncode == chat.returncode == top.returncode == 0
    g, c = " ".join(gen.stdout.split()), " ".join(chat.stdout.split())  # argparse wraps lines
    assert "(default 200;" in g and "(default 300;" in c
    for text in (g, c):
        assert "0 = no top-k filter (default 0)" in text
        assert "0 (or 1) = no nucleus filter (default 0)" in text
        assert "0 = greedy (default 0.8)" in text
        assert "exit status: 0 done, 1 runtime or server error, 2 usage error" in text
    assert "stop string, repeatable (default: none)" in g
    assert "(default: a blank line, '\\n\\n')" in c
    assert "answer i (from 0) uses SEED+i" in c
    assert "(default 30)" in " ".join(top.stdout.split())


# -- runtime errors: exit 1, on a line of their own ------------------------------------------------------

def test_rejected_generate_prints_no_prompt(server: str) -> None:
    """The prompt is fed, then the generate is refused: nothing but the error, alone on its line."""
    merged = subprocess.run([str(BIN / "rnn-client"), "--target", server, "generate", "--model", "tiny",
                             "--prompt", "First", "--max-tokens", str(MAX_GENERATE + 1)],
                            capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=30, env=_env(), check=False)
    assert merged.returncode == 1, merged.stdout
    assert merged.stdout.startswith(f"rnn-client: error: INVALID_ARGUMENT: max_tokens {MAX_GENERATE + 1} exceeds"), merged.stdout
    assert merged.stdout.count("\n") == 1
    # a prompt outside the vocabulary: refused at the feed, likewise
    r = cli("rnn-client", "--target", server, "generate", "--model", "tiny", "--prompt", "First~")
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert re.fullmatch(r"rnn-client: error: INVALID_ARGUMENT: [^\n]*'~'[^\n]*\n", r.stderr), r.stderr
    # and one that works still echoes the prompt ahead of its continuation
    ok = cli("rnn-client", "--target", server, "generate", "--model", "tiny", "--prompt", "First",
             "--max-tokens", "5", "--seed", "1")
    assert ok.returncode == 0 and ok.stdout.startswith("First") and len(ok.stdout) == len("First") + 6


def test_usage_errors_exit_2_runtime_errors_exit_1(server: str, closed_port: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    for script in ("rnn-client", "rnn-health"):
        argv = [script, "--target", server, "--tls-ca", str(missing)] + (["models"] if script == "rnn-client" else [])
        r = cli(*argv)
        assert r.returncode == 2 and f"--tls-ca {missing}: cannot read" in r.stderr, (script, r.stderr)
    r = cli("rnn-client", "--target", closed_port, "models")
    assert r.returncode == 1 and r.stderr.startswith("rnn-client: error: server") and "unreachable" in r.stderr
    r = cli("rnn-client", "--target", server, "generate", "--model", "no-such-model")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = cli("rnn-health", "--timeout", "0")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "rnn-health: error: argument --timeout: must be a positive number of " \
                                        "seconds, got 0", r.stderr


# -- rnn-health's target ---------------------------------------------------------------------------------

def test_health_reads_its_target_then_the_clients(server: str, closed_port: str) -> None:
    r = cli("rnn-health", RNNSERVE_TARGET=server)
    assert r.returncode == 0 and f"at {server} is SERVING" in r.stdout, r.stderr
    r = cli("rnn-health", "--timeout", "2", RNNSERVE_HEALTH_TARGET=closed_port, RNNSERVE_TARGET=server)
    assert r.returncode == 1 and f"{closed_port} unreachable" in r.stderr, r.stderr
    r = cli("rnn-health", "--target", server, RNNSERVE_HEALTH_TARGET=closed_port, RNNSERVE_TARGET=closed_port)
    assert r.returncode == 0, r.stderr


def test_health_interrupted_exits_130() -> None:
    """A server that accepts the connection but never answers; ^C while rnn-health waits."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(20)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen([str(BIN / "rnn-health"), "--target", target, "--timeout", "25"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        conn, _ = silent.accept()  # the Check call is under way
        with conn:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err == "rnn-health: interrupted\n" and out == "", (proc.returncode, err)


# -- chat: hints on their own line, exit codes, seeds ----------------------------------------------------

class Console:
    """`rnn-client` on a terminal (a pty as stdin), its stdout and stderr collected as they come."""

    def __init__(self, *argv: str, small_stdout: bool = False) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([str(BIN / "rnn-client"), *argv], stdin=slave, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=_env())
        os.close(slave)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._drain, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        if small_stdout:  # a one-page pipe left unread: the answer blocks after 4 KiB, mid-stream
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, 4096)
        for t in self.readers[small_stdout:]:
            t.start()

    def wait_for_held_stdout(self, timeout: float = 20.0) -> None:
        """Wait until the unread stdout pipe (`small_stdout`) holds output: the command is streaming an answer."""
        deadline, held = time.monotonic() + timeout, bytearray(4)
        while True:
            fcntl.ioctl(self.proc.stdout.fileno(), termios.FIONREAD, held)  # bytes waiting in the pipe
            if int.from_bytes(held, sys.byteorder):
                return
            assert self.proc.poll() is None, self.err
            assert time.monotonic() < deadline, f"no output within {timeout} s: {bytes(self.err)!r}"
            time.sleep(0.02)

    def read_stdout(self) -> None:
        """Start draining stdout (after `small_stdout` held it)."""
        if not self.readers[0].is_alive():
            self.readers[0].start()

    @staticmethod
    def _drain(stream, into: bytearray) -> None:
        while chunk := stream.read1(4096):
            into.extend(chunk)

    def wait_for(self, what: str, where: bytearray, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while where.count(what.encode()) < count:
            assert self.proc.poll() is None, (self.out, self.err)
            assert time.monotonic() < deadline, f"no {what!r} x{count} in {bytes(where)!r}"
            time.sleep(0.02)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> tuple[int, str, str]:
        self.read_stdout()
        code = self.proc.wait(timeout=20)
        for t in self.readers:
            t.join(10)
        os.close(self.master)
        return code, self.out.decode(), self.err.decode()


def test_chat_end_of_input_and_ctrl_c_print_the_hint_on_its_own_line(server: str) -> None:
    # Ctrl-D at the prompt: exit 0, the hint below the prompt rather than after it
    chat = Console("--target", server, "chat", "--model", "tiny", "--max-tokens", "8")
    chat.wait_for("> ", chat.err)
    chat.type("\x04")  # the terminal's end of input
    code, out, err = chat.finish()
    assert code == 0 and out == "", (code, err)
    assert HINT.search(err) and err.endswith("> \n" + HINT.search(err).group(0) + "\n"), err
    # Ctrl-C at the prompt: the same hint on its own line, then exit 130
    chat = Console("--target", server, "chat", "--model", "tiny", "--max-tokens", "8")
    chat.wait_for("> ", chat.err)
    chat.proc.send_signal(signal.SIGINT)
    code, out, err = chat.finish()
    assert code == 130, (code, err)
    hint = HINT.search(err)
    assert hint and err.endswith(f"> \n{hint.group(0)}\nrnn-client: interrupted\n"), err
    # Ctrl-C in the middle of an answer (held there by a full stdout pipe): the answer's line is ended,
    # the hint follows on stderr, the session is kept
    chat = Console("--target", server, "chat", "--model", "flat", "--max-tokens", str(MAX_GENERATE),
                "--temperature", "1", "--stop", "~", small_stdout=True)
    chat.wait_for("> ", chat.err)
    chat.type("First\n")
    chat.wait_for_held_stdout()  # answering: a full pipe holds the answer there
    assert b"steps]" not in chat.err.split(b"> ", 1)[1], "the answer ended before it could be interrupted"
    sid = re.search(rb"\[session (\S+) ", chat.err).group(1).decode()
    chat.proc.send_signal(signal.SIGINT)
    code, out, err = chat.finish()
    assert code == 130, (code, err)
    assert 1 < len(out) < MAX_GENERATE and out.endswith("\n") and out.count("\n") == 1, (len(out), out[-80:])
    # (on a terminal the prompt line ended with the echoed input; stdout carried the answer's newline)
    assert err.endswith(f"> session {sid} kept: resume with `rnn-client chat --session {sid}`\n"
                        "rnn-client: interrupted\n"), err
    with Client(server) as c:  # kept, as the hint says
        assert c.get_state(sid).steps > len("First")
        c.close_session(sid)


def test_generate_interrupted_keeps_a_kept_session_and_says_how_to_resume(server: str) -> None:
    gen = Console("--target", server, "generate", "--model", "flat", "--keep", "--prompt", "First",
                  "--max-tokens", str(MAX_GENERATE), "--stop", "~", small_stdout=True)
    gen.wait_for_held_stdout()  # streaming: a full pipe holds the answer there
    assert gen.proc.poll() is None and not gen.err, gen.err
    gen.proc.send_signal(signal.SIGINT)
    code, out, err = gen.finish()
    assert code == 130 and out.startswith("First") and out.endswith("\n") and out.count("\n") == 1, (code, err)
    hint = re.fullmatch(r"session (\S+) kept: resume with `rnn-client generate --session \1`\n"
                        r"rnn-client: interrupted\n", err)
    assert hint, err
    with Client(server) as c:
        assert c.get_state(hint.group(1)).steps > len("First")
        c.close_session(hint.group(1))


def test_chat_seed_gives_each_answer_its_own_seed(server: str, tiny_text: str) -> None:
    """--seed N: answer i uses N+i, so the same line after /reset gets a different (reproducible) answer."""
    line, seed = "First", 2**64 - 1  # the seed wraps: answer 1 uses 0
    argv = ("rnn-client", "--target", server, "chat", "--model", "tiny", "--max-tokens", "30",
            "--temperature", "1", "--stop", "~", "--seed", str(seed))
    r = cli(*argv, stdin=f"{line}\n/reset\n{line}\n")
    assert r.returncode == 0, r.stderr
    nl = "\n" if "\n" in tiny_text else ""
    with Client(server) as c, c.session("tiny") as s:
        want = []
        for answer_seed in (seed, 0):
            s.reset()
            s.feed(line + nl, output="none")
            want.append("".join(s.generate(30, temperature=1, seed=answer_seed, stop=["~"])))
    assert want[0] != want[1], "seeds N and N+1 must give different answers here, or the test proves nothing"
    assert r.stdout == "".join(w + "\n" for w in want), (r.stdout, want)
    assert cli(*argv, stdin=f"{line}\n/reset\n{line}\n").stdout == r.stdout  # a rerun repeats them


# -- the GPU override ------------------------------------------------------------------------------------

def test_gpu_override_gives_up_instead_of_restart_looping(tiny_repo: Path) -> None:
    """Where CUDA is not usable rnn-serve --device cuda exits 1 at once, saying why; the override bounds the
    restarts so the service ends up exited with that reason in its log rather than looping."""
    from test_deploy import COMPOSE, COMPOSE_GPU, resolved

    restart = resolved(COMPOSE, COMPOSE_GPU)["services"]["server"]["restart"]
    match = re.fullmatch(r"on-failure:(\d+)", restart)
    assert match and 1 <= int(match.group(1)) <= 5, restart
    assert resolved(COMPOSE)["services"]["server"]["restart"] == "unless-stopped"  # the CPU server unchanged
    from rnnserve.server.providers import cuda_usable

    usable, why = cuda_usable()
    if usable:
        pytest.skip(f"CUDA is usable here ({why}): nothing to refuse")
    r = subprocess.run([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--host", "127.0.0.1", "--port", "0",
                        "--metrics-port", "-1", "--poll-interval", "0", "--session-store", "memory"], capture_output=True, text=True, timeout=60,
                       env=_env(RNNSERVE_DEVICE="cuda"), check=False)
    assert r.returncode == 1, r.stderr
    assert f"cannot start: --device cuda but CUDA is not usable: {why}" in r.stderr, r.stderr
