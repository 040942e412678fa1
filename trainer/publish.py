"""Publishing into a model repository: a `.tmp-*` folder made whole, then one atomic rename.

The rename also allocates the version number, so two exporters publishing into one repository get
distinct versions, and a crash or `kill -9` leaves only a `.tmp-*` folder that no reader accepts
(the next export removes it). Torch-free.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..server.contract import META_FILE, ModelFormatError, verify_version_dir, version_numbers

TMP_PREFIX = ".tmp-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ExportError(ValueError):
    """An export refused (bad input or a failed check); nothing was written."""


class FlagMismatch(ExportError):
    """The command line asks for what this checkpoint cannot do (an eval flag of the other kind): exit 2."""


def check_name(name: Any) -> str:
    """A model name as the repository takes it (letters, digits, . _ -), or ExportError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportError(f"model name {name!r} must match {NAME_RE.pattern} (letters, digits, . _ -)")
    return name


def name_arg(text: str) -> str:
    """argparse type of --name: a usage error naming the flag for a name no repository takes."""
    try:
        return check_name(text)
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def naming_repo(e: BaseException, repo: str | Path) -> BaseException:
    """An export's OSError when the repository folder itself could not be made, reworded to name --repo."""
    if isinstance(e, OSError) and not Path(repo).is_dir():
        return OSError(f"--repo {repo}: cannot create the model repository ({e.strerror or e})")
    return e


def temp_dir(name_dir: Path) -> Path:
    """A fresh `.tmp-<host>-<pid>-<hex>` folder inside a model's folder (stale ones are removed first)."""
    name_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(name_dir)
    tmp = name_dir / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(name_dir: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Remove `.tmp-*` folders left by exporters that died (their pid is gone here, or a day old)."""
    removed, host = [], socket.gethostname()
    if not name_dir.is_dir():
        return removed
    for p in name_dir.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        parts = p.name[len(TMP_PREFIX):].rsplit("-", 2)  # host-pid-hex
        try:
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            continue
        dead = len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1]))
        if dead or age > max_age_s:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync, so a published folder's files are on disk before its rename."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, name_dir: Path, meta: dict[str, Any], version: int | None) -> Path:
    """Rename tmp to the next free version (or the given one); a lost race moves on to the next number."""
    v = version if version is not None else (version_numbers(name_dir) or [0])[-1] + 1
    while True:
        meta["version"] = v
        write_synced(tmp / META_FILE, meta_bytes(meta))
        final = name_dir / str(v)
        try:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if version is not None:
                raise ExportError(f"{final} already exists; versions are never overwritten") from None
            v += 1
            continue
        fd = os.open(name_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final




def meta_bytes(meta: dict[str, Any]) -> bytes:
    """model.json's bytes as the exporter writes them."""
    return (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_version(name_dir: Path, blobs: dict[str, bytes], meta: dict[str, Any], version: int | None) -> Path:
    """Write the graphs and model.json into a temporary folder, verify it as the server will, then publish
    it as the next (or the given) version; nothing is left behind on failure."""

    tmp = temp_dir(name_dir)
    try:
        for fname, data in blobs.items():
            write_synced(tmp / fname, data)
        write_synced(tmp / META_FILE, meta_bytes(meta))
        try:
            verify_version_dir(tmp)
        except ModelFormatError as e:
            raise ExportError(f"{name_dir.name}: the written files fail verification: {e}") from None
        return publish(tmp, name_dir, meta, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
