"""Every difference between the ComfyUI versions this pack supports (0.3.64 and newer), in one place.

Each function picks its branch by what the installed ComfyUI has, never by its version string. CI runs the
test suite (tests/comfyui) against two full trees, 0.3.64 (October 2025) and 0.33.0 (August 2026), so every
branch here runs in a test on the tree that has it. Newer ComfyUI (0.38.x) was read file by file; each
function names the files read, and the README lists them under "Supported ComfyUI versions".
"""

import comfy.model_patcher
import comfy.ops
import comfy.utils
from comfy_api.latest import io

from ..framepack_core.model import BLOCK_HOOK

try:  # Dynamic VRAM's weight prefetch for DiT block loops
    import comfy.model_prefetch as model_prefetch
except ImportError:
    model_prefetch = None

# comfy_quant checkpoints and comfy.ops.mixed_precision_ops arrived with Comfy-Org/ComfyUI PR #10498
# (merged late October 2025), first released in this version
MIXED_PRECISION_MIN_VERSION = "0.3.68"


def model_patcher_class(disable_dynamic=False):
    """The patcher ComfyUI's own model loaders use.

    0.33 (tested; 0.38.x read: comfy/model_patcher.py, main.py, comfy/clip_vision.py): ``CoreModelPatcher`` is
    ``ModelPatcher``, rebound at start-up to ``ModelPatcherDynamic`` when Dynamic VRAM (comfy-aimdo) is
    on; loaders build ``CoreModelPatcher(model, load_device=..., offload_device=...)``, and a plain
    ``ModelPatcher`` when asked for a non-dynamic copy (``disable_dynamic``).
    0.3.64 (tested): only ``ModelPatcher``.
    """
    if disable_dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def remember_loader(patcher, factory, args):
    """Tell ComfyUI how to build this model again, where it asks.

    0.33 (tested; 0.38.x read: comfy/model_patcher.py ``clone(disable_dynamic=True)``,
    ``get_non_dynamic_delegate``, ``deepclone_multigpu``): a dynamic patcher makes its non-dynamic and
    multi-GPU copies by calling ``factory(*args, disable_dynamic=...)`` from ``patcher.cached_patcher_init``;
    without it those copies (hooked conditioning in core's CFGGuider, multi-GPU nodes) raise
    "cached_patcher_init is not initialized". 0.3.64 (tested): patchers have no such attribute and nothing is set.
    """
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (factory, args)
    return patcher


def quantized_operations(quant, compute_dtype, load_device, fp8_optimizations=False):
    """(operations, convert_state) that load a quantized checkpoint (``quantized.Quantization``).

    - Scaled fp8 where ``comfy.ops.scaled_fp8_ops`` exists (0.3.64, tested): its Linear holds
      ``scale_weight`` / ``scale_input`` parameters and reads the tensors as stored (no conversion).
    - Otherwise ComfyUI's mixed-precision layers (0.33, tested; 0.38.x read: comfy/ops.py ``mixed_precision_ops``,
      ``_load_quantized_module``, ``pick_operations(..., model_config=)``; comfy/utils.py
      ``convert_old_quants``; comfy/quant_ops.py): ``convert_old_quants`` turns scaled fp8 into
      per-layer ``comfy_quant`` configs with ``weight_scale`` / ``input_scale``, which those layers read.
    - comfy_quant on a ComfyUI without mixed-precision layers: an error naming the version to update to.
    """
    if quant.format == "scaled_fp8" and hasattr(comfy.ops, "scaled_fp8_ops"):
        operations = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=quant.input_scales,
                                              override_dtype=quant.dtype)
        return operations, None
    if not hasattr(comfy.ops, "mixed_precision_ops"):
        raise ValueError(f"This checkpoint is quantized in ComfyUI's {quant.format} layout, which the installed "
                         f"ComfyUI cannot run: update ComfyUI to {MIXED_PRECISION_MIN_VERSION} or newer, or use a "
                         "bf16 or plain fp8 FramePack checkpoint.")

    class QuantizedModelConfig:  # pick_operations only asks whether a quant_config is set
        quant_config = {"mixed_ops": True}

    operations = comfy.ops.pick_operations(None, compute_dtype, load_device=load_device,
                                           fp8_optimizations=fp8_optimizations, model_config=QuantizedModelConfig)

    def convert_state(state):
        return comfy.utils.convert_old_quants(state, "", metadata={})[0]

    return operations, convert_state if quant.format == "scaled_fp8" else None


class _OptionListCombo(io.Combo.Input):
    """A combo input declared the V1 way: its type is its option list."""

    def get_io_type(self):
        return list(self.options)


def combo_input(id, options, **kwargs):
    """A V3 combo input that ComfyUI checks against its options when a prompt is queued, naming only it.

    ComfyUI with DynamicCombo in its public V3 API (0.33, tested; both came with Comfy-Org/ComfyUI PR #11345,
    December 2025, read) checks ``io.Combo.Input`` values itself (execution.py ``validate_inputs``), and
    cannot take an option list as a V3 input's type (``_io.parse_class_inputs`` looks types up in a dict).
    Older ones (0.3.64, tested) check only V1 combos, whose type is the option list, so there the input is
    declared that way. A node's ``validate_inputs`` cannot stand in: ComfyUI marks every input the function
    names when it fails (execution.py ``validate_inputs``, both trees).
    """
    if hasattr(io, "DynamicCombo"):
        return io.Combo.Input(id, options=options, **kwargs)
    return _OptionListCombo(id, options=options, **kwargs)


def with_block_prefetch(transformer_options, patcher, device):
    """``transformer_options`` for one FramePack transformer call on ``device``, with Dynamic VRAM's weight
    prefetch as ComfyUI's own DiTs get it.

    0.33 (tested on the CPU; read: comfy/model_base.py ``_apply_model``, comfy/model_prefetch.py,
    comfy/ldm/minimax/model.py and comfy/ldm/lightricks/av_model.py block loops): core sets
    ``prefetch_dynamic_vbars`` from ``current_patcher.is_dynamic()``, and DiTs make a prefetch queue over
    their blocks, pop it before each block and with None after the last. FramePack replaces ``_apply_model``,
    so this sets the same flag and hands the transformer a block hook (framepack_core ``BLOCK_HOOK``) doing
    the same over its dual- then single-stream blocks. ComfyUI makes no queue, and popping None does nothing,
    unless the patcher is dynamic and the device has offload streams (CUDA / ROCm with comfy-aimdo).
    0.3.64 (tested): no ``comfy.model_prefetch``; the options stay as they are.
    """
    if model_prefetch is None:
        return transformer_options
    options = {**transformer_options, "prefetch_dynamic_vbars": patcher is not None and patcher.is_dynamic()}

    def block_hook(blocks):
        queue = model_prefetch.make_prefetch_queue(list(blocks), device, options)
        return lambda block: model_prefetch.prefetch_queue_pop(queue, device, block)

    options[BLOCK_HOOK] = block_hook
    return options
