"""Combining shifts: the formulas, per layer, and the ReLU applied after combining."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral
from spectral import add, interpolate, mix


@pytest.fixture
def pair():
    torch.manual_seed(0)
    first = {"a": torch.randn(4), "b": torch.randn(3), "only_first": torch.randn(2)}
    second = {"a": torch.randn(4), "b": torch.randn(3), "only_second": torch.randn(5)}
    return first, second


def test_add(pair):
    first, second = pair
    third = {"a": torch.randn(4)}
    total = add(first, second, third)
    assert total.keys() == {"a", "b", "only_first", "only_second"}
    torch.testing.assert_close(total["a"], first["a"] + second["a"] + third["a"])
    torch.testing.assert_close(total["b"], first["b"] + second["b"])
    torch.testing.assert_close(total["only_first"], first["only_first"])       # missing counts as 0
    torch.testing.assert_close(total["only_second"], second["only_second"])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolate(pair, alpha):
    first, second = pair
    mixed = interpolate(first, second, alpha)
    torch.testing.assert_close(mixed["a"], alpha * first["a"] + (1 - alpha) * second["a"])
    torch.testing.assert_close(mixed["only_first"], alpha * first["only_first"])
    torch.testing.assert_close(mixed["only_second"], (1 - alpha) * second["only_second"])


def test_interpolate_refuses_alpha_outside_0_1(pair):
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate(*pair, 1.5)


def test_mix_by_patterns_and_by_callable(pair):
    first, second = pair
    for choose in ["a", ["a", "x*"], re.compile("^a$"), lambda name: name == "a"]:
        mixed = mix(first, second, choose)
        assert torch.equal(mixed["a"], first["a"]) and torch.equal(mixed["b"], second["b"])
        assert not mixed["only_first"].any() and torch.equal(mixed["only_second"], second["only_second"])


def test_mismatched_shapes_are_refused(pair):
    first, _ = pair
    with pytest.raises(ValueError, match=r"cannot combine a: shapes \(4,\) and \(5,\)"):
        add(first, {"a": torch.zeros(5)})


def test_relu_acts_on_the_combined_shift(tmp_path):
    """W = U diag(ReLU(sigma + delta_1 + delta_2)) Vh, not a sum of separately clipped weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    layer = shifts.modules["0"]
    sigma = layer.sigma
    first = {"0": -sigma * 0.8}                  # each alone keeps every singular value alive,
    second = {"0": -sigma * 0.7}                 # together they kill all of them
    spectral.load_deltas(model, add(first, second))
    x = torch.randn(3, 6)
    expected = F.linear(x.double(), (layer.U.double() @ torch.diag(F.relu(sigma.double() * (1 - 1.5)))
                                     @ layer.Vh.double()), layer.bias.double())
    torch.testing.assert_close(model(x).double(), expected)
    torch.testing.assert_close(model(x), layer.bias.expand(3, 5))
