"""spectral.function against plain float64 autograd through U diag(ReLU(sigma + delta)) Vh.

Oracles: the plain torch layer (delta = 0 parity) and float64 autograd through the explicit
product (gradients of delta and of the input), in both forms, both delta-gradient routes of the
rebuild form, and with entries where sigma + delta < 0 (zero output and gradient there).
"""

import pytest
import torch
import torch.nn.functional as F

from spectral import function

torch.manual_seed(0)
FORMS = ["factored", "rebuild"]


def thin_svd(matrix):
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return U.float().contiguous(), S.float(), Vh.float().contiguous()


def shift_with_dead_entries(sigma):
    """A delta with some sigma + delta < 0 (dead singular values) and the rest moved around."""
    delta = torch.randn_like(sigma) * sigma.mean() * 0.3
    delta[::3] = -sigma[::3] - 0.5
    return delta


def reference_weight(U, sigma, delta64, Vh):
    return U.double() @ torch.diag(F.relu(sigma.double() + delta64)) @ Vh.double()


@pytest.fixture(params=[True, False], ids=["dW-route", "PG-route"])
def route(request, monkeypatch):
    """Force the rebuild form's way to dL/ds (it is otherwise picked by the cost model)."""
    monkeypatch.setattr(function, "via_weight_grad", lambda m, n, tokens: request.param)


# ---------------------------------------------------------------------- delta = 0 parity

@pytest.mark.parametrize("form", FORMS + ["auto"])
@pytest.mark.parametrize("m,n", [(24, 16), (16, 40), (32, 32)])
def test_linear_zero_shift_is_the_plain_layer(form, m, n):
    layer = torch.nn.Linear(n, m)
    U, S, Vh = thin_svd(layer.weight.detach())
    x = torch.randn(2, 5, n)
    y = function.linear(x, U, S, torch.zeros_like(S), Vh, layer.bias.detach(), form)
    torch.testing.assert_close(y, layer(x).detach(), rtol=1e-5, atol=1e-5)


CONVS = [  # (c_in, c_out, kernel, stride, padding, dilation, size)
    (6, 8, 1, 1, 0, 1, 9), (6, 8, 3, 1, 1, 1, 9), (5, 7, 3, 2, 1, 1, 10), (4, 9, 3, 1, 2, 2, 11),
    (8, 3, (3, 1), (2, 1), (0, 1), 1, 8),
]


@pytest.mark.parametrize("form", FORMS + ["auto"])
@pytest.mark.parametrize("spec", CONVS)
def test_conv2d_zero_shift_is_the_plain_layer(form, spec):
    c_in, c_out, k, stride, padding, dilation, size = spec
    layer = torch.nn.Conv2d(c_in, c_out, k, stride, padding, dilation)
    U, S, Vh = thin_svd(layer.weight.detach().reshape(c_out, -1))
    x = torch.randn(2, c_in, size, size + 1)
    y = function.conv(x, U, S, torch.zeros_like(S), Vh, layer.bias.detach(), layer.kernel_size,
                      layer.stride, layer.padding, layer.dilation, form)
    torch.testing.assert_close(y, layer(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS + ["auto"])
def test_conv1d_zero_shift_is_the_plain_layer(form):
    layer = torch.nn.Conv1d(5, 7, 3, stride=2, padding=1)
    U, S, Vh = thin_svd(layer.weight.detach().reshape(7, -1))
    x = torch.randn(3, 5, 12)
    y = function.conv(x, U, S, torch.zeros_like(S), Vh, layer.bias.detach(), layer.kernel_size,
                      layer.stride, layer.padding, layer.dilation, form)
    torch.testing.assert_close(y, layer(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS + ["auto"])
def test_embedding_zero_shift_is_the_plain_layer(form):
    layer = torch.nn.Embedding(30, 12, padding_idx=0)
    U, S, Vh = thin_svd(layer.weight.detach())
    ids = torch.randint(0, 30, (3, 7))
    y = function.embedding(ids, U, S, torch.zeros_like(S), Vh, 0, form)
    torch.testing.assert_close(y, layer(ids).detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- gradients, float64 oracle

def check_against_float64(run, reference, x, U, S, Vh, input_grad=True):
    """run(x, delta) with our Function vs reference(x64, delta64, W64 builder) in float64."""
    delta = shift_with_dead_entries(S).requires_grad_()
    x_ours = x.clone().requires_grad_(input_grad)
    y = run(x_ours, delta)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    delta64 = delta.detach().double().requires_grad_()
    x64 = x.double().requires_grad_(input_grad)
    y64 = reference(x64, reference_weight(U, S, delta64, Vh))
    (y64 * g.double()).sum().backward()

    scale = y64.abs().max().item()
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(delta.grad.double(), delta64.grad, rtol=1e-4, atol=1e-4 * delta64.grad.abs().max().item())
    dead = (S + delta.detach()) <= 0
    assert dead.any() and (delta.grad[dead] == 0).all()
    if input_grad:
        torch.testing.assert_close(x_ours.grad.double(), x64.grad, rtol=1e-4, atol=1e-4 * x64.grad.abs().max().item())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("m,n,tokens", [(24, 16, 7), (16, 40, 50), (33, 33, 5)])
def test_linear_gradients(form, m, n, tokens, route):
    W, b = torch.randn(m, n), torch.randn(m)
    U, S, Vh = thin_svd(W)
    check_against_float64(lambda x, d: function.linear(x, U, S, d, Vh, b, form),
                          lambda x, W64: F.linear(x, W64, b.double()), torch.randn(2, tokens, n), U, S, Vh)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spec", CONVS)
def test_conv2d_gradients(form, spec, route):
    c_in, c_out, k, stride, padding, dilation, size = spec
    layer = torch.nn.Conv2d(c_in, c_out, k, stride, padding, dilation)
    U, S, Vh = thin_svd(layer.weight.detach().reshape(c_out, -1))
    shape, b = layer.weight.shape, layer.bias.detach()
    check_against_float64(
        lambda x, d: function.conv(x, U, S, d, Vh, b, layer.kernel_size, layer.stride, layer.padding,
                                   layer.dilation, form),
        lambda x, W64: F.conv2d(x, W64.view(shape), b.double(), stride, padding, dilation),
        torch.randn(2, c_in, size, size + 1), U, S, Vh)


@pytest.mark.parametrize("form", FORMS)
def test_conv1d_gradients(form, route):
    layer = torch.nn.Conv1d(5, 7, 3, stride=2, padding=1)
    U, S, Vh = thin_svd(layer.weight.detach().reshape(7, -1))
    b = layer.bias.detach()
    check_against_float64(
        lambda x, d: function.conv(x, U, S, d, Vh, b, (3,), (2,), (1,), (1,), form),
        lambda x, W64: F.conv1d(x, W64.view(7, 5, 3), b.double(), 2, 1),
        torch.randn(3, 5, 12), U, S, Vh)


@pytest.mark.parametrize("form", FORMS)
def test_embedding_gradients_skip_padding_rows(form):
    U, S, Vh = thin_svd(torch.randn(30, 12))
    ids = torch.randint(0, 30, (4, 9))
    ids[:, -3:] = 0                                   # padding tokens: no gradient, as in nn.Embedding
    check_against_float64(lambda _, d: function.embedding(ids, U, S, d, Vh, 0, form),
                          lambda _, W64: F.embedding(ids, W64, padding_idx=0),
                          torch.zeros(1), U, S, Vh, input_grad=False)


def test_input_only_and_delta_only_gradients():
    """Frozen delta: only dx is computed (and vice versa); each matches the full computation."""
    U, S, Vh = thin_svd(torch.randn(20, 12))
    delta = shift_with_dead_entries(S)
    x = torch.randn(6, 12, requires_grad=True)
    for form in FORMS:
        function.linear(x, U, S, delta, Vh, None, form).sum().backward()
        expected = torch.ones(6, 20) @ (U @ torch.diag(F.relu(S + delta)) @ Vh)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
        x.grad = None


def test_no_grad_forward_matches():
    U, S, Vh = thin_svd(torch.randn(20, 12))
    delta = shift_with_dead_entries(S).requires_grad_()
    x = torch.randn(6, 12)
    with torch.no_grad():
        y = function.linear(x, U, S, delta, Vh)
    torch.testing.assert_close(y, x @ (U @ torch.diag(F.relu(S + delta.detach())) @ Vh).T, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_keeps_float32_delta_grad():
    U, S, Vh = thin_svd(torch.randn(16, 24))
    delta = torch.zeros_like(S, requires_grad=True)
    x = torch.randn(5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = function.linear(x, U, S, delta, Vh)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert delta.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("form", FORMS)
def test_autocast_embedding_runs_in_the_table_dtype(form):
    """As nn.Embedding under autocast: float32 out; the backward (no autocast there) works."""
    U, S, Vh = thin_svd(torch.randn(30, 12))
    ids = torch.randint(0, 30, (4, 9))
    delta = shift_with_dead_entries(S).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = function.embedding(ids, U, S, delta, Vh, 0, form)
    assert y.dtype == torch.float32
    y.sum().backward()
    expected = delta.detach().clone().requires_grad_()
    function.embedding(ids, U, S, expected, Vh, 0, form).sum().backward()
    torch.testing.assert_close(delta.grad, expected.grad)


# ---------------------------------------------------------------------- the cost model

def test_cost_model_choices():
    # few tokens through a big square weight: factored; many tokens: rebuild
    assert function.choose_form(1280, 1280, 32, True, True) == "factored"
    assert function.choose_form(320, 320, 8192, True, True) == "rebuild"
    # 3x3 conv, n = 9 c_in >> r = c_out: factored even with many tokens
    assert function.choose_form(320, 2880, 8192, True, True) == "factored"
    # inference (no gradients): rebuilding pays off once tokens exceed about r
    assert function.choose_form(320, 320, 4096, False, False) == "rebuild"
    assert function.choose_form(320, 320, 64, False, False) == "factored"
