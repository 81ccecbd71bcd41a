"""Triton kernels of the weighted cross-entropy op (reference: utilgen/ops/weighted_cross_entropy.py).

Each program takes BLOCK_N rows and walks K in BLOCK_K tiles with an online
(max, sum e^{z-max}, sum e^{z-max} u) per row, so any K fits. The backward
recomputes e^{z - lse} from the saved logsumexp: one read and one write of
(N, K), nothing of that size kept between the passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from utilgen.kernels import INTERPRETED


@triton.jit
def _weighted_cross_entropy_fwd_kernel(
    logits_ptr,
    target_ptr,
    tangent_ptr,
    per_sample_ptr,
    lse_ptr,
    directional_ptr,
    N,
    K,
    HAS_TANGENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * K
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    tangent_sum = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < K)
        offsets = row_start[:, None] + cols[None, :]
        z = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # Rows that are all -inf so far: shift by 0 so exp(-inf - 0) = 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        e = tl.exp(z - shift[:, None])
        running_sum = running_sum * rescale + tl.sum(e, axis=1)
        if HAS_TANGENT:
            u = tl.load(tangent_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tangent_sum = tangent_sum * rescale + tl.sum(e * u, axis=1)
        running_max = new_max

    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    valid = (target >= 0) & (target < K)
    safe_target = tl.where(valid, target, 0)
    z_target = tl.load(logits_ptr + row_start + safe_target, mask=row_mask, other=0.0).to(tl.float32)
    # Rows past N hold sum 0; give them 1 so the interpreter's numpy stays quiet.
    running_sum = tl.where(row_mask, running_sum, 1.0)
    lse = running_max + tl.log(running_sum)
    # Invalid targets cannot raise inside a kernel: NaN marks the row.
    tl.store(lse_ptr + rows, tl.where(valid, lse, float("nan")), mask=row_mask)
    tl.store(per_sample_ptr + rows, tl.where(valid, lse - z_target, float("nan")), mask=row_mask)
    if HAS_TANGENT:
        u_target = tl.load(tangent_ptr + row_start + safe_target, mask=row_mask, other=0.0).to(tl.float32)
        directional = tangent_sum / running_sum - u_target
        tl.store(directional_ptr + rows, tl.where(valid, directional, float("nan")), mask=row_mask)


@triton.jit
def _weighted_cross_entropy_bwd_kernel(
    grad_loss_ptr,
    logits_ptr,
    target_ptr,
    weight_ptr,
    per_sample_ptr,
    lse_ptr,
    grad_logits_ptr,
    grad_weight_ptr,
    N,
    K,
    scale,
    GRAD_PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * K
    if GRAD_PER_ROW:
        g = tl.load(grad_loss_ptr + rows, mask=row_mask, other=0.0)
    else:
        g = tl.zeros([BLOCK_N], tl.float32) + tl.load(grad_loss_ptr) * scale
    weight = tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
    coefficient = g * weight
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < K)
        offsets = row_start[:, None] + cols[None, :]
        z = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse[:, None])
        is_target = cols[None, :] == target[:, None]
        grad = coefficient[:, None] * (p - tl.where(is_target, 1.0, 0.0))
        tl.store(grad_logits_ptr + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    per_sample = tl.load(per_sample_ptr + rows, mask=row_mask, other=0.0)
    tl.store(grad_weight_ptr + rows, g * per_sample, mask=row_mask)


def _tiles(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K). The interpreter pays ~2 ms per program, so it takes
    tall tiles; on a GPU a few rows of up to 1024 columns keep registers modest."""
    block_k = min(triton.next_power_of_2(k), 128 if INTERPRETED else 1024)
    block_n = 32 if INTERPRETED else max(1, min(16, 2048 // block_k))
    return block_n, block_k


def forward(
    logits: torch.Tensor,  # (N, K) contiguous
    target: torch.Tensor,  # (N,) int64
    tangent: torch.Tensor | None,  # (N, K) or None
    per_sample: torch.Tensor,  # (N,) float32, written
    lse: torch.Tensor,  # (N,) float32, written
    directional: torch.Tensor,  # (N,) float32 (written) or (0,)
) -> None:
    n, k = logits.shape
    block_n, block_k = _tiles(k)
    _weighted_cross_entropy_fwd_kernel[(triton.cdiv(n, block_n),)](
        logits,
        target,
        tangent if tangent is not None else logits,
        per_sample,
        lse,
        directional,
        n,
        k,
        HAS_TANGENT=tangent is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def backward(
    grad_loss: torch.Tensor,  # () or (N,) float32
    grad_per_row: bool,
    scale: float,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,  # (N,) float32
    per_sample: torch.Tensor,
    lse: torch.Tensor,
    grad_logits: torch.Tensor,  # (N, K) logits' dtype, written
    grad_weight: torch.Tensor,  # (N,) float32, written
) -> None:
    n, k = logits.shape
    block_n, block_k = _tiles(k)
    _weighted_cross_entropy_bwd_kernel[(triton.cdiv(n, block_n),)](
        grad_loss,
        logits,
        target,
        weight,
        per_sample,
        lse,
        grad_logits,
        grad_weight,
        n,
        k,
        scale,
        GRAD_PER_ROW=grad_per_row,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
