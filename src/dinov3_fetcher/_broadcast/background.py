"""A step of the broadcast in a thread of its own (rank 0's sending, a receiver's rounds): a Ctrl-C lands in the
caller's (main) thread, whatever the step is blocked on, and the caller hands it over to the step (rank 0's
``FetchingSource.error``, a receiver's ``receiver.Stop``), so that every rank ends with one error at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .wire import Report

__all__ = ["Background", "Outcome"]

Outcome = tuple[Report | None, BaseException | None]  # a step's Report (None if it has none) and its error


class Background:
    """``step`` in a daemon thread named ``name``, started at once. Its outcome is ``out[0]`` once ``done`` is set
    (an exception it raised: no Report and that exception)."""

    def __init__(self, step: Callable[[], Outcome], name: str) -> None:
        self.out: list[Outcome] = []
        self.done = threading.Event()  # not Thread.join: a join that a KeyboardInterrupt broke can say "ended" too
        # early
        threading.Thread(target=self._run, args=(step,), name=name, daemon=True).start()

    def _run(self, step: Callable[[], Outcome]) -> None:
        try:
            self.out.append(step())
        except BaseException as exc:  # the interrupt it was told of (a KeyboardInterrupt) ends it too
            self.out.append((None, exc))
        finally:
            self.done.set()

    def wait(self) -> None:
        """Until the step has ended, in short waits: a Ctrl-C (KeyboardInterrupt) is raised here at once."""
        while not self.done.wait(0.2):
            pass
