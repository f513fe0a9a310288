"""The anti-drift sampler node: a whole FramePack generation from ComfyUI's standard inputs."""

import dataclasses
import logging
import os

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from ..framepack_core.cache import FRAMEPACK_MAG_RATIOS, MagCache, TeaCache, load_calibration
from ..framepack_core.checks import check_image_embeddings, check_latent, check_prompt
from ..framepack_core.model import section_memory_bytes
from ..framepack_core.pipeline import Prompt, SamplingSettings, TimedPrompt, generate, prepare_inputs
from ..framepack_core.sampling import SAMPLERS, denoised_steps
from .comfy_compat import combo_input
from .keyframe import Keyframes
from .multigpu import CFGSplit, negative_work_unit
from .resume import model_identity, resume_store
from .schedule import Schedule
from .timed_prompt import TimedPrompts

# MagCache calibrations (JSON) live in models/framepack_magcache/ (more folders via extra_model_paths.yaml)
MAGCACHE_FOLDER = "framepack_magcache"
if MAGCACHE_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[MAGCACHE_FOLDER] = ([os.path.join(folder_paths.models_dir, MAGCACHE_FOLDER)],
                                                            {".json"})
BUILTIN_RATIOS = "FramePack-Studio (built-in)"


def prompt_from_conditioning(conditioning, name, config=None):
    """Our Prompt from ComfyUI CONDITIONING ([[hidden states, {"pooled_output": ...}]]), checked against the model
    when ``config`` is given (the core checks a negative prompt itself, only when CFG runs it)."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty.")
    if len(conditioning) != 1:
        raise ValueError(f"{name} conditioning has {len(conditioning)} entries (combined prompts); FramePack takes "
                         "one prompt per range: use FramePack Timed Prompt for prompts that change over time.")
    text, extras = conditioning[0]
    pooled = extras.get("pooled_output")
    prompt = Prompt(text.float(), None if pooled is None else pooled.float(), extras.get("attention_mask"))
    if config is not None:
        check_prompt(f"{name} conditioning", prompt, config)
    return prompt


def image_embeddings(clip_vision_output, name, config):
    if clip_vision_output is None:
        raise ValueError(f"{name} image embeddings are missing: encode the image with CLIPVisionEncode using "
                         "sigclip_vision_patch14_384.")
    states = clip_vision_output["last_hidden_state"].float()
    check_image_embeddings(f"{name} image embeddings", states, config)
    return states


def video_latent(latent, name, scale, config=None, frames=None):
    """Model-space latent (1, C, T, h, w) from a ComfyUI LATENT, checked against the model."""
    samples = latent["samples"]
    check_latent(name, samples, config, frames=frames)
    return samples.float() * scale


# wrapper types ComfyUI runs around its own sampling loop, outside any transformer call
SAMPLER_WRAPPERS = [getattr(comfy.patcher_extension.WrappersMP, name) for name in
                    ("OUTER_SAMPLE", "PREPARE_SAMPLING", "SAMPLER_SAMPLE", "PREDICT_NOISE", "CALC_COND_BATCH")
                    if hasattr(comfy.patcher_extension.WrappersMP, name)]


def patched_model_call(model):
    """(model_call, transformer_options) that run each transformer call as ComfyUI's samplers do.

    The options are the MODEL's ``transformer_options`` (block patches, attention override) with its
    wrappers and callbacks merged in; each call goes through ``BaseModel.apply_model``, so the
    ``APPLY_MODEL`` and ``DIFFUSION_MODEL`` wrappers (TorchCompileModel's among them) run around it.
    Wrappers of ComfyUI's sampling loop (``SAMPLER_WRAPPERS``) cannot run here and are refused by name.
    """
    options = comfy.model_patcher.create_model_options_clone(model.model_options).get("transformer_options", {})
    for kind in ("wrappers", "callbacks"):
        comfy.patcher_extension.merge_nested_dicts(options.setdefault(kind, {}), getattr(model, kind),
                                                   copy_dict1=False)
    sampler_level = sorted(f"{kind} ({key})" for kind in SAMPLER_WRAPPERS
                           for key in options["wrappers"].get(kind, {}))
    if sampler_level:
        raise ValueError(f"This MODEL carries ComfyUI sampler wrappers that only ComfyUI's own samplers (KSampler, "
                         f"SamplerCustom) run: {', '.join(sampler_level)}, e.g. from EasyCache or LazyCache. FramePack "
                         "samples section by section itself and cannot run them: remove that node (for step caching "
                         "use FramePack Sampler's cache input).")
    base = model.model

    def model_call(hidden_states, timestep, transformer_options, **inputs):
        return base.apply_model(hidden_states, transformer_options["sigmas"], transformer_options=transformer_options,
                                timestep=timestep, **inputs)

    return model_call, options


def sampler_inputs():
    """FramePack Sampler's inputs, required then optional (FramePack MagCache Calibrate reuses them)."""
    return [
        io.Model.Input("model", tooltip="From FramePack Model Loader (FramePackI2V_HY for inverted, F1 for forward)."),
        io.Conditioning.Input("positive", tooltip="Prompt encoded by CLIPTextEncode with DualCLIPLoader "
                              "(hunyuan_video)."),
        io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg is not 1."),
        io.ClipVisionOutput.Input("start_image_embeds", tooltip="CLIPVisionEncode of the start image with "
                                  "sigclip_vision_patch14_384."),
        io.Latent.Input("start_latent", tooltip="VAEEncode of the start image (HunyuanVideo VAE)."),
        Schedule.Input("schedule", tooltip="From FramePack Schedule: length, order and context."),
        io.Int.Input("steps", default=25, min=1, max=200, tooltip="Sampling steps per section."),
        io.Int.Input("seed", default=31337, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="One seed for the whole video; the same seed gives the same video."),
        io.Float.Input("distilled_guidance", default=10.0, min=0.0, max=32.0, step=0.1,
                       tooltip="Embedded (distilled) guidance scale; 10 is the original's default."),
        io.Float.Input("cfg", default=1.0, min=1.0, max=32.0, step=0.1, tooltip="Real classifier-free guidance; "
                       "above 1 it also runs the negative prompt (twice the time)."),
        io.Float.Input("cfg_rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Rescale guided predictions toward the positive's std (counters burn)."),
        io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="Sigma shift; "
                       "0 derives it from the section's token count, as the original does."),
        combo_input("sampler", options=list(SAMPLERS), default="unipc_bh1",
                    tooltip="unipc_bh1 is the original's sampler."),
        io.Float.Input("teacache", default=0.15, min=0.0, max=1.0, step=0.01, tooltip="TeaCache threshold: skips "
                       "steps whose input barely changed. 0.15 about 2x faster, 0.1 about 1.6x; 0 turns it off (best "
                       "hands and fine detail)."),
        io.ClipVisionOutput.Input("end_image_embeds", optional=True, tooltip="End image's CLIPVisionEncode: each "
                                  "section's image embedding moves from the start's to the end's."),
        io.Latent.Input("end_latent", optional=True, tooltip="End image's VAEEncode (inverted mode): the video leads "
                        "into it."),
        Keyframes.Input("keyframes", optional=True, tooltip="From FramePack Keyframe (inverted mode)."),
        TimedPrompts.Input("timed_prompts", optional=True, tooltip="From FramePack Timed Prompt: prompts per time "
                           "range."),
        io.Latent.Input("extend_latent", optional=True, tooltip="A video's latents to continue (VAEEncode of its "
                        "frames). Forward mode continues after it; inverted starts from its last frame."),
        *cache_inputs(),
        io.Boolean.Input("resume", optional=True, default=True, tooltip="Save the generation after every section in "
                         "output/framepack_resume/, so queueing the same generation again after a cancel, an "
                         "out-of-memory error or a crash continues after the last finished section (the same video "
                         "as an uninterrupted run). The state is deleted when the video is done."),
        io.Latent.Input("guide_latent", optional=True, tooltip="Video-to-video: VAEEncode of a guide video "
                        "(bucketed to the start image's size, at least as long as the output). Each section starts "
                        "from its part of it, re-noised by denoise, so its motion and layout carry over."),
        io.Float.Input("denoise", optional=True, default=1.0, min=0.0, max=1.0, step=0.01, tooltip="With "
                       "guide_latent: the share of steps re-done (1: ignore the guide, like no guide; about 0.6-0.8 "
                       "keeps the motion, lower stays closer to the guide)."),
    ]


class FramePackSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackSampler",
            display_name="FramePack Sampler",
            category="FramePack",
            description=("Generates a video section by section with FramePack: the start image conditions every "
                         "section through packed 1x/2x/4x context, sampled in the schedule's order."),
            inputs=sampler_inputs(),
            outputs=[io.Latent.Output(tooltip="The video latents (start frame first). They carry their mode and "
                                      "window, from which FramePack Decode derives the section boundaries.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, start_image_embeds, start_latent, schedule, steps, seed,
                distilled_guidance, cfg, cfg_rescale, shift, sampler, teacache, end_image_embeds=None,
                end_latent=None, keyframes=None, timed_prompts=None, extend_latent=None, cache="teacache",
                magcache_calibration=BUILTIN_RATIOS, magcache_threshold=0.1, magcache_max_skips=2,
                magcache_retention=0.25, cfg_batch="auto", resume=True, guide_latent=None, denoise=1.0):
        unloaded = model.get_model_object("diffusion_model")
        config, fmt = unloaded.config, model.model.latent_format
        plan = schedule.build(config.clean_kernels)
        scale = fmt.scale_factor
        step_cache = make_step_cache(cache, teacache, magcache_calibration, magcache_threshold, magcache_max_skips,
                                     magcache_retention, plan.mode)
        settings = SamplingSettings(steps=steps, seed=seed, distilled_guidance=distilled_guidance, cfg=cfg,
                                    cfg_rescale=cfg_rescale, shift=shift or None, sampler=sampler, cache=step_cache,
                                    denoise=denoise)
        inputs = dict(
            start_latent=video_latent(start_latent, "start_latent", scale, config, 1),
            image_embeddings=image_embeddings(start_image_embeds, "start", config),
            prompt=prompt_from_conditioning(positive, "positive", config),
            negative=prompt_from_conditioning(negative, "negative"),
            end_latent=None if end_latent is None else video_latent(end_latent, "end_latent", scale, config, 1),
            end_image_embeddings=None if end_image_embeds is None else image_embeddings(end_image_embeds, "end", config),
            keyframes={k: v * scale for k, v in (keyframes or {}).items()},
            timed_prompts=[TimedPrompt(prompt_from_conditioning(c, "timed", config), a, b, *blend)
                           for c, a, b, *blend in (timed_prompts or [])],
            extend_latents=None if extend_latent is None else video_latent(extend_latent, "extend_latent", scale, config),
            guide_latents=None if guide_latent is None else video_latent(guide_latent, "guide_latent", scale, config))
        # every input is checked (and the start resolved) before the model is loaded onto the GPU
        start = prepare_inputs(config, plan, settings, fps=schedule.fps, **inputs).start_latent
        height, width = start.shape[-2:]
        tokens = plan.token_budget(height, width).total_tokens
        memory = lambda batch: section_memory_bytes(config, tokens, unloaded.compute_dtype, batch=batch)  # noqa: E731
        model_call, transformer_options = patched_model_call(model)
        unit = negative_work_unit(model, cfg)  # MultiGPU CFG Split: the device that runs the negative prompt
        patchers = [model] + ([unit] if unit else [])
        mm.load_models_gpu(patchers, memory_required=memory(1))
        transformer = model.get_model_object("diffusion_model")  # read again once loaded, object patches applied
        # with a work unit, CFGSplit runs the two halves of each batched call on the two devices
        batched = unit is not None or (
            cfg != 1.0 and choose_cfg_batch(cfg_batch, mm.get_free_memory(model.load_device), memory(2)))
        settings = dataclasses.replace(settings, cfg_batch=batched)
        section_steps = steps if inputs["guide_latents"] is None else max(denoised_steps(steps, denoise), 1)
        total = len(plan) * section_steps
        pbar = comfy.utils.ProgressBar(total)
        previewer = latent_preview.get_previewer(model.load_device, fmt)

        def on_step(section, sections, step, section_steps, x0):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            pbar.update_absolute(section * section_steps + step + 1, total, preview)

        for patcher in patchers:
            patcher.pre_run()  # as ComfyUI's samplers do: current_patcher and ON_PRE_RUN callbacks
        saved = SavedSections(resume_store(), len(plan)) if resume else None
        if unit is not None:
            model_call = CFGSplit(model_call, patched_model_call(unit)[0], unit.load_device)
        try:
            result = generate(transformer, plan, settings=settings, fps=schedule.fps, on_step=on_step,
                              interrupt=mm.throw_exception_if_processing_interrupted, device=model.load_device,
                              model_call=model_call, transformer_options=transformer_options,
                              resume_from=saved and saved.load, on_state=saved and saved.save,
                              weights_identity=saved and model_identity(model), **inputs)
        except BaseException as e:
            if saved is not None:
                saved.report_stop(e)
            raise
        finally:
            for patcher in patchers:
                patcher.cleanup()
            if unit is not None:
                model_call.close()
        if saved is not None:
            saved.store.delete(result.fingerprint)
        # FramePack Decode derives the section boundaries from the mode, the window and the length
        return io.NodeOutput({"samples": result.latents / scale, "framepack_mode": result.mode,
                              "framepack_window": result.window})


def magcache_files():
    return [BUILTIN_RATIOS] + folder_paths.get_filename_list(MAGCACHE_FOLDER)


def cache_inputs():
    """The sampler's optional cache inputs (the calibration list is read when ComfyUI asks for the inputs)."""
    return [
        combo_input("cache", optional=True, options=["teacache", "magcache", "none"], default="teacache",
                    tooltip="Step cache: teacache uses the teacache threshold above; magcache skips steps by "
                    "calibrated magnitude ratios (about 2x at 0.1); none computes every step."),
        combo_input("magcache_calibration", optional=True, options=magcache_files(), default=BUILTIN_RATIOS,
                    tooltip="Per-step magnitude ratios: FramePack-Studio's published ones for the FramePack / F1 "
                    "weights, or a JSON file from FramePack MagCache Calibrate in models/framepack_magcache/. "
                    "Other step counts are rescaled."),
        io.Float.Input("magcache_threshold", optional=True, default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="MagCache error budget while skipping; higher is faster, 0 never skips."),
        io.Int.Input("magcache_max_skips", optional=True, default=2, min=1, max=10,
                     tooltip="MagCache: most steps skipped in a row."),
        io.Float.Input("magcache_retention", optional=True, default=0.25, min=0.0, max=1.0, step=0.01,
                       tooltip="MagCache: share of the first steps that always compute (they set the layout)."),
        combo_input("cfg_batch", optional=True, options=["auto", "batched", "sequential"], default="auto",
                    tooltip="With cfg above 1: run the positive and negative prompt as one batch (faster, twice "
                    "the activation memory) or one after the other. auto batches when the free memory holds it."),
    ]


def make_step_cache(choice, teacache, calibration, threshold, max_skips, retention, mode):
    """The cache strategy for the sampler's inputs (a strategy object passes through)."""
    if not isinstance(choice, str):
        return choice
    if choice == "none":
        return None
    if choice == "teacache":  # as before the cache input existed: the teacache threshold, 0 = off
        return TeaCache(teacache) if teacache else None
    if choice != "magcache":
        raise ValueError(f"Unknown cache {choice!r}; choose teacache, magcache or none.")
    if calibration == BUILTIN_RATIOS:
        ratios = FRAMEPACK_MAG_RATIOS[mode]
    else:
        path = folder_paths.get_full_path(MAGCACHE_FOLDER, calibration)
        if path is None:
            raise ValueError(f"MagCache calibration {calibration!r} is not in models/{MAGCACHE_FOLDER}/; make one "
                             "with FramePack MagCache Calibrate or pick the built-in ratios.")
        ratios = load_calibration(path)
    return MagCache(threshold, max_skips=max_skips, retention=retention, ratios=ratios)


def choose_cfg_batch(choice, free_bytes, batched_bytes):
    """Batch positive and negative when asked, or (auto) when the free memory holds a batch of 2."""
    if choice not in ("auto", "batched", "sequential"):
        raise ValueError(f"Unknown cfg_batch {choice!r}; choose auto, batched or sequential.")
    batched = choice == "batched" or (choice == "auto" and free_bytes >= batched_bytes)
    logging.info("[FramePack] CFG %s (free %.0f MiB, a batch of 2 needs %.0f MiB)",
                 "batched" if batched else "sequential", free_bytes / 2**20, batched_bytes / 2**20)
    return batched
class SavedSections:
    """The sampler's resume states in ``store``: loads and saves them, and says what is saved when a run stops."""

    def __init__(self, store, num_sections):
        self.store, self.num_sections, self.sections = store, num_sections, 0

    def load(self, fingerprint):
        state = self.store.load(fingerprint)
        self.sections = 0 if state is None else state.sections_done
        return state

    def save(self, state):
        if not state.finished:  # the finished video is returned and its state deleted at once
            self.store.save(state)
            self.sections = state.sections_done

    def report_stop(self, error):
        stopped = "cancelled" if isinstance(error, mm.InterruptProcessingException) else "stopped by an error"
        if self.sections:
            logging.warning("[FramePack] generation %s: %d of %d sections are saved in %s. Queue the same "
                            "generation again to resume after section %d.", stopped, self.sections,
                            self.num_sections, self.store.folder, self.sections)
        else:
            logging.warning("[FramePack] generation %s before its first section finished; nothing is saved to "
                            "resume.", stopped)
