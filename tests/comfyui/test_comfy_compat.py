"""nodes/comfy_compat.py against the installed ComfyUI (CI runs 0.3.64 and 0.33.0): each test takes the
branch the installed tree has, by what it has, never by its version string.

Branches neither tree has are verified by reading only (README, "Supported ComfyUI versions")."""

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


def test_quantized_checkpoints_use_the_layers_comfyui_has(compat):
    """Scaled fp8: comfy.ops' scaled-fp8 layers as stored (0.3.64), else the mixed-precision layers after
    ``convert_old_quants`` (0.33); comfy_quant: the mixed-precision layers, else the update error."""
    import comfy.ops as comfy_ops

    from framepack_core.quantized import Quantization

    fp8, cpu = torch.float8_e4m3fn, torch.device("cpu")
    scaled_fp8 = Quantization("scaled_fp8", ("a",), dtype=fp8, input_scales=True)
    comfy_quant = Quantization("comfy_quant", ("a",))
    if hasattr(comfy_ops, "scaled_fp8_ops"):
        operations, convert = compat.quantized_operations(scaled_fp8, torch.float32, cpu)
        assert convert is None and issubclass(operations.Linear, comfy_ops.manual_cast.Linear)
        layer = operations.Linear(4, 4)
        assert layer.weight.dtype == fp8 and layer.scale_input is not None
    elif hasattr(comfy_ops, "mixed_precision_ops"):
        operations, convert = compat.quantized_operations(scaled_fp8, torch.float32, cpu)
        weight = torch.randn(4, 4).to(fp8)
        state = convert({"scaled_fp8": torch.empty(0, dtype=fp8), "a.weight": weight,
                         "a.scale_weight": torch.tensor(0.5), "a.scale_input": torch.tensor(2.0)})
        assert sorted(state) == ["a.comfy_quant", "a.input_scale", "a.weight", "a.weight_scale"]
        layer = operations.Linear(4, 4, bias=False)
        layer.load_state_dict({k[len("a."):]: v for k, v in state.items()})
        x = torch.randn(3, 4)
        torch.testing.assert_close(layer(x), x @ (weight.float() * 0.5).T)  # CPU: emulated, input scale unused
    else:
        with pytest.raises(ValueError, match=r"scaled_fp8 layout.*update ComfyUI to 0\.3\.68 or newer"):
            compat.quantized_operations(scaled_fp8, torch.float32, cpu)
    if hasattr(comfy_ops, "mixed_precision_ops"):
        operations, convert = compat.quantized_operations(comfy_quant, torch.float32, cpu)
        assert convert is None and issubclass(operations.Linear, comfy_ops.CastWeightBiasOp)
    else:
        with pytest.raises(ValueError, match=r"comfy_quant layout.*update ComfyUI to 0\.3\.68 or newer"):
            compat.quantized_operations(comfy_quant, torch.float32, cpu)


def test_supported_versions_are_declared_for_comfyui(comfy):
    from comfy_config.config_parser import extract_node_configuration

    # ComfyUI's own reader of the registry metadata: the oldest tree CI tests, no upper cap
    config = extract_node_configuration(str(PACK))
    assert config.project.supported_comfyui_version == ">=0.3.64"


def test_the_loader_can_build_its_model_again_as_comfyui_asks(comfy, compat, tmp_path):
    """0.38.x rebuilds non-dynamic and multi-GPU copies with ``factory(*args, disable_dynamic=True)`` from
    ``patcher.cached_patcher_init`` (read only). The factory called that way gives a plain ModelPatcher with
    the same weights; the attribute is set only where ComfyUI's patchers have it (not in 0.3.64)."""
    import comfy.model_patcher as model_patcher
    from models import write_framepack

    loader = sys.modules[comfy.pack["FramePackModelLoader"].__module__]
    path = str(tmp_path / "framepack.safetensors")
    write_framepack(path, seed=0)
    patcher = loader.load_framepack(path, "auto", "sdpa")
    has_it = hasattr(model_patcher.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu"), "cached_patcher_init")
    assert hasattr(patcher, "cached_patcher_init") == has_it
    factory, args = getattr(patcher, "cached_patcher_init", None) or (loader.load_framepack, (path, "auto", "sdpa"))
    copy = factory(*args, disable_dynamic=True)
    assert type(copy) is model_patcher.ModelPatcher and copy.model.framepack_source == patcher.model.framepack_source
    mine, theirs = patcher.model.diffusion_model.state_dict(), copy.model.diffusion_model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    class PatcherWithRebuild:  # what 0.38.x patchers carry: cached_patcher_init, None until a loader sets it
        cached_patcher_init = None

    assert compat.remember_loader(PatcherWithRebuild(), factory, args).cached_patcher_init == (factory, args)
