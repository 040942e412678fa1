"""Ctrl-C in the command lines without raising inside grpc.

A KeyboardInterrupt raised while the main thread is inside a streaming call's `next()` can leave that
call's lock held; the cleanup's `cancel()` then waits on it for ever (seen: `rnn-client frames` hung
in 2 of 60 interrupts). While a session's stream is being read, Ctrl-C therefore cancels the stream
from another thread, and the KeyboardInterrupt is raised once the read has returned, in our code.
Elsewhere (waiting on stdin, writing to a full stdout) Ctrl-C raises at once, as usual.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .core import RnnServeError
from .lib import Session


class Interrupts:
    """The SIGINT handler of one command line run; `reading(session)` marks the stretches inside grpc."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.pending = False

    def install(self) -> None:
        """Take SIGINT over (main thread only: elsewhere Python's default stays)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        s = self.session
        if s is None or self.pending:  # outside grpc, or a second Ctrl-C: raise here
            raise KeyboardInterrupt
        self.pending = True
        threading.Thread(target=s.detach, name="interrupt", daemon=True).start()

    @contextmanager
    def reading(self, session: Session) -> Iterator[None]:
        """Run a call on `session`'s stream; a Ctrl-C meanwhile ends it with KeyboardInterrupt afterwards
        (the stream's own CANCELLED error, which the interrupt caused, is not reported)."""
        self.session = session
        try:
            yield
        except RnnServeError:
            if not self.pending:
                raise
        finally:
            self.session = None  # from here a Ctrl-C raises at once again
            interrupted, self.pending = self.pending, False
        if interrupted:
            raise KeyboardInterrupt
