"""The one place that knows about processes: row shards, gathers with gradients, object exchange.

With one process (or no process group) every helper is the identity, so single-process code
paths run the same functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_slice(rows: int, rank: int, num_processes: int) -> slice:
    """Process ``rank``'s contiguous share of ``rows`` rows, which must split evenly.

    >>> shard_slice(8, 1, 2)
    slice(4, 8, None)
    """
    if rows % num_processes:
        raise ValueError(f"{rows} rows do not split evenly over {num_processes} processes")
    size = rows // num_processes
    return slice(rank * size, (rank + 1) * size)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``x`` (same shape on all) concatenated in rank order, and this process's first row.

    Gradients flow back to each row's owner: the backward pass sums, for this process's rows,
    the gradients that every process's loss sends them. With each process's loss the mean over
    its own queries and DDP averaging gradients over processes, one step then equals the
    single-process step on the global batch.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0), rank * x.shape[0]


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process when ``flag`` is true on any (a collective: all processes must call it)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each value averaged over processes (a collective; every process passes the same keys)."""
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / world()[1] for k, v in zip(keys, tensor.tolist())}


def gather_rows(x: torch.Tensor, chunk_rows: int = 65536) -> list[torch.Tensor]:
    """Every process's rows of ``x`` (R_i, D), row counts may differ by process, as CPU tensors in rank order.

    Sent in chunks of ``chunk_rows``, so a large corpus never sits whole on an accelerator.
    """
    rank, size = world()
    if size == 1:
        return [x.cpu()]
    counts = [int(n) for n in gather_objects(x.shape[0])]
    width = int(max(gather_objects(x.shape[1] if x.dim() == 2 else 0)))
    x = x.reshape(x.shape[0], width)
    parts: list[list[torch.Tensor]] = [[] for _ in range(size)]
    for start in range(0, max(counts), chunk_rows):
        block = x[start : start + chunk_rows]
        padded = torch.zeros(min(chunk_rows, max(counts) - start), width, dtype=x.dtype, device=x.device)
        padded[: block.shape[0]] = block
        received = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(received, padded)
        for r, rows in enumerate(received):
            parts[r].append(rows[: max(0, min(counts[r] - start, rows.shape[0]))].cpu())
    return [torch.cat(p) for p in parts]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order, on every process."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
