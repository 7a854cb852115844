"""The fused Triton reconstruction against the torch fallback and float64.

Triton decides at import time whether to interpret kernels, so the CPU-interpreter check runs
in a fresh process with TRITON_INTERPRET=1. On a machine with CUDA the kernel is also compared
on the GPU.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spectral.kernel import reconstruct, reconstruct_torch

triton = pytest.importorskip("triton")

# shapes that are not multiples of the block sizes, with some sigma + delta < 0
CHECK = textwrap.dedent("""
    import torch
    from spectral.kernel import reconstruct_torch, reconstruct_triton
    torch.manual_seed(0)
    device = "{device}"
    for m, r, n in [(70, 37, 45), (5, 5, 130), (33, 20, 20), (129, 17, 3)]:
        U, Vh = torch.randn(m, r, device=device), torch.randn(r, n, device=device)
        sigma, delta = torch.rand(r, device=device), torch.randn(r, device=device)
        for blocks in [(16, 16, 16), (64, 32, 16)]:
            ours = reconstruct_triton(U, sigma, delta, Vh, *blocks)
            fallback = reconstruct_torch(U, sigma, delta, Vh)
            exact = (U.double() * torch.relu(sigma + delta).double()) @ Vh.double()
            assert ours.shape == (m, n) and ours.dtype == torch.float32
            assert (ours - fallback).abs().max() <= 1e-5 * exact.abs().max(), (m, r, n, blocks)
            assert (ours.double() - exact).abs().max() <= 1e-5 * exact.abs().max(), (m, r, n, blocks)
            half = reconstruct_triton(U.half(), sigma, delta, Vh.half(), *blocks)
            half_fallback = reconstruct_torch(U.half(), sigma, delta, Vh.half())
            assert half.dtype == torch.float16
            assert (half.float() - half_fallback.float()).abs().max() <= 2e-3 * exact.abs().max()
    print("ok")
""")


def test_triton_kernel_in_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", CHECK.format(device="cpu")], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_cuda():
    namespace = {}
    exec(CHECK.format(device="cuda"), namespace)


def test_reconstruct_dispatches_to_the_fallback_on_cpu():
    U, Vh, sigma = torch.randn(9, 4), torch.randn(4, 6), torch.rand(4)
    delta = torch.tensor([0.1, -5.0, 0.0, 0.2])
    torch.testing.assert_close(reconstruct(U, sigma, delta, Vh), reconstruct_torch(U, sigma, delta, Vh))
    expected = U @ torch.diag(torch.relu(sigma + delta)) @ Vh
    torch.testing.assert_close(reconstruct(U, sigma, delta, Vh), expected, rtol=1e-5, atol=1e-6)


def test_float64_weights_keep_float64_accuracy():
    """The scale is float32 for half / float32 weights, but must not round float64 ones."""
    torch.manual_seed(0)
    U, Vh = torch.randn(30, 12, dtype=torch.float64), torch.randn(12, 17, dtype=torch.float64)
    sigma, delta = torch.rand(12, dtype=torch.float64) + 0.1, torch.randn(12) * 1e-3
    exact = (U * torch.relu(sigma + delta.double())) @ Vh
    ours = reconstruct(U, sigma, delta, Vh)
    assert ours.dtype == torch.float64
    assert (ours - exact).abs().max() <= 1e-13 * exact.abs().max()
