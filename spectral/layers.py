"""Attaching spectral shifts to any torch model, and taking them off again.

SVDiff (Han et al. 2023, eq. 3) trains only a shift delta of each weight's singular values:

    W = U diag(sigma) Vh,  W_delta = U diag(ReLU(sigma + delta)) Vh
    W (m, n); U (m, r), sigma and delta (r,), Vh (r, n), r = min(m, n)

    shifts = attach(unet)                  # every Linear / Conv1d / Conv2d / Embedding / norm
    opt = torch.optim.AdamW(shifts.param_groups(lr=1e-3, norm_lr=1e-6))
    ...train...
    save_shifts("shift.safetensors", shifts.named_deltas(), ...)    # spectral/io.py
    merge(unet)                            # plain layers holding W_delta: inference at base cost

attach swaps each chosen layer for a spectral one at the same module path:

    Linear (m, n), Conv (c_out, c_in, *k) as c_out x (c_in*prod(k)), Embedding (num, dim):
        buffers U (m, r), sigma (r,), Vh (r, n) from the cached thin SVD; bias a buffer;
        parameter delta (r,) = 0, float32. The weight itself is dropped: W is not kept beside
        its factors. Forward: the layer's op with W_delta = U diag(ReLU(sigma + delta)) Vh, in
        the layer's `form`: "reference" rebuilds W_delta with plain autograd (spectral/reference.py),
        "auto" (the default) runs the fast forms of spectral/function.py; same values.
    GroupNorm / LayerNorm scale gamma (c,), spectral/norms.py:
        buffers weight (gamma) and bias; parameter delta (c,) = 0: the scale used is gamma + delta,
        a full-vector additive shift (the paper's 1-D case), trained with a much smaller lr.

The model is frozen (requires_grad_(False)) first: afterwards the deltas are its only trainable
parameters. Names are module paths ("input_blocks.1.1.proj_in"); callers add their component
prefix ("unet.", "text.") when saving. Conv layers need groups = 1 and zero padding; others are
refused at attach with the layer's name, so they can be excluded.

detach restores plain layers with the original weights, W = U diag(sigma) Vh computed in float64
and rounded to the weights' dtype: for float32 weights about half the entries come back
bit-identical and every entry within a few units in the last place of max|W|
(|W' - W| <= 1e-6 max|W|, tested). Bit-exact restoration would need W itself (or a residual as
large), which is exactly what attach does not keep; reload the checkpoint for that.
"""

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from spectral import function, reference
from spectral.cache import Factors, SVDCache, svd_key
from spectral.io import check_entries
from spectral.kernel import reconstruct
from spectral.norms import NORMS, ShiftedNorm

Patterns = str | re.Pattern | Iterable[str | re.Pattern] | None


def matches(name: str, patterns: Patterns) -> bool:
    """Whether a module name matches any pattern: a str is a glob over the whole name
    (fnmatch: "*attn2*", "input_blocks.*"), a compiled re.Pattern is searched in it."""
    if patterns is None:
        return False
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    return any(p.search(name) if isinstance(p, re.Pattern) else fnmatch.fnmatchcase(name, p)
               for p in patterns)


# --------------------------------------------------------------------------- spectral layers

class ShapeOnly:
    """What a spectral layer answers for `.weight`: the weight's shape, and nothing else.

    The layer keeps U, sigma and Vh, not W, yet code outside reads a layer's weight shape:
    transformers' CLIPTextEmbeddings checks position_embedding.weight.shape[0] in every forward.
    So `.weight.shape` works, and anything else (values, dtype, passing it to an op) fails with a
    message naming shifted_weight(). Not a meta tensor: an op given one beside real tensors may
    return uninitialized memory instead of failing (F.linear on the CPU does).
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = torch.Size(shape)

    def __getattr__(self, name: str):
        raise AttributeError(f"a spectral layer keeps no weight tensor, only its shape (.weight.shape); "
                             f"call the layer's shifted_weight() for W_delta (asked for .weight.{name})")

    def __repr__(self) -> str:
        return f"ShapeOnly({tuple(self.shape)})"


# How a spectral layer computes its op: "reference" rebuilds W_delta with plain autograd
# (spectral/reference.py); the fast forms of spectral/function.py give the same values with a
# hand-written backward: "auto" picks "factored" or "rebuild" per call by their cost.
FORMS = ("auto", "reference", "factored", "rebuild")


def check_form(form: str) -> str:
    """`form` itself, or a ValueError naming FORMS."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form


class Spectral(nn.Module):
    """Frozen factors U (m, r), sigma (r,), Vh (r, n) of a weight, and its trainable shift delta (r,)."""

    def __init__(self, factors: Factors, bias: Tensor | None, form: str):
        super().__init__()
        self.register_buffer("U", factors.U)
        self.register_buffer("sigma", factors.S)
        self.register_buffer("Vh", factors.Vh)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.delta = nn.Parameter(torch.zeros_like(factors.S, dtype=torch.float32))
        self.form = form

    @property
    def form(self) -> str:
        """One of FORMS; may be changed at any time (the factors and delta stay)."""
        return self._form

    @form.setter
    def form(self, value: str) -> None:
        self._form = check_form(value)

    def weight_matrix(self, shifted: bool) -> Tensor:
        """W_delta (m, n) with the shift, else the original W = U diag(sigma) Vh in float64."""
        if shifted:
            return reconstruct(self.U, self.sigma, self.delta.detach(), self.Vh)
        return ((self.U.double() * self.sigma.double()) @ self.Vh.double()).to(self.U.dtype)

    @property
    def weight(self) -> ShapeOnly:
        """The weight's shape alone (see ShapeOnly); W_delta itself is shifted_weight()."""
        return ShapeOnly(self.weight_shape)

    def shifted_weight(self) -> Tensor:
        """W_delta in the layer's weight shape (a detached copy, rebuilt at each call: a full
        reconstruction for a big layer). The forward never uses it."""
        return self.weight_matrix(shifted=True).view(self.weight_shape)

    def _plain(self, layer: nn.Module, weight: Tensor) -> nn.Module:
        """Give a layer built on the meta device its (frozen) weight and our bias."""
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias, requires_grad=False)
        return layer


class SpectralLinear(Spectral):
    """nn.Linear(n, m) with W_delta: x (..., n) -> (..., m)."""

    def __init__(self, layer: nn.Linear, factors: Factors, form: str = "auto"):
        super().__init__(factors, layer.bias, form)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight_shape = tuple(layer.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "reference":
            return reference.linear(x, self.U, self.sigma, self.delta, self.Vh, self.bias)
        return function.linear(x, self.U, self.sigma, self.delta, self.Vh, self.bias, self.form)

    def to_plain(self, shifted: bool) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return self._plain(layer, self.weight_matrix(shifted))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.delta.numel()}"


class SpectralConv(Spectral):
    """nn.Conv1d / nn.Conv2d (groups = 1, zero padding) with kernel W_delta.view(c_out, c_in, *k)."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, factors: Factors, form: str = "auto"):
        super().__init__(factors, layer.bias, form)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.padding = _explicit_padding(layer)
        self.weight_shape = tuple(layer.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        if self.form == "reference":
            return reference.conv(x, self.U, self.sigma, self.delta, self.Vh, self.bias, *geometry)
        return function.conv(x, self.U, self.sigma, self.delta, self.Vh, self.bias, *geometry, self.form)

    def to_plain(self, shifted: bool) -> nn.Module:
        kind = nn.Conv1d if len(self.kernel_size) == 1 else nn.Conv2d
        layer = kind(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                     self.dilation, bias=self.bias is not None, device="meta")
        return self._plain(layer, self.weight_matrix(shifted).view(self.weight_shape))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, rank={self.delta.numel()}")


class SpectralEmbedding(Spectral):
    """nn.Embedding(num, dim) with table W_delta: ids (...) -> (..., dim)."""

    def __init__(self, layer: nn.Embedding, factors: Factors, form: str = "auto"):
        super().__init__(factors, None, form)
        self.num_embeddings, self.embedding_dim = layer.num_embeddings, layer.embedding_dim
        self.padding_idx = layer.padding_idx
        self.weight_shape = tuple(layer.weight.shape)

    def forward(self, ids: Tensor) -> Tensor:
        if self.form == "reference":
            return reference.embedding(ids, self.U, self.sigma, self.delta, self.Vh, self.padding_idx)
        return function.embedding(ids, self.U, self.sigma, self.delta, self.Vh, self.padding_idx, self.form)

    def to_plain(self, shifted: bool) -> nn.Embedding:
        layer = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        return self._plain(layer, self.weight_matrix(shifted))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.delta.numel()}"


SPECTRAL = {nn.Linear: SpectralLinear, nn.Conv1d: SpectralConv, nn.Conv2d: SpectralConv,
            nn.Embedding: SpectralEmbedding}
SHIFTED = (Spectral, ShiftedNorm)


def _explicit_padding(layer) -> tuple[int, ...]:
    """Conv padding as ints per dim ("valid" -> 0, "same" -> half the dilated kernel)."""
    if layer.padding == "valid":
        return (0,) * len(layer.kernel_size)
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation))
    return tuple(layer.padding)


def _unsupported(module: nn.Module) -> str | None:
    """Why a layer of a supported type cannot be shifted, or None."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 convolutions are supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding is supported)"
        if module.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(module.kernel_size, module.dilation)):
            return "padding='same' with an even kernel (asymmetric padding is not supported)"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                             or module.sparse):
        return "max_norm / scale_grad_by_freq / sparse embeddings are not supported"
    return None


def targets(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> dict[str, nn.Module]:
    """The layers attach would shift, by module path: exact types Linear, Conv1d, Conv2d,
    Embedding, and GroupNorm / LayerNorm with a scale; kept when the name matches `include`
    (everything when None) and not `exclude`. Works on meta-device models."""
    chosen = {}
    for name, module in model.named_modules():
        supported = type(module) in SPECTRAL or (type(module) in NORMS and module.weight is not None)
        if not supported or (include is not None and not matches(name, include)) or matches(name, exclude):
            continue
        problem = _unsupported(module)
        if problem:
            raise ValueError(f"cannot shift {name}: {problem}; leave it out with exclude=[{name!r}]")
        if name == "":
            raise ValueError("attach needs a model containing the layer (e.g. nn.Sequential(layer))")
        chosen[name] = module
    return chosen


def _weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as the (m, n) matrix that is decomposed: convs as c_out x (c_in*prod(k))."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _parents(model: nn.Module) -> dict[nn.Module, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) holding each submodule (a shared layer has several)."""
    parents = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                parents.setdefault(child, []).append((parent, child_name))
    return parents


def _swap(parents, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` was."""
    holders = parents.pop(old)
    for parent, child_name in holders:
        parent._modules[child_name] = new
    parents[new] = holders


# --------------------------------------------------------------------------- the public API

@dataclass
class ShiftParameters:
    """What attach returns: the shifted layers by module path, and their deltas."""
    modules: dict[str, nn.Module]

    @property
    def matrices(self) -> list[nn.Parameter]:
        """Shifts of singular values (Linear, Conv, Embedding): lr about 1e-3."""
        return [m.delta for m in self.modules.values() if isinstance(m, Spectral)]

    @property
    def norms(self) -> list[nn.Parameter]:
        """Additive shifts of norm scales: a much smaller lr, about 1e-6."""
        return [m.delta for m in self.modules.values() if isinstance(m, ShiftedNorm)]

    def named_deltas(self) -> dict[str, Tensor]:
        """{module path: delta} (detached views, no copies)."""
        return {name: m.delta.detach() for name, m in self.modules.items()}

    def param_groups(self, lr: float, norm_lr: float) -> list[dict]:
        """Optimizer groups: matrices at `lr`, norms at `norm_lr` (empty groups left out)."""
        groups = [{"params": self.matrices, "lr": lr}, {"params": self.norms, "lr": norm_lr}]
        return [g for g in groups if g["params"]]

    def num_parameters(self) -> int:
        return sum(m.delta.numel() for m in self.modules.values())


def attach(model: nn.Module, include: Patterns = None, exclude: Patterns = None,
           cache_dir=None, progress: bool = True, form: str = "auto") -> ShiftParameters:
    """Freeze `model` and replace its layers (see `targets`) by spectral ones, in place.

    SVDs come from the cache in `cache_dir` (default ~/.cache/svdiff/svd), computed once with a
    progress bar when missing. Layers are replaced one at a time, so the peak memory is the
    model plus one layer's factors, and each W is released as soon as its factors are in.
    `form` (see FORMS) is given to every spectral layer; "reference" is the plain-autograd one.
    """
    if any(isinstance(m, SHIFTED) for m in model.modules()):
        raise ValueError("model already has spectral shifts attached; detach or merge it first")
    check_form(form)                       # before any SVD, which may take minutes
    model.requires_grad_(False)
    chosen = targets(model, include, exclude)
    parents, cache = _parents(model), SVDCache(cache_dir)
    keys = {name: svd_key(m.weight) for name, m in chosen.items() if type(m) in SPECTRAL}
    missing = sum(not cache.contains(key) for key in keys.values())
    shifted = {}
    with tqdm(total=missing, desc=f"SVD, once (cached in {cache.directory})", unit="weight",
              disable=not progress or missing == 0) as bar:
        for name in list(chosen):
            module = chosen.pop(name)
            if isinstance(module, NORMS):
                new = ShiftedNorm(module)
            else:
                matrix = _weight_matrix(module)
                factors = cache.load(matrix, keys[name])
                if factors is None:
                    factors = cache.compute(matrix, keys[name])
                    bar.update()
                new = SPECTRAL[type(module)](module, factors, form)
            _swap(parents, module, new)
            shifted[name] = new
    return ShiftParameters(shifted)


def shifted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attached spectral / shifted-norm layers of a model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SHIFTED)}


def _restore(model: nn.Module, shifted: bool) -> None:
    parents = _parents(model)
    for module in shifted_modules(model).values():
        _swap(parents, module, module.to_plain(shifted))


def merge(model: nn.Module) -> None:
    """Replace every shifted layer by a plain one holding W_delta (norms: gamma + delta), in
    place: the merged model runs at exactly the base model's cost."""
    with torch.no_grad():
        _restore(model, shifted=True)


def detach(model: nn.Module) -> None:
    """Replace every shifted layer by a plain one holding the original weight (module docstring
    says how close), in place; the deltas are dropped."""
    with torch.no_grad():
        _restore(model, shifted=False)


def load_deltas(model: nn.Module, deltas: dict[str, Tensor]) -> None:
    """Copy {module path: delta} into an attached model. Refuses (ShiftFileError, one line) a
    dict with missing, extra or wrongly shaped entries."""
    modules = shifted_modules(model)
    check_entries(deltas, {name: tuple(m.delta.shape) for name, m in modules.items()}, "deltas")
    with torch.no_grad():
        for name, value in deltas.items():
            modules[name].delta.copy_(value)

