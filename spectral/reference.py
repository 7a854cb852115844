"""The reference form: W_delta rebuilt with ordinary torch ops, then the ordinary layer op.

    W_delta = U diag(ReLU(sigma + delta)) Vh               SVDiff (Han et al. 2023), eq. 3
    U (m, r), sigma (r,), Vh (r, n): the thin SVD of a pretrained W (m, n), r = min(m, n), frozen
    delta (r,): the shift of the singular values, the only trained tensor

A conv kernel (c_out, c_in, *k) is the matrix c_out x (c_in*prod(k)); an embedding table
(num_embeddings, dim) is W itself. This file computes exactly that: W_delta from U, sigma, delta
and Vh, then F.linear / F.conv1d / F.conv2d / F.embedding, and autograd does the backward:

    dL/ddelta = 1[sigma + delta > 0] * diag(U^T dW V),   dW = dL/dW_delta (m, n)

It is the form to read first, and the oracle of the fast forms in function.py, which compute the
same values (tested in float64) without a weight-sized tensor kept for backward. Its price: a full
W_delta (m, n) in every forward, kept by autograd until the backward. Pick it per layer
(layer.form = "reference") or for a whole model (attach(model, form="reference")).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

CONV = {1: F.conv1d, 2: F.conv2d}      # the op by number of spatial dims


def shifted_weight(U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor) -> Tensor:
    """W_delta = (U * ReLU(sigma + delta)) @ Vh, (m, r), (r,), (r,), (r, n) -> (m, n), in the dtype
    of Vh (U scaled, then rounded to it); differentiable in every argument."""
    return (U * torch.relu(sigma + delta)).to(Vh.dtype) @ Vh


def layer_weight(U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor) -> Tensor:
    """W_delta as a plain layer would hold it: built with autocast off, in the weights' dtype.
    The op that uses it then casts it as it would the plain layer's weight (under autocast
    F.linear and F.conv run in half precision, F.embedding in the table's dtype)."""
    with torch.autocast(U.device.type, enabled=False):
        return shifted_weight(U, sigma, delta, Vh)


def linear(x: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with W_delta: x (..., n) -> (..., m)."""
    return F.linear(x, layer_weight(U, sigma, delta, Vh), bias)


def conv(x: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor, bias: Tensor | None,
         kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
         dilation: tuple[int, ...]) -> Tensor:
    """F.conv1d / F.conv2d (by len(kernel_size)), groups = 1, with the kernel
    W_delta.view(c_out, c_in, *kernel_size): x (B, c_in, *spatial) -> (B, c_out, *out_spatial)."""
    weight = layer_weight(U, sigma, delta, Vh).view(U.shape[0], -1, *kernel_size)
    return CONV[len(kernel_size)](x, weight, bias, stride, padding, dilation)


def embedding(ids: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor,
              padding_idx: int | None = None) -> Tensor:
    """F.embedding with the table W_delta (num_embeddings, dim): ids (...) -> (..., dim). Rows at
    padding_idx get no gradient, so their tokens add nothing to dL/ddelta."""
    return F.embedding(ids, layer_weight(U, sigma, delta, Vh), padding_idx)
