"""FramePack as a ComfyUI MODEL, and the node that loads it.

The core transformer is built with ComfyUI's own layer classes (comfy.ops) and wrapped in a
``comfy.model_base.BaseModel`` held by ComfyUI's model patcher, so ComfyUI's memory management loads and
offloads it (partial "lowvram" loading included), the stock LoRA loader can patch its weights, and
transformer calls go through ``BaseModel.apply_model`` with ComfyUI's wrappers and patches.
"""

import logging
import math
import os

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import folder_paths
import torch
from comfy_api.latest import io

from ..framepack_core.attention import BACKENDS
from ..framepack_core.loading import (SAFETENSORS_DTYPES, load_transformer, read_config, read_key_shapes,
                                      read_quantization)
from ..framepack_core.model import FramePackTransformer
from . import comfy_compat

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

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **inputs):
        """The transformer's velocity for FramePack Sampler's inputs, run inside ComfyUI's
        ``DIFFUSION_MODEL`` wrappers. ``apply_model`` (which runs the ``APPLY_MODEL`` wrappers, e.g.
        TorchCompileModel's) calls this; ``t`` is the sigma, the transformer's inputs come as keywords."""
        if "encoder_hidden_states" not in inputs:
            raise RuntimeError("A FramePack MODEL samples video section by section with packed context: connect "
                               "it to the 'FramePack Sampler' node, not to KSampler or SamplerCustom.")
        transformer_options = comfy_compat.with_block_prefetch(transformer_options, self.current_patcher, x.device)
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self.diffusion_model, self.diffusion_model, wrappers)
        return executor.execute(hidden_states=x, transformer_options=transformer_options, **inputs)


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


def load_framepack(path, weight_dtype="auto", attention="auto", disable_dynamic=False, read_weights=True):
    """ModelPatcher holding a FramePack transformer built with comfy.ops layers (``disable_dynamic``: a plain
    ModelPatcher even where Dynamic VRAM is on, as ComfyUI asks its loaders for a non-dynamic copy).

    ``read_weights=False`` builds the model without reading a weight (its tensors stay on the meta device):
    a copy that ``read_weights_of`` fills once it is used, see ``rebuild_framepack``.
    """
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    quant = read_quantization(path)
    storage = WEIGHT_DTYPES[weight_dtype]
    if quant is not None and storage is not None and read_weights:
        logging.warning("[FramePack] %s is quantized (%s): its quantized layers keep their stored format and "
                        "weight_dtype %s is not applied; the other layers use ComfyUI's automatic dtype.",
                        os.path.basename(path), quant.format, weight_dtype)
    if storage is None or quant is not None:  # quantized layers stay as stored: storage is for the rest
        shapes = [v for k, v in read_key_shapes(path).items() if quant is None or not quant.is_extra(k)]
        params = sum(math.prod(shape) for shape, _ in shapes)
        stored = [SAFETENSORS_DTYPES.get(d) for _, d in shapes]
        file_dtype = None if quant is not None or not stored else max(set(stored), key=stored.count)
        storage = mm.unet_dtype(model_params=params, supported_dtypes=FramePackModelConfig.supported_inference_dtypes,
                                weight_dtype=file_dtype)
    compute = mm.unet_manual_cast(storage, load_device, FramePackModelConfig.supported_inference_dtypes) or storage
    fast_fp8 = weight_dtype == "fp8_e4m3fn_fast"
    convert_state = None
    if quant is None:
        operations = comfy.ops.pick_operations(storage, compute, load_device=load_device, fp8_optimizations=fast_fp8)
    else:
        operations, convert_state = comfy_compat.quantized_operations(quant, compute, load_device, fast_fp8)
    if read_weights:
        transformer = load_transformer(path, compute_dtype=compute, storage_dtype=storage, operations=operations,
                                       attention_backend=attention, device=offload_device, convert_state=convert_state)
    else:
        with torch.device("meta"):
            transformer = FramePackTransformer(read_config(path), operations=operations, attention_backend=attention,
                                               compute_dtype=compute,
                                               dtype=None if quant is not None else storage)
    config = FramePackModelConfig(FramePackModelConfig.unet_config)  # BASE() sets unet_config from its argument
    config.set_inference_dtype(storage, None if compute == storage else compute)
    model = FramePackModel(transformer, config, device=offload_device)
    model.framepack_source = (path, {"weight_dtype": weight_dtype, "attention": attention})  # resume identity
    patcher = comfy_compat.model_patcher_class(disable_dynamic)(model, load_device=load_device,
                                                                offload_device=offload_device)
    return comfy_compat.remember_loader(patcher, rebuild_framepack, (path, weight_dtype, attention))


def rebuild_framepack(path, weight_dtype, attention, disable_dynamic=False):
    """The loader's factory for the copies ComfyUI builds of a FramePack MODEL (``cached_patcher_init``).

    A non-dynamic copy (``disable_dynamic``) is used as soon as it is made: it is loaded whole. Any other is a
    work unit of MultiGPU CFG Split, made for every extra GPU before anything knows whether FramePack will use
    it (only with cfg > 1, and only one): it is built without reading its weights, and FramePack Sampler reads
    them (``read_weights_of``) only for the copy it samples with, so unused copies cost no disk read and no
    memory.
    """
    if disable_dynamic:
        return load_framepack(path, weight_dtype, attention, disable_dynamic=True)
    return load_framepack(path, weight_dtype, attention, read_weights=False)


def has_weights(patcher):
    return not any(t.is_meta for t in patcher.model.diffusion_model.parameters())


def read_weights_of(patcher):
    """Give a copy built without weights (``rebuild_framepack``) its transformer, read from its checkpoint."""
    if has_weights(patcher):
        return patcher
    path, options = patcher.model.framepack_source
    loaded = load_framepack(path, options["weight_dtype"], options["attention"], disable_dynamic=True)
    patcher.model.diffusion_model = loaded.model.diffusion_model
    patcher.size = 0  # measured again from the real tensors
    return patcher


class FramePackModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackModelLoader",
            display_name="FramePack Model Loader",
            category="FramePack",
            description=("Loads a FramePack transformer (FramePackI2V_HY or FramePack_F1_I2V_HY) from "
                         "models/diffusion_models (single .safetensors, bf16 or fp8) or models/diffusers (sharded "
                         "folder)."),
            inputs=[
                comfy_compat.combo_input("model_name", options=model_choices(), tooltip="FramePack transformer "
                                         "weights: a file in models/diffusion_models or a folder in models/diffusers."),
                comfy_compat.combo_input("weight_dtype", options=list(WEIGHT_DTYPES), default="auto", tooltip="Dtype "
                                         "the weights are kept in. auto: as ComfyUI picks for your GPU. fp8 halves "
                                         "memory; fp8_e4m3fn_fast also uses fp8 matrix multiplies on GPUs that "
                                         "support them."),
                comfy_compat.combo_input("attention", options=list(BACKENDS), default="auto", tooltip="Attention "
                                         "kernel. auto picks sageattention, flash_attn or xformers when installed, "
                                         "else PyTorch SDPA."),
            ],
            outputs=[io.Model.Output(tooltip="The FramePack transformer, managed by ComfyUI (offloading, low-VRAM "
                                     "partial loading, LoRA).")],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype, attention):
        path = resolve_model_path(model_name)
        try:
            return io.NodeOutput(load_framepack(path, weight_dtype, attention))
        except ValueError as e:  # CheckpointError included; the loader's own messages mostly name the file
            message = str(e)
            named = message.startswith(os.path.basename(os.path.normpath(path)))
            raise ValueError(message if named else f"{model_name}: {message}") from e
