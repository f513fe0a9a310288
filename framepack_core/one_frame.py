"""Single-frame ("one-frame", kisekaeichi, oichi) inference: one latent frame at a chosen time index.

FramePack is very sensitive to the RoPE time positions of its inputs. Sampling a single noisy frame at
a far-off time index, with the start image as clean context, gives a still image that has "moved on"
from the start image as the prompt says: an image edit for a fraction of a section's compute. The
layout follows the one documented by kohya-ss/musubi-tuner (docs/framepack_1f.md):

    noisy     1 frame at ``target_index``                          (default: window, the window's last frame)
    1x clean  [start latent, reference latents..., post]           each at its own index
              the start latent sits at ``start_index`` (default 0); each reference at its own index;
              "post" is an all-zero frame at window + 1 (switch off: the documented ``no_post``)
    2x        2 zero frames at window + 2, window + 3               (switch off: ``no_2x``)
    4x        16 zero frames at window + 4 .. window + 19           (switch off: ``no_4x``)

With every level on, no references and the default target this is the original's first inverted
section (padding 0, empty history) with the noisy window cut to its last frame.

Masks (kisekaeichi): a mask in [0, 1] multiplies its clean latent (1 = keep, 0 = zeroed and hence ignored),
resized to the latent grid by area averaging. E.g. keep the face and body from the start image and the
clothes from a reference image placed at index 10 with target index 1 to 5.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .packing import Level
from .checks import (NonFiniteError, StepCheck, check_image_embeddings, check_latent, check_prompt, check_settings,
                     diagnose)
from .pipeline import (DefaultSectionSampler, SamplingSettings, compute_dtype, guidance_negative, model_device,
                       model_inputs)

POST_OFFSET, COUNT_2X, COUNT_4X = 1, 2, 16


@dataclass(frozen=True)
class Reference:
    """A clean latent (1, C, 1, H, W) placed at time ``index``; ``mask`` (h, w) in [0, 1] keeps its regions."""

    latent: torch.Tensor
    index: int
    mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class OneFrameLayout:
    """RoPE time indices of one single-frame sample; the 1x order is [start, references..., post]."""

    target_index: int
    clean_indices: Tuple[int, ...]
    indices_2x: Tuple[int, ...]
    indices_4x: Tuple[int, ...]
    post: bool

    def check_weights(self, config) -> None:
        """Every context level the layout uses has its clean-latent embedder in these weights."""
        for kernel, indices in ((2, self.indices_2x), (4, self.indices_4x)):
            if indices and kernel not in config.clean_kernels:
                raise ValueError(f"These weights have no {kernel}x clean-latent embedder; switch use_{kernel}x off "
                                 f"(the documented no_{kernel}x).")

    def levels(self) -> Tuple[Level, Level, Level]:
        return tuple(Level(k, idx, False, ()) for k, idx in zip((1, 2, 4),
                                                                (self.clean_indices, self.indices_2x, self.indices_4x)))

    def tokens(self, latent_height: int, latent_width: int) -> Tuple[int, int, int, int]:
        """(1x, 2x, 4x, noisy) token counts."""
        noisy = (latent_height // 2) * (latent_width // 2)
        return tuple(level.tokens(latent_height, latent_width) for level in self.levels()) + (noisy,)


def one_frame_layout(reference_indices: Sequence[int] = (), target_index: Optional[int] = None, window: int = 9,
                     start_index: int = 0, post: bool = True, use_2x: bool = True, use_4x: bool = True):
    """The layout for a start latent plus references at ``reference_indices``; see the module docstring."""
    target = window if target_index is None else target_index
    for name, value in [("window", window), ("target_index", target), ("start_index", start_index),
                        *((f"reference index {i}", r) for i, r in enumerate(reference_indices))]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    base = window + POST_OFFSET
    return OneFrameLayout(
        target_index=target,
        clean_indices=(start_index, *reference_indices) + ((base,) if post else ()),
        indices_2x=tuple(range(base + 1, base + 1 + COUNT_2X)) if use_2x else (),
        indices_4x=tuple(range(base + 1 + COUNT_2X, base + 1 + COUNT_2X + COUNT_4X)) if use_4x else (),
        post=post,
    )


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (h, w) or (1, h, w) mask in [0, 1] as (1, 1, 1, height, width), area-resized to the latent grid."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"A mask must be one (height, width) map, got {shape}; pick one mask of a batch.")
    mask = mask.reshape(1, 1, *mask.shape[-2:]).float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("A mask must hold values in [0, 1] (1 keeps the region, 0 ignores it).")
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="area")
    return mask.unsqueeze(2)


def one_frame_context(layout: OneFrameLayout, start_latent: torch.Tensor, references: Sequence[Reference] = (),
                      start_mask: Optional[torch.Tensor] = None) -> dict:
    """The transformer's context kwargs (as ``Section.gather``) for ``layout``; masks already applied."""
    check_latent("start_latent", start_latent)
    shape = start_latent.shape
    if len(layout.clean_indices) != 1 + len(references) + layout.post:
        raise ValueError(f"The layout has room for {len(layout.clean_indices) - 1 - layout.post} reference(s) "
                         f"but {len(references)} were given.")
    clean = []
    for name, latent, mask in [("start_latent", start_latent, start_mask),
                               *((f"reference {i}", r.latent, r.mask) for i, r in enumerate(references))]:
        check_latent(name, latent, like=shape)
        latent = latent.float()
        clean.append(latent if mask is None else latent * latent_mask(mask, *shape[-2:]))
    zeros = lambda frames: torch.zeros(shape[0], shape[1], frames, *shape[-2:])  # noqa: E731
    if layout.post:
        clean.append(zeros(1))
    index = lambda values: torch.tensor(values, dtype=torch.long) if values else None  # noqa: E731
    return {
        "latent_indices": index((layout.target_index,)),
        "clean_latents": torch.cat(clean, dim=2), "clean_latent_indices": index(layout.clean_indices),
        "clean_latents_2x": zeros(COUNT_2X) if layout.indices_2x else None,
        "clean_latent_2x_indices": index(layout.indices_2x),
        "clean_latents_4x": zeros(COUNT_4X) if layout.indices_4x else None,
        "clean_latent_4x_indices": index(layout.indices_4x),
    }


def generate_one_frame(model, start_latent, image_embeddings, prompt, negative=None, settings=SamplingSettings(), *,
                       references: Sequence[Reference] = (), start_mask=None, target_index=None, window=9,
                       start_index=0, post=True, use_2x=True, use_4x=True, sample_section=None, on_step=None,
                       interrupt=None, device=None, model_call=None, transformer_options=None) -> torch.Tensor:
    """One latent frame (1, C, 1, H, W) in model space, sampled as the original samples a section.

    Noise is ``randn(1, C, 1, H, W)`` from a CPU generator seeded with ``settings.seed``; the sigma
    shift comes from the single frame's token count, as the original's sampler computes it.
    ``on_step(step, steps, x0)`` after every sampler step; the other arguments are as in ``generate``.
    A NaN or inf prediction stops with ``NonFiniteError``.
    """
    layout = one_frame_layout([r.index for r in references], target_index, window, start_index, post, use_2x, use_4x)
    config = getattr(model, "config", None)
    if config is not None:
        layout.check_weights(config)
    check_latent("start_latent", start_latent, config)
    context = one_frame_context(layout, start_latent, references, start_mask)
    check_image_embeddings("image_embeddings", image_embeddings, config)
    check_settings(settings)
    check_prompt("prompt", prompt, config)
    negative = guidance_negative(negative, settings.cfg, config)
    sample_section = sample_section or DefaultSectionSampler(model, settings, model_call, transformer_options)
    device = torch.device(device) if device is not None else model_device(model)
    dtype = compute_dtype(model)
    shape = start_latent.shape
    noise = torch.randn((1, shape[1], 1, *shape[-2:]), generator=torch.Generator("cpu").manual_seed(settings.seed))
    positive = model_inputs(prompt, image_embeddings, context, settings, dtype, device)
    negative = None if negative is None else model_inputs(negative, image_embeddings, context, settings, dtype, device)
    check = StepCheck(f"the single frame (target index {layout.target_index})", lambda: diagnose(model, dtype))

    def step_callback(step, steps, x, x0):
        check(step, steps, x0)
        if on_step is not None:
            on_step(step, steps, x0)

    frame = sample_section(noise.to(device), positive, negative, step_callback, interrupt).float().cpu()
    check.finish()
    if not torch.isfinite(frame).all():
        raise NonFiniteError(f"The sampled single frame contains NaN or inf. {diagnose(model, dtype)}")
    return frame
