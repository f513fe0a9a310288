"""Real CFG: positive and negative as one batch of 2 against one after the other, at the medium config.

    python bench/cfg_batch.py [--quick] [--device cuda] [--dtype bfloat16]

One guided denoiser step (cfg 3, prompts of different lengths) on the MEDIUM random model with a
FramePack section's layout (32x32 latent, window 9; bench/forward.py's medium size), timed ABAB so that
slow drift hits both alike. Prints median seconds per step for each path, their ratio, and the largest
difference of the two results. A benchmark, never run as a test.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core.model import FramePackTransformer  # noqa: E402
from framepack_core.sampling import make_flow_denoiser  # noqa: E402
from framepack_core.synthetic import MEDIUM, random_state_dict, section_inputs  # noqa: E402

SIZE = dict(height=32, width=32, window=9)


def conditions(config, device, dtype, text_lengths=(77, 20)):
    prompts = []
    for seed, n in enumerate(text_lengths):
        kw = section_inputs(config, **SIZE, text_lengths=[n], seed=0)  # same latents and context for both
        text = section_inputs(config, **SIZE, text_lengths=[n], seed=seed + 1)
        kw.update({k: text[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")})
        prompts.append({k: v.to(device) if k.endswith(("indices", "mask")) else v.to(device, dtype)
                        for k, v in kw.items()})
    x = prompts[0].pop("hidden_states")
    for p in prompts:
        p.pop("timestep")
        p.pop("hidden_states", None)
    return x, prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = FramePackTransformer(MEDIUM, compute_dtype=dtype).eval().requires_grad_(False)
    model.load_state_dict(random_state_dict(MEDIUM))
    model.to(args.device, dtype)
    x, (positive, negative) = conditions(MEDIUM, args.device, dtype)
    sigma = torch.full((1,), 0.7, device=args.device)
    paths = {"sequential": make_flow_denoiser(model, positive, negative, 3.0, dtype=dtype, batch_cfg=False),
             "batched": make_flow_denoiser(model, positive, negative, 3.0, dtype=dtype, batch_cfg=True)}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    reps = 3 if args.quick else 9
    times = {k: [] for k in paths}
    with torch.inference_mode():
        out = {k: f(x.float(), sigma) for k, f in paths.items()}  # warm-up
        for _ in range(reps):
            for k, f in paths.items():
                sync()
                start = time.perf_counter()
                f(x.float(), sigma)
                sync()
                times[k].append(time.perf_counter() - start)
    diff = (out["batched"] - out["sequential"]).abs().max().item()
    ratio = statistics.median(s / b for s, b in zip(times["sequential"], times["batched"]))
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads; MEDIUM "
          f"model, latent {SIZE['height']}x{SIZE['width']}, window {SIZE['window']}, cfg 3, {reps} reps after warm-up")
    print(f"{'path':<11} {'median s/step':>14} {'min':>8}")
    for k, v in times.items():
        print(f"{k:<11} {statistics.median(v):>14.4f} {min(v):>8.4f}")
    print(f"speedup sequential / batched (median of back-to-back pairs): {ratio:.2f}x; max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
