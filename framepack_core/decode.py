"""Section-wise VAE decoding with cross-fades, streamed to a frame sink.

The video VAE turns ``t`` latent frames into ``4t-3`` pixel frames. FramePack never decodes a whole video
at once: each section is decoded as one clip together with a window of neighbouring latents, and
neighbouring clips are joined by a linear cross-fade over ``window*4-3`` pixel frames (the earlier clip's
tail fades out with weights 1 -> 0 while the later clip's head fades in).

The original decodes while it samples, which in inverted (anti-drifting) mode means from the temporal end
back to the start, prepending each new clip. A cross-fade only touches the head of one clip and the tail of
the clip before it, and inside one clip those two regions never meet, so the result is the same as
decoding every section's clip on its own and joining the clips in temporal order. That is what this module
does: one clip at a time, in temporal order, handing frames to a sink as soon as no later clip can change
them. At most two clips are held at once, whatever the video length.

Typical use::

    sections = [(0, 10), (10, 19), (19, 28)]                 # latent ranges, temporal order
    frames = decode_sections(latents, "inverted", 9, sections, vae_decode)          # (N, H, W, 3)
    with VideoFileSink("out.mp4", fps=30) as sink:
        path, count = decode_sections(latents, "inverted", 9, sections, vae_decode, sink=sink)

Layouts: latents are (1, C, T, h, w); pixels are ComfyUI images, (frames, height, width, 3) floats in [0, 1].
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .checks import check_latent
from .packing import MODES, check_mode_window, overlap_frames, pixel_frames, section_ranges  # noqa: F401 (re-exported)

Range = Tuple[int, int]  # (start, stop) latent frames of a section, temporal order


def _check_sections(mode: str, sections: Sequence[Range]) -> List[Range]:
    ranges = []
    for i, section in enumerate(sections):
        try:
            start, stop = (int(v) for v in section)
        except (TypeError, ValueError):
            raise ValueError(f"section {i} must be a (start, stop) pair of latent frames, got {section!r}.") from None
        if start >= stop:
            raise ValueError(f"section {i} is empty or reversed: ({start}, {stop}).")
        if ranges and start != ranges[-1][1]:
            raise ValueError(f"sections must be contiguous in temporal order: section {i - 1} ends at "
                             f"{ranges[-1][1]} but section {i} starts at {start}.")
        ranges.append((start, stop))
    if not ranges:
        raise ValueError("sections is empty: nothing to decode.")
    first = 0 if mode == "inverted" else 1
    if ranges[0][0] != first:
        where = ("includes the start latent at frame 0" if mode == "inverted"
                 else "begins after the start latent at frame 0")
        raise ValueError(f"in {mode} mode the first section {where}, so it must start at {first}; "
                         f"got {ranges[0]}.")
    return ranges


def decode_clips(mode: str, window: int, sections: Sequence[Range]) -> List[Range]:
    """Latent-frame ranges to decode, one clip per section, in temporal order.

    ``sections``: the (start, stop) latent ranges each section produced in the final video latents, in
    temporal order. Inverted mode: the first section includes the start latent (it starts at 0); forward
    mode: the start latent at frame 0 belongs to no section (the first section starts at 1).

    inverted: every section but the temporally last decodes [start, stop + window) (itself plus one window
    of the later frames it was sampled next to); the temporally last decodes [start, stop).
    forward: the first section decodes [0, stop) (with the start latent); later ones [stop - 2*window, stop).
    """
    check_mode_window(mode, window)
    ranges = _check_sections(mode, sections)
    total = ranges[-1][1]
    last = len(ranges) - 1
    clips = []
    for i, (start, stop) in enumerate(ranges):
        if mode == "inverted":
            clip = (start, stop) if i == last else (start, stop + window)
        else:
            clip = (0, stop) if i == 0 else (stop - 2 * window, stop)
        if clip[0] < 0 or clip[1] > total:
            raise ValueError(f"section {i} {ranges[i]} is too short for window {window}: its decode clip "
                             f"{clip} falls outside the video's latent frames [0, {total}).")
        clips.append(clip)
    _check_clip_lengths(window, clips)
    return clips


def _check_clip_lengths(window: int, clips: List[Range]) -> None:
    # Each cross-fade must fit inside both clips, and a clip's head and tail fades must not meet; otherwise
    # joining in temporal order would no longer equal the original's sampling-order joins.
    if len(clips) < 2:
        return
    overlap = overlap_frames(window)
    for i, (start, stop) in enumerate(clips):
        neighbours = (i > 0) + (i < len(clips) - 1)
        frames = pixel_frames(stop - start)
        if frames < neighbours * overlap:
            raise ValueError(f"decode clip {i} {(start, stop)} gives {frames} pixel frames, too few to cross-fade "
                             f"with {neighbours} neighbour(s) over {overlap} frames each (window {window}).")


def _fade_weights(overlap: int, like: torch.Tensor) -> torch.Tensor:
    return torch.linspace(1, 0, overlap, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def _cross_fade(earlier_tail: torch.Tensor, later_head: torch.Tensor) -> torch.Tensor:
    w = _fade_weights(earlier_tail.shape[0], earlier_tail)
    return w * earlier_tail + (1 - w) * later_head


def soft_append(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two (N, H, W, 3) clips, cross-fading ``earlier``'s last ``overlap`` frames into ``later``'s first.

    Frame k of the overlap is ``w_k * earlier + (1 - w_k) * later`` with ``w = linspace(1, 0, overlap)``;
    ``overlap <= 0`` simply concatenates. The result has ``len(earlier) + len(later) - overlap`` frames.
    """
    if earlier.shape[1:] != later.shape[1:]:
        raise ValueError(f"cannot join clips of frame shape {tuple(earlier.shape[1:])} and {tuple(later.shape[1:])}.")
    if overlap <= 0:
        return torch.cat([earlier, later], dim=0)
    if earlier.shape[0] < overlap or later.shape[0] < overlap:
        raise ValueError(f"overlap {overlap} is longer than a clip ({earlier.shape[0]} and {later.shape[0]} frames).")
    later = later.to(earlier)
    blended = _cross_fade(earlier[-overlap:], later[:overlap])
    return torch.cat([earlier[:-overlap], blended, later[overlap:]], dim=0)


def _decode_clip(decode: Callable, latents: torch.Tensor, clip: Range, index: int) -> torch.Tensor:
    frames = clip[1] - clip[0]
    pixels = decode(latents[:, :, clip[0]:clip[1]])
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"decode must return a tensor, got {type(pixels).__name__}.")
    if pixels.ndim == 5 and pixels.shape[0] == 1:
        pixels = pixels[0]
    expected = pixel_frames(frames)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"decode must return pixels shaped (1, frames, H, W, 3) or (frames, H, W, 3); "
                         f"got {tuple(pixels.shape)} for clip {index} {clip}.")
    if pixels.shape[0] != expected:
        raise ValueError(f"decode returned {pixels.shape[0]} frames for clip {index} {clip} of {frames} latent "
                         f"frames; a video VAE must give 4*{frames}-3 = {expected}.")
    return pixels.detach().to(device="cpu", dtype=torch.float32)


def decode_sections(latents: torch.Tensor, mode: str, window: int, sections: Sequence[Range],
                    decode: Callable[[torch.Tensor], torch.Tensor], sink=None,
                    progress: Optional[Callable[[int, int], None]] = None):
    """Decode a FramePack video section by section and stream its frames to ``sink``.

    latents: (1, C, T, h, w), T = sections[-1][1]. ``decode`` maps a latent clip (1, C, t, h, w) to pixels
    (1, 4t-3, H, W, 3) (or (4t-3, H, W, 3)) in [0, 1]. Clips (see ``decode_clips``) are decoded one at a
    time in temporal order and cross-faded over ``4*window-3`` frames in float32 on the CPU. ``sink(chunk)``
    receives every final frame exactly once, in order, as (n, H, W, 3) chunks, as soon as no later clip can
    change them; the sink's ``result()`` is returned (None when it has none). The default sink is a
    ``TensorSink``, so the default result is the whole (N, H, W, 3) video with N = 4T-3.

    ``progress(done_clips, total_clips)`` is called after each clip; raising from it (e.g. on a user
    interrupt) stops decoding. The sink is not closed here: the caller owns it.
    """
    clips = decode_clips(mode, window, sections)
    check_latent("latents", latents, frames=None)
    total = clips[-1][1]
    if latents.shape[2] != total:
        raise ValueError(f"the sections cover {total} latent frames but latents has {latents.shape[2]}.")
    if sink is None:
        sink = TensorSink()
    overlap = overlap_frames(window)
    pending = None  # the previous clip's tail, waiting to be cross-faded with this clip's head
    for index, clip in enumerate(clips):
        pixels = _decode_clip(decode, latents, clip, index)
        head = 0
        if pending is not None:
            if pixels.shape[1:] != pending.shape[1:]:
                raise ValueError(f"decode returned frames of shape {tuple(pixels.shape[1:])} for clip {index}, "
                                 f"but {tuple(pending.shape[1:])} before.")
            sink(_cross_fade(pending, pixels[:overlap]))
            head = overlap
        is_last = index == len(clips) - 1
        tail = pixels.shape[0] if is_last else pixels.shape[0] - overlap
        if tail > head:
            sink(pixels[head:tail])
        pending = None if is_last else pixels[tail:].clone()
        del pixels
        if progress is not None:
            progress(index + 1, len(clips))
    result = getattr(sink, "result", None)
    return result() if callable(result) else None


class TensorSink:
    """Collects frame chunks; ``result()`` is the whole (N, H, W, 3) tensor."""

    def __init__(self):
        self._chunks: List[torch.Tensor] = []
        self._whole: Optional[torch.Tensor] = None
        self.frames = 0

    def __call__(self, chunk: torch.Tensor) -> None:
        if self._whole is not None:
            raise RuntimeError("TensorSink already returned its result; it takes no more frames.")
        self._chunks.append(chunk.detach().clone())
        self.frames += chunk.shape[0]

    def result(self) -> torch.Tensor:
        if self._whole is None:
            if not self._chunks:
                raise ValueError("TensorSink received no frames.")
            self._whole = torch.cat(self._chunks, dim=0)
            self._chunks = []
        return self._whole

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# x264's macroblock-tree rate control makes different files from the same frames, run to run, on CPUs with
# AVX-512 (seen with x264 core 165 in PyAV 18.1 wheels; the same build with AVX-512 masked off, or its C code,
# repeats itself); with it off, the same frames always make the same file.
X264_REPEATABLE = "mbtree=0"


class VideoFileSink:
    """Writes frame chunks to an H.264 mp4 as they arrive (PyAV / libx264, yuv420p).

    Frames are (n, H, W, 3) floats in [0, 1], clamped and rounded to uint8 RGB. yuv420p needs even sizes, so
    an odd height or width is padded by repeating the last row/column. ``crf`` is x264's constant rate factor
    (0 lossless, 16 the original FramePack's default, higher is smaller); the same frames always give the
    same file (``X264_REPEATABLE``). ``close()`` finishes the file;
    ``result()`` closes and returns (path, frames written). A sink that received no frames writes no file.

    Crash-safe: the file is a fragmented mp4 (an empty moov up front, then one moof+mdat fragment per
    keyframe interval of ``fragment_seconds``), each fragment handed to the OS as soon as it is complete
    and fsynced after every chunk that completed one. A process killed at any moment leaves a file that
    opens and holds the first ``flushed_frames`` frames. Fragmented H.264 mp4 plays in browsers (ComfyUI's
    preview) and common players.
    """

    MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"

    def __init__(self, path, fps: float = 30, crf: int = 16, codec: str = "libx264", fragment_seconds: float = 1.0):
        try:
            import av  # noqa: F401  (imported lazily so framepack_core works without PyAV)
        except ImportError as exc:
            raise ImportError("VideoFileSink needs PyAV to write mp4 files: pip install av") from exc
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}.")
        if fragment_seconds <= 0:
            raise ValueError(f"fragment_seconds must be positive, got {fragment_seconds!r}.")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.codec = codec
        self.fragment_seconds = fragment_seconds
        self.frames = 0
        self.flushed_frames = 0  # frames in complete fragments already handed to the OS
        self._muxed = 0
        self._file = None
        self._container = None
        self._stream = None
        self._size = None
        self._closed = False

    def _open(self, height: int, width: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb", buffering=0)  # unbuffered: what PyAV flushes reaches the OS
        self._container = av.open(self._file, mode="w", format="mp4",
                                  options={"movflags": self.MOVFLAGS, "flush_packets": "1"})
        rate = Fraction(self.fps).limit_denominator(1001)
        options = {"crf": str(self.crf)}
        if self.codec == "libx264":
            options["x264-params"] = X264_REPEATABLE
        self._stream = self._container.add_stream(self.codec, rate=rate, options=options)
        self._stream.width = width + width % 2
        self._stream.height = height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.gop_size = max(1, round(self.fps * self.fragment_seconds))
        self._size = (height, width)

    def _mux(self, packets) -> None:
        for packet in packets:
            if packet.is_keyframe:  # the muxer writes out the fragment before a keyframe (frag_keyframe)
                self.flushed_frames = self._muxed
            self._container.mux(packet)
            self._muxed += 1

    def __call__(self, chunk: torch.Tensor) -> None:
        import av

        if self._closed:
            raise RuntimeError(f"VideoFileSink for {self.path} is closed; it takes no more frames.")
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise ValueError(f"VideoFileSink takes (frames, H, W, 3) chunks, got {tuple(chunk.shape)}.")
        height, width = chunk.shape[1], chunk.shape[2]
        if self._container is None:
            self._open(height, width)
        elif (height, width) != self._size:
            raise ValueError(f"frame size changed from {self._size} to {(height, width)} in {self.path}.")
        pixels = (chunk.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        if height % 2 or width % 2:
            pixels = torch.nn.functional.pad(pixels.permute(0, 3, 1, 2).float(), (0, width % 2, 0, height % 2),
                                             mode="replicate").permute(0, 2, 3, 1).to(torch.uint8)
        flushed = self.flushed_frames
        for frame in pixels.numpy():
            self._mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += pixels.shape[0]
        if self.flushed_frames != flushed:
            os.fsync(self._file.fileno())  # fragments survive a power loss too, not only a killed process

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            try:
                self._mux(self._stream.encode())
            finally:
                try:
                    self._container.close()
                    os.fsync(self._file.fileno())
                    self.flushed_frames = self._muxed
                finally:
                    self._file.close()

    def result(self) -> Tuple[Path, int]:
        self.close()
        return self.path, self.frames

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
