"""rnn-export list: the index of a model repository, judged by the same contract checks the server makes.

A version is usable when its model.json passes the schema and its files their checksums (and, with
--verify, load and step in onnxruntime). The default of a model, the version `rnn-serve` gives new
sessions, is the one its default.json names when that version is usable, else its newest usable version
(rnnserve.server.contract); the list says which, and why.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..client.core import headline
from ..server.contract import (
    DEFAULT_FILE,
    ModelFormatError,
    check_version,
    model_names,
    read_default,
    verify_version_dir,
    version_numbers,
)


def human_size(n: int) -> str:
    """Bytes as K or M, for the tables."""
    return f"{n / 1024:.1f}K" if n < 1 << 20 else f"{n / (1 << 20):.1f}M"


def default_of(name_dir: Path, usable: list[int]) -> tuple[int | None, str]:
    """(the default among the usable versions, why): default.json's version when usable, else the newest."""
    try:
        pointer, problem = read_default(name_dir), ""
    except ModelFormatError as e:
        pointer, problem = None, f"{DEFAULT_FILE} is broken: {e}"
    if pointer is not None and pointer.version in usable:
        return pointer.version, pointer.reason or f"named by {DEFAULT_FILE}"
    if pointer is not None:
        problem = f"{DEFAULT_FILE} names version {pointer.version}, which is not usable"
    if not usable:
        return None, problem
    return usable[-1], f"highest version ({problem or f'no {DEFAULT_FILE}'})"


def scan(repo: str | Path, verify: bool = False) -> list[dict[str, Any]]:
    """Every version in a repository with its status; `default` marks the version new sessions get (and
    `default_reason` on that row says why)."""
    repo = Path(repo)
    out: list[dict[str, Any]] = []
    for name_dir in (repo / n for n in model_names(repo)):
        rows = []
        for v in version_numbers(name_dir):
            d = name_dir / str(v)
            row: dict[str, Any] = {"model": name_dir.name, "version": v, "cell": None, "hidden_size": None,
                                   "layers": None, "val_loss": None, "metric": None, "size": 0, "default": False,
                                   "default_reason": None, "status": "ok"}
            try:
                meta = verify_version_dir(d) if verify else check_version(d)
                row.update(cell=meta.cell, hidden_size=meta.hidden_size, layers=meta.layers,
                           val_loss=meta.metrics.get("val_loss"), metric=headline(meta.task, meta.metrics),
                           size=sum((d / f).stat().st_size for f in meta.onnx_files))
            except (OSError, ModelFormatError) as e:
                row["status"] = f"broken: {e}"
            rows.append(row)
        default, why = default_of(name_dir, [r["version"] for r in rows if r["status"] == "ok"])
        for r in rows:
            if r["version"] == default:
                r["default"], r["default_reason"] = True, why
        out += rows
    return out


def main_list(argv: list[str]) -> int:
    """`rnn-export list REPO`: models, versions, cell types, val loss and the default (latest usable) version."""
    p = argparse.ArgumentParser(prog="rnn-export list", description="Index of a model repository.")
    p.add_argument("repo", help="model repository folder")
    p.add_argument("--verify", action="store_true", help="also load every version in onnxruntime")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    if not Path(a.repo).is_dir():
        print(f"rnn-export list: error: repository {a.repo} does not exist or is not a folder", file=sys.stderr)
        return 2  # a usage error: the command line names a folder that is not there
    rows = scan(a.repo, a.verify)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'MODEL':24} {'VER':>4} {'CELL':6} {'HIDDEN':>6} {'LAYERS':>6} {'METRIC':20} {'SIZE':>8}  DEFAULT  STATUS")
    for r in rows:
        print(f"{r['model']:24} {r['version']:>4} {r['cell'] or '-':6} {r['hidden_size'] or '-':>6} "
              f"{r['layers'] or '-':>6} {r['metric'] or '-':20} {human_size(r['size']) if r['size'] else '-':>8}  "
              f"{'*' if r['default'] else '':7}  {r['status']}")
    if not rows:
        print(f"(no versions in {a.repo})")
    for r in rows:
        if r["default"]:
            print(f"default of {r['model']}: version {r['version']}: {r['default_reason']}")
    return 0
