"""nodes/comfy_compat.py against the installed ComfyUI (0.3.64 in CI): the branches that tree has are taken.

The 0.38.x branches are verified by reading only (README, "Supported ComfyUI versions")."""

import sys
from pathlib import Path

import pytest
import torch

PACK = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compat(comfy):
    return sys.modules[comfy.pack["FramePackModelLoader"].__module__.rsplit(".", 1)[0] + ".comfy_compat"]


def test_loaders_use_the_patcher_comfyui_uses(comfy, compat):
    import comfy.model_patcher as model_patcher

    expected = getattr(model_patcher, "CoreModelPatcher", model_patcher.ModelPatcher)
    assert compat.model_patcher_class() is expected
    if not hasattr(model_patcher, "CoreModelPatcher"):  # 0.3.64
        assert expected is model_patcher.ModelPatcher


def test_scaled_fp8_uses_comfyui_scaled_fp8_layers(compat):
    import comfy.ops as comfy_ops

    from framepack_core.quantized import Quantization

    quant = Quantization("scaled_fp8", ("a",), dtype=torch.float8_e4m3fn, input_scales=True)
    operations, convert = compat.quantized_operations(quant, torch.float32, torch.device("cpu"))
    assert convert is None and issubclass(operations.Linear, comfy_ops.manual_cast.Linear)
    layer = operations.Linear(4, 4)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale_input is not None


def test_supported_versions_are_declared_for_comfyui(comfy):
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(PACK))
    assert config.project.supported_comfyui_version == ">=0.3.64,<0.39"
