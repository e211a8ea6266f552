"""Log-softmax normalizers over the full vocabulary from a frozen lm_head, without gathering it.

`log_normalizer(h, weight)` = logsumexp(h @ weight.T) per row of h, in fp32, differentiable in h.

Plain weight (one process, or replicated): the whole matrix is one segment. ZeRO-3: each rank holds
a flat slice of the flattened (V, D) weight (`param.ds_tensor`), as DeepSpeed partitions it: every
rank `ceil(V*D / world)` elements, rank r from element r * size, the last slice padded past V*D
with uninitialised memory (`partition_parameters.py: _partition_param`). Slices are not row-aligned,
so a partition boundary can cut a row. Then:

1. the ranks exchange their decoder states (every state needs every rank's slice of the
   vocabulary);
2. each rank computes, for all those states, the logsumexp over the rows wholly inside its slice,
   and partial dot products for the few rows a boundary cuts (<= world - 1 rows, the same list on
   every rank);
3. one all-reduce sums the cut rows' partial products and brings every rank's logsumexp (one
   column per rank); each rank takes the logsumexp over those columns for its own states.

The all-reduces are autograd-aware (`_AllReduceSum`: its backward all-reduces the gradient), so
the prompt gets gradients through the decoder states from every rank's share of the vocabulary.
The frozen weight gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt import is_zero3

CHUNK_ROWS = 8192  # vocabulary rows per fp32 matmul: bounds the temporary to CHUNK_ROWS x (N + D) floats


@dataclass(frozen=True)
class Segment:
    """Flat elements [start, end) of a (rows, dim) matrix held by one rank, and the rows any
    partition boundary cuts (`split`, sorted; the same on every rank)."""

    start: int
    end: int
    rows: int
    dim: int
    split: tuple[int, ...]

    @property
    def whole_rows(self) -> range:
        """Rows lying entirely inside this segment."""
        first = -(-self.start // self.dim)
        return range(first, max(first, self.end // self.dim))


def segment(rows: int, dim: int, world: int, rank: int) -> Segment:
    """Rank `rank`'s slice of a (rows, dim) matrix split as DeepSpeed ZeRO-3 does (module docstring)."""
    numel = rows * dim
    size = -(-numel // world)
    start = min(rank * size, numel)
    split = sorted({b // dim for b in range(size, numel, size) if b % dim})
    return Segment(start, min(start + size, numel), rows, dim, tuple(split))


class _RowsLogSumExp(torch.autograd.Function):
    """logsumexp(h @ w.T, -1) in fp32, `w` read CHUNK_ROWS rows at a time in forward and backward, so
    neither the (N, rows) logits nor an fp32 copy of `w` is kept for backward. `w` is frozen."""

    @staticmethod
    def forward(ctx, h, w):  # h (N, D) fp32, w (R, D) any float dtype
        parts = [torch.logsumexp(h @ chunk.to(h.device, h.dtype).T, -1) for chunk in w.split(CHUNK_ROWS)]
        out = torch.logsumexp(torch.stack(parts, -1), -1)  # (N,): -inf for no rows
        ctx.save_for_backward(h, out)
        ctx.w = w
        return out

    @staticmethod
    def backward(ctx, grad):
        h, out = ctx.saved_tensors
        dh = torch.zeros_like(h)
        for chunk in ctx.w.split(CHUNK_ROWS):
            c = chunk.to(h.device, h.dtype)
            dh += (grad[:, None] * torch.exp(h @ c.T - out[:, None])) @ c  # softmax-weighted rows
        return dh, None


def segment_stats(h: torch.Tensor, flat: torch.Tensor, seg: Segment, rank: int = 0, world: int = 1) -> torch.Tensor:
    """(N, world + S): column `rank` holds the logsumexp over the segment's whole rows (-inf if none),
    columns world + j this segment's partial dot products with cut row j (0 where it does not touch
    it); every other column is 0. Summed over ranks, the columns are every rank's logsumexp and the
    cut rows' full logits: their logsumexp is the full normalizer. `flat` holds elements
    [seg.start, seg.end) (a longer tensor is fine: the padding is never read)."""
    whole = seg.whole_rows
    w = flat[whole.start * seg.dim - seg.start: whole.stop * seg.dim - seg.start].view(len(whole), seg.dim)
    cols = [h.new_zeros(h.shape[0], world)]
    cols[0][:, rank] = _RowsLogSumExp.apply(h, w)
    for row in seg.split:
        lo, hi = max(row * seg.dim, seg.start), min((row + 1) * seg.dim, seg.end)
        if lo >= hi:
            cols.append(h.new_zeros(h.shape[0], 1))
            continue
        part = flat[lo - seg.start: hi - seg.start].to(h.device, h.dtype)
        cols.append(h[:, lo - row * seg.dim: hi - row * seg.dim] @ part[:, None])  # (N, 1)
    return torch.cat(cols, dim=1)


def log_normalizer(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, D) states -> (N,) logsumexp over all rows of the frozen (V, D) `weight`, fp32. Collective
    under ZeRO-3 (every rank must call it, with any N, 0 included)."""
    h = h.float()
    if not is_zero3(weight):
        rows, dim = weight.shape
        return torch.logsumexp(segment_stats(h, weight.detach().reshape(-1), segment(rows, dim, 1, 0)), 1)
    import torch.distributed as dist

    part = weight.ds_tensor
    if hasattr(part, "ds_quant_scale") or part.numel() < part.ds_numel:
        raise NotImplementedError("rank classification reads lm_head's ZeRO-3 partition in place: "
                                  "quantized or NVMe-offloaded frozen weights are not supported")
    group = weight.ds_process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows, dim = weight.ds_shape
    seg = segment(rows, dim, world, rank)
    if world == 1:
        return torch.logsumexp(segment_stats(h, part, seg), 1)
    states = _exchange(h, group, world, rank)  # (world, n_max, D): every rank's states
    stats = segment_stats(states.reshape(-1, dim), part, seg, rank, world)  # (world * n_max, world + S)
    lse = torch.logsumexp(_all_reduce_sum(stats, group), 1)  # (world * n_max,)
    return lse[rank * states.shape[1]:][:h.shape[0]]


def _exchange(h: torch.Tensor, group, world: int, rank: int) -> torch.Tensor:
    """(N, D) per rank -> (world, n_max, D) on every rank, zero-padded; the gradient of each slot goes
    back to the rank whose states it holds."""
    import torch.distributed as dist

    n_max = torch.tensor([h.shape[0]], device=h.device)
    dist.all_reduce(n_max, op=dist.ReduceOp.MAX, group=group)
    padded = torch.nn.functional.pad(h, (0, 0, 0, int(n_max) - h.shape[0]))  # (n_max, D)
    slots = [padded if r == rank else torch.zeros_like(padded) for r in range(world)]
    return _all_reduce_sum(torch.stack(slots), group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks, so each rank's input gets the gradient
    of every rank's loss (what torch.distributed.nn.functional.all_reduce does; that one is deprecated)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ranks (collective in the forward and in the backward)."""
    return _AllReduceSum.apply(x.contiguous(), group)
