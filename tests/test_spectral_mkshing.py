"""Importing mkshing/svdiff-pytorch shift files (spectral/mkshing.py).

The mkshing oracle is their method written out independently (each weight, norms included, as a
matrix W = U diag(S) Vh -> U diag(ReLU(S + delta)) Vh) applied to diffusers' UNet and to
transformers' CLIPTextModel under their module names, and, when the svdiff-pytorch package is
installed, their own layer classes.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import spectral
from spectral.io import ShiftFileError, save_shifts
from spectral.mkshing import load_mkshing


def mkshing_weight(weight, delta):
    """Their forward: W reshaped 'co (cin h w)' (a norm scale as a 1 x c matrix), thin SVD,
    U diag(ReLU(S + delta)) Vh, reshaped back. In float64 here."""
    matrix = weight.double().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.double()[None]
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U @ torch.diag(F.relu(S + delta.double())) @ Vh).reshape(weight.shape)


def mkshing_file(path, model, seed=0, prefix=""):
    """A spectral_shifts.safetensors as they write it: '<module path>.delta' for every Linear,
    Conv, Embedding and norm of `model` (their patched classes), norms as one scalar."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            if m.weight.dim() == 1:
                delta = 0.3 * torch.randn(1, generator=g)
            else:
                rank = min(m.weight.shape[0], m.weight[0].numel())
                delta = 0.2 * torch.randn(rank, generator=g)
                delta[-1] = -1e3                                            # a dead singular value
            tensors[f"{prefix}{name}.delta"] = delta
    save_file(tensors, path)
    return tensors


def apply_mkshing(model, tensors, prefix=""):
    with torch.no_grad():
        for key, delta in tensors.items():
            module = model.get_submodule(key[len(prefix):-len(".delta")])
            module.weight.copy_(mkshing_weight(module.weight, delta).float())


def test_mkshing_unet_file_gives_their_outputs(tmp_path):
    pytest.importorskip("diffusers")
    from oracle import diffusers_unet, randomize
    from tiny import UNET
    from ldm.diffusers_layout import diffusers_unet_name_to_compvis
    from ldm.unet import UNetModel

    config = UNET["sd1"]
    ours = randomize(UNetModel(config)).eval()
    theirs = diffusers_unet(ours)
    path = tmp_path / "spectral_shifts.safetensors"
    tensors = mkshing_file(path, theirs)
    apply_mkshing(theirs, tensors)

    spectral.attach(ours, cache_dir=tmp_path / "svd", progress=False)
    deltas = load_mkshing(path, lambda name: diffusers_unet_name_to_compvis(name, config), ours)
    spectral.load_deltas(ours, deltas)           # every one of our layers gets exactly one entry

    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 7, config.context_dim)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(ours(x, t, context), expected, rtol=1e-4, atol=1e-4)


def test_mkshing_text_encoder_file_gives_their_outputs(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12, bos_token_id=48, eos_token_id=49)
    ours = nn.ModuleDict({"transformer": CLIPTextModel(config).eval()})
    theirs = CLIPTextModel(config).eval()
    theirs.load_state_dict(ours["transformer"].state_dict())
    path = tmp_path / "spectral_shifts_te.safetensors"
    # their CLIPTextModel (older transformers) has a text_model level; ours is flat under "transformer."
    tensors = mkshing_file(path, theirs, prefix="text_model.")
    apply_mkshing(theirs, tensors, prefix="text_model.")

    spectral.attach(ours, cache_dir=tmp_path / "svd", progress=False)
    deltas = load_mkshing(path, lambda name: "transformer." + name.removeprefix("text_model."), ours)
    spectral.load_deltas(ours, deltas)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours["transformer"](input_ids=ids).last_hidden_state,
                                   theirs(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_mkshing_norm_conversion_matches_their_layer_classes():
    """When svdiff-pytorch is installed: their SVDGroupNorm / SVDLinear with a delta vs ours."""
    spec = importlib.util.find_spec("svdiff_pytorch")
    if spec is None or importlib.util.find_spec("einops") is None:
        pytest.skip("svdiff-pytorch (and einops) not installed")
    layers_path = os.path.join(spec.submodule_search_locations[0], "layers.py")
    module_spec = importlib.util.spec_from_file_location("mkshing_layers", layers_path)
    theirs = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(theirs)

    torch.manual_seed(0)
    norm, linear = theirs.SVDGroupNorm(2, 6), theirs.SVDLinear(5, 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.delta.fill_(-0.4)
        linear.delta.copy_(torch.tensor([0.3, -0.2, -50.0, 0.1]))
    plain = nn.ModuleDict({"norm": nn.GroupNorm(2, 6), "linear": nn.Linear(5, 4)})
    plain.load_state_dict({k: v for k, v in {**{f"norm.{k}": v for k, v in norm.state_dict().items()},
                                            **{f"linear.{k}": v for k, v in linear.state_dict().items()}}.items()
                           if not k.endswith("delta")})
    x, features = torch.randn(3, 6, 4), torch.randn(3, 5)
    with torch.no_grad():
        expected_norm, expected_linear = norm(x), linear(features)

    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "spectral_shifts.safetensors")
        save_file({"norm.delta": norm.delta.detach().clone(), "linear.delta": linear.delta.detach().clone()}, path)
        spectral.attach(plain, cache_dir=os.path.join(directory, "svd"), progress=False)
        spectral.load_deltas(plain, load_mkshing(path, lambda name: name, plain))
    with torch.no_grad():
        torch.testing.assert_close(plain["norm"](x), expected_norm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain["linear"](features), expected_linear, rtol=1e-5, atol=1e-5)


def test_mkshing_refusals(tmp_path):
    model = nn.ModuleDict({"fc": nn.Linear(3, 4), "norm": nn.LayerNorm(4)})
    path = tmp_path / "spectral_shifts.safetensors"
    save_file({"fc.delta": torch.zeros(3), "norm.delta": torch.zeros(1)}, path)
    with pytest.raises(ShiftFileError, match="per-norm scalar shift; pass model="):
        load_mkshing(path, lambda name: name)
    with pytest.raises(ShiftFileError, match="maps to 'gone.fc', which is not a module"):
        load_mkshing(path, lambda name: "gone." + name, model)
    ours = tmp_path / "ours.safetensors"
    save_shifts(ours, {"fc": torch.zeros(3)})
    with pytest.raises(ShiftFileError, match="not an mkshing shift file"):
        load_mkshing(ours, lambda name: name, model)
    converted = load_mkshing(path, lambda name: name, model)
    assert converted["norm"].shape == (4,) and not converted["norm"].any()
