"""Dynamic VRAM's weight prefetch reaches FramePack's block loop as it reaches core DiTs, in-process on the CPU.

Where ComfyUI has ``comfy.model_prefetch`` (0.33), every FramePack transformer call gets
``prefetch_dynamic_vbars`` as core's ``BaseModel._apply_model`` sets it, and a block hook that makes ComfyUI's
prefetch queue over the dual- then single-stream blocks and pops it before each block and after the last,
as comfy/ldm/minimax/model.py does. ComfyUI makes the queue only for a dynamic patcher (comfy-aimdo) on a
device with offload streams, so on the CPU the queue is None and each pop does nothing: what only a GPU
shows is the weights streamed in ahead of each block and the output unchanged by it. Where ComfyUI has no
prefetch (0.3.64), the transformer options stay as they were.
"""

import importlib
import importlib.util

import pytest
import torch

from framepack_core.model import BLOCK_HOOK
from framepack_core.synthetic import TINY
from models import write_framepack
from test_end_to_end import CHECKPOINT, SECTIONS, STEPS, load_model, sample

CALLS = SECTIONS * STEPS  # transformer calls of one generation with cfg 1


@pytest.fixture(scope="module")
def pack(comfy):
    write_framepack(comfy.models / "diffusion_models" / CHECKPOINT, seed=0)
    return comfy.pack


def has_module(name):
    return importlib.util.find_spec(name) is not None


def has_prefetch():
    return has_module("comfy.model_prefetch")


def watch_prefetch(model, keep_hook=True):
    """Wrap every transformer call: note its options and what its block hook is told (or drop the hook)."""
    from comfy.patcher_extension import WrappersMP

    seen = {"options": [], "planned": [], "before": []}

    def wrapper(executor, *args, **kwargs):
        options = dict(kwargs["transformer_options"])
        seen["options"].append(options)
        hook = options.pop(BLOCK_HOOK, None)
        if hook is not None and keep_hook:
            def noting(blocks):
                seen["planned"].append(list(blocks))
                before_block = hook(blocks)

                def before(block):
                    seen["before"].append(block)
                    before_block(block)
                return before
            options[BLOCK_HOOK] = noting
        kwargs["transformer_options"] = options
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_dynamic_vram", wrapper)
    return seen


def test_each_transformer_call_pops_the_prefetch_queue_once_per_block_in_order(pack):
    model = load_model(pack).clone()
    seen = watch_prefetch(model)
    out = sample(pack, model)["samples"]

    assert len(seen["options"]) == CALLS
    if not has_prefetch():
        assert all(BLOCK_HOOK not in o and "prefetch_dynamic_vbars" not in o for o in seen["options"])
        return
    import comfy.model_prefetch

    # as core's BaseModel._apply_model sets it: the patcher in use is dynamic or not (never on the CPU)
    assert [o["prefetch_dynamic_vbars"] for o in seen["options"]] == [model.is_dynamic()] * CALLS
    transformer = model.model.diffusion_model
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert len(blocks) == TINY.num_layers + TINY.num_single_layers
    assert seen["planned"] == [blocks] * CALLS
    assert seen["before"] == (blocks + [None]) * CALLS
    # the CPU has no offload streams: ComfyUI makes no queue, the pops do nothing, and nothing is left queued
    assert comfy.model_prefetch.make_prefetch_queue(blocks, model.load_device, {"prefetch_dynamic_vbars": True}) is None
    assert comfy.model_prefetch.PREFETCH_QUEUES == []

    without = load_model(pack).clone()
    watch_prefetch(without, keep_hook=False)
    assert torch.equal(out, sample(pack, without)["samples"])


def test_lazy_weight_layers_load_and_sample_like_eager_ones(pack, monkeypatch):
    """With comfy-aimdo, ComfyUI's Linear layers start with weight=None and take their tensor at load."""
    plain = sample(pack, load_model(pack))["samples"]
    import comfy.ops

    if has_module("comfy.memory_management"):  # 0.33: comfy-aimdo's switch
        memory_management = importlib.import_module("comfy.memory_management")
        monkeypatch.setattr(memory_management, "aimdo_enabled", True)  # as main.py sets it with comfy-aimdo
        assert comfy.ops.disable_weight_init.Linear(4, 4).weight is None, "the tree's lazy layers are on"
    lazy = load_model(pack)
    monkeypatch.undo()
    transformer = lazy.model.diffusion_model
    assert transformer.proj_out.weight is not None and transformer.proj_out.weight.device.type != "meta"
    assert torch.equal(sample(pack, lazy)["samples"], plain)
