"""FramePack Sampler in a real ComfyUI: a cancelled generation, queued again, resumes after its last saved
section and gives the video of an uninterrupted run; its state is removed once the video is done."""

import logging
import os

import pytest
import torch

from models import write_framepack, write_lora
from test_end_to_end import lora_targets, make_schedule, run, sample

CHECKPOINT = "resume_framepack_tiny.safetensors"
SECTIONS, STEPS = 3, 3  # test_end_to_end's sample() uses STEPS sampler steps


@pytest.fixture(scope="module")
def model(comfy, pack):
    write_framepack(comfy.models / "diffusion_models" / CHECKPOINT, seed=4)
    cls = pack["FramePackModelLoader"]
    return run(cls, model_name=CHECKPOINT, weight_dtype="fp32", attention="sdpa")[0]


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy.pack


def resume_folder():
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "framepack_resume")


def saved_states():
    folder = resume_folder()
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []


class CancelAtSection:
    """An APPLY_MODEL wrapper that presses ComfyUI's cancel (interrupt_current_processing) at a known point:
    the first transformer call of the run's n-th section (the call whose sigma is the schedule's first).

    Not a progress hook: ComfyUI may throttle those (0.33 calls them at most every 100 ms / 0.5 %), so a
    cancel pressed from one can land sections later or never. The same wrapper stays on the model for
    every run, so the resume identity (which covers wrappers) is the same whether it is armed or not."""

    def __init__(self):
        self.at, self.sections = None, 0

    def arm(self, section):
        self.at, self.sections = section, 0

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        import comfy.model_management as mm

        if self.at is not None and torch.all(t == transformer_options["sample_sigmas"][0]):
            self.sections += 1
            if self.sections == self.at:
                self.at = None
                mm.interrupt_current_processing(True)  # ComfyUI's own checks raise at their next point
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def test_cancelled_generation_resumes_where_it_stopped(comfy, pack, model, caplog):
    import comfy.model_management as mm
    from comfy.patcher_extension import WrappersMP

    cancel = CancelAtSection()
    cancellable = model.clone()
    cancellable.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "cancel", cancel)
    schedule = make_schedule(pack, sections=SECTIONS, mode="forward")[0]
    whole = sample(pack, cancellable, schedule=schedule)["samples"]
    assert saved_states() == [], "a finished generation leaves no state behind"

    # cancel during the second section of a fresh run, then during the last section of the resumed run
    # (which starts at the second section, so the last is its second too)
    for stopped in (1, SECTIONS - 1):
        cancel.arm(2)
        caplog.clear()
        with caplog.at_level(logging.INFO), pytest.raises(mm.InterruptProcessingException):
            sample(pack, cancellable, schedule=schedule)
        assert cancel.at is None, "the cancel was pressed"
        assert len(saved_states()) == 1
        assert (f"cancelled: {stopped} of {SECTIONS} sections are saved in {resume_folder()}. Queue the "
                "same generation again to resume") in caplog.text

    # queueing again resumes after the last-but-one section
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = sample(pack, cancellable, schedule=schedule)["samples"]
    assert f"resuming after section {SECTIONS - 1} of {SECTIONS}" in caplog.text
    assert torch.equal(resumed, whole)
    assert saved_states() == []

    # a changed input (here the seed) does not pick up another generation's state
    cancel.arm(2)
    with pytest.raises(mm.InterruptProcessingException):
        sample(pack, cancellable, schedule=schedule)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        other = sample(pack, cancellable, schedule=schedule, seed=8)["samples"]
    assert "resuming" not in caplog.text and not torch.equal(other, whole)
    assert len(saved_states()) == 1, "the cancelled generation's state stays for when it is queued again"
    assert torch.equal(sample(pack, cancellable, schedule=schedule)["samples"], whole)
    assert saved_states() == []


def test_model_identity_covers_checkpoint_and_lora_patches(comfy, pack, model):
    import sys

    identity = sys.modules[pack["FramePackSampler"].__module__].model_identity
    lora_loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]
    write_lora(comfy.models / "loras" / "resume_lora.safetensors", lora_targets(), seed=1)
    write_lora(comfy.models / "loras" / "resume_lora_2.safetensors", lora_targets(), seed=2)

    def with_lora(name, strength):
        return run(lora_loader, model=model, lora_name=name, strength_model=strength)[0]

    base = identity(model)
    assert identity(model.clone()) == base
    lora = identity(with_lora("resume_lora.safetensors", 1.0))
    assert lora != base and identity(with_lora("resume_lora.safetensors", 1.0)) == lora
    others = {identity(with_lora("resume_lora.safetensors", 0.5)), identity(with_lora("resume_lora_2.safetensors", 1.0))}
    assert len(others | {base, lora}) == 4
    # the same file loaded with another weight dtype is another model
    fp16 = run(pack["FramePackModelLoader"], model_name=CHECKPOINT, weight_dtype="fp16", attention="sdpa")[0]
    assert identity(fp16) != base
    # and a rewritten checkpoint (new size or modification time) too
    path = comfy.models / "diffusion_models" / CHECKPOINT
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert identity(model) != base
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_model_identity_covers_model_patches(comfy, pack, model):
    """A resumed run must not continue another patched model's video: object patches, wrappers, block
    replacements and the attention override change the identity; the same patches give the same one."""
    import sys

    from comfy.patcher_extension import WrappersMP

    identity = sys.modules[pack["FramePackSampler"].__module__].model_identity

    def load(name):
        return run(pack["FramePackModelLoader"], model_name=name, weight_dtype="fp32", attention="sdpa")[0]

    base = identity(model)
    assert identity(load(CHECKPOINT)) == base  # loaded again: nothing differs

    def wrapper(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    def block(args, extra):
        return extra["original_block"](args)

    def attention(func, *args, **kwargs):
        return func(*args, **kwargs)

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test", wrapper)
    replaced = model.clone()
    replaced.set_model_patch_replace(block, "dit", "double_block", 0)
    replaced_other = model.clone()
    replaced_other.set_model_patch_replace(block, "dit", "double_block", 1)
    overridden = model.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = attention
    write_framepack(comfy.models / "diffusion_models" / "resume_other.safetensors", seed=9)
    other = load("resume_other.safetensors")
    patched = model.clone()
    patched.add_object_patch("diffusion_model", other.model.diffusion_model)
    identities = [identity(m) for m in (wrapped, replaced, replaced_other, overridden, patched)]
    assert len(set(identities + [base])) == 6
    again = model.clone()
    again.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test", wrapper)
    assert identity(again) == identities[0]
