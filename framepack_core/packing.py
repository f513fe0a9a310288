"""Context packing schedules: which clean frames each FramePack section sees, at which RoPE positions.

FramePack samples a video in sections of ``window`` latent frames. Besides its noisy window, each section
gets a fixed-size context of clean latents at three compressions, one per clean-latent embedder:

    kernel 1  "1x" clean latents   patch (1,2,2)  ``clean_x_embedder.proj``
    kernel 2  "2x" history         patch (2,4,4)  ``clean_x_embedder.proj_2x``
    kernel 4  "4x" history         patch (4,8,8)  ``clean_x_embedder.proj_4x``

``counts = (c1, c2, c4)`` is how many history frames each level takes (the original: 1, 2, 16). With
``first_frame_priority`` the start latent additionally takes the first 1x slot.

Frame-index layouts (RoPE time positions; groups are consecutive ranges starting at 0, in this order):

    inverted  [start s | blank p*window | noisy window | post c1 | 2x c2 | 4x c4]
    forward   [start s | 4x c4 | 2x c2 | 1x c1 | noisy window]

where s = 1 with first_frame_priority else 0, and p is the section's anti-drifting padding. The 1x level
is the start group followed by the c1 group. With the defaults these are exactly the original layouts.

History buffer (the schedule owns its conventions, so the section loop is mode-agnostic):

    inverted  starts as c1+c2+c4 zero frames; sampled windows are prepended, so history[0] is the
              temporally earliest frame so far. 1x takes history[0:c1], 2x the next c2, 4x the next c4.
    forward   starts as c1+c2+c4 zero frames followed by the start latent; sampled windows are appended.
              1x takes the last c1 frames, 2x the c2 before those, 4x the c4 before those.

Because the level sizes never change, every section of every video costs the same number of tokens
(FramePack's O(1) context); ``PackingSchedule.token_budget`` reports it.

Typical loop::

    schedule = make_schedule("inverted", sections_for_length(5.0, window=9))
    history = schedule.initial_history(start_latent)
    for section in schedule:
        context = section.gather(start_latent, history)       # model kwargs
        sampled = sample(noise, **context)                     # (B, 16, window, H, W)
        history = schedule.append(history, section.output(sampled, start_latent))
    video = schedule.video_latents(history)                    # start latent included, zeros stripped
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

MODES = ("inverted", "forward")


# --- the frame rule and section tiling (decode.py and the nodes use these) ---------------------------


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the VAE makes from ``latent_frames`` latent frames (4t-3)."""
    return 4 * latent_frames - 3


def overlap_frames(window: int) -> int:
    """Pixel frames over which neighbouring clips cross-fade."""
    return 4 * window - 3


def check_mode_window(mode: str, window: int) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown decode mode {mode!r}; expected one of {', '.join(MODES)}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}.")


def section_ranges(mode: str, frames: int, window: int) -> list:
    """Sections tiling a video of ``frames`` latent frames, in temporal order, for ``decode_clips``.

    Sections are ``window`` frames long, counted from the end; the first takes what is left (one to two
    windows, plus the start latent in inverted mode), so every decode clip stays bounded however the video
    was made. For a sampled video this is exactly where its sections lie: inverted [(0, window+1),
    (window+1, 2*window+1), ...], forward [(1, window+1), ...] (the start latent at frame 0 belongs to no
    section there). Videos that continue an input video tile the input the same way.
    """
    check_mode_window(mode, window)
    first = 0 if mode == "inverted" else 1
    if isinstance(frames, bool) or not isinstance(frames, int) or frames - first < 1:
        raise ValueError(f"a {mode} video needs at least {first + 1} latent frame(s), got {frames!r}.")
    smallest_first = window + (mode == "inverted")  # a full window, plus the start latent when inverted
    ranges, stop = [], frames
    while stop - window - first >= smallest_first:
        ranges.append((stop - window, stop))
        stop -= window
    ranges.append((first, stop))
    return ranges[::-1]


KERNELS = (1, 2, 4)
DEFAULT_COUNTS = (1, 2, 16)
# each kernel's clean-latent embedder: its name under ``clean_x_embedder`` and its patch size (t, h, w)
CLEAN_EMBEDDERS = {1: ("proj", (1, 2, 2)), 2: ("proj_2x", (2, 4, 4)), 4: ("proj_4x", (4, 8, 8))}
EMBEDDER_NAMES = {k: f"clean_x_embedder.{name}" for k, (name, _) in CLEAN_EMBEDDERS.items()}

Counts = Union[Sequence[int], Mapping[int, int]]

# Bounds, so that a typo fails with a message instead of allocating gigabytes. 1000 sections of window 9 are
# about 20 minutes of video; the original trains window 9 with 1/2/16 history frames.
MAX_SECTIONS = 1000
MAX_WINDOW = 64
MAX_HISTORY_FRAMES = 256  # per compression level
MAX_LAYOUT_POSITIONS = 2_000_000  # RoPE frame positions over all sections (gaps included)


def sections_for_length(seconds: float, window: int = 9, fps: float = 30) -> int:
    """Number of sections for a video of ``seconds``, as the original: each latent frame is 4 pixel frames."""
    _check_positive_int("window", window)
    if not seconds > 0 or not fps > 0:
        raise ValueError(f"video length must be > 0 seconds and fps > 0, got seconds={seconds}, fps={fps}")
    return max(round(seconds * fps / (window * 4)), 1)


def even_spread_counts(total: int, kernels_available: Sequence[int] = KERNELS) -> Tuple[int, int, int]:
    """Split ``total`` history frames over the available kernels as evenly as possible.

    Every available level gets ``total // k`` frames (k = number of available levels); the remaining
    ``total % k`` frames go one each to the finest levels first (1x, then 2x), since the finest level holds
    the frames nearest the window. Unavailable kernels get 0. Returns (c1, c2, c4).
    Examples: 19 over (1, 2, 4) -> (7, 6, 6); 19 over (2, 4) -> (0, 10, 9); 2 over (1, 2, 4) -> (1, 1, 0).
    """
    available = _check_kernels_available(kernels_available)
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"even spread total must be a non-negative integer, got {total!r}")
    if total > 0 and not available:
        raise ValueError("even spread needs at least one clean-latent kernel in kernels_available")
    used = [k for k in KERNELS if k in available]
    base, extra = divmod(total, max(len(used), 1))
    spread = {k: base + (1 if i < extra else 0) for i, k in enumerate(used)}
    return tuple(spread.get(k, 0) for k in KERNELS)


@dataclass(frozen=True)
class Level:
    """One context level: its frames in order are [start latent (if with_start)] + history[history_positions]."""

    kernel: int
    indices: Tuple[int, ...]  # RoPE frame index of each frame, same order as the frames
    with_start: bool
    history_positions: Tuple[int, ...]  # positions in the history buffer; negative counts from the end

    @property
    def frames(self) -> int:
        return len(self.indices)

    def tokens(self, latent_height: int, latent_width: int) -> int:
        """Tokens after patchifying. 1x is an unpadded stride-2 conv; 2x/4x are replicate-padded first."""
        if self.frames == 0:
            return 0
        k = self.kernel
        if k == 1:
            return self.frames * (latent_height // 2) * (latent_width // 2)
        spatial = math.ceil(latent_height / (2 * k)) * math.ceil(latent_width / (2 * k))
        return math.ceil(self.frames / k) * spatial

    def gather(self, start_latent: torch.Tensor, history: torch.Tensor):
        """(latents (B,16,T,H,W), indices 1-D LongTensor), or (None, None) for an empty level."""
        if self.frames == 0:
            return None, None
        parts = [start_latent.to(history)] if self.with_start else []
        if self.history_positions:
            parts.append(history[:, :, list(self.history_positions)])
        indices = torch.tensor(self.indices, dtype=torch.long, device=history.device)
        return torch.cat(parts, dim=2), indices


@dataclass(frozen=True)
class Section:
    """Everything one section needs; the section loop does no index arithmetic of its own."""

    index: int  # sampling order, 0 = sampled first
    padding: int  # anti-drifting gap in windows (inverted mode); always 0 in forward mode
    blank_indices: Tuple[int, ...]  # RoPE positions of the gap (no tokens, only spacing)
    noisy_indices: Tuple[int, ...]
    clean: Level  # kernel 1
    history_2x: Level
    history_4x: Level
    is_last: bool
    joins_start: bool  # the start latent is prefixed to this section's output (inverted, padding 0)
    first_video_frame: int  # latent frame of the final video where this window begins (start latent = 0)
    video_index: int  # position in the video: 0 is the section right after the start frame

    @property
    def levels(self) -> Tuple[Level, Level, Level]:
        return (self.clean, self.history_2x, self.history_4x)

    def gather(self, start_latent: torch.Tensor, history: torch.Tensor, guide: Optional[torch.Tensor] = None) -> dict:
        """Context kwargs picked from ``start_latent`` (B,16,1,H,W) and ``history`` (B,16,T,H,W).

        ``guide`` (B,16,1,H,W), inverted mode: stands in for the 1x history frame right after the window
        (history[0]), so the section leads into it (an end frame or a keyframe).

        Keys: latent_indices, clean_latents, clean_latent_indices, clean_latents_2x, clean_latent_2x_indices,
        clean_latents_4x, clean_latent_4x_indices. Latents are (B,16,frames,H,W) in history's dtype/device;
        indices are 1-D LongTensors; an empty level gives None for both.
        """
        if guide is not None:
            if self.clean.history_positions[:1] != (0,):
                raise ValueError("a guide frame (end frame or keyframe) needs the inverted schedule with at least "
                                 "one 1x history frame (counts[0] >= 1)")
            history = torch.cat([guide.to(history), history[:, :, 1:]], dim=2)
        context = {"latent_indices": torch.tensor(self.noisy_indices, dtype=torch.long, device=history.device)}
        named = {"": self.clean, "_2x": self.history_2x, "_4x": self.history_4x}
        for suffix, level in named.items():
            context[f"clean_latents{suffix}"], context[f"clean_latent{suffix}_indices"] = level.gather(start_latent, history)
        return context

    def output(self, sampled: torch.Tensor, start_latent: torch.Tensor) -> torch.Tensor:
        """The frames this section adds to the history/video: the sampled window, plus the start latent in
        front when the section joins the start frame (the original's last inverted section)."""
        if self.joins_start:
            return torch.cat([start_latent.to(sampled), sampled], dim=2)
        return sampled

    def tokens(self, latent_height: int, latent_width: int) -> Tuple[int, int, int, int]:
        """(1x, 2x, 4x, noisy) token counts."""
        noisy = len(self.noisy_indices) * (latent_height // 2) * (latent_width // 2)
        return tuple(level.tokens(latent_height, latent_width) for level in self.levels) + (noisy,)


@dataclass(frozen=True)
class TokenBudget:
    """Tokens one section puts through the transformer (text and image tokens not included)."""

    latent_height: int
    latent_width: int
    frames_1x: int
    frames_2x: int
    frames_4x: int
    noisy_frames: int
    tokens_1x: int
    tokens_2x: int
    tokens_4x: int
    noisy_tokens: int

    @property
    def context_tokens(self) -> int:
        return self.tokens_1x + self.tokens_2x + self.tokens_4x

    @property
    def total_tokens(self) -> int:
        return self.context_tokens + self.noisy_tokens

    def __str__(self) -> str:
        def row(name, frames, tokens):
            return f"  {name:<13}{frames:>4} frames {tokens:>8} tokens"

        def total(name, tokens, note=""):
            return f"  {name:<25}{tokens:>8} tokens{note}"

        return "\n".join([
            f"FramePack tokens per section (latent {self.latent_height}x{self.latent_width}):",
            row("1x clean", self.frames_1x, self.tokens_1x),
            row("2x history", self.frames_2x, self.tokens_2x),
            row("4x history", self.frames_4x, self.tokens_4x),
            total("context", self.context_tokens),
            row("noisy window", self.noisy_frames, self.noisy_tokens),
            total("total", self.total_tokens, " (same for every section and video length)"),
        ])


@dataclass(frozen=True)
class PackingSchedule:
    mode: str
    window: int
    counts: Tuple[int, int, int]  # history frames at 1x, 2x, 4x
    first_frame_priority: bool
    sections: Tuple[Section, ...]

    def __len__(self) -> int:
        return len(self.sections)

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections)

    def __getitem__(self, i: int) -> Section:
        return self.sections[i]

    @property
    def history_padding(self) -> int:
        """Zero frames the history buffer starts with, so every level can always be filled."""
        return sum(self.counts)

    def initial_history(self, start_latent: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b, c, _, h, w = start_latent.shape
        zeros = torch.zeros(b, c, self.history_padding, h, w, dtype=dtype, device=start_latent.device)
        if self.mode == "forward":
            return torch.cat([zeros, start_latent.to(zeros)], dim=2)
        return zeros

    def append(self, history: torch.Tensor, new_latents: torch.Tensor) -> torch.Tensor:
        """Add a section's output in temporal order: prepended when inverted, appended when forward."""
        new_latents = new_latents.to(history)
        pair = [new_latents, history] if self.mode == "inverted" else [history, new_latents]
        return torch.cat(pair, dim=2)

    def video_latents(self, history: torch.Tensor) -> torch.Tensor:
        """The real frames so far, in temporal order (the initial zero frames stripped)."""
        real = history.shape[2] - self.history_padding
        return history[:, :, :real] if self.mode == "inverted" else history[:, :, self.history_padding:]

    def token_budget(self, latent_height: int, latent_width: int) -> TokenBudget:
        _check_positive_int("latent_height", latent_height)
        _check_positive_int("latent_width", latent_width)
        first = self.sections[0]
        tokens = first.tokens(latent_height, latent_width)
        if any(s.tokens(latent_height, latent_width) != tokens for s in self.sections):
            raise AssertionError("packing schedule has sections of different token counts")  # O(1) broken
        return TokenBudget(
            latent_height, latent_width,
            *(level.frames for level in first.levels), len(first.noisy_indices), *tokens,
        )


def make_schedule(
    mode: str,
    num_sections: int,
    window: int = 9,
    counts: Optional[Counts] = None,
    first_frame_priority: bool = True,
    anti_drift_padding: bool = True,
    kernels_available: Sequence[int] = KERNELS,
    even_spread: Optional[int] = None,
) -> PackingSchedule:
    """Build the per-section layouts of one generation.

    mode: "inverted" (anti-drifting, sampled from the end back to the start frame; the original I2V model)
        or "forward" (F1: sampled forward from the start frame).
    counts: history frames per level, as (c1, c2, c4) or {kernel: count}; default (1, 2, 16).
    even_spread: instead of counts, spread this many history frames evenly (see ``even_spread_counts``).
    first_frame_priority: the start latent always takes a 1x slot (the I2V default). Off, it gets none: in
        forward mode it still reaches the context as ordinary history; in inverted mode it is not in it.
    anti_drift_padding: inverted paddings [3, 2, ..., 2, 1, 0] when num_sections > 4 instead of
        [n-1, ..., 0] (the original's default). Forward mode has no padding.
    kernels_available: the clean-latent kernels the loaded weights have embedders for.
    """
    if mode not in MODES:
        raise ValueError(f"unknown packing mode {mode!r}; use one of {MODES}")
    _check_positive_int("num_sections", num_sections, MAX_SECTIONS,
                        "a video of more sections is better made as several extensions (extend_latents)")
    _check_positive_int("window", window, MAX_WINDOW, "FramePack is trained with window 9")
    available = _check_kernels_available(kernels_available)
    if even_spread is not None:
        if counts is not None:
            raise ValueError("give either counts or even_spread, not both")
        counts = even_spread_counts(even_spread, available)
    c1, c2, c4 = _normalise_counts(DEFAULT_COUNTS if counts is None else counts)
    for kernel, count in zip(KERNELS, (c1, c2, c4)):
        if count > 0 and kernel not in available:
            raise ValueError(
                f"counts ask for {count} frame(s) at kernel {kernel} ({kernel}x), but the weights have no "
                f"{EMBEDDER_NAMES[kernel]}; set that count to 0 or load weights that include it"
            )
    if first_frame_priority and 1 not in available:
        raise ValueError(
            f"first_frame_priority puts the start frame at kernel 1 (1x), but the weights have no "
            f"{EMBEDDER_NAMES[1]}; turn first_frame_priority off or load weights that include it"
        )

    s = 1 if first_frame_priority else 0
    if mode == "inverted":
        paddings = list(reversed(range(num_sections)))
        if anti_drift_padding and num_sections > 4:
            paddings = [3] + [2] * (num_sections - 3) + [1, 0]
        positions = sum(paddings) * window + num_sections * (s + window + c1 + c2 + c4)
        if positions > MAX_LAYOUT_POSITIONS:
            raise ValueError(f"{num_sections} inverted sections of window {window} without anti_drift_padding would "
                             f"need {positions} RoPE positions (the gap grows with every section); turn "
                             "anti_drift_padding on, as the original does, or use fewer sections")
        history_slots = (tuple(range(0, c1)), tuple(range(c1, c1 + c2)), tuple(range(c1 + c2, c1 + c2 + c4)))
    else:
        paddings = [0] * num_sections
        history_slots = (tuple(range(-c1, 0)), tuple(range(-(c1 + c2), -c1)),
                         tuple(range(-(c1 + c2 + c4), -(c1 + c2))))

    sections = []
    for i, p in enumerate(paddings):
        if mode == "inverted":
            start, blank, noisy, post, h2, h4 = _consecutive([s, p * window, window, c1, c2, c4])
            first_video_frame = 1 + (num_sections - 1 - i) * window
        else:
            start, h4, h2, post, noisy = _consecutive([s, c4, c2, c1, window])
            blank, first_video_frame = (), 1 + i * window
        sections.append(Section(
            index=i, padding=p, blank_indices=blank, noisy_indices=noisy,
            clean=Level(1, start + post, bool(s), history_slots[0]),
            history_2x=Level(2, h2, False, history_slots[1]),
            history_4x=Level(4, h4, False, history_slots[2]),
            is_last=i == num_sections - 1,
            joins_start=mode == "inverted" and p == 0,
            first_video_frame=first_video_frame,
            video_index=num_sections - 1 - i if mode == "inverted" else i,
        ))
    return PackingSchedule(mode, window, (c1, c2, c4), first_frame_priority, tuple(sections))


def _consecutive(sizes: Sequence[int]) -> list:
    """Split 0, 1, 2, ... into consecutive groups of the given sizes."""
    groups, at = [], 0
    for size in sizes:
        groups.append(tuple(range(at, at + size)))
        at += size
    return groups


def _check_positive_int(name: str, value, maximum: Optional[int] = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r} (a typo?); {why}")


def _check_kernels_available(kernels: Sequence[int]) -> Tuple[int, ...]:
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(
                f"kernel {k!r} is not a FramePack clean-latent kernel; only {KERNELS} exist "
                f"({', '.join(EMBEDDER_NAMES.values())}); remove it from kernels_available"
            )
    return tuple(kernels)


def _normalise_counts(counts: Counts) -> Tuple[int, int, int]:
    if isinstance(counts, Mapping):
        for k in counts:
            if k not in KERNELS:
                raise ValueError(
                    f"counts name kernel {k!r}, but FramePack only has clean-latent kernels {KERNELS}; "
                    f"use keys from {KERNELS}"
                )
        counts = tuple(counts.get(k, 0) for k in KERNELS)
    counts = tuple(counts)
    if len(counts) != len(KERNELS):
        raise ValueError(f"counts must give one count per kernel {KERNELS}, got {counts!r}")
    for k, c in zip(KERNELS, counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"count for kernel {k} must be a non-negative integer, got {c!r}")
        if c > MAX_HISTORY_FRAMES:
            raise ValueError(f"count for kernel {k} is {c}, more than {MAX_HISTORY_FRAMES} history frames (a typo?); "
                             "the original uses 1, 2 and 16")
    return counts
