"""Gradient caching: a step whose peak memory depends on a mini-batch, not on the batch.

Contrastive losses couple every row of a batch (in-batch negatives, KL over candidate lists), so
the batch cannot be cut into independent micro-batches. GradCache cuts the *encoding* instead:

1. each chunk of rows is encoded without a graph, after recording its RNG state;
2. the losses are computed on the concatenated outputs, as they would be on a plain forward's;
3. in the backward pass each chunk is encoded again, with its graph, from its recorded RNG state
   (dropout draws the same masks, so the outputs are the ones the losses saw), and
   back-propagated with the gradients that the losses sent to its rows.

``cached_encode`` holds steps 1 and 3 in one autograd function, so whoever owns the backward (the
training loop) still calls it once, on the summed loss, and the replay runs inside it. The
parameters are inputs of that function and receive their gradient summed over the chunks in one
go: DDP sees one gradient per parameter per backward pass, as after a plain forward.

``chunked_loss`` is the cheaper case of a loss that is a sum over independent chunks (a
cross-encoder's listwise loss is per group): each chunk's forward and backward run at once, and
the summed parameter gradients wait for the loop's backward, which scales them by the gradient
that reaches the loss. No second forward, nothing to replay.

Reference: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021 (GradCache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

Inputs = dict[str, torch.Tensor]


def split_rows(inputs: Inputs, size: int) -> list[Inputs]:
    """Consecutive chunks of ``size`` rows (the last may be shorter), each cut to its longest row.

    Every tensor has the rows as dim 0; those as wide as ``attention_mask`` lose the trailing
    columns that no row of the chunk attends to, so a chunk of short texts is not encoded at the
    batch's width. Right-padded ``data.collate`` batches stay valid batches: a chunk of
    ``encoder_inputs`` is ``2 + max(lengths)`` wide, as ColBERT's ``content_tokens`` expects.

    >>> from data.collate import SpecialTokens, encoder_inputs
    >>> batch = encoder_inputs([[7, 8, 9], [5], [6]], SpecialTokens(cls=1, sep=2, pad=0))
    >>> [chunk["input_ids"].tolist() for chunk in split_rows(batch, 2)]
    [[[1, 7, 8, 9, 2], [1, 5, 2, 0, 0]], [[1, 6, 2]]]
    """
    if size < 1:
        raise ValueError(f"chunks need at least one row, got {size}")
    mask = inputs["attention_mask"]  # (B, T)
    width = mask.shape[1]
    chunks = []
    for start in range(0, mask.shape[0], size):
        rows = slice(start, start + size)
        attended = mask[rows].any(dim=0).nonzero()  # (columns, 1)
        used = int(attended.max()) + 1 if len(attended) else width
        chunks.append({k: v[rows, :used] if v.dim() >= 2 and v.shape[1] == width else v[rows]
                       for k, v in inputs.items()})
    return chunks


@dataclass
class RngState:
    """The CPU generator's state and that of every accelerator the chunk's tensors live on."""

    cpu: torch.Tensor
    devices: list
    device_states: list

    @classmethod
    def capture(cls, *tensors: torch.Tensor) -> "RngState":
        devices, states = get_device_states(*tensors)
        return cls(torch.get_rng_state(), devices, states)


def restore_rng(state: RngState) -> None:
    """Put the generators back where they were when ``state`` was captured."""
    torch.set_rng_state(state.cpu)
    set_device_states(state.devices, state.device_states)


def _autocast_of(device_type: str) -> dict:
    """The autocast state in force, to replay a forward in the backward pass under the same one."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _add(totals: list, grads: Sequence) -> list:
    """``totals + grads`` in place: one buffer per parameter, which autograd then takes as its gradient."""
    return [t if g is None else g if t is None else t.add_(g) for t, g in zip(totals, grads)]


class _CachedEncode(torch.autograd.Function):
    """Outputs of ``encode`` over every chunk (no graph); the backward replays chunk by chunk."""

    @staticmethod
    def forward(ctx, encode, chunks, *params):
        ctx.encode, ctx.chunks, ctx.params = encode, chunks, params
        ctx.set_materialize_grads(False)  # an output no loss reads needs no replay
        first = next(iter(chunks[0].values()))
        ctx.autocast = _autocast_of(first.device.type)
        ctx.states, outputs = [], []
        for chunk in chunks:
            ctx.states.append(RngState.capture(*chunk.values()))
            outputs.append(encode(chunk))
        ctx.rows = [out[0].shape[0] for out in outputs]
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    @staticmethod
    def backward(ctx, *grads):
        totals, start = [None] * len(ctx.params), 0
        for chunk, state, rows in zip(ctx.chunks, ctx.states, ctx.rows):
            cached = [(i, g[start : start + rows]) for i, g in enumerate(grads) if g is not None]
            start += rows
            if not cached:
                continue
            # fork_rng: the replay must not move the generators that the rest of training draws from
            with torch.random.fork_rng(devices=state.devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
                restore_rng(state)
                outputs = ctx.encode(chunk)
            totals = _add(totals, torch.autograd.grad([outputs[i] for i, _ in cached], ctx.params,
                                                      [g for _, g in cached], allow_unused=True))
        return (None, None, *totals)


def cached_encode(encode: Callable[[Inputs], tuple[torch.Tensor, ...]], chunks: list[Inputs],
                  params: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, ...]:
    """``encode`` over ``chunks`` with GradCache's memory: one chunk's graph alive at a time.

    Args:
        encode: chunk -> tuple of tensors with the chunk's rows as dim 0 (same width for every
            chunk); it runs twice per chunk, so it must depend on nothing but the chunk, the
            parameters and the RNG.
        chunks: consecutive row chunks of one batch (``split_rows``).
        params: the parameters ``encode`` trains; those without ``requires_grad`` are left out.

    Returns:
        each output of ``encode``, concatenated over the chunks; they carry gradients to ``params``.

    >>> layer = torch.nn.Linear(3, 1)
    >>> x = {"attention_mask": torch.ones(5, 1), "x": torch.randn(5, 3)}
    >>> (out,) = cached_encode(lambda chunk: (layer(chunk["x"]),), split_rows(x, 2), list(layer.parameters()))
    >>> out.pow(2).sum().backward()
    >>> cached = layer.weight.grad.clone()
    >>> layer.zero_grad()
    >>> layer(x["x"]).pow(2).sum().backward()
    >>> torch.allclose(cached, layer.weight.grad)
    True
    """
    return _CachedEncode.apply(encode, chunks, *[p for p in params if p.requires_grad])


class _ChunkedLoss(torch.autograd.Function):
    """A sum of per-chunk losses, each back-propagated at once; the gradients wait for the backward."""

    @staticmethod
    def forward(ctx, loss_of, chunks, *params):
        losses, totals = [], [None] * len(params)
        for chunk in chunks:
            with torch.enable_grad():
                loss = loss_of(chunk)
            totals = _add(totals, torch.autograd.grad(loss, params, allow_unused=True))
            losses.append(loss.detach())
        ctx.totals = totals
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *[None if g is None else g * grad for g in ctx.totals])


def chunked_loss(loss_of: Callable[[Inputs], torch.Tensor], chunks: list[Inputs],
                 params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """``sum_c loss_of(chunk_c)`` with one chunk's graph alive at a time, and no second forward.

    Each chunk's gradients are computed in this call, at an upstream gradient of 1, and kept
    summed (one buffer the size of ``params``); the backward pass scales them by the gradient that
    reaches the returned loss. Exact for any loss that is a sum over independent chunks. Under
    fp16 autocast the chunk gradients miss the loss scaler's scaling: use bf16 or fp32.

    >>> layer = torch.nn.Linear(3, 1)
    >>> x = {"attention_mask": torch.ones(5, 1), "x": torch.randn(5, 3)}
    >>> loss = chunked_loss(lambda chunk: layer(chunk["x"]).pow(2).sum(), split_rows(x, 2), list(layer.parameters()))
    >>> (3 * loss).backward()
    >>> chunked = layer.weight.grad.clone()
    >>> layer.zero_grad()
    >>> (3 * layer(x["x"]).pow(2).sum()).backward()
    >>> torch.allclose(chunked, layer.weight.grad)
    True
    """
    return _ChunkedLoss.apply(loss_of, chunks, *[p for p in params if p.requires_grad])
