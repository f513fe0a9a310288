"""A whole FramePack generation on CPU with a tiny random model: ``python -m framepack_core.demo``.

Random weights make noise, not a picture: this shows the machinery (anti-drifting section order, the
constant per-section token budget, flat time and memory per section, streamed decoding to mp4). Real
videos need the released FramePack weights, the HunyuanVideo VAE and the text/vision encoders, which the
ComfyUI nodes load.
"""

import argparse
import time
from pathlib import Path

import torch

from .decode import VideoFileSink, decode_sections
from .model import FramePackTransformer
from .packing import make_schedule, sections_for_length
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
    parser.add_argument("--seconds", type=float, default=4.0, help="video length (30 fps)")
    parser.add_argument("--window", type=int, default=9, help="latent frames per section")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"), help="latent size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="framepack_demo.mp4")
    args = parser.parse_args(argv)

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
    settings = SamplingSettings(steps=args.steps, seed=args.seed)

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
