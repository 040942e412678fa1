"""`rnn-client`: generate text, chat with a carried session, stream frames to a vector model, list models.

Exit status, the convention of every rnnserve command line: 0 done; 1 a runtime error (the server
unreachable or answering with an error: NOT_FOUND, INVALID_ARGUMENT, ...); 2 a usage error (a bad flag or
value, a file that cannot be read), reported before anything is sent; 130 interrupted (Ctrl-C).
Errors go to stderr as `rnn-client: error: ...`, on a line of their own.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from . import frames_cli
from .connection import add_connection_flags, connection_settings, refusal_hint
from .core import RnnServeError, headline
from .interrupts import Interrupts
from .lib import Client, Session

DEFAULT_TARGET = "127.0.0.1:8001"
ENV_PREFIX = "RNNSERVE_"  # RNNSERVE_TARGET, RNNSERVE_TOKEN, RNNSERVE_TLS_CA, ...
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS = ("exit status: 0 done, 1 runtime or server error, 2 usage error (bad flag, value or file), "
               "130 interrupted")
CHAT_HELP = ("lines continue the session; /reset starts it over; /quit, end of input (Ctrl-D) or Ctrl-C "
             "leave it resumable")
CHAT_STOP = "\n\n"  # chat's default stop string: a blank line ends an answer
UINT32, UINT64, INT64 = 2**32 - 1, 2**64 - 1, 2**63 - 1  # the protocol's field ranges


def _number(cast: Callable[[str], Any], lo: float, hi: float, what: str) -> Callable[[str], Any]:
    """An argparse type: `cast` the text and check lo <= value <= hi; argparse names the flag in the error."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        if isinstance(hi, int) and value > hi:  # past the protocol's field
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {text}")
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


POSITIVE_SECONDS = _number(float, math.ulp(0.0), math.inf, "a positive number of seconds")
MAX_TOKENS = _number(int, 1, UINT32, "a positive integer")
TEMPERATURE = _number(float, 0.0, math.inf, "a number >= 0 (0 = greedy)")
TOP_K = _number(int, 0, UINT32, "an integer >= 0 (0 = no top-k filter)")
TOP_P = _number(float, 0.0, 1.0, "a number from 0 to 1 (0 = no nucleus filter)")
SEED = _number(int, 0, UINT64, f"an integer from 0 to {UINT64}")
VERSION = _number(int, 0, INT64, "an integer >= 0 (0 = the default version)")


class _Stdout:
    """stdout, flushed per write, remembering whether its last line is unfinished (an error, a hint or a
    ^C then starts on a line of its own instead of being glued to streamed text)."""

    def __init__(self) -> None:
        self.open_line = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        """Finish an unfinished line (a cut-off answer); a closed pipe has no line to finish."""
        try:
            self.write("\n" if self.open_line else "")
        except BrokenPipeError:
            self.open_line = False


_out = _Stdout()
_intr = Interrupts()  # Ctrl-C while a stream is read: cancel it, raise once the read returns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn-client", description=__doc__.splitlines()[0], epilog=EXIT_STATUS)
    p.add_argument("--target", default=None,
                   help=f"server HOST:PORT (env RNNSERVE_TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=POSITIVE_SECONDS, default=30.0,
                   help="seconds for unary calls, > 0 (default 30)")
    add_connection_flags(p, ENV_PREFIX)
    sub = p.add_subparsers(dest="command", required=True)

    def sampling(sp: argparse.ArgumentParser, max_tokens: int, stop: str, seed: str) -> None:
        sp.add_argument("--model", help="model name (default: the first text model the server lists)")
        sp.add_argument("--version", type=VERSION, default=0, help="model version (default 0 = the model's default version)")
        sp.add_argument("--session", help="resume this session id instead of opening a new one (default: a "
                                          "new session)")
        sp.add_argument("--max-tokens", type=MAX_TOKENS, default=max_tokens,
                        help=f"tokens to generate at most, > 0 (default {max_tokens}; at most the server's limit)")
        sp.add_argument("--temperature", type=TEMPERATURE, default=0.8,
                        help="sampling temperature, >= 0; 0 = greedy (default 0.8)")
        sp.add_argument("--top-k", type=TOP_K, default=0,
                        help="sample among the k most probable tokens; 0 = no top-k filter (default 0)")
        sp.add_argument("--top-p", type=TOP_P, default=0.0,
                        help="sample within the smallest set holding this probability mass, 0..1; 0 (or 1) "
                             "= no nucleus filter (default 0)")
        sp.add_argument("--seed", type=SEED, default=None, help=seed)
        sp.add_argument("--stop", action="append", default=None,
                        help=f"stop string, repeatable (default: {stop})")

    gen = sub.add_parser("generate", help="feed a prompt and stream the continuation", epilog=EXIT_STATUS)
    sampling(gen, 200, "none", "seed for reproducible sampling, 0..2^64-1 (default: random)")
    gen.add_argument("--prompt", default="", help="text fed before generating, echoed with the answer "
                                                  "(default: none: a new session starts after a newline)")
    gen.add_argument("--keep", action="store_true",
                     help="keep a new session open afterwards and print its id (for --session)")
    chat = sub.add_parser("chat", help=f"a REPL on one session: {CHAT_HELP}",
                          description=f"A REPL on one session: {CHAT_HELP}.", epilog=EXIT_STATUS)
    sampling(chat, 300, "a blank line, '\\n\\n'",
             "seed of the first answer, 0..2^64-1; answer i (from 0) uses SEED+i, so answers differ "
             "and a rerun repeats them (default: random)")
    frames_cli.add_parser(sub, EXIT_STATUS, VERSION, _number)
    sub.add_parser("models", help="list the server's models", epilog=EXIT_STATUS)
    fork = sub.add_parser("fork", help="copy a session (state, last distribution, steps) into a new one",
                          epilog=EXIT_STATUS)
    fork.add_argument("--session", required=True, help="the session to fork")
    return p


def _fail(msg: str, code: int = EXIT_ERROR) -> int:
    """Print `msg` on stderr on a line of its own (after any unfinished output) and return `code`."""
    _out.end_line()
    print(f"rnn-client: error: {msg}", file=sys.stderr)
    return code


def _describe(err: RnnServeError, target: str, settings: dict[str, Any]) -> str:
    """A one-line reason naming the problem."""
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return f"server {target} unreachable ({err.message}{refusal_hint(err.message, settings)})"
    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"server {target} did not answer in time"
    return f"{err.code.name}: {err.message}"


def _open(client: Client, args: argparse.Namespace) -> Session:
    """Resume --session, or open a session on --model (default: the first text model listed; generate and
    chat take text, and a vector model listed before it would only refuse it)."""
    if args.session:
        return client.resume(args.session)
    model = args.model
    if not model:
        models = client.list_models()
        text = [m for m in models if m.input_kind != "vector"]
        if not text:
            raise RnnServeError(grpc.StatusCode.NOT_FOUND, "the server has no text models loaded" + (
                " (only vector models: stream frames to them with `rnn-client frames MODEL --csv FILE`)"
                if models else ""))
        model = text[0].name
    return client.session(model, args.version)


def _generate(s: Session, args: argparse.Namespace, stop: Sequence[str], seed: int | None,
              before: str = "") -> None:
    """Stream one generation to stdout; `before` (the echoed prompt) goes out with the first chunk, so a
    rejected request prints nothing but its error."""
    chunks = s.generate(args.max_tokens, args.temperature, args.top_k, args.top_p, seed, stop)
    while True:
        with _intr.reading(s):
            text = next(chunks, None)
        if text is None:
            break
        _out.write(before + text)
        before = ""
    _out.write(before)


def _label(s: Session) -> str:
    return f"[session {s.session_id} · {s.model.name} v{s.model.version} · {s.steps} steps]"


def _resume_hint(s: Session, command: str) -> None:
    print(f"session {s.session_id} kept: resume with `rnn-client {command} --session {s.session_id}`",
          file=sys.stderr)


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    """Feed the prompt, stream the continuation, then close (or keep) the session."""
    s = _open(client, args)
    keep = bool(args.session) or args.keep
    try:
        # a new session has no distribution to sample from until it is fed: with no prompt it starts as a
        # line does (a newline, not echoed) when the model knows one; a resumed session goes on from its own
        start = args.prompt or ("\n" if not s.steps and "\n" in (s.model.vocab or ()) else "")
        if start:
            with _intr.reading(s):
                s.feed(start, output="none")
        _generate(s, args, args.stop or (), args.seed, args.prompt)
        _out.write("\n")
    except RnnServeError:
        if not keep:  # a bad prompt or generate request: don't leave a session behind for the idle timeout
            try:
                with _intr.reading(s):
                    s.close()
            except RnnServeError:
                s.detach()
        raise
    except KeyboardInterrupt:
        s.detach()  # cancel: the server stops generating at once
        if keep:
            _out.end_line()
            _resume_hint(s, "generate")
        raise
    except BaseException:
        s.detach()  # broken pipe: cancel likewise
        raise
    if keep:
        print(_label(s), file=sys.stderr)
        s.detach()
    else:
        with _intr.reading(s):
            s.close()
    return EXIT_OK


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """Answer `turn`'s seed in a chat: the given one plus the turn (mod 2^64), or None (random)."""
    return None if seed is None else (seed + turn) % (UINT64 + 1)


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    """Each input line is fed (with its newline, if the vocab has one) and answered on the same session;
    /quit or end of input return 0, Ctrl-C returns 130, both printing the resume hint on a line of its own."""
    s = _open(client, args)
    tty = sys.stdin.isatty()
    stop = args.stop if args.stop is not None else [CHAT_STOP]
    print(f"{'resumed' if s.opened.resumed else 'opened'} {_label(s)}", file=sys.stderr)
    if tty:
        print(CHAT_HELP, file=sys.stderr)
    prompt_open = False  # the "> " prompt is on screen with the cursor after it
    turn, code = 0, EXIT_OK
    try:
        while True:
            if tty:
                sys.stderr.write("> ")
                sys.stderr.flush()
                prompt_open = True
            line = sys.stdin.readline()
            if not line:  # end of input: on a terminal the cursor is still after the prompt
                break
            prompt_open = False  # the terminal echoed the line's newline
            if line.strip() == "/quit":
                break
            if line.strip() == "/reset":
                with _intr.reading(s):
                    s.reset()
                print(_label(s), file=sys.stderr)
                continue
            try:
                line = line.rstrip("\n")
                with _intr.reading(s):
                    s.feed(line + "\n" if "\n" in s.model.vocab else line, output="none")
            except RnnServeError as err:
                if err.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                print(f"rnn-client: {err.message} (state unchanged)", file=sys.stderr)
                continue
            _generate(s, args, stop, _turn_seed(args.seed, turn))
            turn += 1
            _out.write("\n")
            print(_label(s), file=sys.stderr)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        s.detach()
    _out.end_line()  # an answer cut off by ^C
    if prompt_open:
        sys.stderr.write("\n")
    _resume_hint(s, "chat")
    if code == EXIT_INTERRUPTED:
        print("rnn-client: interrupted", file=sys.stderr)
    return code


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    """One line per loaded model version: its input (characters or frames of F floats) and task too."""
    rows = [("NAME", "VERSION", "CELL", "HIDDEN", "LAYERS", "STATE", "INPUT", "TASK", "METRIC", "DEFAULT")]
    for m in client.list_models():
        vector = m.input_kind == "vector"
        given = f"{m.features} floats" if vector else f"{len(m.vocab)} chars"
        task = f"classify ({len(m.classes)})" if m.task == "classify" else (m.task or "lm")
        rows.append((m.name, str(m.version), m.cell, str(m.hidden_size), str(m.layers), str(m.state_size),
                     given, task, headline(m.task, m.metrics) or "-", "yes" if m.latest else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return EXIT_OK


def cmd_fork(client: Client, args: argparse.Namespace) -> int:
    """Print the new session's id (and its step count) on stdout."""
    opened = client.fork(args.session)
    print(opened.session_id)
    print(f"forked {args.session} at step {opened.steps}: continue it with `rnn-client chat --session "
          f"{opened.session_id}`", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rnn-client`; returns the exit status (0 ok, 1 runtime error, 2 usage, 130 ^C)."""
    parser = _parser()
    args = parser.parse_args(argv)  # a bad flag or value: argparse names it and exits 2
    target = args.target or os.environ.get(f"{ENV_PREFIX}TARGET") or DEFAULT_TARGET
    commands = {"generate": cmd_generate, "chat": cmd_chat, "models": cmd_models, "fork": cmd_fork,
                "frames": lambda c, a: frames_cli.run(c, a, _out.write, _intr.reading)}
    _out.open_line = False
    _intr.install()
    settings: dict[str, Any] = {}
    try:
        settings = connection_settings(args, ENV_PREFIX, os.environ)
        client = Client(target, timeout=args.timeout, **settings)
    except ValueError as err:  # a credentials file that cannot be read, a token that cannot be sent
        parser.error(str(err))
    try:
        with client:
            return commands[args.command](client, args)
    except frames_cli.UsageError as err:  # a file or flag that does not fit the model
        return _fail(str(err), EXIT_USAGE)
    except RnnServeError as err:
        return _fail(_describe(err, target, settings))
    except KeyboardInterrupt:
        _out.end_line()
        print("rnn-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
