"""Frames from a CSV in rnn-train's sequence layout, for `rnn-client frames` (no trainer import: the client
stands alone).

The layout (trainer/series.py has the full description): UTF-8, a header row, then one row per time step;
column `id` (required: which sequence; a sequence's rows are contiguous and in time order), `t` (optional:
a number, strictly increasing within a sequence), `label` (optional: a class name, shown beside the
answer), and every other column a feature, in header order (or the `features` given). Every problem is a
FramesFileError whose message is `FILE: row R, column C: problem` (R is the line number, the header is 1).
"""
from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
RESERVED = ("id", "t", "label")


class FramesFileError(ValueError):
    """A frames file that cannot be streamed; the message names the file, row and column."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None,
                 column: str | None = None) -> None:
        where = [f"row {row}"] if row is not None else []
        where += [f"column {column}"] if column is not None else []
        super().__init__(f"{path}: {', '.join(where) + ': ' if where else ''}{problem}")


@dataclass(frozen=True)
class FrameSeries:
    """One sequence of the file: its id, frames (T, F) float32, each row's t (text) and label (or None)."""

    id: str
    frames: np.ndarray
    t: tuple[str, ...]
    labels: tuple[str, ...] | None


@dataclass(frozen=True)
class FramesFile:
    """The sequences of a file, in file order, and the feature columns their frames hold."""

    path: str
    features: tuple[str, ...]
    series: tuple[FrameSeries, ...]

    @property
    def frames(self) -> int:
        """Frames over all sequences."""
        return sum(len(s.frames) for s in self.series)


def _number(path: Path, text: str, row: int, column: str) -> float:
    """A finite float from a cell, or a FramesFileError naming it."""
    if not text.strip():
        raise FramesFileError(path, "missing value", row, column)
    try:
        v = float(text)
    except ValueError:
        raise FramesFileError(path, f"{text!r} is not a number", row, column) from None
    if not math.isfinite(v):
        raise FramesFileError(path, f"{text!r} is not finite", row, column)
    return v


def _header(path: Path, reader: csv.reader, features: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The header's column names and the feature columns to read, checked."""
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise FramesFileError(path, "is empty: expected a header row with an id column") from None
    col = set(header)
    if len(col) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise FramesFileError(path, f"duplicate column names {dup}", 1)
    if "id" not in col:
        raise FramesFileError(path, f"no 'id' column (header: {', '.join(header)})", 1)
    names = list(features) if features else [h for h in header if h not in RESERVED]
    for n in names:
        if n not in col or n in RESERVED:
            raise FramesFileError(path, f"no feature column {n!r} (header: {', '.join(header)})", 1)
    if len(set(names)) != len(names):
        raise FramesFileError(path, f"a feature column is named twice in {names}")
    if not names:
        raise FramesFileError(path, "no feature columns (every column besides id, t and label is one)", 1)
    return header, names


def read_csv(path: str | Path, features: Sequence[str] | None = None,
             ids: Sequence[str] | None = None) -> FramesFile:
    """The sequences of a CSV, in file order (only those in `ids`, when given); FramesFileError if bad."""
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise FramesFileError(path, f"cannot be read ({e.strerror or e})") from None
    wanted = set(ids) if ids else None
    series: list[FrameSeries] = []
    rows: list[list[float]] = []
    ts: list[str] = []
    labs: list[str] = []
    current: str | None = None
    seen: set[str] = set()
    last_t = 0.0
    reader = csv.reader(f)

    def flush() -> None:
        if current is not None and (wanted is None or current in wanted):
            series.append(FrameSeries(current, np.asarray(rows, np.float32), tuple(ts),
                                      tuple(labs) if "label" in col else None))

    with f:
        try:
            header, names = _header(path, reader, features)
            col = {h: i for i, h in enumerate(header)}
            fidx = [col[n] for n in names]
            for rec in reader:
                row = reader.line_num
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue  # a blank line
                if len(rec) != len(header):
                    where = header[len(rec)] if len(rec) < len(header) else None
                    problem = f"has {len(rec)} fields, the header has {len(header)}"
                    raise FramesFileError(path, problem, row, where)
                sid = rec[col["id"]].strip()
                if not sid:
                    raise FramesFileError(path, "missing sequence id", row, "id")
                new = sid != current
                if new and sid in seen:
                    raise FramesFileError(path, f"sequence {sid!r} resumes here after other sequences (the "
                                          "rows of a sequence must be contiguous)", row, "id")
                if "t" in col:
                    t = _number(path, rec[col["t"]], row, "t")
                    if not new and t <= last_t:
                        problem = f"t {t:g} does not increase (previous row {last_t:g})"
                        raise FramesFileError(path, problem, row, "t")
                    last_t = t
                if new:
                    flush()
                    current, rows, ts, labs = sid, [], [], []
                    seen.add(sid)
                if wanted is not None and sid not in wanted:
                    continue
                rows.append([_number(path, rec[i], row, header[i]) for i in fidx])
                ts.append(rec[col["t"]].strip() if "t" in col else str(len(ts)))
                if "label" in col:
                    labs.append(rec[col["label"]].strip())
        except csv.Error as e:
            raise FramesFileError(path, f"malformed CSV: {e}", reader.line_num) from None
        except UnicodeDecodeError as e:
            raise FramesFileError(path, f"not valid UTF-8: {e.reason}", reader.line_num + 1) from None
    flush()
    if not seen:
        raise FramesFileError(path, "has a header but no rows")
    if wanted is not None:
        missing = [i for i in ids if i not in seen]
        if missing:
            some = sorted(seen)[:5]
            raise FramesFileError(path, f"no sequence with id {missing[0]!r} (ids: {', '.join(some)}"
                                  f"{', ...' if len(seen) > len(some) else ''})")
    return FramesFile(str(path), tuple(names), tuple(series))
