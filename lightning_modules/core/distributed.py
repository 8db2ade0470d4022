"""What the objectives, the data and the run need to know about a distributed (DDP, FSDP) run; torch only.

On one process every function here is the identity (rank 0 of 1), so single-process code paths are
unchanged. The rule that makes ``B`` per rank on ``W`` ranks match ``W*B`` on one process: the loader
hands rank ``r`` the ``r``-th contiguous slice of each global batch (``datamodules/loading/in_memory.py``), and
every random draw of a training step (augmentations, MAE masks) is made for the whole global batch
from the RNG stream that all ranks share (``EpochSeed`` seeds it identically on every rank), each rank
keeping the same slice. So ranks never repeat each other's augmentations, and the images, views and
masks of a step are those the single-process run draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

# The same call as Lightning's own ``all_gather(..., sync_grads=True)``; the replacement torch suggests
# (``_functional_collectives``) is private API.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


_alone = False


@contextmanager
def alone():
    """Inside, this process computes as if it were the only one (no gathers, unsliced draws): for work that
    every rank does on all of the data by itself, e.g. the forgetting probe."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group or ``alone()``."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` of all ranks concatenated in rank order, and where this rank's rows start in it.

    Gradients flow back to each rank's own ``x`` (``torch.distributed.nn`` all_gather, as Lightning's
    ``all_gather(sync_grads=True)``: its backward sums the gradients from every rank's loss); plain
    ``dist.all_gather`` would cut the graph. Ranks may hold different numbers of rows (the last
    evaluation batch): they are padded to the largest for the gather and trimmed after."""
    rank, world = rank_world()
    if world == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
    parts = all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all ranks (sum, then divide, as Lightning's ``sync_dist`` does), queued on the
    device's stream: no barrier, so on GPUs the host does not wait for it."""
    _, world = rank_world()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world


def shard_draw(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """``draw(m)`` returns ``m`` random rows; draw them for the global batch (``n`` per rank) and keep
    this rank's slice, so the draws match the single-process run on the same global batch (exactly when
    it splits evenly, as training batches always do)."""
    rank, world = rank_world()
    if world == 1:
        return draw(n)
    return draw(n * world)[rank * n : (rank + 1) * n]


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total`` (a sum over this rank's items: tokens, say) divided so that DDP's gradient averaging gives
    the mean over the items of the *global* batch: ``total * world / (count summed over ranks)``. Ranks may
    hold different numbers of items (selected or real tokens), so a per-rank mean would weigh them wrongly.
    On one process: ``total / count``. The count carries no gradient."""
    rank, world = rank_world()
    count = count.detach().to(total.dtype)
    if world > 1:
        count = count.clone()
        dist.all_reduce(count)
    return total * world / count.clamp_min(1)


@contextmanager
def unsharded(module: torch.nn.Module, reader: bool = True):
    """Inside, an FSDP2-sharded ``module`` (``trainer=fsdp``) holds its whole parameters as plain CPU tensors on the
    ``reader`` rank: what an export of the weights reads (safetensors, ``state_dict``). Every rank must enter: each
    sharded parameter is gathered from all of them (a collective), in the module's order; tied parameters stay tied.
    On leaving, the sharded parameters are put back. A module that is not sharded is left as it is."""
    from torch.distributed.tensor import DTensor

    swapped, whole = [], {}
    with torch.no_grad():
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if not isinstance(p, DTensor):
                    continue
                if id(p) not in whole:
                    gathered = p.full_tensor()
                    whole[id(p)] = (
                        torch.nn.Parameter(gathered.to("cpu", copy=True), p.requires_grad) if reader else None
                    )
                if reader:
                    swapped.append((owner, name, p))
    for owner, name, p in swapped:
        owner._parameters[name] = whole[id(p)]  # a plain copy in the sharded one's place
    try:
        yield module
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
