"""End to end inside a real ComfyUI, on the CPU: loader -> schedule -> sampler -> section decode.

Every model is a tiny random-weight file written into the temporary models folder and loaded through the
real loaders: this pack's FramePack loader, ComfyUI's HunyuanVideo VAE (``comfy.sd.VAE``) and ComfyUI's
stock ``LoraLoaderModelOnly``. Nodes are called the way ComfyUI's executor calls them: an instance of the
registered class, its FUNCTION method, keyword inputs (defaults taken from INPUT_TYPES).
"""

import os
import sys

import pytest
import torch

from framepack_core.synthetic import TINY
from models import hunyuan_vae_state_dict, write_framepack, write_lora

H, W = 2, 4  # latent size: 16 x 32 pixels, non-square so a swapped axis shows
WINDOW, SECTIONS, STEPS = 3, 2, 3
LATENT_FRAMES = 1 + SECTIONS * WINDOW
PIXEL_FRAMES = 4 * LATENT_FRAMES - 3
CHECKPOINT = "e2e_framepack_tiny.safetensors"


# ---------------------------------------------------------------------------------------------
# calling nodes as ComfyUI does


def node_defaults(cls):
    spec = cls.INPUT_TYPES()
    return {name: opts[1]["default"] for name, opts in spec["required"].items()
            if len(opts) > 1 and "default" in opts[1]}


def run(cls, **inputs):
    """A node's result as ComfyUI's executor gets it: V1 nodes through an instance's FUNCTION; V3 nodes
    (io.ComfyNode) through FUNCTION on a clone of the class, which returns an io.NodeOutput (indexable)."""
    from comfy_api.latest import io

    if issubclass(cls, io.ComfyNode):
        cls.VALIDATE_CLASS()
        return getattr(cls.PREPARE_CLASS_CLONE({}), cls.FUNCTION)(**inputs)
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy.pack


@pytest.fixture(scope="module")
def checkpoint(comfy):
    write_framepack(comfy.models / "diffusion_models" / CHECKPOINT, seed=0)
    return CHECKPOINT


@pytest.fixture(scope="module")
def vae(comfy):
    from comfy.sd import VAE

    return VAE(sd=hunyuan_vae_state_dict())


def load_model(pack, name=CHECKPOINT):
    cls = pack["FramePackModelLoader"]
    return run(cls, **{**node_defaults(cls), "model_name": name})[0]


def make_schedule(pack, **overrides):
    cls = pack["FramePackSchedule"]
    inputs = {**node_defaults(cls), "mode": "inverted", "sections": SECTIONS, "window": WINDOW,
              "width": 8 * W, "height": 8 * H, **overrides}
    return run(cls, **inputs)


def conditioning(seed=0, tokens=7, width=TINY.text_dim, pooled=TINY.pooled_dim):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=gen), {"pooled_output": torch.randn(1, pooled, generator=gen)}]]


def vision_output(seed=0, tokens=9, width=TINY.image_dim):
    from comfy.clip_vision import Output

    out = Output()
    out["last_hidden_state"] = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))
    return out


def start_latent(seed=0):
    return {"samples": torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(seed))}


def sampler_inputs(pack, model, **overrides):
    cls = pack["FramePackSampler"]
    return {**node_defaults(cls), "model": model, "positive": conditioning(), "negative": conditioning(1),
            "start_image_embeds": vision_output(), "start_latent": start_latent(),
            "schedule": make_schedule(pack)[0], "steps": STEPS, "seed": 7, "teacache": 0.0, **overrides}


def sample(pack, model, **overrides):
    return run(pack["FramePackSampler"], **sampler_inputs(pack, model, **overrides))[0]


# ---------------------------------------------------------------------------------------------
# 1. the whole chain


def test_generate_and_decode_in_process(comfy, pack, checkpoint, vae):
    import comfy.utils as comfy_utils  # "as": the fixture is called `comfy` too
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy.model_patcher import ModelPatcher

    assert checkpoint in pack["FramePackModelLoader"].INPUT_TYPES()["required"]["model_name"][1]["options"]
    model = load_model(pack, checkpoint)
    assert isinstance(model, ModelPatcher)
    transformer = model.model.diffusion_model
    assert (transformer.config.num_layers, transformer.config.text_dim) == (TINY.num_layers, TINY.text_dim)

    schedule, report = make_schedule(pack)
    assert f"{SECTIONS} sections, {PIXEL_FRAMES} frames" in report

    # the start latent comes from ComfyUI's own VAEEncode with the HunyuanVideo VAE
    image = torch.rand(1, 8 * H, 8 * W, 3, generator=torch.Generator().manual_seed(3))
    encoded = run(comfy.nodes.NODE_CLASS_MAPPINGS["VAEEncode"], pixels=image, vae=vae)[0]
    assert encoded["samples"].shape == (1, 16, 1, H, W)

    # progress and latent previews go through ComfyUI's hook, as in the UI
    updates = []
    previous_hook, previous_preview = comfy_utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append(
        (value, total, preview)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        latent = sample(pack, model, start_latent=encoded, schedule=schedule)
    finally:
        comfy_utils.set_progress_bar_global_hook(previous_hook)
        args.preview_method = previous_preview
    assert updates[-1][:2] == (SECTIONS * STEPS, SECTIONS * STEPS)
    assert len(updates) == SECTIONS * STEPS and all(u[2] is not None and u[2][0] == "JPEG" for u in updates)

    samples = latent["samples"]
    assert samples.shape == (1, 16, LATENT_FRAMES, H, W)
    assert torch.isfinite(samples).all()
    assert (latent["framepack_mode"], latent["framepack_window"]) == ("inverted", WINDOW)
    decode = sys.modules[pack["FramePackDecode"].__module__]  # the boundaries derive from mode, window, length
    assert decode.sections_of(latent, 9)[1:] == ("inverted", WINDOW, [(0, 1 + WINDOW), (1 + WINDOW, LATENT_FRAMES)])
    # frame 0 is the start latent, handed back unscaled
    torch.testing.assert_close(samples[:, :, :1], encoded["samples"].float())

    again = sample(pack, model, start_latent=encoded, schedule=schedule)
    assert torch.equal(again["samples"], samples), "same seed must give the same video"
    other = sample(pack, model, start_latent=encoded, schedule=schedule, seed=8)
    assert not torch.allclose(other["samples"], samples)

    frames = run(pack["FramePackDecode"], samples=latent, vae=vae)[0]
    assert frames.shape == (PIXEL_FRAMES, 8 * H, 8 * W, 3)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    assert frames.std() > 0.01, "random VAE weights should still give varied pixels"
    # the first clip is the whole inverted video, decoded by ComfyUI's VAE; its head is kept as is,
    # and the last frame is the last clip's alone (cross-fade weight 0 for the earlier clip)
    clip0 = vae.decode(samples[:, :, :LATENT_FRAMES])[0]
    head = PIXEL_FRAMES - (4 * WINDOW - 3)
    torch.testing.assert_close(frames[:head], clip0[:head])
    last = vae.decode(samples[:, :, 1 + WINDOW:])[0]
    torch.testing.assert_close(frames[-1], last[-1])

    import av

    cls = pack["FramePackDecodeToVideo"]
    out = run(cls, **{**node_defaults(cls), "samples": latent, "vae": vae, "filename_prefix": "e2e/framepack"})
    path = out.result[0]
    assert os.path.isfile(path) and path.endswith(".mp4")
    assert out.ui["images"][0]["filename"] in path
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == PIXEL_FRAMES
    assert decoded[0].shape == (8 * H, 8 * W, 3)
    # lossy H.264 of noise: only a loose check that the file holds these frames
    mean_error = (torch.from_numpy(decoded[-1]).float() / 255 - frames[-1]).abs().mean()
    assert mean_error < 0.15


def test_forward_f1_schedule_generates_and_decodes(pack, checkpoint, vae):
    model = load_model(pack, checkpoint)
    schedule = make_schedule(pack, mode="forward")[0]
    latent = sample(pack, model, schedule=schedule)
    assert latent["samples"].shape == (1, 16, LATENT_FRAMES, H, W)
    assert latent["framepack_mode"] == "forward"
    decode = sys.modules[pack["FramePackDecode"].__module__]
    assert decode.sections_of(latent, 9)[1:] == ("forward", WINDOW, [(1, 1 + WINDOW), (1 + WINDOW, LATENT_FRAMES)])
    frames = run(pack["FramePackDecode"], samples=latent, vae=vae)[0]
    assert frames.shape == (PIXEL_FRAMES, 8 * H, 8 * W, 3)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


# ---------------------------------------------------------------------------------------------
# 2. ComfyUI's stock LoRA loader


def lora_targets():
    return {"transformer_blocks.0.attn.to_q": "generic", "transformer_blocks.1.ff.net.0.proj": "kohya",
            "single_transformer_blocks.0.attn.to_k": "generic", "single_transformer_blocks.1.proj_mlp": "kohya"}


def patched_keys(targets):
    return {f"diffusion_model.{m}.weight" for m in targets}


def test_stock_lora_loader_changes_the_output(comfy, pack, checkpoint):
    lora_loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]
    targets = lora_targets()
    write_lora(comfy.models / "loras" / "e2e_lora.safetensors", targets, seed=1)
    write_lora(comfy.models / "loras" / "e2e_zero_lora.safetensors", targets, zero=True)

    model = load_model(pack, checkpoint)
    base = sample(pack, model)["samples"]

    lora_model = run(lora_loader, model=model, lora_name="e2e_lora.safetensors", strength_model=1.0)[0]
    # keys in both of ComfyUI's formats ("diffusion_model.<name>", "lora_unet_<name_with_underscores>") map
    assert set(lora_model.patches) == patched_keys(targets), "every LoRA key must map onto the model's weights"
    with_lora = sample(pack, lora_model)["samples"]
    assert torch.isfinite(with_lora).all()
    assert (with_lora - base).abs().max() > 1e-3, "the LoRA did not change the output"

    # the LoRA lives on the clone only: the base model samples as before
    assert torch.equal(sample(pack, model)["samples"], base)
    # strength 0 and an all-zero LoRA change nothing
    off = run(lora_loader, model=model, lora_name="e2e_lora.safetensors", strength_model=0.0)[0]
    assert torch.equal(sample(pack, off)["samples"], base)
    zero = run(lora_loader, model=model, lora_name="e2e_zero_lora.safetensors", strength_model=1.0)[0]
    assert set(zero.patches) == patched_keys(targets)
    torch.testing.assert_close(sample(pack, zero)["samples"], base, rtol=0, atol=1e-6)
    # and the same LoRA again reproduces its own result
    assert torch.equal(sample(pack, lora_model)["samples"], with_lora)


# ---------------------------------------------------------------------------------------------
# 3. partial ("low VRAM") loading


def generate_like_the_sampler_node(pack, model, inputs):
    """What FramePackSampler.sample does after its ``load_models_gpu`` call, on an already loaded MODEL.

    On a CPU-only ComfyUI, ``load_models_gpu`` always loads a model completely (the CPU device has no
    low-VRAM state), which would undo a partial load made beforehand; so the partial path is driven here
    through ComfyUI's own loading API and the pack's engine is called as the node calls it.
    """

    node = sys.modules[pack["FramePackSampler"].__module__]  # the pack's nodes/sampler.py, as ComfyUI loaded it
    transformer = model.model.diffusion_model
    config, scale = transformer.config, model.model.latent_format.scale_factor
    schedule = inputs["schedule"]
    settings = node.SamplingSettings(
        steps=inputs["steps"], seed=inputs["seed"], distilled_guidance=inputs["distilled_guidance"],
        cfg=inputs["cfg"], cfg_rescale=inputs["cfg_rescale"], shift=inputs["shift"] or None,
        sampler=inputs["sampler"], teacache_threshold=inputs["teacache"] or None)
    result = node.generate(
        transformer, schedule.build(config.clean_kernels), node.video_latent(inputs["start_latent"], "start", scale),
        node.image_embeddings(inputs["start_image_embeds"], "start", config),
        node.prompt_from_conditioning(inputs["positive"], "positive", config), None, settings,
        fps=schedule.fps, device=model.load_device)
    return result.latents / scale


def test_partial_lowvram_load_gives_the_full_load_result(comfy, pack, checkpoint):
    import comfy.model_management as mm
    from comfy.model_patcher import LowVramPatch

    lora_loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]
    targets = {}
    for block in range(TINY.num_layers):
        for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "norm1.linear"):
            targets[f"transformer_blocks.{block}.{layer}"] = "generic" if block % 2 == 0 else "kohya"
    for block in range(TINY.num_single_layers):
        for layer in ("attn.to_q", "proj_mlp", "proj_out"):
            targets[f"single_transformer_blocks.{block}.{layer}"] = "kohya"
    write_lora(comfy.models / "loras" / "e2e_lora_many.safetensors", targets, seed=2, scale=0.3)

    def lora_model():
        model = load_model(pack, checkpoint)
        return run(lora_loader, model=model, lora_name="e2e_lora_many.safetensors", strength_model=1.0)[0]

    # reference: the sampler node; on the CPU ComfyUI loads the whole model and merges the LoRA into it
    full = lora_model()
    inputs = sampler_inputs(pack, full)
    reference = run(pack["FramePackSampler"], **inputs)[0]["samples"]
    assert not full.model.model_lowvram and full.loaded_size() == full.model_size()
    assert torch.equal(generate_like_the_sampler_node(pack, full, inputs), reference)

    # partial: a fresh copy loaded the way load_models_gpu loads a model that does not fit in VRAM
    partial = lora_model()
    budget = partial.model_size() // 2
    loaded = mm.LoadedModel(partial)
    loaded.model_load(lowvram_model_memory=budget)
    try:
        transformer = partial.model.diffusion_model
        assert partial.model.model_lowvram, "ComfyUI did not load the model partially"
        assert 0 < partial.loaded_size() <= budget < partial.model_size()
        layers = [m for m in transformer.modules() if hasattr(m, "comfy_cast_weights")]
        offloaded = [m for m in layers if m.comfy_cast_weights]
        assert 0 < len(offloaded) < len(layers)
        # LoRA patches: merged into the weights of loaded layers, applied on the fly (LowVramPatch) in the others
        streamed = [n for n in targets
                    if any(isinstance(f, LowVramPatch) for f in transformer.get_submodule(n).weight_function)]
        merged = [n for n in targets if f"diffusion_model.{n}.weight" in partial.backup]
        assert streamed and merged and sorted(streamed + merged) == sorted(targets), (streamed, merged)
        assert all(transformer.get_submodule(n).comfy_cast_weights for n in streamed)
        result = generate_like_the_sampler_node(pack, partial, inputs)
    finally:
        loaded.model_unload()
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. mistakes surface as clear errors


def lookalike_checkpoint(kind):
    """Header-faithful stand-ins for files people put in diffusion_models by mistake (tiny tensors)."""
    from framepack_core.synthetic import random_state_dict

    z = torch.zeros
    if kind == "sdxl":
        return {"model.diffusion_model.input_blocks.0.0.weight": z(320, 4, 3, 3),
                "model.diffusion_model.input_blocks.0.0.bias": z(320),
                "model.diffusion_model.out.2.weight": z(4, 320, 3, 3),
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": z(1, 77)}
    if kind == "hunyuan_original":
        return {"img_in.proj.weight": z(3072, 16, 1, 2, 2), "double_blocks.0.img_attn_qkv.weight": z(9216, 8),
                "single_blocks.0.linear1.weight": z(21504, 8), "final_layer.linear.weight": z(64, 8)}
    if kind == "hunyuan_diffusers_t2v":  # diffusers HunyuanVideo without FramePack's extra embedders
        return {k: v for k, v in random_state_dict(TINY).items()
                if not k.startswith(("clean_x_embedder.", "image_projection."))}
    raise ValueError(kind)


@pytest.mark.parametrize("kind, message", [
    ("sdxl", "looks like a Stable Diffusion / SDXL UNet"),
    ("hunyuan_original", "looks like an original-format HunyuanVideo transformer"),
    ("hunyuan_diffusers_t2v", "the base text-to-video model, not FramePack"),
], ids=["sdxl", "hunyuan_original", "hunyuan_diffusers_t2v"])
def test_loader_says_what_a_wrong_file_is(comfy, pack, kind, message):
    from safetensors.torch import save_file

    name = f"e2e_not_framepack_{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in lookalike_checkpoint(kind).items()},
              str(comfy.models / "diffusion_models" / name))
    with pytest.raises(ValueError, match=message) as error:
        load_model(pack, name)
    assert name in str(error.value)


@pytest.fixture(scope="module")
def tiny_model(pack, checkpoint):
    return load_model(pack, checkpoint)


@pytest.mark.parametrize("overrides, message", [
    ({"end_latent": {"samples": torch.zeros(1, 16, 1, H, W + 2)}}, r"end_latent is \(2, 6\).*same resolution"),
    ({"start_image_embeds": None}, "start image embeddings are missing: encode the image with CLIPVisionEncode"),
    ({"start_image_embeds": "vit_h"}, f"start image embeddings are 1280 wide but the model expects {TINY.image_dim}"),
    ({"positive": "sd15"}, "positive conditioning is not HunyuanVideo text.*DualCLIPLoader type 'hunyuan_video'"),
    ({"positive": "sd3"}, "positive conditioning is not HunyuanVideo text.*DualCLIPLoader type 'hunyuan_video'"),
    ({"start_latent": {"samples": torch.zeros(1, 4, H, W)}}, "start_latent is not a video latent"),
    ({"start_latent": {"samples": torch.zeros(1, 16, 2, H, W)}}, "start_latent has 2 latent frames"),
    ({"start_image_embeds": "two_images"}, "start image embeddings hold 2 images; encode a single image"),
    ({"positive": "two_prompts"}, "positive conditioning holds a batch of 2 prompts"),
], ids=["end_latent_size", "no_image_embeds", "vit_h_embeds", "sd15_text", "sd3_pooled", "image_latent",
        "two_frame_start", "image_batch", "prompt_batch"])
def test_sampler_input_errors(pack, tiny_model, overrides, message):
    # ComfyUI conditioning from other text encoders: SD1.5 CLIP-L (768 wide), and one whose states have the
    # right width but whose pooled vector does not (as SD3's 4096-wide T5 states with a 2048 pooled vector)
    special = {"sd15": conditioning(width=768, pooled=768), "sd3": conditioning(pooled=TINY.pooled_dim * 2),
               "vit_h": vision_output(tokens=257, width=1280)}
    special["two_images"] = vision_output()
    special["two_images"]["last_hidden_state"] = special["two_images"]["last_hidden_state"].repeat(2, 1, 1)
    special["two_prompts"] = [[t.repeat(2, 1, 1), {"pooled_output": e["pooled_output"].repeat(2, 1)}]
                              for t, e in conditioning()]
    overrides = {k: special.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=message):
        sample(pack, tiny_model, **overrides)


def test_non_finite_values_stop_the_sampler_with_the_engine_message(comfy, pack, tiny_model):
    """A corrupt checkpoint (one NaN weight) and NaN conditioning: the node raises the engine's error, which
    ComfyUI shows, instead of returning a black video."""
    from framepack_core.checks import NonFiniteError
    from framepack_core.synthetic import random_state_dict, save_single_file

    state = random_state_dict(TINY, seed=0)
    state["transformer_blocks.1.ff.net.2.weight"][0, 0] = float("nan")
    save_single_file(comfy.models / "diffusion_models" / "e2e_nan_weight.safetensors", state)
    corrupt = load_model(pack, "e2e_nan_weight.safetensors")
    with pytest.raises(FloatingPointError, match=rf"section 1 of {SECTIONS} \(video section 1\), step 1 of {STEPS}"
                       r".*transformer_blocks.1.ff.net.2.weight contains NaN.*Download it again") as error:
        sample(pack, corrupt)
    assert type(error.value).__name__ == NonFiniteError.__name__  # the pack's copy of the class, as ComfyUI loaded it

    nan_text = conditioning()
    nan_text[0][1]["pooled_output"][0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"positive conditioning \(pooled vector\) contains NaN or inf.*bf16 or fp32"):
        sample(pack, tiny_model, positive=nan_text)
