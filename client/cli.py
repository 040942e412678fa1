"""`rnn-client`: generate text, chat with a carried session, and list models on an rnnserve server."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from .core import RnnServeError, add_connection_flags, connection_settings, refusal_hint
from .lib import Client, Session

DEFAULT_TARGET = "127.0.0.1:8001"
ENV_PREFIX = "RNNSERVE_"  # RNNSERVE_TARGET, RNNSERVE_TOKEN, RNNSERVE_TLS_CA, ...
CHAT_HELP = "lines continue the session; /reset starts it over, /quit (or end of input) leaves it resumable"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn-client", description=__doc__)
    p.add_argument("--target", default=None,
                   help=f"server HOST:PORT (env RNNSERVE_TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for unary calls (default 30)")
    add_connection_flags(p, ENV_PREFIX)
    sub = p.add_subparsers(dest="command", required=True)

    def sampling(sp: argparse.ArgumentParser, max_tokens: int) -> None:
        sp.add_argument("--model", help="model name (default: the first model the server lists)")
        sp.add_argument("--version", type=int, default=0, help="model version (default: latest)")
        sp.add_argument("--session", help="resume this session id instead of opening a new one")
        sp.add_argument("--max-tokens", type=int, default=max_tokens)
        sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--top-p", type=float, default=0.0)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")

    gen = sub.add_parser("generate", help="feed a prompt and stream the continuation")
    sampling(gen, 200)
    gen.add_argument("--prompt", default="", help="text fed before generating")
    gen.add_argument("--keep", action="store_true",
                     help="keep a new session open afterwards and print its id (for --session)")
    chat = sub.add_parser("chat", help=f"a REPL on one session: {CHAT_HELP}")
    sampling(chat, 300)
    chat.set_defaults(stop=None)
    sub.add_parser("models", help="list the server's models")
    fork = sub.add_parser("fork", help="copy a session (state, last distribution, steps) into a new one")
    fork.add_argument("--session", required=True, help="the session to fork")
    return p


def _fail(msg: str, code: int = 1) -> int:
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
    """Resume --session, or open a session on --model (default: the first listed model)."""
    if args.session:
        return client.resume(args.session)
    model = args.model
    if not model:
        models = client.list_models()
        if not models:
            raise RnnServeError(grpc.StatusCode.NOT_FOUND, "the server has no models loaded")
        model = models[0].name
    return client.session(model, args.version)


def _generate(s: Session, args: argparse.Namespace, stop: Sequence[str]) -> None:
    """Stream one generation to stdout, flushing per chunk."""
    for text in s.generate(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed, stop):
        sys.stdout.write(text)
        sys.stdout.flush()


def _label(s: Session) -> str:
    return f"[session {s.session_id} · {s.model.name} v{s.model.version} · {s.steps} steps]"


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    """Feed the prompt, stream the continuation, then close (or keep) the session."""
    s = _open(client, args)
    keep = bool(args.session) or args.keep
    try:
        if args.prompt:
            s.feed(args.prompt, output="none")
            sys.stdout.write(args.prompt)
        _generate(s, args, args.stop)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except RnnServeError:
        if not keep:  # a bad prompt or generate request: don't leave a session behind for the idle timeout
            try:
                s.close()
            except RnnServeError:
                s.detach()
        raise
    except BaseException:
        s.detach()  # mid-generation (^C, broken pipe): cancel; the server stops generating at once
        raise
    if keep:
        print(_label(s), file=sys.stderr)
        s.detach()
    else:
        s.close()
    return 0


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    """Each input line is fed (with its newline, if the vocab has one) and answered on the same session."""
    s = _open(client, args)
    tty = sys.stdin.isatty()
    stop = args.stop if args.stop is not None else ["\n\n"]
    print(f"{'resumed' if s.opened.resumed else 'opened'} {_label(s)}", file=sys.stderr)
    if tty:
        print(CHAT_HELP, file=sys.stderr)
    try:
        while True:
            if tty:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/quit":
                break
            if line.strip() == "/reset":
                s.reset()
                print(_label(s), file=sys.stderr)
                continue
            try:
                line = line.rstrip("\n")
                s.feed(line + "\n" if "\n" in s.model.vocab else line, output="none")
            except RnnServeError as err:
                if err.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                print(f"rnn-client: {err.message} (state unchanged)", file=sys.stderr)
                continue
            _generate(s, args, stop)
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(_label(s), file=sys.stderr)
    finally:
        s.detach()
    print(f"session {s.session_id} kept: resume with `rnn-client chat --session {s.session_id}`",
          file=sys.stderr)
    return 0


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    """One line per loaded model version."""
    rows = [("NAME", "VERSION", "CELL", "HIDDEN", "LAYERS", "STATE", "VOCAB", "VAL_LOSS", "LATEST")]
    for m in client.list_models():
        loss = m.metrics.get("val_loss")
        rows.append((m.name, str(m.version), m.cell, str(m.hidden_size), str(m.layers), str(m.state_size),
                     str(len(m.vocab)), "-" if loss is None else f"{loss:.4f}", "yes" if m.latest else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_fork(client: Client, args: argparse.Namespace) -> int:
    """Print the new session's id (and its step count) on stdout."""
    opened = client.fork(args.session)
    print(opened.session_id)
    print(f"forked {args.session} at step {opened.steps}: continue it with `rnn-client chat --session "
          f"{opened.session_id}`", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rnn-client`; returns the exit status (0 ok, 1 server error, 2 usage, 130 ^C)."""
    args = _parser().parse_args(argv)
    target = args.target or os.environ.get(f"{ENV_PREFIX}TARGET") or DEFAULT_TARGET
    commands = {"generate": cmd_generate, "chat": cmd_chat, "models": cmd_models, "fork": cmd_fork}
    settings: dict[str, Any] = {}
    try:
        settings = connection_settings(args, ENV_PREFIX, os.environ)
        with Client(target, timeout=args.timeout, **settings) as client:
            return commands[args.command](client, args)
    except RnnServeError as err:
        sys.stdout.flush()
        return _fail(_describe(err, target, settings))
    except ValueError as err:
        return _fail(str(err), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
