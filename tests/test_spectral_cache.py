"""The on-disk SVD cache: a hit equals a fresh SVD and computes nothing; bad entries are redone."""

import pytest
import torch

from spectral import cache as cache_module
from spectral.cache import SVDCache, svd, svd_key


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(24, 40)


def test_fresh_svd_is_a_thin_float64_decomposition(weight):
    U, S, Vh = svd(weight)
    assert U.shape == (24, 24) and S.shape == (24,) and Vh.shape == (24, 40)
    assert U.dtype == Vh.dtype == S.dtype == torch.float32 and U.is_contiguous() and Vh.is_contiguous()
    assert (S[:-1] >= S[1:]).all()
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, weight, rtol=0, atol=2e-6)


def test_svd_key_depends_on_bytes_shape_and_dtype(weight):
    assert svd_key(weight) == svd_key(weight.clone())
    changed = weight.clone()
    changed[3, 4] += 1e-6
    assert svd_key(changed) != svd_key(weight)
    assert svd_key(weight.reshape(40, 24)) != svd_key(weight)
    assert svd_key(weight.double()) != svd_key(weight)
    assert svd_key(weight.T) == svd_key(weight.T.contiguous())


def test_hit_equals_fresh_svd_and_computes_nothing(tmp_path, weight, monkeypatch):
    store, key = SVDCache(tmp_path), svd_key(weight)
    assert store.load(weight, key) is None and not store.contains(key)
    fresh = store.compute(weight, key)
    assert store.contains(key)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.safetensors"]         # no temporary left
    assert store.path(key).stat().st_mode & 0o777 == 0o644

    def no_svd(matrix):
        raise AssertionError("the SVD was recomputed on a cache hit")
    monkeypatch.setattr(cache_module, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    hit = SVDCache(tmp_path).get(weight)
    for a, b in zip(hit, fresh):
        assert torch.equal(a, b)


def test_hit_equals_an_independent_fresh_svd(tmp_path, weight):
    SVDCache(tmp_path).get(weight)
    hit = SVDCache(tmp_path).get(weight)
    for a, b in zip(hit, svd(weight)):
        assert torch.equal(a, b)


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage(path):
    path.write_bytes(b"\x00not a safetensors file at all")


def corrupt_nan(path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["S"][2] = float("nan")
    save_file(tensors, path, metadata=metadata)


def corrupt_other_weight(path):
    """A well-formed entry of the right shapes and key, but for a different matrix."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    other = svd(torch.randn(24, 40))
    save_file({"U": other.U, "S": other.S, "Vh": other.Vh}, path, metadata=metadata)


def corrupt_wrong_key(path):
    from safetensors.torch import load_file, save_file
    save_file(load_file(path), path, metadata={"key": "0" * 32})


@pytest.mark.parametrize("damage", [corrupt_truncate, corrupt_garbage, corrupt_nan, corrupt_other_weight,
                                    corrupt_wrong_key])
def test_bad_entries_are_warned_about_and_recomputed(tmp_path, weight, damage):
    store, key = SVDCache(tmp_path), svd_key(weight)
    fresh = store.compute(weight, key)
    damage(store.path(key))
    with pytest.warns(UserWarning, match="SVD cache entry"):
        assert store.load(weight, key) is None
    with pytest.warns(UserWarning):
        again = store.get(weight, key)
    for a, b in zip(again, fresh):
        assert torch.equal(a, b)
    assert store.load(weight, key) is not None          # the recomputed entry was written back


def test_a_hit_leaves_the_global_rng_where_a_miss_does(tmp_path, weight):
    """The hit's check draws a probe; from its own generator, so a warm cache changes no stream."""
    store = SVDCache(tmp_path)
    torch.manual_seed(1)
    store.get(weight)                                  # a miss: computes and stores
    after_miss = torch.randn(3)
    torch.manual_seed(1)
    store.get(weight)                                  # a hit: loads and checks
    assert torch.equal(torch.randn(3), after_miss)
