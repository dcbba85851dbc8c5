"""The runtimes ``fer-edge predict`` runs a face crop through: a bundle's (no
torch) or a checkpoint in PyTorch.  The command itself (options, checks, the
frame loop) is fer_edge/commands/predict.py.

Privacy: ONNX Runtime's telemetry is off (fer_edge/__init__ sets
ORT_DISABLE_TELEMETRY before it can be imported); the only file a bundle run
may create is a Jetson's TensorRT engine cache, inside the bundle folder.
"""
from __future__ import annotations

from pathlib import Path

from fer_edge import UserError
from fer_edge.targets.backends import runtime_names

# --backend: "auto" (the bundle's own runtime, TensorRT for Jetson where it imports) or one of the runtime table.
BACKENDS = ("auto", *runtime_names())


class TorchBackend:
    """A checkpoint run by PyTorch (merged, fused kernel on CPU): for trying a
    model before converting it."""

    name = "pytorch"

    def __init__(self, weights):
        import torch

        from fer_edge.checkpoint import load_checkpoint
        from fer_edge.contract import artifact_preprocess
        from fer_edge.reparam import merge

        model, self.meta = load_checkpoint(weights)
        model = model if self.meta["form"] == "merged" else merge(model, use_kernel=True)
        # channels_last: the faster layout on the CPU too (see fer_edge.evaluate.evaluate)
        self.model = model.to(memory_format=torch.channels_last)
        self.preprocess = artifact_preprocess(self.meta["preprocess"])  # NCHW float, like an fp32 bundle

    def run(self, x):
        import torch

        with torch.no_grad():
            y = self.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            return y.numpy()


def check_runtime_options(bundle=None, weights=None, backend: str = "auto", trust=None, min_release=None) -> None:
    """Options that contradict each other: one line, before anything is opened."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if bundle and weights:
        raise UserError("give one of --bundle (a converted model) or --weights (a checkpoint), not both")
    if trust and not bundle:
        raise UserError("--trust applies to --bundle (a signed bundle); --weights runs a checkpoint in PyTorch")
    if min_release is not None and not trust:
        raise UserError("--min-release needs --trust: only a signed manifest's release number means anything")
    if not bundle and backend != "auto":
        raise UserError("--backend applies to --bundle; --weights runs in PyTorch")


def _bundle_backend(art, backend: str, log, signed: bool = False) -> tuple[object, str]:
    """(backend, the runtime's name) for a bundle's artifact; ``backend`` auto picks
    TensorRT for a Jetson ONNX where tensorrt imports, else the artifact's runtime."""
    from fer_edge.targets import BackendUnavailable, BundleError, open_artifact, open_backend

    runtime = art.runtime
    if backend == "auto" and runtime == "onnxruntime" and art.target == "jetson":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            backend = "tensorrt"
    if backend not in ("auto", runtime) and not (backend == "tensorrt" and art.file.endswith(".onnx")):
        raise UserError(f"--backend {backend} cannot run {art.file} (a {runtime} artifact)")
    chosen = runtime if backend == "auto" else backend
    try:
        if chosen == "tensorrt":
            from fer_edge.targets.jetson import cached_engine, private_engine_cache

            # A signed bundle's engine is built from its verified ONNX bytes into a
            # private cache: one planted in the bundle folder is never used.
            engine = cached_engine(art.path, art.precision, log=log, onnx_sha256=art.sha256,
                                   onnx_bytes=art.content, cache_dir=private_engine_cache() if signed else None)
            return open_backend(engine, "tensorrt"), chosen
        return open_artifact(art, runtime=chosen), chosen
    except (BackendUnavailable, BundleError, RuntimeError) as exc:   # no runtime here, an unloadable artifact,
        raise UserError(str(exc)) from None                            # an engine of another GPU


def open_runtime(bundle=None, weights=None, backend: str = "auto", log=print, trust=None, min_release=None):
    """(backend, labels, preprocess, description).  trust: a public key file; the
    bundle must then be signed with its private key (and, with min_release, carry
    a release number at least that)."""
    check_runtime_options(bundle, weights, backend, trust, min_release)
    if not bundle:
        from fer_edge.checkpoint import weights_or_default

        weights = weights_or_default(weights)
        b = TorchBackend(weights)
        return b, b.meta["classes"], b.preprocess, f"PyTorch ({Path(weights).name})"
    from fer_edge.targets import BundleError, load_bundle

    try:
        bun = load_bundle(bundle, trust=trust, min_release=min_release)
        art = bun.artifact()
    except BundleError as exc:
        raise UserError(str(exc)) from None
    be, chosen = _bundle_backend(art, backend, log, signed=bun.signed_by is not None)
    return be, bun.labels, bun.preprocess, f"{chosen} ({art.file}, {art.precision})"
