"""Which torch device a command runs on: checked once, before any work starts."""
from __future__ import annotations

from fer_edge import UserError


def torch_device(name: str, local_rank: int | None = None):
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a torch.device that exists, or a
    one-line UserError (no GPU visible, index out of range, unknown name)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch (use --device cpu)")
        count = torch.cuda.device_count()
        if name == "cuda":
            index = local_rank if local_rank is not None else torch.cuda.current_device()
        else:
            index = int(name.split(":", 1)[1])
        if not 0 <= index < count:
            raise UserError(f"--device {name}: PyTorch sees {count} GPU(s), numbered 0 to {count - 1}")
        return torch.device("cuda", index)
    raise UserError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or auto")
