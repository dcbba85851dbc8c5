"""fer-edge: facial-expression recognition from desktop GPU to edge device.

Importing ``fer_edge`` is cheap and never imports torch: the on-device runtime
(``fer_edge.targets``) must work where PyTorch is not installed.  The training
side (``fer_edge.kernels``, models, converters) imports torch on demand.
"""
from __future__ import annotations

import os as _os
from importlib import metadata as _metadata

# ONNX Runtime (1.2x+ on Linux too) creates ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/{deviceid,onnxruntime.db} and queues telemetry the moment it is
# imported, unless this is set first: the devices run where children are
# filmed, and nothing may be written or sent unasked.  setdefault: an explicit
# ORT_DISABLE_TELEMETRY=0 from the user still wins.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

try:
    __version__ = _metadata.version("fer-edge")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


class UserError(Exception):
    """A problem with what the user asked for (bad path, bad file, bad option).

    The command line prints its message as one line on stderr and exits
    non-zero, without a traceback.
    """


# Notes for the user about a choice made for them (e.g. the embedded default
# model stood in for a missing --weights): the command line prints them on
# stderr once the command has succeeded, so that a failure stays one line.
NOTES: list[str] = []


def note(text: str) -> None:
    NOTES.append(text)


__all__ = ["__version__", "UserError", "NOTES", "note"]
