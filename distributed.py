"""Small torch.distributed helpers for the contrastive loss and the trials' evaluation code.

`losses.SupConLoss` gathers features across ranks with `all_gather_with_grad`. The trials gather
kNN memory banks and labels with `all_gather_variable` and sum counts with `all_reduce_sum`.
Every helper falls back to one process when torch.distributed is unavailable or not initialised.
Per-rank sizes along dim 0 may differ, and tensors stay on the device they arrive on.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """Return whether torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Return the number of processes in the default group, or 1 without torch.distributed."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """Return this process's rank in the default group, or 0 without torch.distributed."""
    return dist.get_rank() if is_initialized() else 0


def _gather_sizes(tensor: Tensor) -> list[int]:
    """Gather every rank's size along dim 0, in rank order."""
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(local_size) for _ in range(world_size())]
    dist.all_gather(sizes, local_size)
    return torch.cat(sizes).tolist()


def _gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's rows, padding each to the largest size for the collective."""
    max_size = max(sizes)
    padded = tensor.new_zeros((max_size, *tensor.shape[1:]))  # (max_size, ...)
    padded[: tensor.shape[0]] = tensor
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes, strict=True)])


class _AllGatherFunction(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient at this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], offset: int) -> Tensor:
        ctx.offset = offset
        ctx.size = tensor.shape[0]
        return _gather_padded(tensor.detach(), sizes)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        # gloo has no reduce_scatter, so every rank sums the whole gradient and keeps its rows.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.size], None, None


def all_gather_with_grad(tensor: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's tensor along dim 0, keeping autograd across ranks.

    Ranks may hold different sizes along dim 0 (for example 3, 5 and 1 rows); the other dims
    must match. The helper gathers the sizes first, pads every tensor to the largest size for
    the collective, and strips the padding before concatenating in rank order.

    Gradient: the gradient returned for `tensor` is the sum over all ranks of the gradient of
    each rank's gathered output at this rank's rows, so every rank must call backward. This
    rank's rows in the output are `tensor` itself, so its own part of the gradient flows
    directly, and the all-reduce in backward adds the parts computed on the other ranks.

    Args:
        tensor: This rank's rows, shape `(n, ...)`.

    Returns:
        The concatenation over ranks, shape `(sum of n over ranks, ...)`, and the index of this
        rank's first row in it. Without torch.distributed: `(tensor, 0)`.
    """
    if not is_initialized() or world_size() == 1:
        return tensor, 0

    sizes = _gather_sizes(tensor)
    offset = sum(sizes[: rank()])
    end = offset + tensor.shape[0]
    gathered = _AllGatherFunction.apply(tensor, sizes, offset)  # (sum of sizes, ...)
    # The gathered copy of this rank's rows gets no gradient from this rank, because the local
    # tensor replaces it. The all-reduce in backward still adds the other ranks' gradients.
    return torch.cat([gathered[:offset], tensor, gathered[end:]]), offset


def all_gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate every rank's tensor along dim 0, without autograd.

    Sizes along dim 0 may differ per rank and are handled as in `all_gather_with_grad`.
    Used for kNN memory banks and labels. Without torch.distributed it returns `tensor.detach()`.
    """
    if not is_initialized() or world_size() == 1:
        return tensor.detach()
    detached = tensor.detach()
    return _gather_padded(detached, _gather_sizes(detached))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Return a new tensor containing the sum of `tensor` over ranks, without autograd.

    Without torch.distributed it returns a detached copy, so callers may modify the result.
    """
    total = tensor.detach().clone()
    if is_initialized() and world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
