"""Progress of ``fer-edge convert`` on stderr: stage lines, counters for the
calibration passes, and a heartbeat during the long silent steps (litert-torch
converts for about a minute without a word).

The exporters silence file descriptors 1 and 2 while native converters run
(exporters._quiet), so the lines go to a duplicate of stderr taken before:
they still reach the user's terminal.  ``Progress(enabled=False)`` (``--no-progress``,
and the Python API's default) writes nothing.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


class Progress:
    def __init__(self, enabled: bool = True, prefix: str = "convert", every_s: float = 10.0):
        self.enabled = enabled
        self.prefix = prefix
        self.every_s = every_s
        self._stream = None
        self._lock = threading.Lock()
        self._last_count = 0.0
        if enabled:
            sys.stderr.flush()
            self._stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)

    def say(self, text: str) -> None:
        if self._stream is not None:
            with self._lock:
                self._stream.write(f"{self.prefix}: {text}\n")

    def count(self, what: str, done: int, total: int) -> None:
        """A line at the start, every every_s seconds and at the end of a counted loop."""
        if self._stream is None:
            return
        now = time.monotonic()
        if done in (1, total) or now - self._last_count >= self.every_s:
            self._last_count = now
            self.say(f"{what} {done}/{total}")

    @contextlib.contextmanager
    def step(self, what: str):
        """Say what starts, a heartbeat line every every_s seconds while it runs,
        and how long it took."""
        if self._stream is None:
            yield
            return
        self.say(f"{what} ...")
        t0, stop = time.monotonic(), threading.Event()

        def beat():
            while not stop.wait(self.every_s):
                self.say(f"{what}: {time.monotonic() - t0:.0f} s")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.say(f"{what}: done in {time.monotonic() - t0:.1f} s")

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


NO_PROGRESS = Progress(enabled=False)
