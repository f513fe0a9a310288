"""FramePack as a ComfyUI MODEL, and the node that loads it.

The core transformer is built with ComfyUI's own layer classes (comfy.ops) and wrapped in a
``comfy.model_base.BaseModel`` held by a ``ModelPatcher``, so ComfyUI's memory management loads and
offloads it (partial "lowvram" loading included) and the stock LoRA loader can patch its weights.
"""

import math
import os

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import folder_paths
import torch

from ..framepack_core.attention import BACKENDS
from ..framepack_core.loading import CheckpointError, load_transformer, read_key_shapes, SAFETENSORS_DTYPES

WEIGHT_DTYPES = {
    "auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
DIFFUSERS_FOLDER_PREFIX = "diffusers/"  # how folders under models/diffusers appear in the file list


class FramePackModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}  # the transformer is built by framepack_core
    latent_format = comfy.latent_formats.HunyuanVideo
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 2.0


class FramePackModel(comfy.model_base.BaseModel):
    """A flow-matching MODEL whose ``diffusion_model`` is the FramePack transformer."""

    def __init__(self, transformer, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = transformer

    def get_dtype(self):
        return self.diffusion_model.compute_dtype

    def _apply_model(self, *args, **kwargs):
        raise RuntimeError("A FramePack MODEL samples video section by section with packed context: connect it "
                           "to the 'FramePack Sampler' node, not to KSampler or SamplerCustom.")


def model_choices():
    files = folder_paths.get_filename_list("diffusion_models")
    folders = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            folders += [DIFFUSERS_FOLDER_PREFIX + d for d in sorted(os.listdir(root))
                        if os.path.isfile(os.path.join(root, d, "config.json"))]
    return [f for f in files if f.endswith(".safetensors")] + folders


def resolve_model_path(name):
    if name.startswith(DIFFUSERS_FOLDER_PREFIX):
        folder = name[len(DIFFUSERS_FOLDER_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            if os.path.isdir(os.path.join(root, folder)):
                return os.path.join(root, folder)
        raise FileNotFoundError(f"No folder {folder!r} under models/diffusers.")
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


def load_framepack(path, weight_dtype="auto", attention="auto"):
    """ModelPatcher holding a FramePack transformer built with comfy.ops layers."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    storage = WEIGHT_DTYPES[weight_dtype]
    if storage is None:
        shapes = read_key_shapes(path).values()
        params = sum(math.prod(shape) for shape, _ in shapes)
        stored = [SAFETENSORS_DTYPES.get(d) for _, d in shapes]
        file_dtype = max(set(stored), key=stored.count)
        storage = mm.unet_dtype(model_params=params, supported_dtypes=FramePackModelConfig.supported_inference_dtypes,
                                weight_dtype=file_dtype)
    compute = mm.unet_manual_cast(storage, load_device, FramePackModelConfig.supported_inference_dtypes) or storage
    operations = comfy.ops.pick_operations(storage, compute, load_device=load_device,
                                           fp8_optimizations=weight_dtype == "fp8_e4m3fn_fast")
    transformer = load_transformer(path, compute_dtype=compute, storage_dtype=storage, operations=operations,
                                   attention_backend=attention, device=offload_device)
    config = FramePackModelConfig(FramePackModelConfig.unet_config)  # BASE() sets unet_config from its argument
    config.set_inference_dtype(storage, None if compute == storage else compute)
    model = FramePackModel(transformer, config, device=offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class FramePackModelLoader:
    DESCRIPTION = ("Loads a FramePack transformer (FramePackI2V_HY or FramePack_F1_I2V_HY) from "
                   "models/diffusion_models (single .safetensors, bf16 or fp8) or models/diffusers (sharded folder).")
    CATEGORY = "FramePack"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The FramePack transformer, managed by ComfyUI (offloading, low-VRAM partial loading, LoRA).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "FramePack transformer weights: a file in "
                                             "models/diffusion_models or a folder in models/diffusers."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "auto", "tooltip": "Dtype the weights are kept in. "
                             "auto: as ComfyUI picks for your GPU. fp8 halves memory; fp8_e4m3fn_fast also uses "
                             "fp8 matrix multiplies on GPUs that support them."}),
            "attention": (list(BACKENDS), {"default": "auto", "tooltip": "Attention kernel. auto picks "
                          "sageattention, flash_attn or xformers when installed, else PyTorch SDPA."}),
        }}

    def load(self, model_name, weight_dtype, attention):
        try:
            return (load_framepack(resolve_model_path(model_name), weight_dtype, attention),)
        except CheckpointError as e:
            raise ValueError(f"{model_name}: {e}") from e
