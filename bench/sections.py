"""O(1) evidence: per-section time and peak memory for videos of 2, 4, 8 and 16 sections.

    python bench/sections.py            # tiny and medium random models, CPU
    python bench/sections.py --quick    # fewer steps and sections

FramePack's claim is that every section costs the same however long the video is. For each config and
video length this runs a whole inverted generation and prints, per video, the first and last sampled
section's time and peak memory, and the ratio last/first (1.0 = flat).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core.demo import section_report  # noqa: E402
from framepack_core.model import FramePackTransformer  # noqa: E402
from framepack_core.packing import make_schedule  # noqa: E402
from framepack_core.pipeline import Prompt, SamplingSettings, generate  # noqa: E402
from framepack_core.synthetic import MEDIUM, TINY, random_state_dict  # noqa: E402


def build(config):
    model = FramePackTransformer(config).eval().requires_grad_(False)
    model.load_state_dict(random_state_dict(config))
    g = torch.Generator().manual_seed(0)
    prompt = Prompt(torch.randn(1, 20, config.text_dim, generator=g), torch.randn(1, config.pooled_dim, generator=g))
    return model, prompt, torch.randn(1, 729, config.image_dim, generator=g)


def run(config, num_sections, size, window, steps):
    model, prompt, image = build(config)
    schedule = make_schedule("inverted", num_sections, window=window)
    start = torch.randn(1, config.in_channels, 1, *size)
    settings = SamplingSettings(steps=steps)
    with torch.inference_mode():  # warm-up: one short generation so one-time setup costs are not counted
        generate(model, make_schedule("inverted", 1, window=window), start, image, prompt, settings=settings)
        on_section, rows = section_report(schedule, *size, "cpu")
        generate(model, schedule, start, image, prompt, settings=settings, on_section=on_section)
    return schedule.token_budget(*size).total_tokens, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lengths = (2, 4, 8) if args.quick else (2, 4, 8, 16)
    steps = 2 if args.quick else 4
    setups = [("tiny", TINY, (32, 48)), ("medium", MEDIUM, (16, 24))]
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"CPU, {torch.get_num_threads()} threads, window 9, {steps} steps per section, inverted schedule\n")
    header = (f"{'config':<7} {'sections':>8} {'tokens':>7} {'first s':>8} {'last s':>8} {'median s':>8} "
              f"{'last/first':>10} {'first MiB':>9} {'last MiB':>9} {'last/first':>10}")
    print(header)
    summary = []
    for name, config, size in setups:
        for n in lengths:
            tokens, rows = run(config, n, size, window=9, steps=steps)
            times, peaks = [r[4] for r in rows], [r[5] for r in rows]
            t_ratio, m_ratio = times[-1] / times[0], peaks[-1] / peaks[0]
            summary.append((name, n, t_ratio, m_ratio))
            print(f"{name:<7} {n:>8} {tokens:>7} {times[0]:>8.3f} {times[-1]:>8.3f} {statistics.median(times):>8.3f} "
                  f"{t_ratio:>10.2f} {peaks[0]:>9.0f} {peaks[-1]:>9.0f} {m_ratio:>10.3f}", flush=True)
    print("\nratio last/first sampled section (1.00 = O(1)):")
    for name, n, t_ratio, m_ratio in summary:
        print(f"  {name:<7} {n:>2} sections: time {t_ratio:.2f}, peak memory {m_ratio:.3f}")


if __name__ == "__main__":
    main()
