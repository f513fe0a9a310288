"""MagCache calibration: one uncached generation that records the per-step magnitude ratios.

    python -m framepack_core.magcache_calibrate MODEL.safetensors --out my_model_25.json [--steps 25] ...

The ratios describe the weights and the step schedule, not the picture (the MagCache paper finds them
nearly the same for any prompt), so this command calibrates with seeded random conditioning at a chosen
latent size. The ComfyUI node FramePack MagCache Calibrate does the same with your real prompt and image.
Put the JSON file in ComfyUI's ``models/framepack_magcache/`` and pick it in the sampler.
"""

import argparse
import dataclasses
import logging

import torch

from .cache import MagCacheCalibration, save_calibration
from .pipeline import Prompt, SamplingSettings, generate

log = logging.getLogger(__name__)


def calibrate(model, schedule, start_latent, image_embeddings, prompt, settings, **generate_kwargs):
    """Run one generation with no skipping; return (ratios averaged over its sections, its result)."""
    if settings.teacache_threshold is not None or settings.cache is not None:
        raise ValueError("A MagCache calibration runs uncached: leave teacache_threshold and cache unset.")
    if settings.steps < 2:
        raise ValueError(f"A MagCache calibration needs at least 2 steps, got {settings.steps}.")
    recorder = MagCacheCalibration()
    settings = dataclasses.replace(settings, cache=recorder)
    result = generate(model, schedule, start_latent, image_embeddings, prompt, settings=settings, **generate_kwargs)
    return recorder.ratios(), result


def main(argv=None):
    from .loading import load_transformer
    from .packing import make_schedule

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="FramePack transformer checkpoint (.safetensors file or diffusers folder)")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--mode", choices=("inverted", "forward"), default="inverted",
                        help="inverted for FramePackI2V_HY, forward for the F1 model")
    parser.add_argument("--size", type=int, nargs=2, default=(80, 80), metavar=("H", "W"),
                        help="latent size (image size / 8); 80 80 is the 640 bucket")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--sections", type=int, default=1)
    parser.add_argument("--seed", type=int, default=31337)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dtype = getattr(torch, args.dtype)
    model = load_transformer(args.model, compute_dtype=dtype).to(args.device)
    config = model.config
    g = torch.Generator().manual_seed(args.seed)
    h, w = args.size
    start = torch.randn(1, config.in_channels, 1, h, w, generator=g)
    image = torch.randn(1, 729, config.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 64, config.text_dim, generator=g), torch.randn(1, config.pooled_dim, generator=g))
    settings = SamplingSettings(steps=args.steps, seed=args.seed)
    with torch.inference_mode():
        ratios, _ = calibrate(model, make_schedule(args.mode, args.sections, window=args.window), start, image,
                              prompt, settings)
    path = save_calibration(args.out, ratios, mode=args.mode, latent_size=[h, w], window=args.window,
                            source="framepack_core.magcache_calibrate (random conditioning)")
    log.info("wrote %s: %d ratios %s", path, len(ratios), [round(r, 4) for r in ratios])


if __name__ == "__main__":
    main()
