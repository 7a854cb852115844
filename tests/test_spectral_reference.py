"""The reference form (spectral/reference.py) as the oracle of the fast forms (spectral/function.py).

In float64, every fast form ("auto", "factored", "rebuild" with both of its delta-gradient routes)
gives the reference form's output and gradients of delta and of the input: linear, conv1d /
conv2d (stride, padding, dilation, a non-square kernel) and embedding (with padding_idx). Then
the same through attach(form=...), the reference's own gradient against the paper's closed form,
and autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral
from spectral import function, reference

FAST = ["auto", "factored", "rebuild"]
# The factored form computes s = ReLU(sigma + delta) in the input's dtype: float64 here. The
# rebuild form's W_delta comes from kernel.reconstruct, whose scale is float32 (as in the Triton
# kernel), so it agrees to float32 rounding of s; "auto" is either.
TOLERANCE = {"factored": 1e-12, "rebuild": 1e-6, "auto": 1e-6}


def factors(m, n, seed=0):
    """Float64 thin SVD of a random (m, n) matrix and a delta with dead singular values."""
    g = torch.Generator().manual_seed(seed)
    U, S, Vh = torch.linalg.svd(torch.randn(m, n, generator=g, dtype=torch.float64), full_matrices=False)
    delta = 0.3 * S.mean() * torch.randn(S.shape, generator=g, dtype=torch.float64)
    delta[::3] = -S[::3] - 0.5                               # sigma + delta < 0: no output, no gradient
    return U.contiguous(), S, Vh.contiguous(), delta


def run(op, x, delta, input_grad=True):
    """op(x, delta) -> (y, dL/ddelta, dL/dx or None) for L = sum(y * G), G a fixed random tensor."""
    delta = delta.clone().requires_grad_()
    x = x.clone().requires_grad_(input_grad) if x.is_floating_point() else x
    y = op(x, delta)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * upstream).sum().backward()
    return y, delta.grad, x.grad if x.is_floating_point() else None


def assert_matches_reference(fast, reference_op, x, delta, form, input_grad=True):
    ours, expected = run(fast, x, delta, input_grad), run(reference_op, x, delta, input_grad)
    assert (expected[1] == 0).any(), "some singular values should be dead"
    for name, a, b in zip(["output", "delta grad", "input grad"], ours, expected):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE[form] * b.abs().max().item(), msg=name)


@pytest.fixture(params=["dW-route", "PG-route"])
def route(request, monkeypatch):
    """The rebuild form's two ways to dL/ds (otherwise picked by the cost model)."""
    monkeypatch.setattr(function, "via_weight_grad", lambda m, n, tokens: request.param == "dW-route")


# ---------------------------------------------------------------------- the fast forms, float64

@pytest.mark.parametrize("form", FAST)
@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("m,n,tokens", [(24, 16, 7), (16, 40, 50), (33, 33, 5), (20, 20, 500)])
def test_linear(form, input_grad, m, n, tokens, route):
    U, S, Vh, delta = factors(m, n)
    bias = torch.randn(m, dtype=torch.float64)
    x = torch.randn(2, tokens, n, dtype=torch.float64)
    assert_matches_reference(lambda x, d: function.linear(x, U, S, d, Vh, bias, form),
                             lambda x, d: reference.linear(x, U, S, d, Vh, bias), x, delta, form, input_grad)


def test_the_linear_shapes_make_auto_choose_both_forms():
    chosen = {function.choose_form(m, n, 2 * tokens, True, True)
              for m, n, tokens in [(24, 16, 7), (16, 40, 50), (33, 33, 5), (20, 20, 500)]}
    assert chosen == {"factored", "rebuild"}


CONV2D = [  # (c_in, c_out, kernel, stride, padding, dilation, size)
    (6, 8, 1, 1, 0, 1, 9), (5, 7, 3, 2, 1, 1, 10), (4, 9, 3, 1, 2, 2, 11),
    (8, 3, (3, 1), (2, 1), (0, 1), 1, 8), (3, 16, 3, 1, 1, 1, 12),
]
CONV1D = [(5, 7, 3, 2, 1, 1, 12), (6, 4, 5, 1, 4, 2, 20), (8, 8, 1, 1, 0, 1, 40)]


def conv_case(spec, dims):
    """(U, S, Vh, delta, bias, geometry, x) for a conv spec; geometry as explicit int tuples."""
    c_in, c_out, kernel, stride, padding, dilation, size = spec
    geometry = tuple(torch.nn.modules.utils._ntuple(dims)(v) for v in (kernel, stride, padding, dilation))
    U, S, Vh, delta = factors(c_out, c_in * int(torch.tensor(geometry[0]).prod()))
    x = torch.randn(2, c_in, *[size + i for i in range(dims)], dtype=torch.float64)
    return U, S, Vh, delta, torch.randn(c_out, dtype=torch.float64), geometry, x


@pytest.mark.parametrize("form", FAST)
@pytest.mark.parametrize("dims,spec", [(2, s) for s in CONV2D] + [(1, s) for s in CONV1D])
def test_conv(form, dims, spec, route):
    U, S, Vh, delta, bias, geometry, x = conv_case(spec, dims)
    assert_matches_reference(lambda x, d: function.conv(x, U, S, d, Vh, bias, *geometry, form),
                             lambda x, d: reference.conv(x, U, S, d, Vh, bias, *geometry), x, delta, form)


@pytest.mark.parametrize("form", FAST)
@pytest.mark.parametrize("num,dim,padding_idx", [(30, 12, 0), (12, 30, None), (20, 20, 7)])
def test_embedding(form, num, dim, padding_idx):
    U, S, Vh, delta = factors(num, dim)
    ids = torch.randint(0, num, (4, 9), generator=torch.Generator().manual_seed(2))
    if padding_idx is not None:
        ids[:, -3:] = padding_idx                  # padding tokens: no gradient, as in nn.Embedding
    assert_matches_reference(lambda ids, d: function.embedding(ids, U, S, d, Vh, padding_idx, form),
                             lambda ids, d: reference.embedding(ids, U, S, d, Vh, padding_idx), ids, delta, form)


# ---------------------------------------------------------------------- the reference itself

def test_reference_gradient_is_the_papers_closed_form():
    """dL/ddelta = 1[sigma + delta > 0] * diag(U^T dW V), dW = dY^T x for a linear layer."""
    U, S, Vh, delta = factors(24, 16)
    x, dy = torch.randn(30, 16, dtype=torch.float64), torch.randn(30, 24, dtype=torch.float64)
    d = delta.clone().requires_grad_()
    (reference.linear(x, U, S, d, Vh) * dy).sum().backward()
    closed_form = (S + delta > 0) * torch.diagonal(U.T @ (dy.T @ x) @ Vh.T)
    torch.testing.assert_close(d.grad, closed_form, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- the layers' form

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12, padding_idx=0)
        self.fc = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.down = nn.Conv1d(10, 6, 3, stride=2, dilation=2)

    def forward(self, ids, image):
        h = self.conv(image).flatten(2) + self.fc(self.embed(ids)).mean(1)[:, :, None]
        return self.down(h)


def attached(tmp_path, form):
    torch.manual_seed(0)
    model = Model().double()
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False, form=form)
    model.double()                                          # the deltas too (attach makes them float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in shifts.modules.values():
            module.delta.copy_(0.3 * module.sigma.mean() * torch.randn(module.delta.shape, generator=g))
            module.delta[-1] = -module.sigma[-1] - 1                         # one dead singular value
    return model, shifts


@pytest.mark.parametrize("form", FAST)
def test_attached_model_in_each_fast_form_matches_the_reference_form(tmp_path, form):
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(4))
    ids[:, -1] = 0
    image = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = {}
    for chosen in (form, "reference"):
        model, shifts = attached(tmp_path, chosen)
        assert {m.form for m in shifts.modules.values()} == {chosen}
        y = model(ids, image)
        y.square().sum().backward()
        results[chosen] = y, {name: m.delta.grad for name, m in shifts.modules.items()}
    (y, grads), (y_ref, grads_ref) = results[form], results["reference"]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOLERANCE[form] * y_ref.abs().max().item())
    for name, expected in grads_ref.items():
        tolerance = TOLERANCE[form] * expected.abs().max().item()
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=tolerance, msg=name)


def test_form_is_checked_at_attach_and_on_the_layer(tmp_path):
    with pytest.raises(ValueError, match="form must be one of"):
        spectral.attach(Model(), cache_dir=tmp_path, progress=False, form="fast")
    assert not any(tmp_path.iterdir())                     # refused before any SVD
    shifts = spectral.attach(Model(), cache_dir=tmp_path, progress=False)
    layer = shifts.modules["fc"]
    assert layer.form == "auto"
    layer.form = "reference"
    with pytest.raises(ValueError, match="form must be one of"):
        layer.form = "Reference"


# ---------------------------------------------------------------------- autocast

@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_reference_under_autocast_is_the_plain_op_on_W_delta(kind):
    """Under autocast the reference form is what a plain layer holding W_delta gives: F.linear /
    F.conv cast to bfloat16, F.embedding stays in the table's dtype; delta's gradient is float32.
    The fast forms agree to bfloat16 rounding."""
    m, n = (10, 27) if kind == "conv" else (20, 12)
    U, S, Vh, delta = (t.float() for t in factors(m, n))
    if kind == "linear":
        x = torch.randn(5, n)
        ref = lambda d: reference.linear(x, U, S, d, Vh)                                   # noqa: E731
        plain = lambda W: F.linear(x, W)                                                    # noqa: E731
        fast = lambda d, form: function.linear(x, U, S, d, Vh, None, form)                 # noqa: E731
    elif kind == "conv":
        x = torch.randn(2, 3, 6, 6)
        geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
        ref = lambda d: reference.conv(x, U, S, d, Vh, None, *geometry)                    # noqa: E731
        plain = lambda W: F.conv2d(x, W.view(m, 3, 3, 3), padding=1)                       # noqa: E731
        fast = lambda d, form: function.conv(x, U, S, d, Vh, None, *geometry, form)        # noqa: E731
    else:
        x = torch.randint(0, m, (3, 7))
        ref = lambda d: reference.embedding(x, U, S, d, Vh, 0)                             # noqa: E731
        plain = lambda W: F.embedding(x, W, 0)                                             # noqa: E731
        fast = lambda d, form: function.embedding(x, U, S, d, Vh, 0, form)                 # noqa: E731
    d, W_delta = delta.clone().requires_grad_(), reference.shifted_weight(U, S, delta, Vh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = ref(d), plain(W_delta)
    assert y.dtype == (torch.float32 if kind == "embedding" else torch.bfloat16)
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert d.grad.dtype == torch.float32
    for form in FAST:
        d_fast = delta.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_fast = fast(d_fast, form)
        y_fast.float().sum().backward()
        assert y_fast.dtype == y.dtype
        torch.testing.assert_close(y_fast.float(), y.float(), rtol=0, atol=2e-2 * y.abs().max().item())
        torch.testing.assert_close(d_fast.grad, d.grad, rtol=0, atol=3e-2 * d.grad.abs().max().item())
