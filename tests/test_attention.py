"""Attention backends: selection, clear errors, and masked batches."""

import pytest
import torch

from framepack_core import attention as attn
from framepack_core.synthetic import TINY, section_inputs


def _qkv(batch=3, tokens=11, heads=2, dim=16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, tokens, heads, dim, generator=gen) for _ in range(3)]


def test_sdpa_matches_the_attention_formula():
    q, k, v = _qkv()
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    assert torch.allclose(attn.attention(q, k, v), expected, atol=1e-5)


def test_masked_batch_equals_each_sample_alone():
    q, k, v = _qkv()
    lengths = [11, 4, 7]
    out = attn.attention(q, k, v, lengths)
    for i, n in enumerate(lengths):
        alone = attn.attention(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
        assert torch.allclose(out[i : i + 1, :n], alone, atol=1e-6)


def test_per_sample_fallback_equals_masked_sdpa():
    """The path unmasked kernels (sage, flash, xformers) take for padded batches."""
    q, k, v = _qkv()
    lengths = [3, 11, 6]
    masked = attn.attention(q, k, v, lengths)
    fallback = attn.per_sample(attn._sdpa, q, k, v, lengths)
    for i, n in enumerate(lengths):
        assert torch.allclose(fallback[i, :n], masked[i, :n], atol=1e-6)
        assert not fallback[i, n:].any()


def test_auto_uses_sdpa_on_cpu():
    q, k, v = _qkv()
    assert torch.equal(attn.attention(q, k, v, backend="auto"), attn.attention(q, k, v))


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'; choose one of auto, sdpa"):
        attn.check_backend("flash")


@pytest.mark.parametrize("name, package", [("sageattention", "sageattention"), ("flash_attn", "flash-attn"),
                                           ("xformers", "xformers")])
def test_missing_package_is_named(name, package):
    if attn.installed(name):
        pytest.skip(f"{name} is installed here")
    with pytest.raises(ImportError, match=f"needs the package '{package}'.*pip install {package}"):
        attn.check_backend(name)


def test_model_with_auto_backend_equals_sdpa(tiny_file):
    from framepack_core.loading import load_transformer

    kwargs = section_inputs(TINY, batch=2, text_lengths=[7, 3])
    with torch.no_grad():
        a = load_transformer(tiny_file, attention_backend="auto")(**kwargs)
        b = load_transformer(tiny_file, attention_backend="sdpa")(**kwargs)
    assert torch.equal(a, b)
