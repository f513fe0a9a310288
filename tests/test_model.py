"""The transformer computes what diffusers' HunyuanVideoFramepackTransformer3DModel computes."""

import pytest
import torch

from oracle import relative_error, run_reference
from framepack_core.loading import load_transformer
from framepack_core.model import FramePackTransformer
from framepack_core.ops import CastOps, TorchOps
from framepack_core.synthetic import TINY, section_inputs

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ours(tiny_file):
    return load_transformer(tiny_file, compute_dtype=torch.float32)


@pytest.mark.parametrize("layout, height, width", [
    ("inverted", 8, 8),
    ("inverted", 12, 20),  # not a multiple of the 4x kernel: exercises replicate padding of latents and RoPE
    ("forward", 8, 12),
    ("clean_only", 8, 8),
])
def test_matches_diffusers(ours, reference, layout, height, width):
    kwargs = section_inputs(TINY, layout=layout, height=height, width=width, window=3, padding=2)
    with torch.no_grad():
        expected = run_reference(reference, kwargs)
        actual = ours(**kwargs)
    assert actual.shape == expected.shape == kwargs["hidden_states"].shape
    assert relative_error(actual, expected) <= TOLERANCE


def test_masked_batch_matches_diffusers_and_single_runs(ours, reference):
    kwargs = section_inputs(TINY, batch=2, text_lengths=[9, 4], height=8, width=8)
    with torch.no_grad():
        batched = ours(**kwargs)
        assert relative_error(batched, run_reference(reference, kwargs)) <= TOLERANCE
        for i, length in enumerate([9, 4]):
            alone = {k: _sample(v, i, length, k) for k, v in kwargs.items()}
            assert relative_error(batched[i : i + 1], ours(**alone)) <= TOLERANCE


def _sample(value, i, length, key):
    """Sample i of a batched keyword, with its text cropped to its own length."""
    if key.endswith("indices"):
        return value
    value = value[i : i + 1]
    if key in ("encoder_hidden_states", "encoder_attention_mask"):
        value = value[:, :length]
    return value


def test_text_padding_does_not_change_the_result(ours):
    kwargs = section_inputs(TINY, text_lengths=[5])
    padded = dict(kwargs)
    padded["encoder_hidden_states"] = torch.cat([kwargs["encoder_hidden_states"], torch.randn(1, 6, TINY.text_dim)], 1)
    padded["encoder_attention_mask"] = torch.cat([kwargs["encoder_attention_mask"], torch.zeros(1, 6, dtype=torch.bool)], 1)
    with torch.no_grad():
        assert torch.equal(ours(**kwargs), ours(**padded))


def test_per_sample_frame_indices(ours):
    """Frame indices may differ per sample (B, T); each sample then matches its own single run."""
    a = section_inputs(TINY, batch=2, padding=1)
    b = section_inputs(TINY, batch=2, padding=3)
    mixed = dict(a)
    for key in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices"):
        mixed[key] = torch.stack([a[key], b[key]])
    with torch.no_grad():
        out = ours(**mixed)
        assert relative_error(out[:1], ours(**{k: _sample(v, 0, 99, k) for k, v in a.items()})) <= TOLERANCE
        assert relative_error(out[1:], ours(**{k: _sample(v, 1, 99, k) for k, v in b.items()})) <= TOLERANCE


def test_every_weight_holding_leaf_comes_from_the_operations_namespace():
    class Recording:
        made = []

    for name, base in vars(TorchOps).items():
        if isinstance(base, type):
            setattr(Recording, name, type(name, (base,), {}))

    model = FramePackTransformer(TINY, operations=Recording, device="meta")
    op_classes = tuple(v for v in vars(Recording).values() if isinstance(v, type))
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            assert isinstance(module, op_classes), f"{name} holds weights but is not an operations layer"
            assert not any(True for _ in module.children()), f"{name} holds weights next to child modules"


def test_forward_never_touches_weights(tiny_file):
    model = load_transformer(tiny_file, compute_dtype=torch.bfloat16, storage_dtype=torch.float8_e4m3fn)
    assert isinstance(model.transformer_blocks[0].attn.to_q, CastOps.Linear)
    before = {k: (v.dtype, v.data_ptr(), v.float().sum().item()) for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(**section_inputs(TINY))
    assert out.dtype == torch.float32  # fp32 output projection, as the original
    after = {k: (v.dtype, v.data_ptr(), v.float().sum().item()) for k, v in model.state_dict().items()}
    assert before == after


def test_bf16_compute_stays_close_to_fp32(tiny_file):
    kwargs = section_inputs(TINY)
    with torch.no_grad():
        exact = load_transformer(tiny_file, compute_dtype=torch.float32)(**kwargs)
        half = load_transformer(tiny_file, compute_dtype=torch.bfloat16)(**kwargs)
    assert half.dtype == torch.float32
    assert relative_error(half, exact) < 0.05


def test_bad_inputs_are_named(ours):
    kwargs = section_inputs(TINY)
    with pytest.raises(ValueError, match="image embeddings"):
        ours(**{**kwargs, "image_embeddings": None})
    with pytest.raises(ValueError, match="guidance"):
        ours(**{**kwargs, "guidance": None})
    with pytest.raises(ValueError, match="prefix"):
        ours(**{**kwargs, "encoder_attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)})
    with pytest.raises(ValueError, match="no valid tokens"):
        ours(**{**kwargs, "encoder_attention_mask": torch.zeros(1, 7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="frame indices"):
        ours(**{**kwargs, "clean_latent_4x_indices": torch.arange(3)})
    with pytest.raises(ValueError, match="latent size"):
        ours(**{**kwargs, "clean_latents": torch.randn(1, 16, 2, 8, 10)})
    with pytest.raises(ValueError, match="patch size"):
        ours(**{**kwargs, "hidden_states": torch.randn(1, 16, 3, 8, 9)})


def test_missing_history_embedder_is_reported(tiny_state, tmp_path):
    from framepack_core.synthetic import save_single_file

    state = {k: v for k, v in tiny_state.items() if "proj_4x" not in k}
    model = load_transformer(save_single_file(tmp_path / "no4x.safetensors", state))
    assert model.config.clean_kernels == (1, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="no 4x clean-latent embedder"):
        model(**section_inputs(TINY))


def test_full_size_model_has_the_released_keys():
    """The released checkpoints hold exactly 1274 tensors; the default config builds exactly those."""
    keys = FramePackTransformer(device="meta").state_dict().keys()
    assert len(keys) == 1274
    assert {"transformer_blocks.19.attn.norm_added_k.weight", "single_transformer_blocks.39.proj_out.bias",
            "clean_x_embedder.proj_4x.weight", "image_projection.up.weight",
            "context_embedder.token_refiner.refiner_blocks.1.norm_out.linear.weight"} <= set(keys)
