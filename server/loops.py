"""The event loop the server runs on: uvloop when installed (fewer microseconds per loop turn), else asyncio's.

Every request crosses the loop several times (gRPC's completion, the handler, the batcher, the answer);
uvloop's turns are cheaper. Measured on 2 cores (README, Benchmarks, "The event loop"): native ping-pong
+15% at 64 sessions and +21% at 16, KServe streams +10% at 64 sequences, one session and unary calls
level. The benches' do-nothing ceiling servers run on the same loop as rnn-serve, so a ratio never mixes two.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopUnavailable(RuntimeError):
    """--event-loop uvloop was asked for and uvloop does not import."""


def _standard_loop() -> asyncio.AbstractEventLoop:
    """asyncio's own loop for this platform, whatever event loop policy the process has set."""
    return asyncio.DefaultEventLoopPolicy().new_event_loop()


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name, factory for asyncio.Runner) of an --event-loop choice: auto, uvloop or asyncio."""
    if choice == "asyncio":
        return "asyncio", _standard_loop
    try:
        import uvloop
    except ImportError as e:
        if choice == "uvloop":
            raise LoopUnavailable(f"--event-loop uvloop: uvloop does not import ({e}); install it "
                                  "(pip install uvloop) or pass --event-loop asyncio") from None
        return "asyncio", _standard_loop
    return "uvloop", uvloop.new_event_loop


def run(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """Run the coroutine that main() makes to its end on the chosen loop; returns its result."""
    _, factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
