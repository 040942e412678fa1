"""rnnserve client: `Client` (sync) and `AsyncClient` (asyncio) for the rnnserve.v1 protocol.

Names are imported lazily so `rnn-health` (rnnserve.client.health) stays light.
"""
from __future__ import annotations

__all__ = ["AsyncClient", "AsyncSession", "Client", "RnnServeError", "Session"]

_WHERE = {"Client": ".lib", "Session": ".lib", "AsyncClient": ".aio", "AsyncSession": ".aio",
          "RnnServeError": ".core"}


def __getattr__(name: str):
    """Import the public classes on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name], __name__), name)
