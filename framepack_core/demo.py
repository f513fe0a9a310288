"""A whole FramePack generation on CPU with the project's tiny trained model: ``python -m framepack_core.demo``.

The model (``train.WEIGHTS``, trained by ``python -m framepack_core.train``) knows the procedural world of
world.py: coloured shapes sliding in the prompt's direction until they rest against a wall. From a held-out start
frame the demo generates a multi-section video in both modes, inverted (anti-drifting) and forward (F1),
through the real ``generate()``, section decode and mp4 writer, and writes them side by side with the true
continuation (truth | inverted | forward). It prints each mode's error against the truth.

``--random`` runs a tiny model with random weights instead (noise, not a picture): the machinery alone,
with the per-section token budget, time and peak memory, which stay flat however long the video.
Real videos need the released FramePack weights, the HunyuanVideo VAE and the text/vision encoders, which
the ComfyUI nodes load.
"""

import argparse
import time
from pathlib import Path

import torch

from . import train, world
from .decode import VideoFileSink, decode_sections
from .loading import load_transformer
from .model import FramePackTransformer
from .packing import MODES, make_schedule, sections_for_length
from .pipeline import Prompt, SamplingSettings, generate
from .synthetic import TINY, random_state_dict


class PeakMemory:
    """Peak memory since the last ``reset()``: CUDA allocator peak on GPU, peak RSS (VmHWM) on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the RSS high-water mark
            except OSError:
                pass

    def peak_mib(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return float("nan")
        return int(status.split("VmHWM:")[1].split()[0]) / 1024


def preview_decode(latents, scale=8):
    """A fixed latent-to-RGB decoder shaped like the video VAE: (1, C, T, h, w) -> (4T-3, 8h, 8w, 3).

    Each latent frame is projected to RGB by a fixed channel mix; the first frame maps to one pixel frame and
    every later one to four, as the HunyuanVideo VAE does.
    """
    channels = latents.shape[1]
    mix = torch.sin(torch.arange(channels * 3, dtype=torch.float32).reshape(3, channels)) / channels**0.5
    rgb = torch.einsum("rc,bcthw->bthwr", mix, latents.float()).sigmoid()[0]
    rgb = torch.cat([rgb[:1], rgb[1:].repeat_interleave(4, dim=0)])
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def section_report(schedule, latent_height, latent_width, device):
    """Callbacks that time each section and its peak memory; returns (on_section, rows)."""
    meter, rows = PeakMemory(device), []
    tokens = schedule.token_budget(latent_height, latent_width).total_tokens
    clock = {"t": time.perf_counter()}
    meter.reset()

    def on_section(section, _video):
        now = time.perf_counter()
        rows.append((len(rows), section.video_index, section.padding, tokens, now - clock["t"], meter.peak_mib()))
        meter.reset()
        clock["t"] = time.perf_counter()

    return on_section, rows


def print_rows(rows):
    print(f"{'sampled':>7} {'video':>5} {'padding':>7} {'tokens':>7} {'seconds':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r[0]:>7} {r[1]:>5} {r[2]:>7} {r[3]:>7} {r[4]:>8.2f} {r[5]:>9.0f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", action="store_true", help="a random-weight model instead of the trained one")
    parser.add_argument("--sections", type=train.positive_int, default=6, help="sections per video (trained model)")
    parser.add_argument("--steps", type=train.positive_int, default=None, help="sampling steps (default: 25 trained, 6 random)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; the trained demo's start is held-out clip SEED")
    parser.add_argument("--out", default="framepack_demo.mp4")
    parser.add_argument("--strip", default=None, metavar="PNG", help="also write a frame strip (trained model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="video length at 30 fps (random model)")
    parser.add_argument("--window", type=train.positive_int, default=9, help="latent frames per section (random model)")
    parser.add_argument("--size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"),
                        help="latent size (random model)")
    args = parser.parse_args(argv)
    if args.random:
        random_demo(args)
    else:
        trained_demo(args)


def trained_demo(args):
    model = load_transformer(train.WEIGHTS, compute_dtype=torch.float32)
    clip = world.held_out_clip(args.seed)
    settings = SamplingSettings(steps=25 if args.steps is None else args.steps, seed=args.seed)
    print(f"{train.WEIGHTS.name}: a tiny FramePack trained on world.py's shapes. Held-out start {args.seed}: "
          f"{len(clip.colours)} shape(s) moving {clip.direction}; {args.sections} sections of {train.WINDOW} "
          f"latent frames, {settings.steps} steps.")
    truth = clip.frames(range(1 + args.sections * train.WINDOW))
    began, videos = time.perf_counter(), [world.decode(truth)[0]]
    for mode in MODES:
        schedule = make_schedule(mode, args.sections, window=train.WINDOW)
        with torch.inference_mode():
            result = generate(model, schedule, *clip.conditioning(), settings=settings)
        frames = decode_sections(result.latents, mode, result.window, result.sections, world.decode)
        error = world.truth_error(result.latents, truth)
        step, change = world.motion(frames)
        print(f"{mode:>9}: error vs the true continuation {error[1:].mean():.3f} (first section "
              f"{error[1:1 + train.WINDOW].mean():.3f}, last {error[-train.WINDOW:].mean():.3f}); distance to the "
              f"nearest world frame {world.world_error(result.latents, clip).mean():.3f}; frame-to-frame change "
              f"{step:.3f} and first-to-last change {change:.2f} of the frames' spread")
        videos.append(frames)
    print(f"    truth: distance to the nearest world frame {world.world_error(truth, clip).mean():.3f} (latent units; "
          f"the true frames spread {truth.std():.2f} around their mean)")
    panels = side_by_side(videos)
    with VideoFileSink(args.out, fps=30) as sink:
        sink(panels)
        path, count = sink.result()
    print(f"wrote {path} ({count} frames: truth | inverted | forward) in {time.perf_counter() - began:.1f} s.")
    if args.strip:
        write_strip(args.strip, videos)
        print(f"wrote {args.strip}")


def side_by_side(videos, gap=4):
    """(N, H, W, 3) videos of one length joined left to right with white gaps."""
    white = torch.ones(videos[0].shape[0], videos[0].shape[1], gap, 3)
    parts = [p for v in videos for p in (v, white)][:-1]
    return torch.cat(parts, dim=2)


def write_strip(path, videos, count=8, gap=4):
    """A PNG: one row per video, ``count`` evenly spaced frames each (PyAV's PNG encoder, no imaging library)."""
    import av

    picks = torch.linspace(0, videos[0].shape[0] - 1, count).round().long()
    rows = [side_by_side(list(v[picks].unsqueeze(1)), gap)[0] for v in videos]
    white = torch.ones(gap, rows[0].shape[1], 3)
    image = torch.cat([p for r in rows for p in (r, white)][:-1])
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], "rgb24"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)


def random_demo(args):
    torch.manual_seed(args.seed)
    model = FramePackTransformer(TINY).eval().requires_grad_(False)
    model.load_state_dict(random_state_dict(TINY, seed=args.seed))
    h, w = args.size
    schedule = make_schedule("inverted", sections_for_length(args.seconds, args.window), window=args.window)
    print(schedule.token_budget(h, w))
    g = torch.Generator().manual_seed(args.seed)
    start = torch.randn(1, TINY.in_channels, 1, h, w, generator=g)
    image = torch.randn(1, 729, TINY.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 20, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    settings = SamplingSettings(steps=6 if args.steps is None else args.steps, seed=args.seed)

    on_section, rows = section_report(schedule, h, w, "cpu")
    began = time.perf_counter()
    with torch.inference_mode():
        result = generate(model, schedule, start, image, prompt, settings=settings, on_section=on_section)
    print(f"\n{len(schedule)} sections, inverted anti-drifting order (video section n-1 first):")
    print_rows(rows)
    with VideoFileSink(args.out, fps=30) as sink:
        path, frames = decode_sections(result.latents, result.mode, result.window, result.sections,
                                       preview_decode, sink=sink)
    print(f"\nwrote {path} ({frames} frames) in {time.perf_counter() - began:.1f} s total."
          " Random weights: expect coloured noise, not a picture.")


if __name__ == "__main__":
    main()
