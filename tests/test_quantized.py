"""ComfyUI's quantized checkpoint layouts are recognised from the file, and the engine alone refuses them clearly.

(Loading them through ComfyUI's layers is tested in tests/comfyui/test_quantized_checkpoints.py.)
"""

import json

import pytest
import torch

from framepack_core.loading import CheckpointError, load_transformer, read_quantization
from framepack_core.quantized import METADATA_KEY
from framepack_core.synthetic import TINY, quantized_state, random_state_dict, save_single_file

PREFIX = "model.diffusion_model."


def write(tmp_path, layout, input_scales=False, prefix=PREFIX):
    tensors, metadata, _ = quantized_state(random_state_dict(TINY), layout, input_scales)
    if metadata:  # layer names in the metadata carry the file's key prefix, as ComfyUI writes them
        layers = json.loads(metadata[METADATA_KEY])["layers"]
        metadata = {METADATA_KEY: json.dumps({"layers": {prefix + k: v for k, v in layers.items()}})}
    return save_single_file(tmp_path / f"{layout}.safetensors", tensors, prefix=prefix, metadata=metadata)


@pytest.mark.parametrize("layout", ["scaled_fp8", "comfy_quant", "comfy_quant_metadata"])
def test_layouts_are_recognised(tmp_path, layout):
    quant = read_quantization(write(tmp_path, layout, input_scales=True))
    assert quant.format == ("scaled_fp8" if layout == "scaled_fp8" else "comfy_quant")
    assert "transformer_blocks.0.attn.to_q" in quant.layers and "proj_out" not in quant.layers
    assert len(quant.layers) == TINY.num_layers * 14 + TINY.num_single_layers * 6  # every block matrix
    assert quant.input_scales
    if layout == "scaled_fp8":
        assert quant.dtype == torch.float8_e4m3fn
    assert quant.keeps_dtype("transformer_blocks.0.attn.to_q.weight") and not quant.keeps_dtype("proj_out.weight")


def test_plain_checkpoints_are_not_quantized(tiny_file):
    assert read_quantization(tiny_file) is None


@pytest.mark.parametrize("layout", ["scaled_fp8", "comfy_quant"])
def test_the_engine_alone_refuses_quantized_files_with_the_fix(tmp_path, layout):
    with pytest.raises(CheckpointError, match=f"quantized in ComfyUI's {layout} layout.*FramePack Model Loader"):
        load_transformer(write(tmp_path, layout))


def test_scales_without_a_layout_marker_are_an_error(tmp_path):
    tensors, _, _ = quantized_state(random_state_dict(TINY), "scaled_fp8")
    del tensors["scaled_fp8"]
    path = save_single_file(tmp_path / "unmarked.safetensors", tensors)
    with pytest.raises(CheckpointError, match="no 'scaled_fp8' marker"):
        read_quantization(path)


def test_damaged_quantization_metadata_is_an_error(tmp_path):
    path = save_single_file(tmp_path / "bad_meta.safetensors", random_state_dict(TINY), metadata={METADATA_KEY: "{"})
    with pytest.raises(CheckpointError, match="_quantization_metadata metadata is not the JSON"):
        read_quantization(path)
