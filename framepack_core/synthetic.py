"""Random-weight FramePack models and inputs for tests, benchmarks and the demo.

No weights can be downloaded where these run, so models of the real architecture are built with small
widths and random weights, and saved as real checkpoints (single file or sharded diffusers folder)
that go through the real loader.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import FramePackConfig, FramePackTransformer

# ~1 MB: runs a forward pass in milliseconds on CPU
TINY = FramePackConfig(num_heads=2, head_dim=32, num_layers=2, num_single_layers=2, num_refiner_layers=2,
                       text_dim=32, pooled_dim=8, image_dim=12, rope_axes=(4, 14, 14))
# ~120 MB: big enough that weight layout and kernels matter on CPU, small enough for CI
MEDIUM = FramePackConfig(num_heads=4, head_dim=64, num_layers=4, num_single_layers=8, num_refiner_layers=2,
                         text_dim=256, pooled_dim=64, image_dim=96, rope_axes=(8, 28, 28))


def random_state_dict(config=TINY, seed=0, scale=0.1, dtype=torch.float32):
    """A full state dict with the released checkpoints' key names and random values."""
    with torch.device("meta"):
        shapes = FramePackTransformer(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * scale).to(dtype) for k, v in shapes.items()}


def diffusers_config(config):
    """config.json content of a diffusers FramePack folder for this shape."""
    return {
        "_class_name": "HunyuanVideoFramepackTransformer3DModel",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
        "num_layers": config.num_layers, "num_single_layers": config.num_single_layers,
        "num_refiner_layers": config.num_refiner_layers, "mlp_ratio": config.mlp_ratio,
        "patch_size": config.patch_size[1], "patch_size_t": config.patch_size[0], "qk_norm": "rms_norm",
        "guidance_embeds": config.guidance_embeds, "text_embed_dim": config.text_dim,
        "pooled_projection_dim": config.pooled_dim, "rope_theta": config.rope_theta,
        "rope_axes_dim": list(config.rope_axes), "image_condition_type": None, "has_image_proj": True,
        "image_proj_dim": config.image_dim, "has_clean_x_embedder": True,
    }


def save_single_file(path, state, prefix="", dtype=None, metadata=None):
    """One .safetensors file, keys optionally prefixed (e.g. "model.diffusion_model.")."""
    save_file({prefix + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}, str(path),
              metadata=metadata)
    return Path(path)


def save_diffusers_folder(folder, state, config, shards=3):
    """A diffusers-style folder: config.json, N shards and the *.safetensors.index.json weight map."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(diffusers_config(config)))
    return folder


def section_inputs(config=TINY, layout="inverted", batch=1, height=8, width=8, window=3, padding=1,
                   text_lengths=None, seed=0):
    """Keyword arguments for one transformer call laid out like a FramePack section.

    layout: "inverted" (original anti-drifting, blank padding in the indices), "forward" (F1) or
    "clean_only" (1x clean latents, no 2x/4x history). ``text_lengths``: valid prompt length per sample.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    text_lengths = text_lengths or [7] * batch
    n_text = max(text_lengths)
    mask = torch.arange(n_text)[None] < torch.tensor(text_lengths)[:, None]
    c, hw = config.in_channels, (height, width)
    if layout == "forward":
        idx = torch.arange(1 + 16 + 2 + 1 + window)
        start, i4, i2, i1, noisy = idx.split([1, 16, 2, 1, window])
    else:
        idx = torch.arange(1 + padding * window + window + 1 + 2 + 16)
        start, _, noisy, i1, i2, i4 = idx.split([1, padding * window, window, 1, 2, 16])
    kwargs = dict(
        hidden_states=randn(batch, c, window, *hw),
        timestep=torch.full((batch,), 875.0),
        encoder_hidden_states=randn(batch, n_text, config.text_dim) * mask[..., None],
        encoder_attention_mask=mask,
        pooled_projections=randn(batch, config.pooled_dim),
        image_embeddings=randn(batch, 9, config.image_dim),
        guidance=torch.full((batch,), 10000.0),
        latent_indices=noisy,
        clean_latents=randn(batch, c, 2, *hw),
        clean_latent_indices=torch.cat([start, i1]),
    )
    if layout != "clean_only":
        kwargs.update(clean_latents_2x=randn(batch, c, 2, *hw), clean_latent_2x_indices=i2,
                      clean_latents_4x=randn(batch, c, 16, *hw), clean_latent_4x_indices=i4)
    return kwargs


def quantized_state(state, layout, input_scales=False):
    """``state`` in one of ComfyUI's quantized layouts (see quantized.py), and its dequantized twin.

    Every block matrix becomes fp8 e4m3fn with a per-tensor scale (weight = fp8 * scale). layout:
    "scaled_fp8" (marker, ``scale_weight``, optional ``scale_input``), "comfy_quant" (per-layer
    ``comfy_quant`` config tensors, ``weight_scale``, optional ``input_scale``) or "comfy_quant_metadata"
    (the configs go to the safetensors metadata instead). Returns (tensors, metadata, dequantized state).
    """
    from .quantized import METADATA_KEY, json_tensor

    fp8 = torch.float8_e4m3fn
    tensors, dequantized, configs = dict(state), dict(state), {}
    layers = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2
              and k.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    for layer in layers:
        weight = state[f"{layer}.weight"].float()
        scale = weight.abs().max() / torch.finfo(fp8).max
        stored = (weight / scale).to(fp8)
        tensors[f"{layer}.weight"] = stored
        dequantized[f"{layer}.weight"] = stored.float() * scale
        if layout == "scaled_fp8":
            tensors[f"{layer}.scale_weight"] = scale
            if input_scales:
                tensors[f"{layer}.scale_input"] = torch.ones(())
        else:
            tensors[f"{layer}.weight_scale"] = scale
            if input_scales:
                tensors[f"{layer}.input_scale"] = torch.ones(())
            configs[layer] = {"format": "float8_e4m3fn"}
            if layout == "comfy_quant":
                tensors[f"{layer}.comfy_quant"] = json_tensor(configs[layer])
    if layout == "scaled_fp8":
        tensors["scaled_fp8"] = torch.empty(0, dtype=fp8)
    metadata = {METADATA_KEY: json.dumps({"format_version": "1.0", "layers": configs})} \
        if layout == "comfy_quant_metadata" else None
    return tensors, metadata, dequantized
