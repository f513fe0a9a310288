"""The section loop: a whole FramePack generation, section by section, from a start latent.

Latents here are in the model's space (ComfyUI's HunyuanVideo latents times 0.476986). Per-section
layouts come from a packing schedule (packing.py); each section is sampled by a pluggable
``sample_section`` step, by default the flow-matching samplers (sampling.py) driving the transformer.
One CPU generator, seeded once, draws every section's noise in sampling order, as the original does,
so the same seed gives the same video.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from .cache import TeaCache
from .checks import (NonFiniteError, StepCheck, check_image_embeddings, check_latent, check_prompt, check_settings,
                     diagnose)
from .packing import pixel_frames, section_ranges
from .prompts import section_prompts
from .resume import STATE_FORMAT, Fingerprint, GenerationState, weights_digest
from .sampling import make_flow_denoiser, noise_to_sigma, sample, sigma_schedule, truncate_sigmas

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 512  # the original pads/crops the LLM hidden states to this length
VAE_SCALE = 8  # the HunyuanVideo VAE: one latent pixel per 8x8 image pixels (for sizes in messages)


@dataclass(frozen=True)
class Prompt:
    """One encoded prompt: LLM hidden states (1, N, text_dim), pooled CLIP-L (1, pooled_dim), mask (1, N)."""

    text: torch.Tensor
    pooled: torch.Tensor
    mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TimedPrompt:
    """A prompt for the sections that start within [start, end) seconds of the video; the change to and from
    it is blended over ``blend_sections`` sections (see prompts.py)."""

    prompt: Prompt
    start: float
    end: float
    blend_sections: int = 0


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 25
    seed: int = 0
    distilled_guidance: float = 10.0
    cfg: float = 1.0  # real CFG (negative prompt evaluated) only when != 1
    cfg_rescale: float = 0.0
    shift: Optional[float] = None  # None: from the section's token count, as the original
    sampler: str = "unipc_bh1"
    teacache_threshold: Optional[float] = None  # None: TeaCache off; 0.15 is the original's setting (= cache=TeaCache(t))
    cache: object = None  # a step-cache strategy (cache.TeaCache / cache.MagCache), fresh state per section and stream
    cfg_batch: bool = True  # with real CFG, run positive and negative as one batch of 2 (False: one after the other)
    denoise: float = 1.0  # with guide latents (video-to-video): the share of each section's steps sampled


@dataclass
class GenerationResult:
    latents: torch.Tensor  # (1, C, T, H, W) in temporal order; frame 0 is the start latent
    sections: list = field(default_factory=list)  # (start, stop) latent frames per section, temporal order (decode plan)
    mode: str = "inverted"
    window: int = 9
    fingerprint: Optional[str] = None  # the generation's fingerprint, when resume_from or on_state was given


def generate(model, schedule, start_latent, image_embeddings, prompt, negative=None, settings=SamplingSettings(),
             *, end_latent=None, end_image_embeddings=None, keyframes=None, timed_prompts=(),
             extend_latents=None, guide_latents=None, fps=30.0, sample_section=None, on_step=None, on_section=None,
             interrupt=None, device=None, model_call=None, transformer_options=None, resume_from=None, on_state=None,
             weights_identity=None):
    """Generate a video's latents section by section.

    The transformer runs in the model's own ``compute_dtype`` (see ``compute_dtype``).
    start_latent: (1, C, 1, H, W). image_embeddings: SigLIP last_hidden_state (1, 729, 1152) of the start
    image. prompt / negative: ``Prompt``s (negative is needed only when settings.cfg != 1).
    end_latent: inverted mode only; guides the temporally last section toward this frame.
    end_image_embeddings: with it, each section's image embedding moves linearly from the start's (first
        section) to the end's (last section).
    keyframes: {video section index: latent (1, C, 1, H, W)} (inverted mode): the section is sampled with
        the keyframe as the frame right after its window, so it leads into that image.
    timed_prompts: ``TimedPrompt``s; a section whose start time falls in a range uses that prompt
        (blended with its neighbour over ``blend_sections`` sections, see ``prompts.section_prompts``).
    extend_latents: (1, C, T, H, W) video to continue. Forward mode keeps it as history (start_latent
        defaults to its first frame); inverted mode starts from its last frame and appends after it, so a
        start_latent given as well is not used (logged).
    guide_latents: (1, C, T, H, W) a video to follow (video-to-video), frame 0 aligned with the start
        frame, at least 1 + sections * window frames (extra frames are not used). Each section starts from
        its own slice of it, re-noised to the sigma ``settings.denoise`` selects (see ``truncate_sigmas``),
        with the same noise draws as ordinary generation, and samples only the remaining steps.
    sample_section(noise, positive, negative, on_step, interrupt) -> latents: replaces the default
        sampler (``DefaultSectionSampler``); positive/negative are the transformer's keyword arguments.
        With guide_latents it is also given ``guide=`` (the section's slice, model space).
    on_step(section_position, num_sections, step, steps, x0): after every sampler step.
    on_section(section, video_latents_so_far): after every section. interrupt(): raises to stop.
    device: where the transformer runs (default: where its first weight is; pass it when the model is
        partially loaded, e.g. by ComfyUI's low-VRAM mode).
    model_call, transformer_options: how a host routes transformer calls through its own machinery
        (ComfyUI: wrappers and patches). model_call(hidden_states=, timestep=, transformer_options=,
        **inputs) -> velocity replaces calling ``model`` directly; transformer_options (a dict) goes to
        every call with "sample_sigmas" (the section's schedule), "sigmas" and "cond_or_uncond" added.
    on_state(GenerationState): after every section, the state to resume from (resume.py); save it with
        ``resume.save_state`` or a ``ResumeStore``.
    resume_from: a ``GenerationState``, or a function fingerprint -> state or None (e.g. ``store.load``).
        A state with this generation's fingerprint continues after its last section, bit-identical to a run
        that was never interrupted; any other state is ignored (fresh start). on_section and on_step are
        not called for the sections it skips.
    weights_identity: str or bytes naming the weights (file, dtype, LoRA patches) for the fingerprint;
        default: ``resume.weights_digest(model)``, a sampled hash. A custom sample_section's behaviour is
        not fingerprinted: put what it depends on into weights_identity.
    """
    mode, window = schedule.mode, schedule.window
    inputs = prepare_inputs(getattr(model, "config", None), schedule, settings, start_latent, image_embeddings,
                            prompt, negative, end_latent=end_latent, end_image_embeddings=end_image_embeddings,
                            keyframes=keyframes, timed_prompts=timed_prompts, extend_latents=extend_latents,
                            guide_latents=guide_latents, fps=fps)
    start_latent, prefix, guides, timed, negative = (inputs.start_latent, inputs.prefix, inputs.guides,
                                                     inputs.timed_prompts, inputs.negative)
    shape, dtype = start_latent.shape, compute_dtype(model)
    device = torch.device(device) if device is not None else model_device(model)

    fingerprint = None
    if resume_from is not None or on_state is not None:
        fingerprint = _fingerprint(
            model, weights_identity, schedule, settings, device, sample_section or model_call,
            dtype=str(dtype), start_latent=start_latent,
            prefix=prefix, image_embeddings=image_embeddings, end_image_embeddings=end_image_embeddings,
            prompt=prompt, negative=negative, guides=guides, timed_prompts=timed, guide_latents=guide_latents,
            fps=float(fps))
    sample_section = sample_section or DefaultSectionSampler(model, settings, model_call, transformer_options)

    generator = torch.Generator("cpu").manual_seed(settings.seed)
    history = schedule.initial_history(start_latent)
    if mode == "forward" and prefix is not None:
        history = torch.cat([history[:, :, : schedule.history_padding], prefix.float()], 2)
    n = len(schedule)
    done = 0
    if resume_from is not None:
        state = resume_from(fingerprint) if callable(resume_from) else resume_from
        if state is not None:
            history, done = _resume(state, fingerprint, schedule, history, generator)
    in_time_order = sorted(schedule, key=lambda s: s.video_index)
    prompts = section_prompts([max(pixel_frames(s.first_video_frame), 0) / fps for s in in_time_order], timed, prompt)
    for position, section in enumerate(schedule):
        if position < done:
            continue
        if interrupt is not None:
            interrupt()
        noise = torch.randn((1, shape[1], window, shape[3], shape[4]), generator=generator)
        context = section.gather(start_latent.float(), history, guide=guides.get(section.video_index))
        embeds = _section_embeddings(image_embeddings, end_image_embeddings, section.video_index, n)
        positive = model_inputs(prompts[section.video_index], embeds, context, settings, dtype, device)
        neg = None if negative is None else model_inputs(negative, embeds, context, settings, dtype, device)

        where = f"section {position + 1} of {n} (video section {section.video_index})"
        step_check = StepCheck(where, lambda: diagnose(model, dtype))

        def step_callback(step, steps, x, x0, _position=position, _check=step_check):
            _check(step, steps, x0)
            if on_step is not None:
                on_step(_position, n, step, steps, x0)

        guided = {} if guide_latents is None else {"guide": guide_latents[
            :, :, section.first_video_frame:section.first_video_frame + window].float().to(device)}
        sampled = sample_section(noise.to(device), positive, neg, step_callback, interrupt, **guided).float().cpu()
        step_check.finish()
        if not torch.isfinite(sampled).all():  # e.g. a plug sampler that never calls on_step
            raise NonFiniteError(f"The sampled latents of {where} contain NaN or inf; the video would be black. "
                                 f"{diagnose(model, dtype)}")
        history = schedule.append(history, section.output(sampled, start_latent.float()))
        if on_section is not None:
            on_section(section, schedule.video_latents(history))
        if on_state is not None:
            on_state(GenerationState(fingerprint, position + 1, n, schedule.video_latents(history),
                                     generator.get_state()))

    video = schedule.video_latents(history)
    if mode == "inverted" and prefix is not None:  # the input (less its last frame) stays in front
        video = torch.cat([prefix.float(), video], 2)
    return GenerationResult(video, section_ranges(mode, video.shape[2], window), mode, window, fingerprint)


def _fingerprint(model, weights_identity, schedule, settings, device, custom_call, **inputs):
    """SHA-256 of everything that determines the video (see resume.py)."""
    if weights_identity is not None and not isinstance(weights_identity, (str, bytes)):
        raise TypeError(f"weights_identity must be a str or bytes, got {type(weights_identity).__name__}.")
    if weights_identity is None and not isinstance(model, torch.nn.Module):
        raise TypeError("Resuming needs the weights' identity: pass weights_identity= (a str or bytes naming the "
                        f"weights) when the model is not a torch module (got {type(model).__name__}).")
    fp = Fingerprint().add("format", STATE_FORMAT)
    fp.add("weights", weights_identity if weights_identity is not None else weights_digest(model))
    fp.add("custom_call", None if custom_call is None else type(custom_call).__qualname__)
    fp.add("schedule", schedule).add("settings", settings).add("device", device.type)
    for name, value in inputs.items():
        fp.add(name, value)
    return fp.hexdigest()


def _resume(state, fingerprint, schedule, history, generator):
    """(history, sections done) restored from ``state``; the fresh ones when it belongs elsewhere."""
    if state.fingerprint != fingerprint:
        log.info("[FramePack] the saved state is for a different generation (inputs, weights or settings "
                 "changed): starting afresh.")
        return history, 0
    latents = state.latents.float()
    padding = history[:, :, : schedule.history_padding] if schedule.mode == "forward" else history
    if (state.num_sections != len(schedule) or latents.shape[:2] != history.shape[:2]
            or latents.shape[3:] != history.shape[3:]):
        log.warning("[FramePack] the saved state does not fit this generation's shapes: starting afresh.")
        return history, 0
    generator.set_state(state.generator_state)
    pair = [latents, padding] if schedule.mode == "inverted" else [padding, latents]
    log.info("[FramePack] resuming after section %d of %d.", state.sections_done, state.num_sections)
    return torch.cat(pair, 2), state.sections_done


class DefaultSectionSampler:
    """Samples one section with the flow-matching samplers and the transformer, as the original does."""

    def __init__(self, model, settings, model_call=None, transformer_options=None):
        self.model, self.settings, self.dtype = model, settings, compute_dtype(model)
        self.model_call, self.transformer_options = model_call or model, transformer_options

    def __call__(self, noise, positive, negative, on_step, interrupt, guide=None):
        s = self.settings
        _, _, frames, height, width = noise.shape
        sigmas = sigma_schedule(s.steps, token_count=frames * height * width // 4, shift=s.shift)
        if guide is not None:  # video-to-video: start from the guide re-noised part of the way
            sigmas = truncate_sigmas(sigmas, s.denoise)
            if len(sigmas) < 2:
                return guide.to(noise)  # denoise rounds to 0 steps: the guide itself
            noise = noise_to_sigma(guide.to(noise), noise, sigmas[0])
        cache = step_cache(s)
        if cache is not None:  # fresh state per section and per stream, as the original resets it
            positive = {**positive, "cache": cache.start(len(sigmas) - 1, "positive")}
            negative = None if negative is None else {**negative, "cache": cache.start(len(sigmas) - 1, "negative")}
        options = None
        if self.transformer_options is not None:
            options = {**self.transformer_options, "sample_sigmas": sigmas.to(noise.device, torch.float32)}
        denoise = make_flow_denoiser(self.model_call, positive, negative, s.cfg, s.cfg_rescale, dtype=self.dtype,
                                     transformer_options=options, batch_cfg=s.cfg_batch)
        return sample(s.sampler, denoise, noise, sigmas, callback=on_step, interrupt=interrupt)


def step_cache(settings):
    """The settings' cache strategy; ``teacache_threshold`` is shorthand for ``cache=TeaCache(threshold)``."""
    if settings.teacache_threshold is None:
        return settings.cache
    if settings.cache is not None:
        raise ValueError(f"Both teacache_threshold={settings.teacache_threshold} and cache={settings.cache!r} are "
                         "set; give one of them.")
    return TeaCache(settings.teacache_threshold)


# ---------------------------------------------------------------------------------------------
# inputs of one transformer call


def model_inputs(prompt, image_embeddings, context, settings, dtype, device):
    """The transformer's keyword arguments for one section, moved to its device once per section."""
    text, mask = prompt.text[:, :MAX_TEXT_TOKENS], prompt.mask
    if mask is not None:
        mask = mask[:, :MAX_TEXT_TOKENS]
    guidance = torch.tensor([settings.distilled_guidance * 1000.0], dtype=dtype)
    inputs = dict(encoder_hidden_states=text, encoder_attention_mask=mask, pooled_projections=prompt.pooled,
                  image_embeddings=image_embeddings, guidance=guidance, **context)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _section_embeddings(start, end, video_index, num_sections):
    if end is None or num_sections == 1:
        return start
    return torch.lerp(start.float(), end.float(), video_index / (num_sections - 1)).to(start.dtype)


def compute_dtype(model):
    """The dtype the transformer runs in: its ``compute_dtype``, else that of its first floating weight wider
    than fp8 (an fp8 model computes in a wider type), else float32."""
    dtype = getattr(model, "compute_dtype", None)
    if dtype is not None:
        return dtype
    for param in getattr(model, "parameters", lambda: [])():
        if param.is_floating_point() and param.element_size() > 1:
            return param.dtype
    return torch.float32


def model_device(model):
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None and param.device.type != "meta" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class PreparedInputs:
    """A generation's inputs once checked and resolved (see ``prepare_inputs``)."""

    start_latent: torch.Tensor  # the frame the video starts from (an inverted extension: the input's last frame)
    prefix: Optional[torch.Tensor]  # extension: the input video's frames kept in front of the new ones
    guides: dict  # {video section index: latent the section leads into} (end frame and keyframes)
    timed_prompts: list  # sorted by start time
    negative: Optional[Prompt]  # None when cfg is 1: the negative prompt is never run then


def prepare_inputs(config, schedule, settings, start_latent, image_embeddings, prompt, negative=None, *,
                   end_latent=None, end_image_embeddings=None, keyframes=None, timed_prompts=(), extend_latents=None,
                   guide_latents=None, fps=30.0):
    """Check every input of ``generate`` against the model's ``config`` (None: shapes only) and resolve what
    they mean. ``generate`` calls it first; a host may call it before loading the model to fail early."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0 (timed prompts are placed in seconds), got {fps!r}.")
    check_settings(settings)
    start_latent, prefix = _start_and_prefix(schedule.mode, start_latent, extend_latents, config)
    check_latent("start_latent", start_latent, config)
    check_image_embeddings("image_embeddings", image_embeddings, config)
    guides = _guides(schedule, start_latent.shape, end_latent, keyframes)
    timed = _check_timed_prompts(timed_prompts)
    if end_image_embeddings is not None:
        check_image_embeddings("end_image_embeddings", end_image_embeddings, config, like=image_embeddings)
    check_prompt("prompt", prompt, config)
    for t in timed:
        check_prompt(f"timed prompt [{t.start}, {t.end})", t.prompt, config)
    _check_guide(guide_latents, schedule, start_latent.shape, settings.denoise, extend_latents)
    return PreparedInputs(start_latent, prefix, guides, timed, guidance_negative(negative, settings.cfg, config))


def guidance_negative(negative, cfg, config=None):
    """The negative prompt real CFG runs (checked), or None when ``cfg`` is 1 and it is never run."""
    if cfg == 1.0:
        return None
    if negative is None:
        raise ValueError(f"cfg={cfg} needs a negative prompt; pass negative=... or use cfg=1.")
    check_prompt("negative", negative, config)
    return negative


def _start_and_prefix(mode, start_latent, extend_latents, config):
    if extend_latents is None:
        if start_latent is None:
            raise ValueError("generate() needs a start_latent (or extend_latents to continue a video).")
        return start_latent, None
    check_latent("extend_latents", extend_latents, config, frames=None)
    if mode == "forward":
        if start_latent is None:
            return extend_latents[:, :, :1], extend_latents
        check_latent("start_latent", start_latent, config)
        _check_extension_size(start_latent.shape, extend_latents.shape)
        return start_latent, extend_latents
    if start_latent is not None:
        log.warning("[FramePack] an inverted extension starts from the last frame of the video it extends; the "
                    "start latent given as well is not used (its image embeddings should show that last frame).")
    return extend_latents[:, :, -1:], extend_latents[:, :, :-1]


def _check_extension_size(start, video):
    """A forward extension continues the video's frames after the start latent's: both one size."""
    if start[3:] != video[3:]:
        (h, w), (vh, vw) = start[3:], video[3:]
        s = VAE_SCALE
        raise ValueError(f"extend_latents (the video to extend) is {vh}x{vw} latent ({vh * s}x{vw * s} pixels) but "
                         f"start_latent is {h}x{w} ({h * s}x{w * s} pixels); a video continues at one size. Encode "
                         f"the start image at the video's size (scale it to width {vw * s}, height {vh * s} before "
                         "VAEEncode), or leave start_latent unconnected to start from the video's first frame.")


def _guides(schedule, shape, end_latent, keyframes):
    """{video section index: latent placed right after that section's window}."""
    guides = dict(keyframes or {})
    if end_latent is not None:
        if len(schedule) - 1 in guides:
            raise ValueError(f"Both an end latent and a keyframe target the last section ({len(schedule) - 1}); "
                             "give one of them.")
        guides[len(schedule) - 1] = end_latent
    if guides and schedule.mode != "inverted":
        raise ValueError("End frames and keyframes need the inverted (anti-drifting) schedule: forward (F1) "
                         "sampling never sees frames after the current section.")
    for index, latent in guides.items():
        if not isinstance(index, int) or not 0 <= index < len(schedule):
            raise ValueError(f"Keyframe section {index!r} is out of range: this video has sections "
                             f"0..{len(schedule) - 1}.")
        check_latent("end_latent" if latent is end_latent else f"keyframe {index}", latent, like=shape)
    return guides


def _check_guide(guide, schedule, shape, denoise, extend_latents):
    if guide is None:
        if denoise != 1.0:
            raise ValueError(f"denoise={denoise} needs guide latents to follow (a guide video's VAEEncode); without a "
                             "guide use denoise 1.")
        return
    check_latent("guide_latents", guide, frames=None, like=shape)
    if extend_latents is not None:
        raise ValueError("guide_latents and extend_latents cannot be combined: guide a new video, or extend one.")
    needed = 1 + len(schedule) * schedule.window
    if guide.shape[2] < needed:
        raise ValueError(f"guide_latents hold {guide.shape[2]} latent frames ({pixel_frames(guide.shape[2])} video frames) "
                         f"but this video needs {needed} ({pixel_frames(needed)} frames): load a longer guide video or "
                         "make the video shorter (fewer seconds or sections).")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise!r}.")


def _check_timed_prompts(timed):
    timed = sorted(timed, key=lambda t: t.start)
    for t in timed:
        if not 0 <= t.start < t.end:
            raise ValueError(f"A timed prompt's range must satisfy 0 <= start < end, got [{t.start}, {t.end}).")
        if isinstance(t.blend_sections, bool) or not isinstance(t.blend_sections, int) or t.blend_sections < 0:
            raise ValueError(f"A timed prompt's blend_sections must be an integer >= 0, got {t.blend_sections!r}.")
    for a, b in zip(timed, timed[1:]):
        if b.start < a.end:
            raise ValueError(f"Timed prompt ranges overlap: [{a.start}, {a.end}) and [{b.start}, {b.end}).")
    return timed
