"""SVDiff's spectral shifts (Han et al. 2023) for any torch model.

Read in this order: kernel.py (W_delta = U diag(ReLU(sigma + delta)) Vh), function.py (the
layers' forward and backward), layers.py (attach / merge / detach), cache.py (the SVD, once),
io.py (shift files), combine.py (adding, interpolating, mixing shifts), count.py (sizes).
"""

from spectral.combine import add, interpolate, mix
from spectral.io import ShiftFileError, load_shifts, save_shifts
from spectral.kernel import reconstruct
from spectral.layers import ShiftParameters, attach, detach, load_deltas, merge
from spectral.mkshing import load_mkshing
