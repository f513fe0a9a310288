"""Quantized checkpoints in ComfyUI's layouts load through the installed ComfyUI's own layers.

Each test takes the branch the installed ComfyUI has (nodes/comfy_compat.py ``quantized_operations``):
- scaled fp8 through comfy.ops' scaled-fp8 layers where they exist (ComfyUI 0.3.64), otherwise through the
  mixed-precision layers after ``comfy.utils.convert_old_quants`` (0.33);
- comfy_quant (configs as tensors or in the metadata) through the mixed-precision layers (0.33), and where
  ComfyUI has none (0.3.64) an error naming the version to update to.
Every quantized file runs as its dequantized twin. Plain fp8 keeps loading (test_end_to_end, weight_dtype fp8).
"""

import json

import pytest
import torch

from framepack_core.quantized import METADATA_KEY
from framepack_core.synthetic import TINY, quantized_state, random_state_dict, save_single_file, section_inputs
from test_end_to_end import run

PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn
UPDATE_COMFYUI = r"layout.*update ComfyUI to 0\.3\.68 or newer"


def write(comfy, name, layout, input_scales=False):
    """A quantized file in ``layout`` and its dequantized twin (fp32), both in models/diffusion_models."""
    tensors, metadata, dequantized = quantized_state(random_state_dict(TINY, seed=4), layout, input_scales)
    if metadata:
        layers = json.loads(metadata[METADATA_KEY])["layers"]
        metadata = {METADATA_KEY: json.dumps({"layers": {PREFIX + k: v for k, v in layers.items()}})}
    save_single_file(comfy.models / "diffusion_models" / name, tensors, prefix=PREFIX, metadata=metadata)
    save_single_file(comfy.models / "diffusion_models" / f"dequantized_{name}", dequantized)
    return dequantized


def load(comfy, name, weight_dtype="auto"):
    return run(comfy.pack["FramePackModelLoader"], model_name=name, weight_dtype=weight_dtype,
               attention="sdpa")[0].model.diffusion_model


def file_scale(dequantized, layer):
    """The per-tensor scale the file stores for ``layer`` (see synthetic.quantized_state)."""
    return dequantized[f"{layer}.weight"].abs().max() / torch.finfo(FP8).max


def assert_runs_as_dequantized(comfy, name, dequantized):
    model = load(comfy, name)
    reference = load(comfy, f"dequantized_{name}", "fp32")
    inputs = section_inputs(TINY, height=2, width=4)
    with torch.no_grad():
        out = model(**{k: v.to(model.compute_dtype) if v.is_floating_point() else v for k, v in inputs.items()
                       if v is not None})
        expected = reference(**inputs)
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
    return model


def assert_mixed_precision_layers(model, dequantized):
    """A quantized layer holds ComfyUI's QuantizedTensor (fp8 data, the file's scale); the rest stay plain."""
    from comfy.quant_ops import QuantizedTensor

    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.weight, QuantizedTensor) and layer.weight.storage_dtype == FP8
    assert layer.quant_format == "float8_e4m3fn"
    torch.testing.assert_close(layer.weight.params.scale.float(),
                               file_scale(dequantized, "transformer_blocks.0.attn.to_q"))
    assert not isinstance(model.proj_out.weight, QuantizedTensor)  # unquantized in the file


@pytest.mark.parametrize("input_scales", [False, True])
def test_scaled_fp8_runs_as_its_dequantized_model(comfy, input_scales):
    import comfy.ops as comfy_ops  # "as": the fixture is called `comfy` too

    name = f"scaled_fp8_{input_scales}.safetensors"
    dequantized = write(comfy, name, "scaled_fp8", input_scales)
    if hasattr(comfy_ops, "scaled_fp8_ops"):  # 0.3.64: layers that read scale_weight / scale_input as stored
        model = assert_runs_as_dequantized(comfy, name, dequantized)
        layer = model.transformer_blocks[0].attn.to_q
        assert layer.weight.dtype == FP8 and isinstance(layer, comfy_ops.manual_cast.Linear)
        torch.testing.assert_close(layer.scale_weight, file_scale(dequantized, "transformer_blocks.0.attn.to_q"))
        assert model.proj_out.scale_weight.item() == 1.0  # an unquantized layer: identity scale
    elif hasattr(comfy_ops, "mixed_precision_ops"):  # 0.33: converted to comfy_quant by convert_old_quants
        assert_mixed_precision_layers(assert_runs_as_dequantized(comfy, name, dequantized), dequantized)
    else:
        with pytest.raises(ValueError, match=UPDATE_COMFYUI):
            load(comfy, name)


@pytest.mark.parametrize("layout", ["comfy_quant", "comfy_quant_metadata"])
@pytest.mark.parametrize("input_scales", [False, True])
def test_comfy_quant_runs_where_comfyui_has_mixed_precision_layers(comfy, layout, input_scales):
    import comfy.ops as comfy_ops

    name = f"{layout}_{input_scales}.safetensors"
    dequantized = write(comfy, name, layout, input_scales)
    if hasattr(comfy_ops, "mixed_precision_ops"):
        assert_mixed_precision_layers(assert_runs_as_dequantized(comfy, name, dequantized), dequantized)
    else:
        with pytest.raises(ValueError, match=UPDATE_COMFYUI):
            load(comfy, name)
