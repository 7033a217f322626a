"""Progress reporting: the callback types every long-running function takes, and a plain-text reporter.

A long job (computing vectors, generating, evaluating, searching) calls ``progress(done, total)`` as work finishes.
Functions that run several labelled jobs take a factory instead, ``progress(label) -> callback``. :func:`text_progress`
is such a factory that writes one line now and then, with the time left, to a stream: what the command line prints
when its output is not a terminal, and what a script or a notebook can pass as ``progress=``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from nsteer.text import visible

ProgressCallback = Callable[[int, int], None]  # (done, total)
ProgressFactory = Callable[[str], ProgressCallback]  # label -> that job's callback


def duration(seconds: float) -> str:
    """``seconds`` as ``1:02:03`` or ``2:03``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def text_progress(
    stream: TextIO | None = None, *, every: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> ProgressFactory:
    """A progress factory that writes ``label: done/total (pct), elapsed, about T left`` lines to ``stream``.

    A job writes its first update, then at most one line every ``every`` seconds, and always its last one, so a log
    shows steady progress without a line per step. ``stream`` defaults to standard error at the time of writing.
    """

    def factory(label: str) -> ProgressCallback:
        started: float | None = None
        first_done = 0  # work already done when the job started (a resumed run): not part of the rate
        last_written = -float("inf")
        last_shown: tuple[int, int] | None = None
        shown = visible(label)

        def update(done: int, total: int) -> None:
            nonlocal started, first_done, last_written, last_shown
            now = clock()
            if started is None:
                started, first_done = now, done
            finished = total > 0 and done >= total
            if not finished and now - last_written < every and last_written != -float("inf"):
                return
            if finished and last_shown == (done, total):
                return  # the same last line again (a caller that reports completion twice)
            last_written, last_shown = now, (done, total)
            elapsed = now - started
            line = f"{shown}: {done}/{total}"
            if total > 0:
                line += f" ({done / total:.0%})"
            line += f", {duration(elapsed)} elapsed"
            if finished:
                line += ", done"
            elif first_done < done < total and elapsed > 0:
                line += f", about {duration(elapsed / (done - first_done) * (total - done))} left"
            target = stream if stream is not None else sys.stderr
            print(line, file=target, flush=True)

        return update

    return factory
