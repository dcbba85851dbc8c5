"""Several processes under torchrun: who this process is, and the few
collective steps the loop needs (each a no-op in a single process).

Every rank sees the same global batch order and takes its own slice
(DistributedSampler semantics without the sampler); BatchNorm buffers are
broadcast from rank 0 at the end of each epoch so every rank ends with
identical weights and buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from fer_edge import UserError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


MAX_WORLD = 1 << 16


def env_int(name: str, default: str | None, lo: int, hi: int) -> int:
    """A whole number from the environment, or one UserError line naming it."""
    text = os.environ.get(name, default)
    if text is None:
        raise UserError(f"{name} is not set, but WORLD_SIZE is {os.environ.get('WORLD_SIZE')}: start with torchrun")
    try:
        value = int(text.strip(), 10)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise UserError(f"{name}={text[:40]!r}: must be a whole number from {lo} to {hi} (torchrun sets it)")
    return value


def context_from_env() -> DistContext:
    """This process's place among torchrun's (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    world = env_int("WORLD_SIZE", "1", 0, MAX_WORLD)
    if world <= 1:
        return DistContext()
    return DistContext(env_int("RANK", None, 0, world - 1), world, env_int("LOCAL_RANK", "0", 0, world - 1))


def join_process_group(ctx: DistContext, device: torch.device) -> None:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); nothing in a single process."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as exc:   # no MASTER_ADDR/PORT, a peer that never came
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot join the process group of WORLD_SIZE={ctx.world} (start with torchrun): "
                            f"{first[:200]}") from None


def leave_process_group(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's BatchNorm statistics on every rank."""
    if ctx.enabled:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, 0)


def sum_over_ranks(values: list, ctx: DistContext, device: torch.device) -> list[float]:
    """The sum of each (scalar) value over all ranks, as Python floats."""
    t = torch.stack([torch.as_tensor(v, device=device).float() for v in values])
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def from_main(value: float, ctx: DistContext, device: torch.device, dtype=torch.float64) -> float:
    """Rank 0's value on every rank (a decision every rank must share)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=dtype, device=device)
    dist.broadcast(t, 0)
    return t.item()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(device: torch.device, ctx: DistContext) -> list:
    """Every rank's RNG state, in rank order (stored in the resume file)."""
    state = rng_state(device)
    if not ctx.enabled:
        return [state]
    import torch.distributed as dist

    out = [None] * ctx.world
    dist.all_gather_object(out, state)
    return out
