"""Progress for long steps: a tqdm bar on a terminal, plain lines when the output is a file or a pipe.

tqdm's own non-terminal output is a stream of carriage returns, unreadable in a job log or a CI
transcript; so when the stream is not a TTY this prints one ordinary line per update instead (at most
one every ``min_interval_s`` seconds, and always the last). Any job can use it:

    with Progress(total=4, label="bootstrap") as progress:
        progress.advance("clip")
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any


class Progress:
    """Counts ``total`` units of work; ``advance(note)`` after each one."""

    def __init__(
        self,
        total: int,
        label: str,
        stream: IO[str] | None = None,
        min_interval_s: float = 5.0,
        tty: bool | None = None,
    ):
        self.total = total
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self._started = time.perf_counter()
        self._last_line = float("-inf")
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, file=self.stream, dynamic_ncols=True)

    def advance(self, note: str = "", units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(units)
            return
        now = time.perf_counter()
        if self.done < self.total and now - self._last_line < self.min_interval_s:
            return
        self._last_line = now
        elapsed = now - self._started
        suffix = f" {note}" if note else ""
        print(
            f"[{self.label}] {self.done}/{self.total}{suffix} ({elapsed:.0f}s)", file=self.stream, flush=True
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
