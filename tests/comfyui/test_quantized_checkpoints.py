"""Quantized checkpoints in ComfyUI's layouts load through the installed ComfyUI's own layers.

Scaled fp8 runs through comfy.ops' scaled-fp8 layers (ComfyUI 0.3.64) and gives the dequantized model's
output; comfy_quant needs ComfyUI's mixed-precision layers, and a ComfyUI without them says which version to
update to. Plain fp8 keeps loading (test_end_to_end, weight_dtype fp8).
"""

import json

import pytest
import torch

from framepack_core.quantized import METADATA_KEY
from framepack_core.synthetic import TINY, quantized_state, random_state_dict, save_single_file, section_inputs
from test_end_to_end import run

PREFIX = "model.diffusion_model."


def write(comfy, name, layout, input_scales=False):
    tensors, metadata, dequantized = quantized_state(random_state_dict(TINY, seed=4), layout, input_scales)
    if metadata:
        layers = json.loads(metadata[METADATA_KEY])["layers"]
        metadata = {METADATA_KEY: json.dumps({"layers": {PREFIX + k: v for k, v in layers.items()}})}
    save_single_file(comfy.models / "diffusion_models" / name, tensors, prefix=PREFIX, metadata=metadata)
    return dequantized


def load(comfy, name, weight_dtype="auto"):
    return run(comfy.pack["FramePackModelLoader"], model_name=name, weight_dtype=weight_dtype, attention="sdpa")[0]


@pytest.mark.parametrize("input_scales", [False, True])
def test_scaled_fp8_runs_as_its_dequantized_model(comfy, input_scales):
    import comfy.ops as comfy_ops  # "as": the fixture is called `comfy` too

    if not hasattr(comfy_ops, "scaled_fp8_ops"):  # newer ComfyUI converts it to comfy_quant (read-only verified)
        pytest.fail("this test runs against ComfyUI 0.3.64, which has comfy.ops.scaled_fp8_ops")
    dequantized = write(comfy, "scaled_fp8.safetensors", "scaled_fp8", input_scales)
    save_single_file(comfy.models / "diffusion_models" / "scaled_fp8_dequantized.safetensors", dequantized)
    model = load(comfy, "scaled_fp8.safetensors").model.diffusion_model
    reference = load(comfy, "scaled_fp8_dequantized.safetensors", "fp32").model.diffusion_model

    layer = model.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float8_e4m3fn and isinstance(layer, comfy_ops.manual_cast.Linear)
    scale = dequantized["transformer_blocks.0.attn.to_q.weight"].abs().max() / torch.finfo(torch.float8_e4m3fn).max
    torch.testing.assert_close(layer.scale_weight, scale)
    assert model.proj_out.scale_weight.item() == 1.0  # an unquantized layer: identity scale
    inputs = section_inputs(TINY, height=2, width=4)
    with torch.no_grad():
        out = model(**{k: v.to(model.compute_dtype) if v.is_floating_point() else v for k, v in inputs.items()
                       if v is not None})
        expected = reference(**inputs)
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["comfy_quant", "comfy_quant_metadata"])
def test_comfy_quant_needs_mixed_precision_layers(comfy, layout):
    import comfy.ops as comfy_ops  # "as": the fixture is called `comfy` too

    write(comfy, f"{layout}.safetensors", layout)
    if hasattr(comfy_ops, "mixed_precision_ops"):
        pytest.fail("this test runs against ComfyUI 0.3.64, which has no mixed-precision layers")
    with pytest.raises(ValueError, match=r"comfy_quant layout.*update ComfyUI to 0\.3\.68 or newer"):
        load(comfy, f"{layout}.safetensors")
