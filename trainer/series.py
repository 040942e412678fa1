"""Numeric sequences for `rnn-train --series`: the CSV and NPZ layouts, normalisation, batches.

CSV (UTF-8, comma-separated, a header row, then one row per time step):
    id      required: which sequence the row belongs to (any text). A sequence's rows are contiguous and
            in time order.
    t       optional: a number per row, strictly increasing within a sequence (checked, otherwise unused).
    label   optional: a class name (any text). With `--labels sequence` (the default) it is the class of the
            row's sequence and must be the same on all of its rows; with `--labels step` each row has its own.
            Forecasting ignores it.
    other   every other column is a feature, in header order (`--features a,b,c` picks and orders some
            instead): a finite number on every row. F = the number of features.
NPZ (numpy.savez, no pickled objects):
    x         float (N, T, F): N sequences of up to T steps
    lengths   optional int (N,): steps of each sequence, 1..T; steps past it are padding and never read
    y         optional int, classes 0..C-1: (N,) one per sequence, or (N, T) one per step
    classes   optional str (C,): class names (default "0" .. "C-1")
    features  optional str (F,): feature names (default "x0" .. "x{F-1}")
Every problem is a SeriesError whose message is `FILE: row R, column C: problem`: R is the CSV line number
(the header is row 1), C the column's header name; in an NPZ, R is `sequence i, step t` and C an array and
index. Normalisation (per-feature mean and std) is fitted on the training split only and travels with the model.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LABEL_MODES = ("sequence", "step")
RESERVED = ("id", "t", "label")
PAD_LABEL = -100  # a padded step's label (torch's cross-entropy ignore_index)


class SeriesError(ValueError):
    """A sequence file that cannot be trained on; the message names the file, row and column."""

    def __init__(self, path: str | Path, problem: str, row: int | str | None = None,
                 column: str | None = None) -> None:
        where = [f"row {row}" if isinstance(row, int) else row] if row is not None else []
        where += [f"column {column}"] if column is not None else []
        super().__init__(f"{path}: {', '.join(where) + ': ' if where else ''}{problem}")
        self.path, self.row, self.column = str(path), row, column


@dataclass(frozen=True)
class SeriesSet:
    """Sequences of float32 frames (T_i, F) with optional class labels, as one file held them."""

    path: str
    seqs: tuple[np.ndarray, ...]  # (T_i, F) float32 each
    features: tuple[str, ...]
    ids: tuple[str, ...]
    labels: tuple[np.ndarray, ...] | None = None  # int64: (1,) per sequence, or (T_i,) per step
    label_mode: str | None = None  # "sequence" or "step" when labelled
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def frames(self) -> int:
        """Total time steps over all sequences."""
        return sum(len(s) for s in self.seqs)

    def subset(self, index: np.ndarray) -> SeriesSet:
        """The sequences at `index`, in that order."""
        pick = [int(i) for i in index]
        labels = None if self.labels is None else tuple(self.labels[i] for i in pick)
        return replace(self, seqs=tuple(self.seqs[i] for i in pick), ids=tuple(self.ids[i] for i in pick),
                       labels=labels)


def _class_order(names: set[str]) -> tuple[str, ...]:
    """Class names in order: numerically when all are integers ("2" before "10"), else as text."""
    try:
        return tuple(sorted(names, key=lambda n: (int(n), n)))
    except ValueError:
        return tuple(sorted(names))


def _number(path: Path, text: str, row: int, column: str) -> float:
    if not text.strip():
        raise SeriesError(path, "missing value", row, column)
    try:
        v = float(text)
    except ValueError:
        raise SeriesError(path, f"{text!r} is not a number", row, column) from None
    if not math.isfinite(v):
        raise SeriesError(path, f"{text!r} is not finite", row, column)
    return v


def load_csv(path: str | Path, labels: str | None = "sequence", features: list[str] | None = None,
             classes: tuple[str, ...] | None = None) -> SeriesSet:
    """Read the CSV layout; `labels` None ignores a label column, `classes` fixes the class order (a test file)."""
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise SeriesError(path, f"cannot be read: {e.strerror or e}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SeriesError(path, "is empty: expected a header row with an id column") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise SeriesError(path, f"unreadable: {e}", 1) from None
        col = {h: i for i, h in enumerate(header)}
        if len(col) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise SeriesError(path, f"duplicate column names {dup}", 1)
        if "id" not in col:
            raise SeriesError(path, f"no 'id' column (header: {', '.join(header)})", 1)
        names = list(features) if features else [h for h in header if h not in RESERVED]
        for n in names:
            if n not in col or n in RESERVED:
                raise SeriesError(path, f"no feature column {n!r} (header: {', '.join(header)})", 1)
        if not names:
            raise SeriesError(path, "no feature columns (every column besides id, t and label is one)", 1)
        use_label = labels is not None
        if use_label and "label" not in col:
            raise SeriesError(path, "no 'label' column to classify by", 1)
        fidx = [col[n] for n in names]
        seqs: list[list[list[float]]] = []
        ids: list[str] = []
        labs: list[list[str]] = []
        done: set[str] = set()
        last_t = 0.0
        try:
            for rec in reader:
                row = reader.line_num
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue  # a blank line
                if len(rec) != len(header):
                    where = header[len(rec)] if len(rec) < len(header) else str(len(rec))
                    raise SeriesError(path, f"has {len(rec)} fields, the header has {len(header)}", row, where)
                sid = rec[col["id"]].strip()
                if not sid:
                    raise SeriesError(path, "missing sequence id", row, "id")
                new = not ids or sid != ids[-1]
                if new and sid in done:
                    raise SeriesError(path, f"sequence {sid!r} resumes here after other sequences (the rows "
                                      "of a sequence must be contiguous)", row, "id")
                if "t" in col:
                    t = _number(path, rec[col["t"]], row, "t")
                    if not new and t <= last_t:
                        raise SeriesError(path, f"t {t:g} does not increase (previous row {last_t:g})", row, "t")
                    last_t = t
                try:
                    frame = [float(rec[i]) for i in fidx]
                except ValueError:
                    frame = [_number(path, rec[i], row, header[i]) for i in fidx]  # names the bad cell
                if not all(map(math.isfinite, frame)):
                    bad = next(i for i, v in zip(fidx, frame) if not math.isfinite(v))
                    raise SeriesError(path, f"{rec[bad]!r} is not finite", row, header[bad])
                if new:
                    if ids:
                        done.add(ids[-1])
                    ids.append(sid)
                    seqs.append([])
                    labs.append([])
                seqs[-1].append(frame)
                if use_label:
                    lab = rec[col["label"]].strip()
                    if not lab:
                        raise SeriesError(path, "missing label", row, "label")
                    if classes is not None and lab not in classes:
                        raise SeriesError(path, f"label {lab!r} is not one of the training classes "
                                          f"{list(classes)}", row, "label")
                    if labels == "sequence" and labs[-1] and lab != labs[-1][0]:
                        raise SeriesError(path, f"label {lab!r} differs from {labs[-1][0]!r} earlier in sequence "
                                          f"{sid!r} (--labels sequence wants one label per sequence)", row, "label")
                    labs[-1].append(lab)
        except csv.Error as e:
            raise SeriesError(path, f"malformed CSV: {e}", reader.line_num) from None
        except UnicodeDecodeError as e:
            raise SeriesError(path, f"not valid UTF-8: {e.reason}", reader.line_num + 1) from None
    if not seqs:
        raise SeriesError(path, "has a header but no rows")
    arrays = tuple(np.asarray(s, dtype=np.float32) for s in seqs)
    if not use_label:
        return SeriesSet(str(path), arrays, tuple(names), tuple(ids))
    order = classes if classes is not None else _class_order({x for ls in labs for x in ls})
    index = {c: i for i, c in enumerate(order)}
    out = [np.asarray([index[x] for x in (ls[:1] if labels == "sequence" else ls)], np.int64) for ls in labs]
    return SeriesSet(str(path), arrays, tuple(names), tuple(ids), tuple(out), labels, tuple(order))


def load_npz(path: str | Path, labels: str | None = "sequence", features: list[str] | None = None,
             classes: tuple[str, ...] | None = None) -> SeriesSet:
    """Read the NPZ layout (see the module docstring); arguments as load_csv."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise SeriesError(path, f"is not a readable .npz file: {e}") from None
    if "x" not in arrays:
        raise SeriesError(path, f"has no array 'x' (has {', '.join(arrays) or 'none'})")
    x = arrays["x"]
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1 or x.dtype.kind not in "fiu":
        raise SeriesError(path, f"x must be a non-empty numeric (N, T, F) array, got {x.dtype} {x.shape}")
    N, T, F = x.shape
    lengths = arrays.get("lengths", np.full(N, T))
    if lengths.shape != (N,) or lengths.dtype.kind not in "iu":
        raise SeriesError(path, f"lengths must be {N} integers, got {lengths.dtype} {lengths.shape}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= T:
            raise SeriesError(path, f"length {n} is outside 1..{T}", f"sequence {i}", f"lengths[{i}]")
    names = [str(n) for n in arrays.get("features", [f"x{i}" for i in range(F)])]
    if len(names) != F:
        raise SeriesError(path, f"features names {len(names)} columns, x has {F}")
    if features:
        missing = [n for n in features if n not in names]
        if missing:
            raise SeriesError(path, f"no feature {missing[0]!r} (features: {', '.join(names)})")
        pick = [names.index(n) for n in features]
        x, names = x[:, :, pick], list(features)
    seqs = []
    for i, n in enumerate(lengths):
        s = np.asarray(x[i, :n], dtype=np.float32)
        bad = np.argwhere(~np.isfinite(s))
        if len(bad):
            t, f = (int(v) for v in bad[0])
            raise SeriesError(path, f"value {s[t, f]} is not finite", f"sequence {i}, step {t}",
                              f"{names[f]} (x[{i}, {t}, {f}])")
        seqs.append(s)
    ids = tuple(str(i) for i in range(N))
    if labels is None:
        return SeriesSet(str(path), tuple(seqs), tuple(names), ids)
    if "y" not in arrays:
        raise SeriesError(path, "has no array 'y' of labels to classify by")
    y = arrays["y"]
    mode = "sequence" if y.ndim == 1 else "step"
    if y.dtype.kind not in "iu" or y.shape not in ((N,), (N, T)):
        raise SeriesError(path, f"y must be integers of shape ({N},) or ({N}, {T}), got {y.dtype} {y.shape}")
    if mode != labels:
        raise SeriesError(path, f"y has one label per {mode}, but --labels is {labels}")
    order = classes if classes is not None else tuple(
        str(c) for c in arrays.get("classes", [str(k) for k in range(int(y.max()) + 1)]))
    out = []
    for i, n in enumerate(lengths):
        lab = y[i : i + 1] if mode == "sequence" else y[i, :n]
        bad = np.flatnonzero((lab < 0) | (lab >= len(order)))
        if len(bad):
            t = int(bad[0])
            where = f"sequence {i}" if mode == "sequence" else f"sequence {i}, step {t}"
            raise SeriesError(path, f"label {lab[t]} is not a class index 0..{len(order) - 1}", where,
                              f"y[{i}]" if mode == "sequence" else f"y[{i}, {t}]")
        out.append(np.asarray(lab, np.int64))
    return SeriesSet(str(path), tuple(seqs), tuple(names), ids, tuple(out), mode, order)


def load_series(path: str | Path, labels: str | None = "sequence", features: list[str] | None = None,
                classes: tuple[str, ...] | None = None) -> SeriesSet:
    """Read a .csv or .npz sequence file (by its suffix); see the module docstring for the layouts."""
    p = Path(path)
    if labels is not None and labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES} or None, got {labels!r}")
    if not p.is_file():
        raise SeriesError(p, "does not exist or is not a file")
    if p.suffix.lower() == ".npz":
        return load_npz(p, labels, features, classes)
    if p.suffix.lower() == ".csv":
        return load_csv(p, labels, features, classes)
    raise SeriesError(p, "has neither a .csv nor a .npz suffix")


def fit_normalization(data: SeriesSet) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (F,) float32 over every frame of `data` (the training split only).

    A constant feature gets std 1, so it is centred and left alone rather than divided by zero.
    """
    frames = np.concatenate(data.seqs).astype(np.float64)  # (N_frames, F)
    mean, std = frames.mean(axis=0), frames.std(axis=0)
    flat = ~(std > 1e-6 * np.maximum(1.0, np.abs(mean)))
    for i in np.flatnonzero(flat):
        log.warning("%s: feature %s is constant (%g): std set to 1", data.path, data.features[i], mean[i])
    std[flat] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def split_off(data: SeriesSet, fraction: float, seed: int) -> tuple[SeriesSet, SeriesSet | None]:
    """(train, validation): a seeded random `fraction` of the sequences held out (none when 0)."""
    if fraction <= 0:
        return data, None
    n_val = max(1, round(len(data) * fraction))
    if n_val >= len(data):
        raise SeriesError(data.path, f"{len(data)} sequences are too few to hold {fraction:.0%} out for validation")
    order = np.random.default_rng([seed, 1]).permutation(len(data))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def pad(data: SeriesSet, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sequences at `index` padded at the end: x (B, T, F) float32, lengths (B,), labels (B,) or (B, T)."""
    seqs = [data.seqs[int(i)] for i in index]
    lengths = np.asarray([len(s) for s in seqs], np.int64)
    x = np.zeros((len(seqs), int(lengths.max()), seqs[0].shape[1]), np.float32)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = s
    if data.labels is None:
        return x, lengths, None
    if data.label_mode == "sequence":
        return x, lengths, np.asarray([data.labels[int(i)][0] for i in index], np.int64)
    y = np.full(x.shape[:2], PAD_LABEL, np.int64)
    for b, i in enumerate(index):
        y[b, : lengths[b]] = data.labels[int(i)]
    return x, lengths, y


class SeriesBatches:
    """Batches of B sequence indices: a seeded shuffle per epoch; `position` (batches served) resumes exactly."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no sequences to batch")
        self.n, self.batch, self.seed, self.position = n, min(batch, n), seed, 0
        self.per_epoch = math.ceil(n / self.batch)

    def indices(self, k: int) -> np.ndarray:
        """Batch k's sequence indices (the last batch of an epoch may be smaller)."""
        epoch, j = divmod(k, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return order[j * self.batch : (j + 1) * self.batch]

    def next(self) -> np.ndarray:
        """The next batch in order."""
        out = self.indices(self.position)
        self.position += 1
        return out
