"""What this installation can do: versions, compiled kernels, runtimes, GPU."""
from __future__ import annotations

import importlib
import importlib.util
import platform



def runtime_modules() -> tuple[str, ...]:
    """The Python modules of every runtime a bundle can run on (the backend table)
    and of every exporter (the formats table), by import name."""
    from fer_edge.targets.backends import runtime_modules as backends

    try:
        from fer_edge.converters.formats import tools
    except ImportError:  # a device install without the converters' dependencies
        return backends()
    return tuple(dict.fromkeys((*backends(), *tools())))


def _module_version(name: str) -> str | None:
    """The version of an importable module, or None when it is not installed.

    Read from the package metadata without importing it: importing litert_torch
    or tensorrt takes seconds and prints native log lines."""
    if importlib.util.find_spec(name) is None:
        return None
    from importlib import metadata

    for dist in metadata.packages_distributions().get(name, [name]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        mod = importlib.import_module(name)
    except Exception:  # a broken install counts as absent  # noqa: BLE001
        return None
    return str(getattr(mod, "__version__", "unknown"))


def collect() -> dict:
    """Everything `fer-edge info` reports, as a JSON-ready dict."""
    from fer_edge import __version__

    info: dict = {
        "fer_edge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": None,
        "kernels": {"cpu": False, "cuda": False, "cuda_archs": [], "openmp": False},
        "runtimes": {},
        "cuda_device": None,
        "default_model": None,
    }
    try:
        from fer_edge.weights import default_card, default_weights

        card = default_card()
        info["default_model"] = {"name": card["name"], "path": str(default_weights(card)),
                                 "publictest_accuracy": card.get("publictest", {}).get("accuracy"),
                                 "status": card.get("status")}
    except Exception as exc:  # noqa: BLE001  (info reports, never fails)
        info["default_model"] = {"error": str(exc)}
    try:
        from fer_edge import _C

        built = _C.build_info()
        info["kernels"] = {
            "cpu": bool(built["cpu"]),
            "cuda": bool(built["cuda"]),
            "cuda_archs": list(built["cuda_archs"]),
            "openmp": bool(built["openmp"]),
            "cutlass": bool(built.get("cutlass")),
            "cutlass_sm90": bool(built.get("cutlass_sm90")),
        }
        if built["cuda"]:
            info["kernels"]["cuda_devices_visible"] = int(_C.cuda_device_count())
    except ImportError as exc:
        info["kernels"]["error"] = f"fer_edge._C does not import: {exc}"
    info["torch"] = _module_version("torch")
    if info["torch"] is not None:
        # Imported here (a second or two): the GPU is what people run `info` to see.
        # (It once printed "cuda_device": null on the H100 machine, torch not yet imported.)
        try:
            import torch

            if torch.cuda.is_available():
                info["cuda_device"] = torch.cuda.get_device_name(0)
                info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        except Exception:  # noqa: BLE001  (info reports, never fails)
            pass
    from fer_edge.dispatch import describe

    info["kernel_dispatch"] = describe()
    for name in runtime_modules():
        info["runtimes"][name] = _module_version(name)
    return info


def dispatch_lines(d: dict) -> list[str]:
    """The kernel dispatch table as text: what merged layers run on CUDA, per measured shape."""
    if "error" in d:
        return [f"kernel dispatch: {d['file']} unusable ({d['error']}): every layer runs cudnn"]
    rows = d.get("entries", [])
    head = (f"kernel dispatch on CUDA ({d.get('file')}): {len(rows)} measured shape(s), "
            f"{d.get('default', 'cudnn')} elsewhere"
            + (f"; FER_EDGE_CUDA_KERNEL={d['override']} overrides it" if d.get("override") else ""))
    lines = [head]
    if d.get("override_error"):
        lines.append(f"  FER_EDGE_CUDA_KERNEL is ignored: {d['override_error']}")
    for r in rows:
        lines.append(f"  cc {r['cc']} {r['dtype']} batch {r['batch']:>6}  C={r['cin']} c1/c3/c5={r['c1']}/{r['c3']}/"
                     f"{r['c5']} {r['h']}x{r['w']}: {r['choice']}"
                     + (f" ({r['speedup']:.2f}x the best cuDNN way)" if "speedup" in r else ""))
    return lines


def format_text(info: dict) -> str:
    k = info["kernels"]
    lines = [
        f"fer-edge {info['fer_edge']} (Python {info['python']}, {info['platform']})",
        f"torch: {info['torch'] or 'not installed'}",
        f"kernels: cpu={'yes' if k['cpu'] else 'no'} (openmp={'yes' if k.get('openmp') else 'no'}), "
        f"cuda={'yes' if k['cuda'] else 'no'}"
        + (f" for sm_{', sm_'.join(k['cuda_archs'])}" if k["cuda_archs"] else "")
        + (" (with the CUTLASS paths" + (", and their Hopper versions)" if k.get("cutlass_sm90") else ")")
           if k.get("cutlass") else ""),
        f"cuda device: {info['cuda_device'] or 'none'}"
        + (f" (compute capability {info['cuda_capability']})" if info.get("cuda_capability") else ""),
        *dispatch_lines(info.get("kernel_dispatch") or {}),
    ]
    dm = info.get("default_model") or {}
    if "name" in dm:
        acc = dm.get("publictest_accuracy")
        lines.append(f"default model: {dm['name']}" + (f" ({100 * acc:.1f}% FER2013 PublicTest)" if acc else "")
                     + f", {dm['path']}")
    else:
        lines.append(f"default model: none ({dm.get('error', 'not installed')})")
    lines.append("runtimes:")
    for name, ver in info["runtimes"].items():
        lines.append(f"  {name:16s} {ver or '-'}")
    return "\n".join(lines)
