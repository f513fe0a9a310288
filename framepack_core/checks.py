"""Finite or fail: generate()'s inputs checked against the loaded model before any compute, and the model's
prediction checked once per sampler step.

A NaN or inf anywhere (one weight, the conditioning, a guidance value, fp16 overflow) otherwise spreads
through every later step and section and ends as a black video with no error. The ComfyUI nodes call the
same checks with their own input names.
"""

import math

import torch

INPUT_FIX = ("The model that made it (VAE, text or vision encoder) overflowed or has damaged weights: run it in "
             "bf16 or fp32 rather than fp16, or download its weights again.")
CAUSES = ("Likely causes: fp16 overflow (HunyuanVideo's activations exceed fp16's range: load the model with "
          "weight dtype bf16 or fp32), or a corrupt checkpoint or LoRA (NaN or inf weights: download it again).")


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or inf where finite numbers are needed: an input of generate(), or the model's prediction."""


def check_finite(name, tensor, fix=INPUT_FIX):
    finite = torch.isfinite(tensor)
    if not finite.all():
        raise NonFiniteError(f"{name} contains NaN or inf ({(~finite).sum().item()} of {tensor.numel()} values). {fix}")


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_latent(name, latent, config=None, frames=1, like=None):
    """A video latent (1, C, frames, H, W) in the model's channel count, finite; ``like``: the start's shape."""
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5:
        raise ValueError(f"{name} is not a video latent ({_shape(latent)}): it must be shaped (1, channels, frames, "
                         "height, width), as the HunyuanVideo VAE encodes images (VAEEncode in ComfyUI).")
    if latent.shape[0] != 1:
        raise ValueError(f"{name} holds a batch of {latent.shape[0]}; FramePack generates one video at a time.")
    if config is not None and latent.shape[1] != config.in_channels:
        raise ValueError(f"{name} has {latent.shape[1]} channels but this model takes {config.in_channels}: encode "
                         "the image with the HunyuanVideo VAE.")
    if frames is not None and latent.shape[2] != frames:
        raise ValueError(f"{name} has {latent.shape[2]} latent frames; it must hold {frames} (one encoded image).")
    if like is not None and (latent.shape[1], *latent.shape[3:]) != (like[1], *like[3:]):
        raise ValueError(f"{name} is {tuple(latent.shape[3:])} (latent H, W) with {latent.shape[1]} channels but "
                         f"the start latent is {tuple(like[3:])} with {like[1]}: encode both images at the "
                         "same resolution.")
    check_finite(name, latent)


def check_image_embeddings(name, embeds, config=None, like=None):
    """SigLIP last_hidden_state (1, tokens, image_dim), finite; ``like``: the start image's embeddings."""
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"{name} must be the CLIP vision last_hidden_state shaped (1, tokens, dim), "
                         f"got {_shape(embeds)}.")
    if config is not None and embeds.shape[-1] != config.image_dim:
        raise ValueError(f"{name} are {embeds.shape[-1]} wide but the model expects {config.image_dim}: use the "
                         "SigLIP vision model sigclip_vision_patch14_384.")
    if embeds.shape[0] != 1:
        raise ValueError(f"{name} hold {embeds.shape[0]} images; encode a single image (pick one frame with "
                         "ImageFromBatch).")
    if like is not None and embeds.shape != like.shape:
        raise ValueError(f"{name} is {tuple(embeds.shape)} but the start image's are {tuple(like.shape)}.")
    check_finite(name, embeds)


def check_prompt(name, prompt, config=None):
    """A Prompt: text (1, N, text_dim), pooled (1, pooled_dim), optional mask (1, N); all finite."""
    text, pooled, mask = prompt.text, prompt.pooled, prompt.mask
    if not isinstance(text, torch.Tensor) or not isinstance(pooled, torch.Tensor) or text.ndim != 3 or (
            config is not None and (text.shape[-1] != config.text_dim or pooled.shape[-1] != config.pooled_dim)):
        want = "" if config is None else f", which give {config.text_dim}-wide states and {config.pooled_dim}-wide pooled"
        raise ValueError(f"{name} is not HunyuanVideo text ({_shape(text)}, pooled {_shape(pooled)}): encode it with "
                         f"the HunyuanVideo text encoders (llava_llama3 + clip_l; in ComfyUI DualCLIPLoader type "
                         f"'hunyuan_video'){want}.")
    if text.shape[0] != 1 or pooled.shape[0] != 1:
        raise ValueError(f"{name} holds a batch of {max(text.shape[0], pooled.shape[0])} prompts; FramePack "
                         "generates one video at a time: encode one prompt.")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(text.shape[:2])):
        raise ValueError(f"{name}'s attention mask is {_shape(mask)} but its text is {tuple(text.shape[:2])} "
                         "(batch, tokens); pass the mask the encoder returned, or none.")
    check_finite(f"{name} (text hidden states)", text)
    check_finite(f"{name} (pooled vector)", pooled)


def check_settings(settings):
    """Guidance values and other numbers of SamplingSettings are finite and in range."""
    for field in ("distilled_guidance", "cfg", "cfg_rescale", "shift", "teacache_threshold"):
        value = getattr(settings, field)
        if value is None and field in ("shift", "teacache_threshold"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NonFiniteError(f"SamplingSettings.{field} is {value!r}; it must be a finite number (a NaN or inf "
                                 "guidance value makes every prediction NaN and the video black).")


class StepCheck:
    """One section's per-step check of the model's prediction.

    One fused reduction per step (``isfinite(x0).all()``), queued on the prediction's device; each flag is
    read one step later, when the next step's work is already queued, so a GPU never idles waiting for it.
    """

    def __init__(self, where, diagnose=lambda: CAUSES):
        self.where, self.diagnose, self.pending = where, diagnose, None

    def __call__(self, step, steps, x0):
        previous, self.pending = self.pending, (step, steps, torch.isfinite(x0).all())
        if previous is not None:
            self._check(*previous)

    def finish(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._check(*pending)

    def _check(self, step, steps, finite):
        if not finite:
            raise NonFiniteError(f"The model's prediction became NaN or inf at {self.where}, step {step + 1} of "
                                 f"{steps}; the video would be black. {self.diagnose()}")


def diagnose(model, dtype):
    """The likely cause of a non-finite prediction, looked for only after one happened."""
    for name, param in getattr(model, "named_parameters", lambda: [])():
        values = param.detach()
        if values.dtype.itemsize == 1:  # fp8: isfinite wants a wider float (both fp8 formats fit fp16)
            values = values.to(torch.float16)
        if not torch.isfinite(values).all():
            return (f"The model's weight {name} contains NaN or inf: the checkpoint (or a LoRA merged into it) is "
                    "corrupt. Download it again.")
    if dtype == torch.float16:
        return ("The model runs in fp16, whose range HunyuanVideo's activations exceed (overflow): load it with "
                "weight dtype bf16 or fp32.")
    return CAUSES
