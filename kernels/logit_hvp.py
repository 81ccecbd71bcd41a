"""Triton kernel of ``utilgen.ops.logit_hvp``: out_i = w_i (p_i * v_i - p_i <p_i, v_i>).

Each program owns BLOCK_N rows and loops over K in BLOCK_K columns twice:
pass 1 keeps an online softmax state per row (running max m, s = sum
exp(z - m), d = sum exp(z - m) v, rescaled when m grows), pass 2 writes
w / s * exp(z - m) * (v - d / s). fp32 math for fp32/fp16/bf16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from utilgen.kernels import INTERPRETED

# Elements per tile. On a GPU 4096 fp32 values (16 per thread with 8 warps)
# keep z, v and the exponentials in registers; the CPU interpreter pays ~2 ms
# per program instance and nothing per element, so it takes larger tiles.
_TILE_ELEMENTS = 65536 if INTERPRETED else 4096
_MAX_BLOCK_K = 1024


@triton.jit
def _logit_hvp_fwd_kernel(
    logits_ptr,
    v_ptr,
    weight_ptr,
    out_ptr,
    N,
    K,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * K  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    dot_exp = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]  # (BLOCK_N, BLOCK_K)
        offsets = row_start[:, None] + (k0 + cols)[None, :]
        z = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # A row that has seen only -inf (or is past N) keeps max -inf; shift
        # by 0 there so exp(-inf - shift) is 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        factor = tl.exp(running_max - shift)
        e = tl.exp(z - shift[:, None])  # (BLOCK_N, BLOCK_K)
        sum_exp = sum_exp * factor + tl.sum(e, axis=1)
        dot_exp = dot_exp * factor + tl.sum(e * v, axis=1)
        running_max = new_max

    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    safe_sum = tl.where(row_mask, sum_exp, 1.0)
    p_dot_v = dot_exp / safe_sum  # (BLOCK_N,)
    scale = 1.0 / safe_sum
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
        offsets = row_start[:, None] + (k0 + cols)[None, :]
        z = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p_scaled = tl.exp(z - shift[:, None]) * scale[:, None]
        out = p_scaled * (v - p_dot_v[:, None])
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def forward(logits: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor) -> None:
    """Fill ``out`` (N, K) from contiguous logits/v (N, K) and float32 weight (N,) or None."""
    n, k = logits.shape
    block_k = min(triton.next_power_of_2(k), _MAX_BLOCK_K)
    block_n = max(1, min(_TILE_ELEMENTS // block_k, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block_n),)
    _logit_hvp_fwd_kernel[grid](
        logits,
        v,
        weight if weight is not None else logits,
        out,
        n,
        k,
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
