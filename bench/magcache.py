"""MagCache and TeaCache on the tiny random model: steps skipped and error against the uncached run.

    python bench/magcache.py [--steps 25 12]

Inverted schedule, 2 sections of window 3 on an 8x8 latent, fp32; MagCache uses ratios calibrated on this
model (one uncached run with MagCacheCalibration). Error: relative L2 distance of the video latents to the
uncached result. Random weights make the tiny model far more sensitive to skipped steps than a trained
one: this shows that the rules work, not what quality to expect. A benchmark, never run as a test.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core.cache import MagCache, MagCacheCalibration, TeaCache  # noqa: E402
from framepack_core.model import FramePackTransformer  # noqa: E402
from framepack_core.packing import make_schedule  # noqa: E402
from framepack_core.pipeline import Prompt, SamplingSettings, generate  # noqa: E402
from framepack_core.synthetic import TINY, random_state_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 12])
    args = parser.parse_args()
    model = FramePackTransformer(TINY).eval().requires_grad_(False)
    model.load_state_dict(random_state_dict(TINY, seed=1))
    g = torch.Generator().manual_seed(4)
    start = torch.randn(1, 16, 1, 8, 8, generator=g)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 6, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))

    def run(steps, cache):
        settings = SamplingSettings(steps=steps, seed=2, cache=cache)
        with torch.inference_mode():
            return generate(model, make_schedule("inverted", 2, window=3), start, embeds, prompt, None, settings).latents

    print(f"{'steps':>5} {'cache':<16} {'skipped':>9} {'rel. error':>11}")
    for steps in args.steps:
        calibration = MagCacheCalibration()
        plain = run(steps, calibration)
        caches = [("MagCache 0.05", MagCache(0.05, ratios=calibration.ratios())),
                  ("MagCache 0.1", MagCache(0.1, ratios=calibration.ratios())), ("TeaCache 0.15", TeaCache(0.15))]
        for name, cache in caches:
            error = ((run(steps, cache) - plain).norm() / plain.norm()).item()
            print(f"{steps:>5} {name:<16} {f'{cache.skipped}/{cache.steps}':>9} {error:>11.4f}")


if __name__ == "__main__":
    main()
