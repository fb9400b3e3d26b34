"""The one exception type a user can cause, and its specialisations.

Everything a user can get wrong (a bad schedule file, an unknown name, an impossible setting) raises a
`SolversearchError` whose message says what to change; the CLI turns it into one line and exit status 2.
"""

from __future__ import annotations


class SolversearchError(Exception):
    """An error caused by user input: the message says what to change."""


class ScheduleError(SolversearchError, ValueError):
    """A solver schedule (object or JSON document) is invalid."""


class NoiseScheduleError(SolversearchError, ValueError):
    """A noise schedule configuration is invalid or unsupported."""


class SearchInterrupted(Exception):
    """A search stopped by SIGINT or SIGTERM. Every evaluation recorded before it is kept (`kept` of them,
    when known); running the same command again resumes the study."""

    def __init__(self, signum: int, kept: int | None = None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.kept = signum, kept
