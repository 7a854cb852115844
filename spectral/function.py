"""The fast forms: linear maps whose weight is spectrally shifted, with a hand-written backward.

SVDiff (Han et al. 2023, eq. 3) keeps the singular vectors of a pretrained weight W (m, n) and
trains only a shift delta of its singular values:

    W = U diag(sigma) Vh                          thin SVD: U (m, r), sigma (r,), Vh (r, n), r = min(m, n)
    W_delta = U diag(s) Vh,  s = ReLU(sigma + delta)

A conv kernel (c_out, c_in, kh, kw) is the matrix W = c_out x (c_in*kh*kw); an embedding table
(num_embeddings, dim) is W itself. U, sigma, Vh and the bias are frozen; gradients flow to delta
and to the input only. spectral/reference.py computes the same with plain autograd (read it
first); the forms here give its values (tested in float64) at a fraction of its cost.

Forward, for N tokens x (N, n) -> y = x W_delta^T (N, m), in one of two forms:

    rebuild:   W_delta = reconstruct(U, sigma, delta, Vh), then the ordinary op
    factored:  y = ((x Vh^T) * s) U^T.  For a conv: a conv with Vh as an r-channel kernel,
               then a 1x1 conv with U scaled by s.  For an embedding: rows U[ids], scaled, times Vh.

Backward, with dY = dL/dy (N, m), P = x Vh^T (N, r) and G = dY U (N, r):

    dL/dx     = dY W_delta = (G * s) Vh
    dL/ds_k   = sum over tokens of P[:, k] * G[:, k]  =  [U^T dW V]_kk,   dW = dY^T x (m, n)
    dL/ddelta = 1[sigma + delta > 0] * dL/ds

Cost model (multiply-adds; the choice is made per call from shapes and token count):

    factored  forward  N r (n + m)                 (P, then P scaled times U^T)
              backward N r m  [+ N r n for dx]      (G; dx = G (s Vh); P was kept from the forward)
    rebuild   forward  m r n + N m n               (W_delta, then the op)
              backward [m r n + N m n for dx]       (W_delta rebuilt: never kept between the passes)
                       + min(N m n + m n r,         dW = dY^T x, then the diagonal of U^T dW V
                             N r (n + m))           or P and G as in the factored form

The factored form wins when there are fewer tokens than weight rows/columns (small latents,
cross-attention keys from 77 text tokens, time-embedding layers with N = batch) and for 3x3 convs
(n = 9 c_in >> r); rebuilding wins for square matrices applied to many tokens. Nothing
weight-sized is saved for backward: the factored form keeps P (N, r), the rebuild form keeps x,
which autograd would keep anyway for a trainable weight.

With delta = 0 either form equals the original op to float32 rounding (U, Vh carry the
weights' dtype; tested against the plain layers).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import grad as conv_grad

from spectral.kernel import reconstruct
from spectral.reference import CONV


# --------------------------------------------------------------------------- the cost model

def projections_cost(m: int, n: int, tokens: int) -> int:
    """N r (n + m): x Vh^T and a product with U, token by token. The factored forward (P, then
    P diag(s) U^T), or P and G = dY U for dL/ds."""
    return tokens * min(m, n) * (n + m)


def weight_grad_cost(m: int, n: int, tokens: int) -> int:
    """N m n + m n r: dW = dY^T x (m, n), then the diagonal of U^T dW V, for dL/ds."""
    return tokens * m * n + m * n * min(m, n)


def costs(m: int, n: int, tokens: int, delta_grad: bool, input_grad: bool) -> dict[str, int]:
    """Multiply-adds of one call, forward plus the backward it will need, for each form."""
    r, N = min(m, n), tokens
    rebuilt_op = m * r * n + N * m * n                  # W_delta, then the ordinary op
    factored, rebuild = projections_cost(m, n, N), rebuilt_op
    if input_grad:
        factored += N * r * n
        rebuild += rebuilt_op
    if delta_grad or input_grad:
        factored += N * r * m
    if delta_grad:
        rebuild += delta_grad_cost(m, n, tokens)
    return {"factored": factored, "rebuild": rebuild}


def delta_grad_cost(m: int, n: int, tokens: int) -> int:
    """Cheaper of the two ways to diag(U^T dY^T x V) when x and dY are at hand (rebuild form)."""
    return min(weight_grad_cost(m, n, tokens), projections_cost(m, n, tokens))


def via_weight_grad(m: int, n: int, tokens: int) -> bool:
    """True when dW = dY^T x then diag(U^T dW V) is cheaper than the projections P and G."""
    return weight_grad_cost(m, n, tokens) < projections_cost(m, n, tokens)


def choose_form(m: int, n: int, tokens: int, delta_grad: bool, input_grad: bool) -> str:
    """"factored" or "rebuild", whichever the cost model says is cheaper (ties: factored)."""
    c = costs(m, n, tokens, delta_grad, input_grad)
    return "factored" if c["factored"] <= c["rebuild"] else "rebuild"


# --------------------------------------------------------------------------- helpers

def _addmm(bias: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    return a @ b if bias is None else torch.addmm(bias, a, b)


def _shift_grad(ds: Tensor, sigma: Tensor, delta: Tensor) -> Tensor:
    """dL/ddelta = 1[sigma + delta > 0] * dL/ds, in delta's dtype (float32)."""
    return torch.where(sigma + delta > 0, ds.to(delta.dtype), 0.0)


def _wants_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _apply(function, x, U, sigma, delta, Vh, bias, *rest):
    """function.apply(x, U, sigma, delta, Vh, bias, *rest) in one dtype. Under autocast, cast x,
    U, Vh and bias as F.linear would and switch autocast off inside, so that forward and backward
    agree on dtypes (delta stays float32; its gradient is returned in float32)."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return function.apply(x, U, sigma, delta, Vh, bias, *rest)
    x, U, Vh = x.to(dtype), U.to(dtype), Vh.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return function.apply(x, U, sigma, delta, Vh, bias, *rest)


# --------------------------------------------------------------------------- linear

class SpectralLinearFunction(torch.autograd.Function):
    """y = x W_delta^T + b for x (N, n); see the module docstring for the two forms."""

    @staticmethod
    def forward(ctx, x, U, sigma, delta, Vh, bias, factored: bool):
        delta_grad = ctx.needs_input_grad[3]
        if factored:
            s = torch.relu(sigma + delta).to(x.dtype)
            projected = x @ Vh.T                                        # P (N, r)
            # P diag(s) U^T: scale whichever of P, U is smaller (no weight-sized temporary
            # when there are few tokens)
            if projected.shape[0] <= U.shape[0]:
                y = _addmm(bias, projected * s, U.T)
            else:
                y = _addmm(bias, projected, (U * s).T)
            kept = projected if delta_grad else None
        else:
            y = F.linear(x, reconstruct(U, sigma, delta, Vh), bias)
            kept = x if delta_grad else None
        ctx.save_for_backward(kept, U, sigma, delta, Vh)
        ctx.factored = factored
        return y

    @staticmethod
    def backward(ctx, dy):
        kept, U, sigma, delta, Vh = ctx.saved_tensors
        input_grad, delta_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx = ddelta = None
        if ctx.factored:
            s = torch.relu(sigma + delta).to(dy.dtype)
            g = dy @ U                                                  # G (N, r)
            if input_grad:                                              # G diag(s) Vh
                dx = (g * s) @ Vh if g.shape[0] <= Vh.shape[1] else g @ (Vh * s[:, None])
            if delta_grad:
                ddelta = _shift_grad((kept * g).sum(0), sigma, delta)
        else:
            if input_grad:
                dx = dy @ reconstruct(U, sigma, delta, Vh)
            if delta_grad:
                m, n = U.shape[0], Vh.shape[1]
                if via_weight_grad(m, n, dy.shape[0]):
                    dW = dy.T @ kept                                    # (m, n)
                    ds = ((U.T @ dW) * Vh).sum(1)                       # diag(U^T dW V)
                else:
                    ds = ((kept @ Vh.T) * (dy @ U)).sum(0)
                ddelta = _shift_grad(ds, sigma, delta)
        return dx, None, None, ddelta, None, None, None


def linear(x: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor,
           bias: Tensor | None = None, form: str = "auto") -> Tensor:
    """F.linear with W_delta = U diag(ReLU(sigma + delta)) Vh. x (..., n) -> (..., m).

    form: "auto" (cost model), "factored" or "rebuild" (forced, for tests and benchmarks).
    """
    (m, n), leading = (U.shape[0], Vh.shape[1]), x.shape[:-1]
    x2 = x.reshape(-1, n)
    if form == "auto":
        form = choose_form(m, n, x2.shape[0], _wants_grad(delta), _wants_grad(x))
    y = _apply(SpectralLinearFunction, x2, U, sigma, delta, Vh, bias, form == "factored")
    return y.reshape(*leading, m)


# --------------------------------------------------------------------------- conv (1-d, 2-d)

_CONV_INPUT_GRAD = {1: conv_grad.conv1d_input, 2: conv_grad.conv2d_input}
_CONV_WEIGHT_GRAD = {1: conv_grad.conv1d_weight, 2: conv_grad.conv2d_weight}


def _mix_channels(weight: Tensor, t: Tensor) -> Tensor:
    """weight (k, c) applied at every position of t (B, c, L) -> (B, k, L), a 1x1 conv.

    Many positions: B matmuls (k, c) x (c, L), no copies of t (the weight made contiguous: a
    transposed one, U^T in the backward, sends the batched matmul down a slower path). Few
    positions (under 32): those matmuls would be too thin to run fast, so one (B L, c) x (c, k)
    matmul over all positions, at the price of two transposing copies (small then). The
    crossover was measured on a CPU.
    """
    B, c, L = t.shape
    if L >= 32:
        return weight.contiguous() @ t
    return (t.transpose(1, 2).reshape(B * L, c) @ weight.T).view(B, L, -1).transpose(1, 2).contiguous()


class SpectralConvFunction(torch.autograd.Function):
    """Conv1d / Conv2d (groups = 1) with kernel W_delta.view(c_out, c_in, *kernel_size).

    x: (B, c_in, *spatial) -> y: (B, c_out, *out_spatial). In the factored form the conv uses Vh
    as an r-channel kernel (r, c_in, *kernel_size): P (B, r, *out_spatial); the 1x1 conv with
    U diag(s) is one matmul over all B * positions (`_mix_channels`).
    """

    @staticmethod
    def forward(ctx, x, U, sigma, delta, Vh, bias, kernel_size, stride, padding, dilation, factored: bool):
        d = len(kernel_size)
        conv, (m, r), c_in = CONV[d], U.shape, x.shape[1]
        delta_grad = ctx.needs_input_grad[3]
        if factored:
            projected = conv(x, Vh.view(r, c_in, *kernel_size), None, stride, padding, dilation)
            s, flat = torch.relu(sigma + delta).to(x.dtype), projected.flatten(2)   # (B, r, positions)
            y = _mix_channels(U, flat * s[:, None]) if flat.shape[0] * flat.shape[2] <= m else _mix_channels(U * s, flat)
            y = y.view(x.shape[0], m, *projected.shape[2:])
            if bias is not None:
                y += bias.view(m, *[1] * d)
            kept = projected if delta_grad else None
        else:
            weight = reconstruct(U, sigma, delta, Vh).view(m, c_in, *kernel_size)
            y = conv(x, weight, bias, stride, padding, dilation)
            kept = x if delta_grad else None
        ctx.save_for_backward(kept, U, sigma, delta, Vh)
        ctx.geometry = (x.shape, kernel_size, stride, padding, dilation)
        ctx.factored = factored
        return y

    @staticmethod
    def backward(ctx, dy):
        kept, U, sigma, delta, Vh = ctx.saved_tensors
        x_shape, kernel_size, stride, padding, dilation = ctx.geometry
        input_grad, delta_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        d, (m, r), c_in = len(kernel_size), U.shape, x_shape[1]
        s = torch.relu(sigma + delta).to(dy.dtype)
        dx = ddelta = None
        if ctx.factored:
            g = _mix_channels(U.T, dy.flatten(2))                       # G (B, r, positions)
            if input_grad:                                              # conv^T of G diag(s) with kernel Vh
                if g.shape[0] * g.shape[2] <= Vh.shape[1]:
                    g_scaled, kernel = g * s[:, None], Vh
                else:
                    g_scaled, kernel = g, Vh * s[:, None]
                dx = _CONV_INPUT_GRAD[d](x_shape, kernel.view(r, c_in, *kernel_size),
                                         g_scaled.view(dy.shape[0], r, *dy.shape[2:]), stride, padding, dilation)
            if delta_grad:
                ddelta = _shift_grad((kept.flatten(2) * g).sum((0, 2)), sigma, delta)
        else:
            if input_grad:
                weight = reconstruct(U, sigma, delta, Vh).view(m, c_in, *kernel_size)
                dx = _CONV_INPUT_GRAD[d](x_shape, weight, dy, stride, padding, dilation)
            if delta_grad:
                n, tokens = Vh.shape[1], dy.numel() // m
                if via_weight_grad(m, n, tokens):
                    dW = _CONV_WEIGHT_GRAD[d](kept, (m, c_in, *kernel_size), dy, stride, padding, dilation)
                    ds = ((U.T @ dW.view(m, n)) * Vh).sum(1)
                else:
                    projected = CONV[d](kept, Vh.view(r, c_in, *kernel_size), None, stride, padding, dilation)
                    ds = (projected.flatten(2) * _mix_channels(U.T, dy.flatten(2))).sum((0, 2))
                ddelta = _shift_grad(ds, sigma, delta)
        return dx, None, None, ddelta, None, None, None, None, None, None, None


def conv_output_positions(spatial, kernel_size, stride, padding, dilation) -> int:
    """Number of output positions per image: prod over dims of floor((L + 2p - d(k-1) - 1)/s) + 1."""
    positions = 1
    for L, k, s, p, dl in zip(spatial, kernel_size, stride, padding, dilation):
        positions *= (L + 2 * p - dl * (k - 1) - 1) // s + 1
    return positions


def conv(x: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor, bias: Tensor | None,
         kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
         dilation: tuple[int, ...], form: str = "auto") -> Tensor:
    """F.conv1d / F.conv2d (by len(kernel_size)) with W_delta as the kernel; groups = 1.

    x (B, c_in, *spatial), U (c_out, r), Vh (r, c_in * prod(kernel_size)); explicit int tuples for
    stride / padding / dilation. form: "auto", "factored" or "rebuild".
    """
    if form == "auto":
        tokens = x.shape[0] * conv_output_positions(x.shape[2:], kernel_size, stride, padding, dilation)
        form = choose_form(U.shape[0], Vh.shape[1], tokens, _wants_grad(delta), _wants_grad(x))
    return _apply(SpectralConvFunction, x, U, sigma, delta, Vh, bias, tuple(kernel_size), tuple(stride),
                  tuple(padding), tuple(dilation), form == "factored")


# --------------------------------------------------------------------------- embedding

def embedding_costs(m: int, n: int, tokens: int, delta_grad: bool) -> dict[str, int]:
    """Multiply-adds for a table lookup; gathering rows is free, there is no input gradient.

    factored: forward N r n ((U[ids] * s) Vh); backward N n r (dY Vh^T, times U[ids]).
    rebuild:  forward m r n (the table);       backward N n + m n r (dW = scatter-add of dY, then
              the diagonal of U^T dW V).
    """
    r, N = min(m, n), tokens
    return {"factored": N * r * n + (N * n * r if delta_grad else 0),
            "rebuild": m * r * n + (N * n + m * n * r if delta_grad else 0)}


class SpectralEmbeddingFunction(torch.autograd.Function):
    """y = W_delta[ids] for ids (N,) long -> (N, n). Rows at padding_idx get no gradient, as in
    nn.Embedding: their tokens do not contribute to dL/ddelta."""

    @staticmethod
    def forward(ctx, ids, U, sigma, delta, Vh, padding_idx, factored: bool):
        if factored:
            y = (U[ids] * torch.relu(sigma + delta).to(U.dtype)) @ Vh
        else:
            y = F.embedding(ids, reconstruct(U, sigma, delta, Vh))
        ctx.save_for_backward(ids, U, sigma, delta, Vh)
        ctx.padding_idx, ctx.factored = padding_idx, factored
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, U, sigma, delta, Vh = ctx.saved_tensors
        if not ctx.needs_input_grad[3]:
            return (None,) * 7
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, dy = ids[keep], dy[keep]
        if ctx.factored:
            ds = (U[ids] * (dy @ Vh.T)).sum(0)
        else:
            dW = torch.zeros(U.shape[0], Vh.shape[1], dtype=dy.dtype, device=dy.device).index_add_(0, ids, dy)
            ds = ((U.T @ dW) * Vh).sum(1)
        return None, None, None, _shift_grad(ds, sigma, delta), None, None, None


def embedding(ids: Tensor, U: Tensor, sigma: Tensor, delta: Tensor, Vh: Tensor,
              padding_idx: int | None = None, form: str = "auto") -> Tensor:
    """F.embedding with table W_delta (num_embeddings, dim). ids (...,) -> (..., dim)."""
    (m, n), flat = (U.shape[0], Vh.shape[1]), ids.reshape(-1)
    if form == "auto":
        c = embedding_costs(m, n, flat.numel(), _wants_grad(delta))
        form = "factored" if c["factored"] <= c["rebuild"] else "rebuild"
    # autocast off: F.embedding does not autocast (nn.Embedding returns the table's dtype), and a
    # half-precision forward would meet the weights' dtype in the backward, which runs without it
    with torch.autocast(flat.device.type, enabled=False):
        y = SpectralEmbeddingFunction.apply(flat, U, sigma, delta, Vh, padding_idx, form == "factored")
    return y.view(*ids.shape, n)
