"""FramePack Sampler with ComfyUI's MultiGPU CFG Split (core node ``MultiGPU_WorkUnits``), in-process on the CPU.

On a machine with one device that node makes no work units. The split path is tested with a work unit
declared on the CPU through ComfyUI's own patcher API, as the node's ``create_multigpu_deepclones`` declares
one per extra GPU: ``deepclone_multigpu`` (a fresh model from the loader's factory), flagged
``is_multigpu_base_clone`` and listed under the MODEL's additional models "multigpu". What only several GPUs
show: the two halves overlapping in time (the speed-up) and the copies living on their own devices.
"""

import logging
import sys
import threading

import pytest
import torch

from models import write_framepack
from test_end_to_end import CHECKPOINT, SECTIONS, STEPS, load_model, run, sample

CFG = 2.5


@pytest.fixture(scope="module")
def pack(comfy):
    write_framepack(comfy.models / "diffusion_models" / CHECKPOINT, seed=0)
    return comfy.pack


def has_work_units(comfy):
    """Whether this ComfyUI makes work units; one without must not have the node that asks for them either."""
    from comfy.model_patcher import ModelPatcher

    if hasattr(ModelPatcher, "deepclone_multigpu"):
        return True
    assert "MultiGPU_WorkUnits" not in comfy.nodes.NODE_CLASS_MAPPINGS
    return False


def with_cpu_work_unit(model):
    """A clone of the MODEL with one work unit on its own device (the CPU), and that unit."""
    unit = model.deepclone_multigpu(new_load_device=model.load_device)
    unit.is_multigpu_base_clone = True
    split = model.clone()
    split.set_additional_models("multigpu", [unit])
    return split


def record_calls(model):
    """Every transformer call: (the transformer that ran it, its cond_or_uncond, whether on the main thread)."""
    from comfy.patcher_extension import WrappersMP

    calls = []

    def wrapper(executor, *args, **kwargs):
        options = kwargs["transformer_options"]
        calls.append((executor.class_obj, options["cond_or_uncond"], threading.current_thread() is threading.main_thread()))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_multigpu", wrapper)
    return calls


def weights_read(pack, unit):
    """Whether a work unit's transformer holds weights (copies are built without, and read them when used)."""
    return sys.modules[pack["FramePackModelLoader"].__module__].has_weights(unit)


def loaded_patchers():
    import comfy.model_management as mm

    return [loaded.model for loaded in mm.current_loaded_models]


def test_the_core_node_on_one_device_makes_no_work_units(comfy, pack):
    model = load_model(pack)
    if not has_work_units(comfy):
        return
    node = comfy.nodes.NODE_CLASS_MAPPINGS["MultiGPU_WorkUnits"]
    units = run(node, model=model, max_gpus=2)[0].get_additional_models_with_key("multigpu")
    assert units == [], "the CPU is the only device: MultiGPU CFG Split has nothing to copy the model to"


def test_cfg_split_over_two_work_units_gives_the_sequential_result(comfy, pack, caplog):
    if not has_work_units(comfy):
        return
    reference = sample(pack, load_model(pack), cfg=CFG, cfg_batch="sequential")["samples"]
    model = load_model(pack).clone()
    calls = record_calls(model)
    split = with_cpu_work_unit(model)
    [unit] = split.get_additional_models_with_key("multigpu")
    assert not weights_read(pack, unit), "a work unit is built without reading its checkpoint"
    with caplog.at_level(logging.INFO):
        out = sample(pack, split, cfg=CFG)["samples"]
    assert weights_read(pack, unit), "the copy the negative prompt ran on read its weights"

    assert torch.equal(out, reference), "each device computes its prompt exactly as one device does alone"
    assert "[FramePack] CFG split over two devices: the positive prompt on cpu, the negative on cpu." in caplog.text
    main_model, unit_model = split.model.diffusion_model, unit.model.diffusion_model
    assert main_model is not unit_model
    assert sorted((obj is unit_model, cond, on_main) for obj, cond, on_main in calls) == (
        [(False, [0], True)] * (SECTIONS * STEPS) + [(True, [1], False)] * (SECTIONS * STEPS))


def test_cfg_1_samples_on_one_device_and_never_loads_the_copy(comfy, pack, caplog):
    if not has_work_units(comfy):
        return
    plain = sample(pack, load_model(pack))["samples"]
    model = load_model(pack).clone()
    calls = record_calls(model)
    split = with_cpu_work_unit(model)
    [unit] = split.get_additional_models_with_key("multigpu")
    with caplog.at_level(logging.INFO):
        out = sample(pack, split)["samples"]

    assert torch.equal(out, plain)
    assert "[FramePack] FramePack samples on one device (cpu)" in caplog.text
    assert "Its copies on cpu are not loaded and their weights are never read" in caplog.text
    assert not weights_read(pack, unit), "an unused copy never reads its checkpoint"
    assert all(obj is split.model.diffusion_model for obj, _, _ in calls) and len(calls) == SECTIONS * STEPS
    assert unit not in loaded_patchers() and not any(p.model is unit.model for p in loaded_patchers())


def test_single_frame_samples_on_one_device_and_never_reads_the_copy(comfy, pack, caplog):
    from test_features import single_frame

    if not has_work_units(comfy):
        return
    plain = single_frame(pack, load_model(pack), cfg=CFG)["samples"]
    split = with_cpu_work_unit(load_model(pack).clone())
    [unit] = split.get_additional_models_with_key("multigpu")
    with caplog.at_level(logging.INFO):
        out = single_frame(pack, split, cfg=CFG)["samples"]

    assert torch.equal(out, plain)
    assert "[FramePack] FramePack samples on one device (cpu)" in caplog.text
    assert "FramePack Single Frame does not split them" in caplog.text
    assert not weights_read(pack, unit)
