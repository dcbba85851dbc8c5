"""What every runtime backend shares (numpy only, no runtime imported here):
the Backend interface, the two errors the device API raises, and a way to
quiet native libraries.  ``backends`` (ONNX Runtime, LiteRT, the runtime
table) and ``jetson`` (TensorRT) build on it."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np


class BundleError(ValueError):
    """A bundle that is missing, incomplete, altered or unloadable (one line for the user).
    Defined here, where an artifact is opened, and re-exported by fer_edge.targets.bundle."""


class BackendUnavailable(RuntimeError):
    """The runtime this artifact needs is not installed here."""


@contextlib.contextmanager
def native_output_silenced(fds=(2,)):
    """Send what C/C++ code writes straight to these file descriptors (1 = stdout,
    2 = stderr) to /dev/null meanwhile.  Native libraries log there unasked:
    LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate", absl/MLIR lines
    from the converters; the user's terminal is for real problems."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    try:
        yield
    finally:
        for fd, s in zip(fds, saved):
            os.dup2(s, fd)
            os.close(s)
        os.close(devnull)


class Backend:
    name = "base"

    def run_batch(self, x: np.ndarray) -> np.ndarray:  # one call of the native runtime
        raise NotImplementedError

    @property
    def fixed_batch(self) -> int | None:
        return None

    def run(self, x: np.ndarray) -> np.ndarray:
        fb = self.fixed_batch
        try:
            if fb is None or len(x) == fb:
                return self.run_batch(x)
            if fb != 1:
                raise ValueError(f"artifact takes batches of exactly {fb}")
            return np.concatenate([self.run_batch(x[i:i + 1]) for i in range(len(x))])
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001  (native runtimes raise their own types)
            # The artifact rejects an input shaped by the bundle's preprocess.json: the two disagree.
            raise BundleError(f"the {self.name} artifact cannot run an input of shape {tuple(np.shape(x))} "
                              f"{np.asarray(x).dtype}: {first_line(exc)}") from None

    def latency_ms(self, sample: np.ndarray, runs: int = 100, warmup: int = 10) -> float:
        """Median wall time of one batch-1 call, in ms."""
        one = sample[:1]
        for _ in range(warmup):
            self.run_batch(one)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.run_batch(one)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__
