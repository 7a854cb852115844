"""SVDiff's spectral shifts (Han et al. 2023) for any torch model.

    W = U diag(sigma) Vh             thin SVD of a pretrained weight, once: frozen
    W_delta = U diag(ReLU(sigma + delta)) Vh          delta trained (paper eq. 3)
    W (m, n); U (m, r); sigma, delta (r,); Vh (r, n); r = min(m, n)

Read in this order:
    layers.py      attach / merge / detach: which layers become spectral and what they keep
    reference.py   the equation as code: W_delta from plain torch ops, then the layer's op,
                   plain autograd (the oracle of everything after it)
    norms.py       the 1-D case: a norm scale's additive shift gamma + delta
    function.py    the fast forms: the same values with a hand-written backward, chosen per
                   call by a cost model
    kernel.py      last, speed only: W_delta rebuilt in one fused Triton kernel on CUDA
Around them, in any order: cache.py (the SVD, once, on disk), io.py (shift files), mkshing.py
(reading mkshing/svdiff-pytorch's files), combine.py (adding, interpolating, mixing shifts),
count.py (how big a shift is).
"""

from spectral.combine import add, interpolate, mix
from spectral.io import ShiftFileError, load_shifts, save_shifts
from spectral.kernel import reconstruct
from spectral.layers import ShiftParameters, attach, detach, load_deltas, merge
from spectral.mkshing import load_mkshing
