"""Tiny model files for the ComfyUI integration tests: FramePack checkpoints, LoRAs and a HunyuanVideo VAE.

Nothing can be downloaded where the tests run, so every model is written here with random weights in the
layout the real files have, and then goes through ComfyUI's (or this pack's) real loaders. ComfyUI modules
are imported inside the functions: this file is imported while collecting, when ComfyUI may be absent.
"""

import logging
import math
import re

import torch
from safetensors.torch import save_file

from framepack_core.synthetic import TINY, random_state_dict, save_single_file


def write_framepack(path, seed=0, prefix="", config=TINY):
    """A tiny FramePack transformer checkpoint (released key names, random weights); returns its state dict."""
    state = random_state_dict(config, seed=seed)
    save_single_file(path, state, prefix=prefix)
    return state


def lora_key_names(module, style):
    """Key stem of a LoRA for the transformer's layer ``module`` (e.g. "transformer_blocks.0.attn.to_q").

    generic: "diffusion_model.<module>" (ComfyUI's own format); kohya: "lora_unet_<module with underscores>".
    """
    if style == "generic":
        return f"diffusion_model.{module}"
    if style == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    raise ValueError(style)


def lora_state_dict(targets, rank=4, seed=0, scale=0.5, zero=False, alpha=None):
    """LoRA tensors for ``targets`` {module name: key style}, shaped for the TINY model's weights.

    Each target gets lora_up (out, rank), lora_down (rank, in) and alpha. ``zero`` makes lora_up all zeros
    (a LoRA that changes nothing).
    """
    shapes = {k: v.shape for k, v in random_state_dict(TINY, seed=0).items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, style in targets.items():
        out_dim, in_dim = shapes[f"{module}.weight"]
        stem = lora_key_names(module, style)
        up = torch.zeros(out_dim, rank) if zero else torch.randn(out_dim, rank, generator=gen) * scale
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * scale
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return tensors


def write_lora(path, targets, **kwargs):
    save_file({k: v.contiguous() for k, v in lora_state_dict(targets, **kwargs).items()}, str(path))
    return path


def hunyuan_vae_state_dict(seed=0):
    """A complete random state dict for ComfyUI's HunyuanVideo VAE (16 latent channels, 3D convs).

    ComfyUI picks the VAE type from the keys and fixes its size (ch 128, ch_mult 1,2,4,4), so the key names
    and shapes are read off a VAE ComfyUI builds from two marker tensors. ComfyUI's layers skip weight
    init, so every tensor is filled here: convolutions ~ N(0, 1/fan_in), norm weights 1, biases 0.
    """
    import comfy.sd

    probe = {"decoder.conv_in.conv.weight": torch.zeros(512, 16, 3, 3, 3),
             "post_quant_conv.weight": torch.zeros(16, 16, 1, 1, 1)}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the probe is missing almost every key, which ComfyUI lists at length
    try:
        probe_vae = comfy.sd.VAE(sd=probe)
    finally:
        logging.disable(previous)
    shapes = {k: tuple(v.shape) for k, v in probe_vae.first_stage_model.state_dict().items()}
    del probe_vae
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            norm_weight = key.endswith(".weight") and "norm" in key.rsplit(".", 2)[-2]
            state[key] = torch.ones(shape) if norm_weight else torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


def rife_state_dict(seed=0, width=8):
    """A tiny random RIFE frame-interpolation model as ComfyUI's Load Frame Interpolation Model reads it.

    Only ComfyUI trees with core frame interpolation (0.33+) have it. Key names are RIFE's own (``encode.*``,
    ``block0.*`` .. ``block4.*``), which the loader maps onto core's IFNet; the shapes are read off that IFNet
    with ``width`` channels per block, which the loader infers back from them. Convolutions ~ N(0, 1/fan_in),
    biases 0, the residual scales (``beta``) 1.
    """
    from comfy_extras.frame_interpolation_models.ifnet import IFNet

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in IFNet(head_ch=4, channels=(width,) * 5).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".beta"):
            value = torch.ones(shape)
        elif len(shape) == 1:
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        state[re.sub(r"^blocks\.(\d)\.", r"block\1.", key)] = value
    return state
