"""ComfyUI's model patch mechanisms reach the FramePack MODEL: every transformer call of FramePack Sampler goes
through ``BaseModel.apply_model`` with the ``APPLY_MODEL`` / ``DIFFUSION_MODEL`` wrappers and a
``transformer_options`` that carries the sigmas, block replacements and the attention override; object patches
are read after loading. Patches are set with ComfyUI's own ModelPatcher API and stock nodes, in-process on the CPU.
"""

import pytest
import torch

from framepack_core.synthetic import TINY
from models import write_framepack
from test_end_to_end import CHECKPOINT, SECTIONS, STEPS, generate_like_the_sampler_node, load_model, run, sample
from test_end_to_end import sampler_inputs

CALLS = SECTIONS * STEPS  # transformer calls of one generation with cfg 1


@pytest.fixture(scope="module")
def pack(comfy):
    write_framepack(comfy.models / "diffusion_models" / CHECKPOINT, seed=0)
    return comfy.pack


@pytest.fixture(scope="module")
def plain(pack):
    """The sampler's output with no patches at all."""
    return sample(pack, load_model(pack))["samples"]


def test_no_patches_leave_the_output_bit_identical(pack, plain):
    model = load_model(pack)
    direct = generate_like_the_sampler_node(pack, model, sampler_inputs(pack, model))  # the engine, called directly
    assert torch.equal(plain, direct)


def test_wrappers_run_around_every_transformer_call(pack, plain):
    from comfy.patcher_extension import WrappersMP

    model = load_model(pack).clone()
    seen = {"apply": [], "diffusion": []}

    def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen["apply"].append((t.clone(), transformer_options["sample_sigmas"].clone()))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def diffusion_model_wrapper(executor, *args, **kwargs):
        seen["diffusion"].append(executor.class_obj)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test", apply_model_wrapper)
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", diffusion_model_wrapper)
    out = sample(pack, model)["samples"]

    assert torch.equal(out, plain)
    assert len(seen["apply"]) == len(seen["diffusion"]) == CALLS
    assert all(obj is model.model.diffusion_model for obj in seen["diffusion"])
    # the sigma of each call is the current entry of its section's schedule, as ComfyUI's samplers pass it
    for step, (sigma, schedule) in enumerate(seen["apply"]):
        assert len(schedule) == STEPS + 1 and sigma.item() == schedule[step % STEPS].item()


def test_block_replacement_is_called_once_per_block_and_step(pack, plain):
    model = load_model(pack).clone()
    calls = []

    def replace(kind):
        def patch(args, extra):
            calls.append(kind)
            assert set(args) >= {"img", "vec", "pe", "attention_mask", "transformer_options"}
            options = args["transformer_options"]
            assert "sigmas" in options
            assert (options["block_type"] + "_block", options["block_index"]) == kind
            assert options["total_blocks"] == TINY.num_layers + TINY.num_single_layers
            return extra["original_block"](args)
        return patch

    for i in range(TINY.num_layers):
        model.set_model_patch_replace(replace(("double_block", i)), "dit", "double_block", i)
    model.set_model_patch_replace(replace(("single_block", 1)), "dit", "single_block", 1)
    out = sample(pack, model)["samples"]

    assert torch.equal(out, plain)  # the original block, called through the patch, computes the same
    expected = [("double_block", i) for i in range(TINY.num_layers)] + [("single_block", 1)]
    assert calls == expected * CALLS


def test_a_replaced_block_changes_the_output(pack, plain):
    model = load_model(pack).clone()

    def skip_block(args, extra):  # a replacement that does not call the original: the block is left out
        return {"img": args["img"]}

    model.set_model_patch_replace(skip_block, "dit", "single_block", 0)
    out = sample(pack, model)["samples"]
    assert out.shape == plain.shape and not torch.allclose(out, plain)


def test_attention_override_replaces_every_attention_call(pack, plain):
    model = load_model(pack).clone()
    calls = []

    def override(func, q, k, v, heads, **kwargs):
        options = kwargs.get("transformer_options", {})
        calls.append((q.shape, options.get("block_type"), options.get("block_index")))
        assert kwargs["skip_reshape"] and q.shape[1] == heads == TINY.num_heads
        return func(q, k, v, heads, **kwargs)

    model.model_options["transformer_options"]["optimized_attention_override"] = override
    out = sample(pack, model)["samples"]

    assert torch.equal(out, plain)
    assert len(calls) == CALLS * (TINY.num_refiner_layers + TINY.num_layers + TINY.num_single_layers)
    per_call = ([(None, None)] * TINY.num_refiner_layers + [("double", i) for i in range(TINY.num_layers)]
                + [("single", i) for i in range(TINY.num_single_layers)])  # the refiner is not a DiT block
    assert [c[1:] for c in calls] == per_call * CALLS


def test_object_patch_of_the_diffusion_model_is_used(comfy, pack, plain):
    """A MODEL whose diffusion_model is object-patched samples with the patched transformer."""
    write_framepack(comfy.models / "diffusion_models" / "patches_other.safetensors", seed=5)
    replacement = load_model(pack, "patches_other.safetensors")
    expected = sample(pack, replacement)["samples"]

    model = load_model(pack).clone()
    model.add_object_patch("diffusion_model", replacement.model.diffusion_model)
    out = sample(pack, model)["samples"]
    assert torch.equal(out, expected) and not torch.equal(out, plain)


def test_stock_torch_compile_node_compiles_the_transformer(comfy, pack, plain):
    """TorchCompileModel (an APPLY_MODEL wrapper that swaps in torch.compile(diffusion_model)) takes effect.

    CPU inductor: slow to compile (tens of seconds on two cores), so this is the one compiled run."""
    import torch._dynamo

    compile_node = comfy.nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
    compiled = compile_node.execute(model=load_model(pack), backend="inductor").result[0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = sample(pack, compiled)["samples"]

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the compiled transformer never ran"
    # inductor fuses and reorders float math: the same video up to rounding, compounded over the steps
    torch.testing.assert_close(out, plain, rtol=1e-3, atol=1e-3)


def test_patches_reach_the_single_frame_node(comfy, pack):
    """FramePack Single Frame calls the transformer the same way: wrappers, block replacement and object
    patches apply, and without them the frame is unchanged."""
    from comfy.patcher_extension import WrappersMP
    from test_features import single_frame

    base = load_model(pack)
    plain_frame = single_frame(pack, base)["samples"]
    model = base.clone()
    sigmas, blocks = [], []

    def apply_model_wrapper(executor, x, t, *args, **kwargs):
        sigmas.append(t.item())
        return executor(x, t, *args, **kwargs)

    def count_block(args, extra):
        blocks.append(args["transformer_options"]["sample_sigmas"][len(blocks)].item())
        return extra["original_block"](args)

    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test", apply_model_wrapper)
    model.set_model_patch_replace(count_block, "dit", "double_block", 0)
    assert torch.equal(single_frame(pack, model)["samples"], plain_frame)
    assert len(sigmas) == STEPS and sigmas == blocks  # once per step, at that step's sigma

    write_framepack(comfy.models / "diffusion_models" / "patches_other.safetensors", seed=5)
    replacement = load_model(pack, "patches_other.safetensors")
    patched = base.clone()
    patched.add_object_patch("diffusion_model", replacement.model.diffusion_model)
    out = single_frame(pack, patched)["samples"]
    assert torch.equal(out, single_frame(pack, replacement)["samples"]) and not torch.equal(out, plain_frame)


def test_sampler_level_wrappers_are_refused_by_name(comfy, pack):
    """The stock EasyCache node wraps ComfyUI's sampling loop (OUTER_SAMPLE, CALC_COND_BATCH), which FramePack
    does not run; both FramePack samplers say so and name the fix instead of failing inside the wrapper."""
    from test_features import single_frame

    easycache = comfy.nodes.NODE_CLASS_MAPPINGS["EasyCache"]
    model = easycache.execute(model=load_model(pack), reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                              verbose=False).result[0]
    for run_node in (lambda: sample(pack, model), lambda: single_frame(pack, model)):
        with pytest.raises(ValueError, match=r"calc_cond_batch \(easycache\), outer_sample \(easycache\).*remove "
                           "that node.*cache input"):
            run_node()
