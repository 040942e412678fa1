"""rnn-export batch: many checkpoints into one repository.

batch: every checkpoint gets every check of the single export; one whose weights, config and vocab
(its content hash, recorded in model.json `source`; the same checkpoint file by the same exporter
short-cuts that without unpickling) are already published under its name is skipped, so a rerun is
cheap and idempotent. Failures are reported and the others still run; exit 1 if any
failed. Versions are published by atomic rename (see trainer.publish), so a kill leaves only `.tmp-*`
folders that no reader accepts and the next export cleans up. Each published version is judged by the
promotion rule (--promote, trainer.promote) as soon as it is out, in the order the exports finish; --load
then asks a running server to load every model that got a new version.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..server.contract import (
    META_FILE,
    ONNX_FILES,
    OPTIONAL_FILES,
    ModelFormatError,
    check_version,
    sha256_file,
    version_numbers,
)
from .export import default_name
from .listing import human_size
from .promote import add_promotion_flags, apply_rule, load_after_publish, load_credentials, pin
from .publish import check_name, name_arg, naming_repo

STATUSES = ("ok", "skipped", "failed")
PARITY_KEYS = ("step", "sequence_vs_step", "sequence_vs_torch")  # model.json "checks": max abs differences


@dataclass(frozen=True)
class BatchArgs:
    """Settings of one batch run, parsed once."""

    checkpoints: tuple[str, ...]
    repo: str
    name: str | None = None
    jobs: int = 1
    eval_corpus: str | None = None
    report: str | None = None
    force: bool = False
    progress: bool = True
    promote: str = "if-better"


def expand(patterns: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Paths and globs -> checkpoint paths in order (deduplicated), plus a failure per glob matching nothing."""
    paths, missing, seen = [], [], set()
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not hits:
            missing.append(_result(pat, None, error=f"no checkpoint matches {pat!r}"))
        for h in hits:
            key = os.path.abspath(h)
            if key not in seen:
                seen.add(key)
                paths.append(h)
    return paths, missing


def _result(ckpt: str, name: str | None, **kw: Any) -> dict[str, Any]:
    """One report row."""
    row = {"checkpoint": ckpt, "name": name, "version": None, "status": "failed", "val_loss": None,
           "parity": None, "sizes": {}, "seconds": 0.0, "error": None, "path": None, "promoted": None,
           "default": None, "promotion": None}
    row.update(kw)
    return row


def _fill(row: dict[str, Any], path: Path) -> None:
    """Copy version, val_loss, parity error and file sizes from a published folder into a report row."""
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    row.update(path=str(path), version=meta["version"], val_loss=meta["metrics"].get("val_loss"),
               parity=max((v for k, v in meta.get("checks", {}).items() if k in PARITY_KEYS), default=None),
               sizes={f: (path / f).stat().st_size for f in (*ONNX_FILES, *OPTIONAL_FILES) if (path / f).is_file()})


_INDEX: dict[Path, dict[int, dict[str, Any]]] = {}  # per process: name folder -> version -> its "source"


def _sources(name_dir: Path) -> dict[int, dict[str, Any]]:
    """`source` of every published version, newest first; model.json is read once per version per process."""
    seen = _INDEX.setdefault(name_dir.resolve(), {})
    for v in version_numbers(name_dir):
        if v not in seen:
            try:
                seen[v] = json.loads((name_dir / str(v) / META_FILE).read_text(encoding="utf-8"))["source"]
            except (OSError, ValueError, KeyError, TypeError):
                seen[v] = {}  # damaged: never "already there"
    return {v: seen[v] for v in sorted(seen, reverse=True)}


def find_unchanged(name_dir: Path, eval_sha: str | None, content: str | None = None,
                   ckpt_sha: str | None = None, exporter: str | None = None) -> Path | None:
    """The newest intact version exported from the same content (or the same checkpoint file by the same
    exporter) with the same eval corpus, if any."""
    for v, src in _sources(name_dir).items():
        same = (content is not None and src.get("content_sha256") == content) or (
            ckpt_sha is not None and src.get("checkpoint_sha256") == ckpt_sha and src.get("exporter") == exporter)
        if not same or (eval_sha and src.get("eval_corpus_sha256") != eval_sha):
            continue
        d = name_dir / str(v)
        try:
            if check_version(d).source == src:  # schema and checksums, as the server checks them
                return d
        except ModelFormatError:
            continue  # a damaged version is never "already there"
    return None


def export_one(ckpt: str, repo: str, name: str | None, eval_text: str | None, eval_sha: str | None,
               force: bool) -> dict[str, Any]:
    """Export (or skip) one checkpoint; never raises: the report row says what happened."""
    from . import checkpoint
    from . import onnx_graph as og
    from .export import export_model  # torch: imported in the worker, not by `rnn-export batch -h`

    t0 = time.perf_counter()
    row = _result(ckpt, name)
    try:
        row["name"] = name = name or default_name(ckpt)
        name_dir = Path(repo) / name
        ckpt_sha = sha256_file(ckpt)
        # the same checkpoint file: skip without unpickling it; otherwise compare what it holds
        existing = None if force else find_unchanged(name_dir, eval_sha, ckpt_sha=ckpt_sha, exporter=og.FORMAT)
        if existing is None:
            loaded = checkpoint.load(ckpt)
            if loaded.is_series and eval_text is not None:
                raise ValueError(f"{ckpt} is a sequence model: --eval-corpus does not apply to it")
            if loaded.is_series:
                from . import series_graph as sg

                content = sg.content_hash(loaded.model, *sg.specs(loaded.model, loaded.series))
            else:
                content = og.content_hash(loaded.model, loaded.vocab)
            existing = None if force else find_unchanged(name_dir, eval_sha, content=content)
        if existing is not None:
            row["status"] = "skipped"
            _fill(row, existing)
        else:
            source = {"checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": ckpt_sha,
                      "eval_corpus_sha256": eval_sha}
            if loaded.is_series:
                from .series_export import export_series_model

                path = export_series_model(loaded.model, loaded.series, repo, name, metrics=loaded.metrics,
                                           source=source)
            else:
                path = export_model(loaded.model, loaded.vocab, repo, name, metrics=loaded.metrics,
                                    eval_text=eval_text, source=source)
            row["status"] = "ok"
            _fill(row, path)
    except (ValueError, OSError) as e:  # CheckpointError, ExportError, ModelFormatError, I/O
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001 -- one bad checkpoint must not stop the batch; reported as failed
        row["error"] = f"unexpected {type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _worker_init() -> None:
    """Workers share the machine: one torch thread each."""
    import torch

    torch.set_num_threads(1)


def run_batch(args: BatchArgs) -> list[dict[str, Any]]:
    """Export every checkpoint (in --jobs processes), with a progress bar; returns the report rows in order."""
    from tqdm import tqdm

    paths, rows = expand(list(args.checkpoints))
    eval_text = eval_sha = None
    if args.eval_corpus:
        from .data import load_text

        eval_text = load_text(args.eval_corpus)
        eval_sha = sha256_file(args.eval_corpus)
    Path(args.repo).mkdir(parents=True, exist_ok=True)
    if args.promote != "always":
        _pin_all(args, paths)
    tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked from here
    results: dict[int, dict[str, Any]] = {}
    jobs = max(1, min(args.jobs, len(paths)))
    with tqdm(total=len(paths), file=sys.stderr, unit="ckpt", disable=not args.progress or not sys.stderr.isatty(),
              dynamic_ncols=True) as bar:
        if jobs == 1:
            _worker_init()
            for i, p in enumerate(paths):
                results[i] = _judged(export_one(p, args.repo, args.name, eval_text, eval_sha, args.force), args)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
                futures = {pool.submit(export_one, p, args.repo, args.name, eval_text, eval_sha, args.force): i
                           for i, p in enumerate(paths)}
                for fut in as_completed(futures):
                    results[futures[fut]] = _judged(fut.result(), args)
                    bar.update(1)
    return rows + [results[i] for i in range(len(paths))]


def _pin_all(args: BatchArgs, paths: list[str]) -> None:
    """Before publishing: pin the current default of every model the batch publishes into (trainer.promote)."""
    for name in sorted({args.name or default_name(p) for p in paths}):
        try:
            pin(args.repo, check_name(name))
        except (ValueError, OSError):
            continue  # a bad name fails its export, with the reason, in the report


def _judged(row: dict[str, Any], args: BatchArgs) -> dict[str, Any]:
    """A published row after the promotion rule (skipped and failed rows are left as they are)."""
    if row["status"] != "ok":
        return row
    try:
        row.update(apply_rule(args.repo, row["name"], row["version"], args.promote).to_json())
    except (ValueError, OSError) as e:
        row["error"] = f"version {row['version']} was published, but the promotion rule failed: {e}"
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The summary table printed after a batch."""
    lines = [f"{'STATUS':8} {'NAME':20} {'VER':>4} {'VAL_LOSS':>8} {'PARITY':>8} {'SIZE':>8} {'SECS':>6}  CHECKPOINT"]
    for r in rows:
        size = sum(r["sizes"].values())
        lines.append(f"{r['status']:8} {r['name'] or '-'!s:20} {r['version'] or '-':>4} "
                     f"{'-' if r['val_loss'] is None else format(r['val_loss'], '.4f'):>8} "
                     f"{'-' if r['parity'] is None else format(r['parity'], '.1e'):>8} "
                     f"{human_size(size) if size else '-':>8} {r['seconds']:6.2f}  {r['checkpoint']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    for r in rows:
        if r.get("promotion"):
            lines.append(f"{r['name']} version {r['version']}: {'promoted' if r['promoted'] else 'not promoted'}: "
                         f"{r['promotion']}")
    return "\n".join(lines)


def write_report(path: str, rows: list[dict[str, Any]], args: BatchArgs, seconds: float) -> None:
    """The JSON report, written atomically."""
    report = {"repo": str(Path(args.repo).resolve()), "seconds": round(seconds, 3), "jobs": args.jobs,
              "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES}, "results": rows}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def batch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn-export batch", description="Export many checkpoints into one repository.")
    p.add_argument("checkpoints", nargs="*", help="checkpoint files or globs (quote globs: 'runs/*/ckpt.pt')")
    p.add_argument("--from-file", help="a file listing checkpoints or globs, one a line (# comments)")
    p.add_argument("--repo", default="models", help="model repository folder (default: models)")
    p.add_argument("--name", type=name_arg, help="publish every checkpoint under this name (default: each one's stem/folder)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--eval-corpus", help="record onnxruntime's val loss on the last 10%% of this corpus")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--force", action="store_true", help="export even when an identical version is published")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_promotion_flags(p)
    return p


def main_batch(argv: list[str]) -> int:
    """`rnn-export batch`: exit 0 if every checkpoint is ok or skipped, 1 if any failed, 2 for bad usage."""
    parser = batch_parser()
    a = parser.parse_args(argv)
    items = list(a.checkpoints)
    try:
        if a.from_file:
            lines = Path(a.from_file).read_text(encoding="utf-8").splitlines()
            items += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--from-file {a.from_file}: {e}")
    if not items:
        parser.error("no checkpoints given (paths, globs or --from-file)")
    if a.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {a.jobs}")
    credentials = load_credentials(parser, a)
    args = BatchArgs(tuple(items), a.repo, a.name, a.jobs, a.eval_corpus, a.report, a.force, not a.no_progress,
                     a.promote)
    t0 = time.perf_counter()
    try:
        rows = run_batch(args)
    except (ValueError, OSError) as e:  # the eval corpus or the repository itself
        e = naming_repo(e, a.repo)
        print(f"rnn-export batch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnn-export batch: interrupted; published versions are complete, nothing partial remains",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    print(table(rows))
    for r in rows:
        if r["status"] == "failed":
            print(f"rnn-export batch: FAILED {r['checkpoint']}: {r['error']}", file=sys.stderr)
    if args.report:
        write_report(args.report, rows, args, seconds)
    bad = any(r["status"] == "failed" or r["error"] for r in rows)
    for r in rows:
        if r["status"] == "ok" and r["error"]:
            print(f"rnn-export batch: error: {r['error']}", file=sys.stderr)
    if a.load and not _load_all(a, credentials, rows):
        return 1
    return 1 if bad else 0


def _load_all(a: argparse.Namespace, credentials: dict, rows: list[dict[str, Any]]) -> bool:
    """--load: ask the server to load every model that got a new version; whether all of them loaded."""
    newest: dict[str, int] = {}
    for r in rows:
        if r["status"] == "ok":
            newest[r["name"]] = max(newest.get(r["name"], 0), r["version"])
    ok = True
    for name, version in sorted(newest.items()):
        what = f"version {version} of {name} was published"
        ok = load_after_publish(a, credentials, name, version, what, "rnn-export batch") == 0 and ok
    return ok
