"""Stopping a search on SIGINT (Ctrl+C) or SIGTERM without losing or half-writing anything.

While Ray Tune runs the trials, the first signal asks Tune for its graceful stop (no new trials; the
ones that finished are already in the study; those in flight are dropped and proposed again on a
rerun); a second signal, or one outside Tune (preparation, the baseline pool, the report), stops at
once. Either way the search ends with `SearchInterrupted` and no report or export: a script can
tell an interrupted search from a finished one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import SearchInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """What the handlers saw: the first signal's number (0: none) and whether Tune is running."""

    signum: int = 0
    tuning: bool = False
    installed: bool = False

    def handle(self, signum: int, frame) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if first and self.tuning:
            os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's own graceful stop
        else:
            raise SearchInterrupted(self.signum)

    def install(self) -> None:
        """(Re)install the handlers: `ray.init` replaces the driver's SIGTERM handler with one that aborts."""
        if self.installed:
            for s in SIGNALS:
                signal.signal(s, self.handle)

    def check(self) -> None:
        """Raise SearchInterrupted if a signal came while Tune was stopping gracefully."""
        if self.signum:
            raise SearchInterrupted(self.signum)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the block (only the main thread can; elsewhere nothing is installed)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    request.installed = True
    request.install()
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def tuning(request: StopRequest) -> Iterator[None]:
    """Around `Tuner.fit()`: Tune must not take SIGINT over, nor print its restore hint (a search resumes
    from its study, not from Tune's temporary folder, which is deleted)."""
    disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tune_logger = logging.getLogger("ray.tune.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)
    request.install()
    request.tuning = True
    try:
        yield
    finally:
        request.tuning = False
        tune_logger.setLevel(level)
        if disabled is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disabled
    request.check()
