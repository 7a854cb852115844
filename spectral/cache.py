"""The SVD of every weight, computed once and kept on disk.

    W = U diag(S) Vh      W (m, n); U (m, r), S (r,), Vh (r, n), r = min(m, n)

the frozen factors of SVDiff's W_delta = U diag(ReLU(S + delta)) Vh (S is the paper's sigma).

A full SD 1.5 decomposition takes minutes on a CPU; the factors only depend on the weight, so
they are stored under a cache directory, one safetensors file per weight, named by the weight's
key (`svd_key`: a hash of everything the SVD depends on):

    key = blake2b(format version, dtype, shape, raw bytes of W)        (32 hex digits)
    <cache_dir>/<key>.safetensors:  U (m, r), S (r,), Vh (r, n);  metadata {"key", "shape", "dtype"}

U and Vh are stored in the weight's dtype (the model never holds them in higher precision),
S in float32. Two models that share a weight (a fine-tune with the original text encoder)
share its entry.

An entry is used only after checks: it must read back, carry its own key, have the shapes of a
thin SVD of W, be finite, and reproduce W on a random probe vector (W v against U (S * (Vh v)),
relative error <= 1e-3 in float32; a cheap stand-in for comparing the whole product). A failing
entry is reported with a warning and recomputed, never used.
"""

import hashlib
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from spectral.io import write_atomically

FORMAT_VERSION = "svdiff-svd/1"
DEFAULT_DIR = Path.home() / ".cache" / "svdiff" / "svd"


class Factors(NamedTuple):
    """Thin SVD W = U diag(S) Vh of an (m, n) matrix, r = min(m, n)."""
    U: Tensor   # (m, r)
    S: Tensor   # (r,), descending, float32
    Vh: Tensor  # (r, n)


def svd_key(weight: Tensor) -> str:
    """The cache key of a weight's SVD: blake2b of the format version, dtype, shape and bytes of
    the weight (any device/dtype), 32 hex digits."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FORMAT_VERSION} {weight.dtype} {tuple(weight.shape)}".encode())
    h.update(weight.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def svd(matrix: Tensor) -> Factors:
    """Thin SVD in float64 on the CPU (float32 on a GPU, where float64 is slow), returned with U
    and Vh in the matrix's dtype and on its device."""
    work = matrix.detach().to(torch.float32 if matrix.is_cuda else torch.float64)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    # contiguous: linalg returns column-major factors, which the conv kernels would copy per call
    return Factors(U.to(matrix.dtype).contiguous(), S.float().contiguous(), Vh.to(matrix.dtype).contiguous())


class SVDCache:
    """Factors on disk, keyed by `svd_key(weight)`."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else DEFAULT_DIR

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, matrix: Tensor, key: str) -> Factors | None:
        """The checked factors of `matrix` (m, n), or None if absent, corrupt or stale (warned)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt", device=str(matrix.device)) as f:
                metadata = f.metadata() or {}
                stored = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            return self._reject(path, f"unreadable ({error})")
        problem = _check(matrix, key, stored, metadata)
        if problem:
            return self._reject(path, problem)
        # fresh allocations, as svd() returns: tensors read from a file are not 64-byte aligned,
        # which changes how vectorized kernels round, so a run on cached factors would differ
        # in the last bits from the first run that computed them (and --resume from both)
        return Factors(stored["U"].clone(), stored["S"].clone(), stored["Vh"].clone())

    def compute(self, matrix: Tensor, key: str) -> Factors:
        """SVD of `matrix`, stored under `key` (written atomically: a crash never leaves a
        truncated entry under the real name)."""
        factors = svd(matrix)
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.cpu() for name, t in factors._asdict().items()}
        metadata = {"key": key, "shape": str(tuple(matrix.shape)), "dtype": str(matrix.dtype)}
        write_atomically(lambda temporary: save_file(tensors, temporary, metadata=metadata), self.path(key))
        return factors

    def get(self, matrix: Tensor, key: str | None = None) -> Factors:
        """Cached factors of `matrix`, computing and storing them on a miss."""
        key = key or svd_key(matrix)
        return self.load(matrix, key) or self.compute(matrix, key)

    @staticmethod
    def _reject(path: Path, problem: str) -> None:
        warnings.warn(f"SVD cache entry {path} is {problem}; recomputing it", stacklevel=3)
        return None


def _check(matrix: Tensor, key: str, stored: dict[str, Tensor], metadata: dict[str, str]) -> str | None:
    """Why a stored entry cannot be the thin SVD of `matrix`, or None if it passes."""
    m, n = matrix.shape
    r = min(m, n)
    if metadata.get("key") != key:
        return f"stale (made for key {metadata.get('key')})"
    if set(stored) != {"U", "S", "Vh"}:
        return f"stale (holds {sorted(stored)})"
    U, S, Vh = stored["U"], stored["S"], stored["Vh"]
    if U.shape != (m, r) or S.shape != (r,) or Vh.shape != (r, n):
        return f"stale (shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} for a {m}x{n} weight)"
    if not all(torch.isfinite(t).all() for t in (U, S, Vh)):
        return "corrupt (non-finite values)"
    # a generator of its own: whether the cache was warm must not change the global RNG stream
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(n, 1, dtype=torch.float64, device=matrix.device, generator=generator)
    expected = matrix.double() @ probe
    rebuilt = U.double() @ (S.double()[:, None] * (Vh.double() @ probe))
    error = (rebuilt - expected).norm() / expected.norm().clamp_min(1e-30)
    tolerance = 1e-3 if matrix.dtype in (torch.float32, torch.float64) else 2e-2
    if not error <= tolerance:
        return f"stale (reproduces the weight with relative error {error:.1e})"
    return None
