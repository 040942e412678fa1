"""`rnn-serve`: parse settings, start the server, drain and exit 0 on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

from . import loops
from .app import App
from .settings import Settings, parse
from .store import StoreUnavailable

log = logging.getLogger(__name__)
EXIT_MARGIN_S = 1.0  # the process is gone at most this long after --grace, whatever is still running


def _force_exit() -> None:
    """The last resort of the grace deadline: something did not stop in time (logged), exit anyway."""
    log.error("still running %.1f s after the grace period: exiting now", EXIT_MARGIN_S)
    logging.shutdown()
    os._exit(0)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain within the grace period."""
    try:
        app = App(settings)
    except ValueError as e:  # a credentials file that cannot be read
        log.error("cannot start: %s", e)
        return 1
    try:
        await app.start()
    except (OSError, RuntimeError, StoreUnavailable) as e:
        log.error("cannot start: %s", e)
        await app.abandon()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    if app.authenticator.tokens is not None:  # SIGHUP: read --auth-tokens again now
        loop.add_signal_handler(signal.SIGHUP, app.authenticator.tokens.reload)
    await stop.wait()
    log.info("signal received: draining (grace %g s)", settings.grace)
    end = loop.time() + settings.grace + EXIT_MARGIN_S
    watchdog = threading.Timer(settings.grace + EXIT_MARGIN_S, _force_exit)
    watchdog.daemon = True
    watchdog.start()
    await app.stop()
    # The calls cut at the deadline unwind on the loop's next turns: let them finish rather than have
    # asyncio.run cancel them halfway (grpc logs that as an unhandled CancelledError with a traceback).
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    if rest:
        await asyncio.wait(rest, timeout=max(0.05, min(1.0, end - EXIT_MARGIN_S / 2 - loop.time())))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse(argv, os.environ)
    if not settings.models.is_dir():  # checked here, not in parse: compose's settings name container paths
        print(f"rnn-serve: error: --models {settings.models}: no such folder (the model repository; it may be "
              "empty, and models published into it later are picked up)", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        from . import workers

        return workers.run(settings, argv)
    try:
        return loops.run(lambda: serve(settings), settings.event_loop)
    except loops.LoopUnavailable as e:
        print(f"rnn-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
