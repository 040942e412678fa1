"""Which version new sessions get: the promotion rule rnn-export applies after publishing, `rnn-export promote`,
and `--load` (asking a running server to load what was just published).

The default of a model is the version its `default.json` names (server.contract, "The default pointer"), or
its highest usable version when there is none. Publishing never moves it silently:
- before publishing, a model without a followable pointer gets one on its current default (`pin`), so the
  new version is not the default merely for being the highest;
- after publishing, `apply_rule` moves it by the rule: `always`, `never`, or `if-better` (the default): the
  new version becomes the default when its recorded metric is no worse than the current default's.
  Token models compare metrics.val_loss (lower is better); vector models the first of test_loss (lower),
  test_accuracy (higher), test_rmse (lower) that both record. Numbers measured on different evaluation
  files (source.eval_corpus_sha256 / eval_series_sha256) are not comparable, nor is a missing metric:
  the version is then not promoted, and the decision says why.
Decisions and explicit promotions hold a lock on the model folder (`.default.lock`), so two exporters
judge one after the other. Torch-free.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client.connection import add_connection_flags, connection_settings
from ..server.contract import (
    DEFAULT_FILE,
    DefaultPointer,
    ModelFormatError,
    ModelMeta,
    check_version,
    read_default,
    version_numbers,
    write_default,
)
from .publish import ExportError

RULES = ("if-better", "always", "never")
TOKEN_METRICS = (("val_loss", True),)  # (model.json metrics key, lower is better), compared in this order
VECTOR_METRICS = (("test_loss", True), ("test_accuracy", False), ("test_rmse", True))
EVAL_KEYS = ("eval_corpus_sha256", "eval_series_sha256")  # model.json source: what the metrics were measured on
LOCK_FILE = ".default.lock"
ENV_PREFIX = "RNNSERVE_"  # --load's credentials: RNNSERVE_TOKEN, RNNSERVE_TLS_CA, ... as rnn-client reads them
NO_POINTER = f"highest version (no {DEFAULT_FILE})"


@dataclass(frozen=True)
class Decision:
    """The outcome of a promotion rule: whether the version became the default, the default now, and why."""

    promoted: bool
    default: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """For rnn-export's JSON line and the batch report."""
        return {"promoted": self.promoted, "default": self.default, "promotion": self.reason}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def locked(name_dir: Path) -> Iterator[None]:
    """Hold the model folder's promotion lock (an flock on `.default.lock`)."""
    name_dir.mkdir(parents=True, exist_ok=True)
    with open(name_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def usable(vdir: Path) -> ModelMeta | None:
    """The version's model.json if it passes the contract's schema and checksums (as `rnn-export list`)."""
    try:
        return check_version(vdir)
    except (OSError, ModelFormatError):
        return None


def current_default(name_dir: Path, exclude: int | None = None) -> tuple[int | None, str]:
    """(the model's default version as the server would choose it among usable versions, why); (None, why)
    when no usable version exists. `exclude`: a version to leave out (the one being judged)."""
    try:
        pointer = read_default(name_dir)
        problem = ""
    except ModelFormatError as e:
        pointer, problem = None, f"{DEFAULT_FILE} is broken: {e}"
    if pointer is not None and pointer.version != exclude and usable(name_dir / str(pointer.version)):
        return pointer.version, pointer.reason or f"named by {DEFAULT_FILE}"
    if pointer is not None and pointer.version != exclude:
        problem = f"{DEFAULT_FILE} names version {pointer.version}, which is not usable"
    for v in reversed(version_numbers(name_dir)):
        if v != exclude and usable(name_dir / str(v)):
            return v, f"highest version ({problem})" if problem else NO_POINTER
    return None, problem or "no usable version"


def pin(repo: str | Path, name: str) -> DefaultPointer | None:
    """Before publishing: give a model whose default is its highest version only by fallback a pointer on that
    version, so the version about to appear is not the default before the rule has judged it."""
    name_dir = Path(repo) / name
    if not name_dir.is_dir():
        return None
    with locked(name_dir):
        version, why = current_default(name_dir)
        if version is None or not why.startswith("highest version"):
            return None
        pointer = DefaultPointer(version, f"{why}, pinned by rnn-export before publishing a new version", _now())
        write_default(name_dir, pointer)
        return pointer


def _number(meta: ModelMeta, key: str) -> float | None:
    v = meta.metrics.get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def compare(new: ModelMeta, old: ModelMeta, new_v: int, old_v: int) -> tuple[bool | None, str]:
    """(True: no worse, False: worse, None: not comparable) and the sentence saying so."""
    if new.input_kind != old.input_kind:
        return None, f"version {new_v} takes {new.input_kind} and version {old_v} {old.input_kind}: not comparable"
    for key in EVAL_KEYS:
        a, b = new.source.get(key), old.source.get(key)
        if a and b and a != b:
            return None, (f"versions {new_v} and {old_v} were measured on different evaluation files "
                          f"(source.{key} differs)")
    table = TOKEN_METRICS if new.input_kind == "tokens" else VECTOR_METRICS
    for key, lower in table:
        a, b = _number(new, key), _number(old, key)
        if a is None or b is None:
            continue
        ok = a <= b if lower else a >= b
        sign = ("<=" if ok else ">") if lower else (">=" if ok else "<")
        return ok, f"{key} {a:.4f} {sign} {b:.4f} of version {old_v}"
    keys = " / ".join(k for k, _ in table)
    side = next((f"version {v}" for v, m in ((new_v, new), (old_v, old))
                 if all(_number(m, k) is None for k, _ in table)), f"versions {new_v} and {old_v}")
    return None, f"{side} records no {keys} (metrics) to compare"


def apply_rule(repo: str | Path, name: str, version: int, rule: str = "if-better") -> Decision:
    """After publishing `version`: move the default (or keep it) by the rule; writes default.json."""
    if rule not in RULES:
        raise ExportError(f"--promote must be one of {', '.join(RULES)}, got {rule!r}")
    name_dir = Path(repo) / name
    with locked(name_dir):
        new = usable(name_dir / str(version))
        if new is None:
            raise ExportError(f"{name_dir / str(version)} is not a usable version: it cannot be promoted")
        cur, cur_why = current_default(name_dir, exclude=version)
        if rule == "always":
            return _promote(name_dir, version, "promoted on publish (--promote always)")
        if cur is None:
            if rule == "never":
                return Decision(False, version, f"not promoted (--promote never), but no other version is usable "
                                                f"({cur_why}): it serves as the default until one is promoted")
            return _promote(name_dir, version, f"first usable version of {name} (--promote if-better)")
        _keep(name_dir, cur, cur_why, version)
        if rule == "never":
            return Decision(False, cur, f"not promoted (--promote never); the default stays version {cur}")
        ok, why = compare(new, usable(name_dir / str(cur)), version, cur)
        if ok:
            return _promote(name_dir, version, f"{why} (--promote if-better)")
        verdict = "worse" if ok is False else "not comparable"
        return Decision(False, cur, f"not promoted, {verdict}: {why}; the default stays version {cur} "
                                    f"(promote it by hand: rnn-export promote {repo} {name} {version})")


def _promote(name_dir: Path, version: int, reason: str) -> Decision:
    write_default(name_dir, DefaultPointer(version, reason, _now()))
    return Decision(True, version, reason)


def _keep(name_dir: Path, cur: int, cur_why: str, new: int) -> None:
    """Make the current default explicit (when it is the default by fallback only) before judging `new`."""
    if cur_why.startswith("highest version"):
        write_default(name_dir, DefaultPointer(cur, f"{cur_why}, kept when version {new} was published", _now()))


def promote(repo: str | Path, name: str, version: int, reason: str = "") -> Decision:
    """`rnn-export promote`: make a usable version the default by hand."""
    name_dir = Path(repo) / name
    vdir = name_dir / str(version)
    if not vdir.is_dir():
        have = ", ".join(map(str, version_numbers(name_dir))) or "none"
        raise ExportError(f"{vdir} does not exist (versions of {name}: {have})")
    with locked(name_dir):
        try:
            check_version(vdir)
        except (OSError, ModelFormatError) as e:
            raise ExportError(f"version {version} of {name} is not usable, so it cannot be the default: {e}") from None
        return _promote(name_dir, version, reason or "promoted by hand (rnn-export promote)")


# -- asking a running server to load (the KServe repository extension) ---------------------------------------
class LoadError(Exception):
    """The server could not be reached, or did not load the version; the message says which and why."""


def load_on_server(target: str, name: str, version: int, timeout: float = 60.0, **credentials: Any) -> str:
    """RepositoryModelLoad of `name` on the KServe endpoint at target, then its index: a line saying that
    `version` is READY and which version is the default; LoadError otherwise."""
    import grpc

    from ..client.connection import connection, refusal_hint
    from ..server.kserve.descriptors import SERVICE, messages

    pb = messages()
    conn = connection(target, **credentials)

    def rpc(channel: Any, method: str, request: Any, response: type) -> Any:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                   response_deserializer=response.FromString)
        return call(request, timeout=timeout, metadata=conn.metadata)

    with conn.channel(grpc, target) as channel:
        try:
            rpc(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name),
                pb.RepositoryModelLoadResponse)
            index = rpc(channel, "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                raise LoadError(f"cannot reach {target}: {details or 'connection failed'}"
                                f"{refusal_hint(details, credentials)}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LoadError(f"{target} did not answer within {timeout:g} s") from None
            raise LoadError(f"{target} answered {code.name}: {details}") from None
    rows = [m for m in index.models if m.name == name]
    mine = next((m for m in rows if m.version == str(version)), None)
    if mine is None or mine.state != "READY":
        state = f"{mine.state}: {mine.reason}" if mine is not None else "not loaded (outside its --serve-versions)"
        raise LoadError(f"{target} loaded {name} but version {version} is {state}")
    default = next((m for m in rows if m.reason.startswith("default for new sessions")), None)
    said = f"version {default.version} ({default.reason.split(': ', 1)[-1]})" if default else "unknown"
    return f"loaded on {target}: {name} version {version} is READY; default for new sessions: {said}"


# -- the command lines' flags (rnn-export, rnn-export batch, rnn-export promote) -------------------------------
def positive_seconds(text: str) -> float:
    """--load-timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """--load TARGET, its timeout and the client's credential flags."""
    p.add_argument("--load", metavar="TARGET", help="after publishing, ask the server at HOST:PORT (its KServe "
                   "endpoint) to load the model, and report the result (default: do not)")
    p.add_argument("--load-timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                   help="how long --load waits for the server (default 60)")
    add_connection_flags(p, ENV_PREFIX)


def add_promotion_flags(p: argparse.ArgumentParser) -> None:
    """--promote and the --load flags, shared by the single and the batch export."""
    p.add_argument("--promote", choices=RULES, default="if-better",
                   help="when the published version becomes the default for new sessions: if-better (its "
                        "val_loss, or a vector model's test_loss / test_accuracy / test_rmse, is no worse than "
                        "the current default's), always, or never (default: if-better)")
    add_load_flags(p)


def load_credentials(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """--load's credentials from the flags and environment, read before anything is published (a bad flag or
    file: exit 2 naming it)."""
    if not args.load:
        return {}
    try:
        return connection_settings(args, ENV_PREFIX, os.environ)
    except ValueError as e:
        p.error(str(e))


def load_after_publish(args: argparse.Namespace, credentials: dict, name: str, version: int, what: str,
                       prog: str = "rnn-export") -> int:
    """--load: ask the server to load `name`; prints the result (stdout) or why not (stderr); exit code."""
    from .promote import LoadError, load_on_server

    try:
        print(load_on_server(args.load, name, version, args.load_timeout, **credentials))
    except (LoadError, ValueError) as e:
        print(f"{prog}: error: {what}, but not loaded on {args.load}: {e}", file=sys.stderr)
        return 1
    return 0
