"""`rnn-client frames`: stream a CSV's frames to a vector model, one frame per request per sequence id.

Each sequence id of the file is one session; up to --parallel of them are open at once and take turns, one
frame each, so the server sees several devices interleaved. Prints each id's final answer (with --every,
the answer after every frame): the predicted class and its probability, or the forecast of the next frame
(and, with --horizon, of the H after it); with a label column, the accuracy over the ids at the end.
"""
from __future__ import annotations

import argparse
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from . import frames_csv
from .core import RnnServeError
from .frames import FrameResult, describe, vector_text
from .lib import Client, Session

log = logging.getLogger(__name__)
UINT32 = 2**32 - 1  # Feed.horizon's range


class UsageError(ValueError):
    """A file or flag that does not fit (exit 2): a bad CSV, a width or kind the model does not take."""


def add_parser(sub: argparse._SubParsersAction, epilog: str, version: Callable, number: Callable) -> None:
    """The `frames` subcommand's flags; `version` and `number` (cast, lo, hi, what) make rnn-client's checked
    number types, so a bad value is named like every other flag's."""
    horizon = number(int, 0, UINT32, "an integer >= 0 (0 = no rollout)")
    parallel = number(int, 1, 100_000, "an integer from 1 to 100000")
    p = sub.add_parser("frames", help="stream frames from a CSV to a vector model, one frame per request",
                       description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=epilog)
    p.add_argument("model", help="the vector model's name (see `rnn-client models`)")
    p.add_argument("--version", type=version, default=0, help="model version (default 0 = the model's default version)")
    p.add_argument("--csv", required=True, metavar="FILE",
                   help="frames in rnn-train's CSV layout: columns id, optional t, features, optional label")
    p.add_argument("--id", action="append", dest="ids", metavar="ID",
                   help="stream only this sequence id; repeatable (default: every id in the file)")
    p.add_argument("--features", metavar="A,B,...",
                   help="comma-separated feature columns, in the model's order (default: every column but "
                        "id, t and label, in header order)")
    p.add_argument("--horizon", type=horizon, default=0,
                   help="forecasting models: also forecast the next H frames after each answer (default 0)")
    p.add_argument("--every", action="store_true", help="print the answer after every frame (default: the "
                                                        "answer after each id's last frame)")
    p.add_argument("--parallel", type=parallel, default=16,
                   help="ids streamed at once, taking turns one frame each (default 16)")


@dataclass
class _Stream:
    """One sequence id being streamed on its own session."""

    series: frames_csv.FrameSeries
    session: Session
    pos: int = 0
    last: FrameResult | None = None


def _check_model(s: Session, data: frames_csv.FramesFile, args: argparse.Namespace) -> None:
    """UsageError unless the session's model takes these frames (kind, width) and flags (--horizon)."""
    m = s.model
    key = f"{m.name}:{m.version}"
    if m.input_kind != "vector":
        raise UsageError(f"model {key} takes {m.input_kind or 'tokens'} (text or token ids), not frames: "
                         "`rnn-client frames` is for vector models (see `rnn-client models`)")
    if len(data.features) != m.features:
        names = ", ".join(data.features)
        raise UsageError(f"{data.path}: {len(data.features)} feature columns ({names}), but model {key} "
                         f"takes frames of {m.features}; pick them with --features")
    if args.horizon and m.task != "forecast":
        raise UsageError(f"--horizon is for forecasting models; model {key} is a {m.task} model")


def _line(st: _Stream, r: FrameResult, final: bool) -> list[str]:
    """The answer's line(s): id, where in the sequence, the answer, the label; the rollout below it."""
    s = st.series
    where = f"{len(s.frames)} frames" if final else f"t={s.t[st.pos - 1]}"
    label = ""
    if s.labels is not None and s.labels[st.pos - 1] and r.probs_all is not None:  # a classifier's answer
        label = f"  label {s.labels[st.pos - 1]}"
    out = [f"{s.id}  {where}  {describe(r)}{label}"]
    if r.forecast is not None:
        for h in range(len(r.forecast.mean)):
            spread = "" if r.forecast.spread is None else f" spread {vector_text(r.forecast.spread[h])}"
            out.append(f"  +{h + 1} mean {vector_text(r.forecast.mean[h])}{spread}")
    return out


def run(client: Client, args: argparse.Namespace, write: Callable[[str], None],
        reading: Callable[[Session], AbstractContextManager[None]] = lambda s: nullcontext()) -> int:
    """Stream the file's sequences (up to --parallel sessions interleaved) and print the answers; each
    call on a stream runs inside `reading(session)` (the command line's Ctrl-C guard)."""
    features = [c.strip() for c in args.features.split(",")] if args.features else None
    if features is not None and not all(features):
        raise UsageError(f"--features: an empty column name in {args.features!r}")
    try:
        data = frames_csv.read_csv(args.csv, features, args.ids)
    except frames_csv.FramesFileError as err:
        raise UsageError(f"--csv {err}") from None
    todo = deque(data.series)
    first = client.session(args.model, args.version)
    try:
        _check_model(first, data, args)
    except UsageError:
        first.close()
        raise
    live: list[_Stream] = [_Stream(todo.popleft(), first)]
    right = labelled = 0
    try:
        while live:
            while todo and len(live) < args.parallel:
                live.append(_Stream(todo.popleft(), client.session(args.model, first.model.version)))
            for st in list(live):  # each live id sends its next frame, in turn
                with reading(st.session):
                    st.last = st.session.feed_frames(st.series.frames[st.pos], horizon=args.horizon)
                st.pos += 1
                done = st.pos == len(st.series.frames)
                if args.every or done:
                    for text in _line(st, st.last, final=done and not args.every):
                        write(text + "\n")
                if done:
                    live.remove(st)
                    st.session.close()
                    lab = st.series.labels[-1] if st.series.labels else ""
                    if lab and st.last.label is not None:
                        labelled += 1
                        right += st.last.label == lab
    except KeyboardInterrupt:
        for st in live:
            st.session.detach()
        raise
    except BaseException:
        for st in live:
            try:
                st.session.close()
            except RnnServeError:
                st.session.detach()
        raise
    if labelled:
        write(f"accuracy {right}/{labelled} = {right / labelled:.1%} (the class after each id's last frame "
              "against its label)\n")
    return 0
