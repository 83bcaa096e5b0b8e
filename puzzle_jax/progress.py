"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines when the output goes to a file.

A tqdm bar redraws itself with carriage returns and escape codes many times a second: on a terminal that is one
line that moves, in a log file it is thousands of fragments (the demo's log was 75 KB for 40 meaningful lines). So
every loop of the package that reports progress goes through ``Progress``: where the stream is a terminal it is a
tqdm bar; elsewhere it writes one plain line each time another tenth of the total is done, or after
``interval_seconds`` without a line (a loop without a total, or a slow tenth), and a last line at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

# Seconds between plain lines when no tenth of the total was completed in between.
DEFAULT_INTERVAL_SECONDS = 30.0


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts finished units of a loop and shows it (see the module docstring).

    Args:
      total: units the loop will finish, or None if unknown.
      initial: units finished before (a resumed run); the rate counts only this run's.
      description: the label (a stage's name).
      unit: what is counted, for the rate ("images", "steps").
      enabled: False shows nothing (e.g. on processes other than 0).
      stream: where to write; default stderr.
      terminal: force the bar (True) or the lines (False); default: ``is_terminal(stream)``.
      interval_seconds: the longest time between two plain lines while units keep finishing.
      clock: seconds as a float (``time.monotonic``); injectable for tests.
    """

    def __init__(
        self,
        total: int | None,
        *,
        initial: int = 0,
        description: str,
        unit: str = "images",
        enabled: bool = True,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.description = description
        self.unit = unit
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.count = self._initial = initial
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._closed = False
        self._started = clock()
        self._last_line_time = self._started
        self._last_line_count = initial
        self._tenths_reported = 10 * initial // total if total else 0
        if enabled and (is_terminal(self.stream) if terminal is None else terminal):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=description, unit=unit, file=self.stream, dynamic_ncols=True
            )

    def update(self, count: int = 1) -> None:
        """Adds ``count`` finished units."""
        self.count += count
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(count)
            return
        now = self.clock()
        tenths = 10 * self.count // self.total if self.total else 0
        if tenths > self._tenths_reported or now - self._last_line_time >= self.interval_seconds:
            self._tenths_reported = max(self._tenths_reported, tenths)
            self._write_line(now)

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        """Values shown after the count (the bar's postfix; appended to the next plain line)."""
        values = {**(values or {}), **more}
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Ends the bar, or writes the last line if the last count was not written yet."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and (self.count != self._last_line_count or self.count == self._initial):
            self._write_line(self.clock())

    def _write_line(self, now: float) -> None:
        elapsed = now - self._started
        done = f"{self.count}/{self.total} ({100 * self.count // self.total}%)" if self.total else f"{self.count}"
        done_here = self.count - self._initial
        rate = f", {done_here / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done_here else ""
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        self.stream.write(f"{self.description}: {done} {self.unit}{rate}, {elapsed:.0f} s{extra}\n")
        self.stream.flush()
        self._last_line_time, self._last_line_count = now, self.count

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def track(
    iterable: Iterable,
    *,
    description: str,
    total: int | None = None,
    unit: str = "images",
    enabled: bool = True,
    **options: Any,
) -> Iterator:
    """Yields the items of ``iterable``, counting each one in a ``Progress`` (closed when the loop ends or stops)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, description=description, unit=unit, enabled=enabled, **options) as progress:
        for item in iterable:
            yield item
            progress.update(1)
