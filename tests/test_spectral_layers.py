"""attach / merge / detach / load_deltas on a small model with every supported layer type.

Oracle: a float64 copy of the plain model whose weights are set to U diag(ReLU(sigma + delta)) Vh
(norm scales gamma + delta) by hand.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral
from spectral import cache as cache_module
from spectral.layers import Spectral, SpectralConv, SpectralEmbedding, SpectralLinear, targets
from spectral.norms import ShiftedNorm


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12, padding_idx=0)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.gn = nn.GroupNorm(2, 10)
        self.down = nn.Conv2d(10, 6, 3, stride=2, padding=1)
        self.mix = nn.Conv1d(6, 5, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(5, 7, bias=False))

    def forward(self, ids, image):
        text = self.fc(self.ln(self.embed(ids))).mean(1)                       # (B, 10)
        h = F.silu(self.gn(self.conv(image)) + text[:, :, None, None])
        h = self.mix(self.down(h).flatten(2))                                   # (B, 5, L)
        return self.head(h.mT)


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (2, 6))
    ids[:, -1] = 0
    return ids, torch.randn(2, 3, 8, 8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():               # non-trivial norm parameters
        for norm in (m.ln, m.gn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return m


def randomize(shifts, scale=0.3):
    torch.manual_seed(2)
    with torch.no_grad():
        for name, module in shifts.modules.items():
            if isinstance(module, Spectral):
                module.delta.copy_(torch.randn_like(module.delta) * module.sigma.mean() * scale)
                module.delta[-1] = -module.sigma[-1] - 1.0               # one dead singular value
            else:
                module.delta.normal_(0, scale)


def float64_oracle(plain: nn.Module, shifts, inputs):
    """The plain model in float64 run with every weight set to its shifted value, built from float64
    leaf copies of the deltas through ordinary ops (U diag(ReLU(sigma + delta)) Vh; norm scales
    gamma + delta). Returns its output and those leaves, whose .grad autograd fills."""
    oracle = copy.deepcopy(plain).double()
    deltas = {name: m.delta.detach().double().requires_grad_() for name, m in shifts.modules.items()}
    weights = {}
    for name, module in shifts.modules.items():
        if isinstance(module, ShiftedNorm):
            weights[f"{name}.weight"] = module.weight.double() + deltas[name]
        else:
            W = module.U.double() @ torch.diag(F.relu(module.sigma.double() + deltas[name])) @ module.Vh.double()
            weights[f"{name}.weight"] = W.view(oracle.get_submodule(name).weight.shape)
    ids, image = inputs
    return torch.func.functional_call(oracle, weights, (ids, image.double())), deltas


def test_attach_replaces_every_supported_layer(model, tmp_path, inputs):
    plain = copy.deepcopy(model)
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    kinds = {name: type(m) for name, m in shifts.modules.items()}
    assert kinds == {"embed": SpectralEmbedding, "ln": ShiftedNorm, "fc": SpectralLinear, "conv": SpectralConv,
                     "gn": ShiftedNorm, "down": SpectralConv, "mix": SpectralConv, "head.1": SpectralLinear}
    # the deltas are the only trainable parameters; no matrix weight is kept beside its factors
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.delta" for n in kinds}
    assert not any(k.endswith(".weight") and not k.startswith(("ln", "gn")) for k in model.state_dict())
    assert len(shifts.matrices) == 6 and len(shifts.norms) == 2
    assert shifts.num_parameters() == 12 + 12 + 10 + 10 + 10 + 6 + 5 + 5
    assert all(d.dtype == torch.float32 and not d.any() for d in shifts.named_deltas().values())
    # delta = 0: the base model's output, to float32 rounding
    torch.testing.assert_close(model(*inputs), plain(*inputs), rtol=1e-5, atol=1e-5)


def test_shifted_forward_and_gradients_match_float64(model, tmp_path, inputs):
    plain = copy.deepcopy(model)
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    randomize(shifts)
    expected, deltas64 = float64_oracle(plain, shifts, inputs)
    y = model(*inputs)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    expected.square().sum().backward()
    for name, module in shifts.modules.items():
        reference = deltas64[name].grad
        assert reference.abs().max() > 0, name
        # float32 model against float64 math: within a few float32 roundings of the largest
        # entry (seen: 0.4-4e-7 of it)
        torch.testing.assert_close(module.delta.grad.double(), reference, rtol=0,
                                   atol=5e-6 * reference.abs().max().item(), msg=name)
        if isinstance(module, Spectral):            # the dead singular value gets no gradient
            assert module.delta.grad[-1] == 0 and reference[-1] == 0, name


def test_merge_equals_the_shifted_forward_and_costs_the_base(model, tmp_path, inputs):
    base_parameters = sum(p.numel() for p in model.parameters())
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    randomize(shifts)
    with torch.no_grad():
        shifted = model(*inputs)
    spectral.merge(model)
    assert type(model.fc) is nn.Linear and type(model.gn) is nn.GroupNorm and type(model.mix) is nn.Conv1d
    assert sum(p.numel() for p in model.parameters()) == base_parameters
    assert not any(isinstance(m, (Spectral, ShiftedNorm)) for m in model.modules())
    torch.testing.assert_close(model(*inputs), shifted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 8), nn.LayerNorm(4)], ids=["group", "layer"])
def test_shifted_norm_under_autocast_equals_its_merged_layer(layer):
    """Under autocast the shifted scale must reach the op as the merged layer's float32 weight
    does, not rounded to half first (a delta of 1e-3 is below bfloat16's step near 1)."""
    torch.manual_seed(0)
    layer.weight.data.uniform_(0.5, 1.5)
    shifted = ShiftedNorm(layer)
    shifted.delta.data.uniform_(-1e-3, 1e-3)
    merged = shifted.to_plain(shifted=True)
    x = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert torch.equal(shifted(x), merged(x))


def test_detach_restores_the_original_weights(model, tmp_path, inputs):
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plain_output = model(*inputs)
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    randomize(shifts)
    spectral.detach(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    exact = total = 0
    for key, value in original.items():
        # the float64 product of float32 factors, rounded: within 1e-6 of max|W| (a few ulps)
        assert (restored[key] - value).abs().max() <= 1e-6 * value.abs().max(), key
        exact += (restored[key] == value).sum().item()
        total += value.numel()
    assert exact / total > 0.3, exact / total
    assert torch.equal(model.ln.weight, original["ln.weight"]) and torch.equal(model.gn.bias, original["gn.bias"])
    torch.testing.assert_close(model(*inputs), plain_output, rtol=1e-5, atol=1e-5)


def test_include_and_exclude_patterns(model):
    assert set(targets(model, include="*conv*")) == {"conv"}
    assert set(targets(model, include=["conv", "down"], exclude="down")) == {"conv"}
    assert set(targets(model, include=re.compile(r"^(fc|head\.\d)$"))) == {"fc", "head.1"}
    assert set(targets(model, exclude=["?n", "embed"])) == {"fc", "conv", "down", "mix", "head.1"}


def test_unsupported_layers_are_refused_by_name(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"cannot shift 0: groups=2 .*exclude=\['0'\]"):
        spectral.attach(model, cache_dir=tmp_path, progress=False)
    assert set(spectral.attach(model, exclude="0", cache_dir=tmp_path, progress=False).modules) == {"1"}
    with pytest.raises(ValueError, match="already has spectral shifts"):
        spectral.attach(model, cache_dir=tmp_path, progress=False)


def test_second_attach_reads_the_cache(model, tmp_path, monkeypatch):
    spectral.attach(copy.deepcopy(model), cache_dir=tmp_path, progress=False)

    def no_svd(matrix):
        raise AssertionError("SVD recomputed although cached")
    monkeypatch.setattr(cache_module, "svd", no_svd)
    spectral.attach(model, cache_dir=tmp_path, progress=False)


def test_shared_layer_is_replaced_everywhere(tmp_path):
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    assert list(shifts.modules) == ["0"] and model[0] is model[2]


def test_training_step_moves_only_deltas(model, tmp_path, inputs):
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    optimizer = torch.optim.AdamW(shifts.param_groups(lr=1e-2, norm_lr=1e-4), weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-4]
    for _ in range(3):
        optimizer.zero_grad()
        model(*inputs).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(d.abs().max() > 0 for d in shifts.named_deltas().values())


def test_load_deltas_round_trip_and_refusals(model, tmp_path, inputs):
    source = copy.deepcopy(model)
    trained = spectral.attach(source, cache_dir=tmp_path, progress=False)
    randomize(trained)
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    deltas = {k: v.clone() for k, v in trained.named_deltas().items()}
    spectral.load_deltas(model, deltas)
    torch.testing.assert_close(model(*inputs), source(*inputs))

    missing = {k: v for k, v in deltas.items() if k != "fc"}
    with pytest.raises(spectral.ShiftFileError, match=r"1 missing \(fc\)$"):
        spectral.load_deltas(model, missing)
    with pytest.raises(spectral.ShiftFileError, match=r"1 unexpected \(extra.layer\)"):
        spectral.load_deltas(model, {**deltas, "extra.layer": torch.zeros(3)})
    with pytest.raises(spectral.ShiftFileError, match=r"1 of another shape \(fc: \(4,\) where \(10,\) is expected\)"):
        spectral.load_deltas(model, {**deltas, "fc": torch.zeros(4)})
    assert shifts.named_deltas()["fc"].shape == (10,)


def test_norm_shift_is_additive_on_the_scale(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"gn": nn.GroupNorm(2, 6), "ln": nn.LayerNorm(6)})
    with torch.no_grad():
        for norm in model.values():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    image, tokens = torch.randn(3, 6, 4, 4), torch.randn(3, 5, 6)
    plain = (model["gn"](image), model["ln"](tokens))
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    assert torch.equal(model["gn"](image), plain[0]) and torch.equal(model["ln"](tokens), plain[1])
    for p in shifts.norms:
        p.data.normal_(0, 0.2)
    gn, ln = shifts.modules["gn"], shifts.modules["ln"]
    expected_gn = F.group_norm(image.double(), 2, (gn.weight + gn.delta).double(), gn.bias.double(), gn.eps)
    expected_ln = F.layer_norm(tokens.double(), (6,), (ln.weight + ln.delta).double(), ln.bias.double(), ln.eps)
    torch.testing.assert_close(model["gn"](image).double(), expected_gn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model["ln"](tokens).double(), expected_ln, rtol=1e-5, atol=1e-5)


def test_shifted_weight_is_an_explicit_call_and_weight_only_a_shape(model, tmp_path):
    matrices = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    shapes = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, matrices)}
    shifts = spectral.attach(model, cache_dir=tmp_path, progress=False)
    randomize(shifts)
    for name, module in shifts.modules.items():
        if isinstance(module, ShiftedNorm):
            continue
        # transformers reads position_embedding.weight.shape[0]: the shape is there, the values are not
        assert module.weight.shape == shapes[name]
        with pytest.raises(AttributeError, match=r"shifted_weight\(\)"):
            module.weight.dtype
        s = F.relu(module.sigma.double() + module.delta.double())
        W = (module.U.double() @ torch.diag(s) @ module.Vh.double()).view(shapes[name])
        torch.testing.assert_close(module.shifted_weight().double(), W, rtol=0, atol=1e-6)
