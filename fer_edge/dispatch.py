"""Which implementation a merged multi-scale layer runs on a CUDA tensor.

One table decides, measured on the GPU by ``benchmarks/bench_msconv.py``
and turned into ``kernel_dispatch.json`` (shipped in the package) by
``benchmarks/make_dispatch.py``.  A row is keyed by the GPU's compute
capability, the layer's shape (input channels, c1/c3/c5, height, width), the
dtype and a batch bucket; its ``choice`` is ``cudnn`` (PyTorch's three
convolutions + cat) or one of fer_edge's kernels (``KERNELS``).  A shape the
table does not name runs ``cudnn``: our kernel is used only where a
measurement showed it faster.

``FER_EDGE_CUDA_KERNEL`` (cudnn or a name in ``KERNELS``) overrides the table for
every layer: for testing and benchmarking, not for speed.  ``override`` is the
only reader of the environment in fer-edge's kernel code (the compiled
extension reads none): it is read once, when the table is first consulted.
The table file is read once too, and a merged layer keeps its answer per
input shape, so an eager forward does not look anything up again.

The CPU never asks: on the CPU the fused C++ kernel always runs (it is faster
than PyTorch's convolutions there, see the benchmarks docs).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fer_edge import UserError

TABLE_FILE = Path(__file__).resolve().parent / "kernel_dispatch.json"
TABLE_FORMAT = "fer-edge-kernel-dispatch"
OVERRIDE_ENV = "FER_EDGE_CUDA_KERNEL"
CUDNN = "cudnn"
# fer_edge's CUDA kernels, by the number the compiled extension takes (csrc/msconv_cuda.cu, Variant).
# mma: the small-batch kernel on tensor cores: each branch's taps x input channels cut into chunks
# spread over the whole GPU (float16, or float32 as 3xTF32, channels_last, sm_80+).
# cutlass: the large-batch path, one implicit GEMM per branch on tensor cores (float16
# channels_last, sm_80+, builds that found CUTLASS's headers).
# stem: inputs of at most 4 channels (MACNN's first layer reads one), bound by its output writes.
# cutlass90: cutlass on Hopper's wgmma and TMA (compute capability 9.0, builds for sm_90).
# cutlass_window, cutlass90_window: those two as one implicit GEMM over the zero-padded 5x5
# window (more multiplies, one launch: for small batches).
KERNELS = {"simt": 0, "wmma": 1, "splitk": 2, "mma": 3, "cutlass": 4, "stem": 5, "cutlass90": 6,
           "cutlass_window": 7, "cutlass90_window": 8}
CHOICES = (CUDNN, *KERNELS)
# Upper bounds of the batch buckets: batch 1 is latency-bound, 2-8 is the small-batch
# kernel's range, larger batches are throughput-bound.
BATCH_BUCKETS = (1, 8, 64, 256)
DTYPES = ("fp32", "fp16")


class DispatchError(UserError):
    """A dispatch table or override that cannot be used (one line for the user)."""


@dataclass(frozen=True)
class LayerKey:
    cc: str          # compute capability "major.minor"
    cin: int
    c1: int
    c3: int
    c5: int
    h: int
    w: int
    dtype: str       # fp32 | fp16
    batch: str       # batch_bucket(n)


def batch_bucket(n: int) -> str:
    """The bucket of a batch size: "1", "2-8", "9-64", "65-256" or ">256"."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    low = 1
    for high in BATCH_BUCKETS:
        if n <= high:
            return str(high) if low == high else f"{low}-{high}"
        low = high + 1
    return f">{BATCH_BUCKETS[-1]}"


def key_of(row: dict) -> LayerKey:
    """The key of a table row (and a check of its fields)."""
    try:
        key = LayerKey(str(row["cc"]), *(int(row[k]) for k in ("cin", "c1", "c3", "c5", "h", "w")),
                       str(row["dtype"]), str(row["batch"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DispatchError(f"dispatch table row {row!r} is malformed ({exc})") from None
    if key.dtype not in DTYPES:
        raise DispatchError(f"dispatch table row {row!r}: dtype must be one of {', '.join(DTYPES)}")
    return key


def parse_table(doc: dict) -> dict[LayerKey, str]:
    """{key: choice} from a table document; DispatchError for anything off."""
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
        raise DispatchError(f"not a kernel dispatch table (format must be {TABLE_FORMAT!r})")
    rows = doc.get("entries")
    if not isinstance(rows, list):
        raise DispatchError("kernel dispatch table: 'entries' must be a list")
    table = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("choice") not in CHOICES:
            raise DispatchError(f"dispatch table row {row!r}: choice must be one of {', '.join(CHOICES)}")
        table[key_of(row)] = row["choice"]
    return table


@functools.lru_cache(maxsize=None)
def _read_document(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DispatchError(f"kernel dispatch table {path}: cannot be read ({exc})") from None


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_FILE)) -> dict[LayerKey, str]:
    """The table in ``path`` (the package's by default), read once per process."""
    return parse_table(_read_document(path))


@functools.lru_cache(maxsize=None)
def override() -> str | None:
    """FER_EDGE_CUDA_KERNEL as a choice, or None when unset (read once)."""
    asked = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if not asked:
        return None
    if asked not in CHOICES:
        raise DispatchError(f"{OVERRIDE_ENV}={asked!r}: choose one of {', '.join(CHOICES)}")
    return asked


def direct_kernel() -> str:
    """The CUDA kernel ``fused_ms_conv`` runs when its caller names none: the
    override when it names one of ours, else simt (a direct call never asks the table)."""
    forced = override()
    return forced if forced in KERNELS else "simt"


def choose(key: LayerKey, table: dict[LayerKey, str] | None = None, forced: str | None = None) -> str:
    """The implementation for one call: the override, else the table's row, else cuDNN."""
    if forced is not None:
        return forced
    return (load_table() if table is None else table).get(key, CUDNN)


def choice_for(cc: tuple[int, int], cin: int, c1: int, c3: int, c5: int, n: int, h: int, w: int,
               dtype: str) -> str:
    """What a merged layer runs for this call (the module's entry point; it caches the answer per shape)."""
    key = LayerKey(f"{cc[0]}.{cc[1]}", cin, c1, c3, c5, h, w, dtype, batch_bucket(n))
    return choose(key, forced=override())


def describe() -> dict:
    """For `fer-edge info`: the table's rows, its provenance and the override."""
    try:
        doc = _read_document(str(TABLE_FILE))
        load_table()
    except DispatchError as exc:
        return {"file": TABLE_FILE.name, "error": str(exc)}
    out = {"file": TABLE_FILE.name, "default": CUDNN, "measured_on": doc.get("measured_on", []),
           "override": None, "entries": doc["entries"]}
    try:
        out["override"] = override()
    except DispatchError as exc:   # reported, not raised: `fer-edge info` must still describe the rest
        out["override_error"] = str(exc)
    return out
