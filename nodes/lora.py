"""FramePack LoRA loader: LoRAs in diffusers/PEFT, kohya/musubi-tuner and original HunyuanVideo formats.

The stock LoraLoaderModelOnly only maps ``diffusion_model.<name>`` / ``lora_unet_<name>`` keys of our
model; this node converts the other formats (splitting fused HunyuanVideo qkv / linear1 LoRAs exactly)
with ``framepack_core.lora`` and applies them as ordinary ModelPatcher patches, so offloading and partial
(low-VRAM) loading work as for any LoRA. It says how many LoRA modules it applied and names the rest.
"""

import logging
import os

import comfy.lora
import folder_paths
from comfy_api.latest import io

from ..framepack_core.lora import FORMATS, convert_lora, describe_keys, read_lora, split_key
from .comfy_compat import combo_input


def lora_choices():
    return [f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]


def model_shapes(model):
    """Shapes of the FramePack transformer's parameters, keyed without the "diffusion_model." prefix."""
    return {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}


def apply_lora(model, lora, strength, name="LoRA"):
    """A clone of ``model`` (ModelPatcher) with ``lora`` ({key: tensor}) patched in at ``strength``.

    Raises ValueError when nothing in the LoRA fits the model. Returns (patched model, conversion, applied
    source modules, source keys not applied).
    """
    converted = convert_lora(lora, model_shapes(model))
    patches = comfy.lora.load_lora(converted.state_dict, converted.key_map, log_missing=False)
    patched = model.clone()
    applied_keys = set(patched.add_patches(patches, strength))
    applied_modules = {k[len("diffusion_model."):].rsplit(".", 1)[0] for k in applied_keys if isinstance(k, str)}

    applied, unmatched, reasons = [], list(converted.unmatched), dict(converted.reasons)
    for source, targets in converted.targets.items():
        if all(t in applied_modules for t in targets):
            applied.append(source)
        else:  # converted, but no ComfyUI weight adapter took it (e.g. an incomplete LoKr): name it too
            unmatched += [k for k in lora if (split_key(k) or (k,))[0] == source]
            reasons[source] = "ComfyUI found no complete adapter in it"

    if not applied:
        raise ValueError(
            f"{name}: none of its {len(lora)} tensors fit this FramePack model, so it would do nothing. "
            f"Keys: {describe_keys(sorted(lora), 6)}. "
            f"Reasons: {describe_keys(sorted(f'{m}: {r}' for m, r in reasons.items()), 3)}. "
            f"Understood formats: {FORMATS}.")
    msg = f"[FramePack] LoRA {name}: {len(applied)} of {converted.total} modules applied"
    if unmatched:
        why = describe_keys(sorted(f"{m} ({r})" for m, r in reasons.items()), 3)
        logging.warning("%s; %d keys not applied: %s. Why: %s", msg, len(unmatched),
                        describe_keys(sorted(unmatched), 5), why)
    else:
        logging.info("%s", msg)
    return patched, converted, applied, sorted(unmatched)


# path -> (mtime, size, state dict): re-running a workflow does not re-read an unchanged LoRA file
_cache = {}


def read_lora_cached(path):
    stat = os.stat(path)
    version = (stat.st_mtime_ns, stat.st_size)
    if _cache.get(path, (None,))[:2] != version:
        _cache[path] = (*version, read_lora(path))
    return _cache[path][2]


class FramePackLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackLoraLoader",
            display_name="FramePack LoRA Loader",
            category="FramePack",
            description=("Applies a LoRA to a FramePack MODEL. Understands FramePack LoRAs in diffusers/PEFT "
                         "(transformer.*.lora_A/lora_B) and kohya/musubi-tuner (lora_unet_*) formats, and HunyuanVideo "
                         "LoRAs in the original layout (double_blocks.*.img_attn_qkv, single_blocks.*.linear1; fused "
                         "layers are split exactly). Logs how many LoRA modules were applied and names any left out; "
                         "fails if none fit."),
            inputs=[
                io.Model.Input("model", tooltip="A FramePack model from 'FramePack Model Loader' "
                               "(or from another LoRA loader)."),
                combo_input("lora_name", options=lora_choices(), tooltip="LoRA file (.safetensors) in models/loras: "
                            "FramePack LoRAs (diffusers, PEFT, musubi-tuner) or HunyuanVideo LoRAs (musubi-tuner, "
                            "diffusion-pipe, ComfyUI)."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model: 1 as trained, 0 off, "
                               "negative inverts it."),
            ],
            outputs=[io.Model.Output(tooltip="The FramePack model with the LoRA patched in (applied when the model is "
                                     "loaded, low-VRAM partial loading included).")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength):
        if not lora_name.endswith(".safetensors"):
            raise ValueError(f"{lora_name}: only .safetensors LoRA files are loaded "
                             "(pickled .pt/.ckpt files can run code).")
        if strength == 0:
            return io.NodeOutput(model)
        lora = read_lora_cached(folder_paths.get_full_path_or_raise("loras", lora_name))
        return io.NodeOutput(apply_lora(model, lora, strength, lora_name)[0])
