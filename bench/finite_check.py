"""Cost of the per-step finite check (checks.StepCheck) against one sampler step, on the MEDIUM config.

    python bench/finite_check.py [--quick]

1. One section (window 9, 32x32 latent, as bench/forward.py's medium case) sampled with UniPC through the
   real transformer and denoiser, with the check in the step callback and with an empty callback,
   alternated ABAB; reports the median of the back-to-back ratios.
2. The check alone (``isfinite(x0).all()`` plus reading the previous step's flag) timed over many calls on
   a prediction of the section's shape, as a share of the median sampler step. The difference in (1) is
   below timing noise on a busy machine; (2) is the cost itself.

A benchmark, never run as a test.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benches run from a checkout, without installing the package

import torch  # noqa: E402

from framepack_core.checks import StepCheck  # noqa: E402
from framepack_core.loading import load_transformer  # noqa: E402
from framepack_core.pipeline import DefaultSectionSampler, SamplingSettings  # noqa: E402
from framepack_core.synthetic import MEDIUM, random_state_dict, save_single_file, section_inputs  # noqa: E402

HEIGHT, WIDTH, WINDOW = 32, 32, 9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    steps, reps = (2, 2) if args.quick else (3, 3)

    with tempfile.TemporaryDirectory() as tmp:
        model = load_transformer(save_single_file(Path(tmp) / "medium.safetensors", random_state_dict(MEDIUM)))
    inputs = section_inputs(MEDIUM, layout="inverted", height=HEIGHT, width=WIDTH, window=WINDOW)
    noise = inputs.pop("hidden_states")
    inputs.pop("timestep")
    sampler = DefaultSectionSampler(model, SamplingSettings(steps=steps))

    def plain(step, steps, x, x0):
        pass

    def section(callback):
        start = time.perf_counter()
        sampler(noise, inputs, None, callback, None)
        return (time.perf_counter() - start) / steps

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores, fp32 CPU; "
          f"MEDIUM, latent {HEIGHT}x{WIDTH}, window {WINDOW}, {steps} UniPC steps per section, {reps} sections each")
    with torch.inference_mode():
        section(plain)  # warm-up
        times = {"without check": [], "with check": []}
        for _ in range(reps):  # ABAB
            times["without check"].append(section(plain))
            check = StepCheck("bench")
            times["with check"].append(section(lambda step, steps, x, x0: check(step, steps, x0)))
            check.finish()

        x0 = torch.randn_like(noise)
        check, calls = StepCheck("bench"), 2000
        start = time.perf_counter()
        for i in range(calls):
            check(i, calls, x0)
        check.finish()
        check_seconds = (time.perf_counter() - start) / calls

    step = statistics.median(times["without check"])
    ratio = statistics.median(a / b for a, b in zip(times["with check"], times["without check"]))
    print(f"\n{'':<16}{'median s/step':>14}{'min s/step':>12}")
    for name, t in times.items():
        print(f"{name:<16}{statistics.median(t):>14.4f}{min(t):>12.4f}")
    print(f"\nsampler step with / without the check (median of ABAB pairs): {ratio:.4f}")
    print(f"the check alone: {check_seconds * 1e6:.1f} us per step on a {tuple(x0.shape)} prediction")
    print(f"check / sampler step: {check_seconds / step:.4%} (must stay < 1%)")


if __name__ == "__main__":
    main()
