"""Validated argument types for the command line: a bad value is refused by
argparse in one line (exit 2) before anything is loaded or computed.

    p.add_argument("--batch-size", type=int_in(1, 65536), ...)
    p.add_argument("--lr", type=float_in(0, 10, low_open=True), ...)
"""
from __future__ import annotations

import argparse
import math
import re

# Sizes beyond these are typing mistakes, not requests (and would allocate terabytes).
MAX_BATCH = 1 << 16
MAX_COUNT = 1 << 31


def int_in(low: int, high: int | None = None):
    """An int type with low <= value (<= high)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {bound})")
        return value
    parse.__name__ = "int"
    return parse


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = False):
    """A finite float type within [low, high] (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{value:g} is out of range (must be {' and '.join(filter(None, (lo, hi)))})")
        return value
    parse.__name__ = "float"
    return parse


_DEVICE = re.compile(r"(auto|cpu|cuda|cuda:\d{1,3})")


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether it exists is checked when the command starts)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda or cuda:N)")
    return text


device_name.__name__ = "device"

positive_int = int_in(1, MAX_COUNT)
batch_size = int_in(1, MAX_BATCH)
non_negative_int = int_in(0, MAX_COUNT)
