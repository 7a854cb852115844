"""Rebuilding a shifted weight: W_delta = U diag(ReLU(sigma + delta)) Vh, in one fused kernel.

Shapes: U (m, r), sigma and delta (r,), Vh (r, n); the result is (m, n) in the dtype of U and Vh.

    W_delta[i, j] = sum_k U[i, k] * max(sigma[k] + delta[k], 0) * Vh[k, j]

This is a matrix product whose left operand is scaled column by column. The torch fallback,
reference.shifted_weight, scales U (an (m, r) temporary) and calls matmul; the Triton kernel
scales each U tile as it is loaded, so the scaled U never exists in memory. Both compute the
scale in float32 and round the scaled U to the weights' dtype before the product, so they agree
to float32 rounding; float64 tensors (sigma included) take the fallback, all in float64.

No autograd here: gradients are the business of spectral/function.py, which calls `reconstruct`
inside its own forward and backward.

`reconstruct` picks Triton for CUDA tensors when triton is installed, the torch fallback
otherwise. The Triton kernel also runs on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1 in the environment before triton is imported), which is how CI tests it.
"""

import os

import torch
from torch import Tensor

from spectral import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: CUDA speed-up and tests only
    triton = None


def reconstruct_torch(U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor) -> Tensor:
    """(U * ReLU(sigma + delta)) @ Vh with plain torch ops; (m, r), (r,), (r,), (r, n) -> (m, n):
    the reference form's W_delta, with the scale in float32 as in the Triton kernel (float64 when
    sigma is: a model moved to float64 keeps float64 accuracy)."""
    scale_dtype = torch.promote_types(sigma.dtype, torch.float32)
    return reference.shifted_weight(U, sigma.to(scale_dtype), delta.to(scale_dtype), Vh)


if triton is not None:

    @triton.jit
    def _reconstruct_kernel(
        u_ptr, sigma_ptr, delta_ptr, vh_ptr, w_ptr,
        m, n, r,
        stride_um, stride_ur, stride_vr, stride_vn, stride_wm, stride_wn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One program computes one (BLOCK_M, BLOCK_N) tile of W, walking r in BLOCK_R steps.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, r, BLOCK_R):
            ks = start + tl.arange(0, BLOCK_R)
            k_ok = ks < r
            sigma = tl.load(sigma_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            delta = tl.load(delta_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            scale = tl.maximum(sigma + delta, 0.0)
            u = tl.load(u_ptr + rows[:, None] * stride_um + ks[None, :] * stride_ur,
                        mask=(rows[:, None] < m) & k_ok[None, :], other=0.0)
            vh = tl.load(vh_ptr + ks[:, None] * stride_vr + cols[None, :] * stride_vn,
                         mask=k_ok[:, None] & (cols[None, :] < n), other=0.0)
            # the scale is applied in float32, then rounded like the torch fallback does;
            # "ieee": no TF32 shortcut for float32 weights (delta = 0 must give W back)
            scaled_u = (u.to(tl.float32) * scale[None, :]).to(vh.dtype)
            acc = tl.dot(scaled_u, vh, acc, input_precision="ieee")
        tl.store(w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn,
                 acc.to(w_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reconstruct_triton(U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor,
                       block_m: int = 64, block_n: int = 64, block_r: int = 32) -> Tensor:
    """The fused Triton kernel; (m, r), (r,), (r,), (r, n) -> (m, n). Block sizes >= 16 (tl.dot)."""
    if triton is None:
        raise RuntimeError("reconstruct_triton needs triton (pip install triton)")
    if not U.is_cuda and not _interpreting():
        raise RuntimeError("reconstruct_triton runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1")
    (m, r), n = U.shape, Vh.shape[1]
    assert sigma.shape == delta.shape == (r,) and Vh.shape == (r, n), "expected U (m,r), sigma/delta (r,), Vh (r,n)"
    W = torch.empty(m, n, device=U.device, dtype=Vh.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _reconstruct_kernel[grid](
        U, sigma, delta, Vh, W, m, n, r,
        U.stride(0), U.stride(1), Vh.stride(0), Vh.stride(1), W.stride(0), W.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    return W


def reconstruct(U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor) -> Tensor:
    """W_delta = (U * ReLU(sigma + delta)) @ Vh, (m, n): Triton on CUDA (half and float32
    weights; its accumulator is float32), torch elsewhere."""
    if U.is_cuda and triton is not None and U.dtype != torch.float64:
        return reconstruct_triton(U, sigma, delta, Vh)
    return reconstruct_torch(U, sigma, delta, Vh)
