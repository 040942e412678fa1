"""Handing freed heap back to the system after a burst (glibc keeps it in its arenas otherwise)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim() -> None:
    """malloc_trim(0) where glibc has it: after a burst of large answers, RSS returns to its level."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
