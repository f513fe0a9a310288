"""CPU forward speed against diffusers, and host memory while loading a checkpoint.

    python bench/forward.py [--quick]

1. Our FramePackTransformer vs diffusers' HunyuanVideoFramepackTransformer3DModel: same random weights,
   same inputs (one inverted-anti-drifting section), fp32, inference mode, calls interleaved ABAB so that
   slow drift hits both alike. Reports medians and ours/diffusers. Run it on an otherwise idle machine:
   with 2 OpenMP threads on 2 cores, any other busy process stalls every op, and not both models alike.
2. Peak host memory of load_transformer on a bf16 MEDIUM checkpoint, measured in a fresh subprocess
   (so nothing allocated here counts), against one copy of the weights. DESIGN.md section 6.

A benchmark, never run as a test.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benches run from a checkout, without installing the package

import torch  # noqa: E402

from framepack_core.loading import load_transformer  # noqa: E402
from framepack_core.synthetic import (MEDIUM, TINY, diffusers_config, random_state_dict,  # noqa: E402
                                      save_single_file, section_inputs)

# latent (height, width, window): window 9 is FramePack's default section, so the mix of noisy,
# 1x/2x/4x history and context tokens is the real one (noisy ~78%, 1x clean ~17%, history ~4%)
SIZES = {"tiny": (TINY, 16, 16, 9), "medium": (MEDIUM, 32, 32, 9)}
# our keyword -> diffusers' keyword
DIFFUSERS_NAMES = {
    "image_embeddings": "image_embeds", "latent_indices": "indices_latents",
    "clean_latents": "latents_clean", "clean_latent_indices": "indices_latents_clean",
    "clean_latents_2x": "latents_history_2x", "clean_latent_2x_indices": "indices_latents_history_2x",
    "clean_latents_4x": "latents_history_4x", "clean_latent_4x_indices": "indices_latents_history_4x",
}


def token_count(height, width, window):
    """Tokens per section: noisy frames, then 1x clean (2 frames) + 2x (2 frames /2x4x4) + 4x (16 frames /4x8x8)."""
    hw = (height // 2) * (width // 2)
    return {"noisy": window * hw, "clean": 2 * hw + hw // 4 + hw // 4}


def bench_forward(name, reps, tmp):
    """Median seconds per forward for ours and diffusers', and the max relative output difference."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config, height, width, window = SIZES[name]
    state = random_state_dict(config)
    ours = load_transformer(save_single_file(Path(tmp) / f"{name}.safetensors", state))  # the real loader
    kwargs = {k: v for k, v in diffusers_config(config).items() if k != "_class_name"}
    theirs = HunyuanVideoFramepackTransformer3DModel(**kwargs)
    theirs.load_state_dict(state, strict=True)
    theirs.eval().requires_grad_(False)
    del state

    inputs = section_inputs(config, layout="inverted", height=height, width=width, window=window)
    their_inputs = {DIFFUSERS_NAMES.get(k, k): v for k, v in inputs.items()}
    calls = {"ours": lambda: ours(**inputs), "diffusers": lambda: theirs(**their_inputs, return_dict=False)[0]}

    times = {k: [] for k in calls}
    with torch.inference_mode():
        out = {k: f() for k, f in calls.items()}  # warm-up (oneDNN primitive creation, allocator)
        busy = other_cpu_seconds()
        for _ in range(reps):
            for k, f in calls.items():  # ABAB...
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        busy = other_cpu_seconds() - busy
    rel_err = ((out["ours"] - out["diffusers"]).abs().max() / out["diffusers"].abs().max()).item()
    tokens = token_count(height, width, window)
    return {
        "size": f"{height}x{width} latent, window {window}: {tokens['noisy']} noisy + {tokens['clean']} clean tokens",
        **{k: statistics.median(v) for k, v in times.items()},
        **{k + "_min": min(v) for k, v in times.items()},
        # each A/B pair ran back to back under the same load, so the median of their ratios is the
        # estimate least moved by other processes coming and going
        "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"])),
        "rel_err": rel_err,
        "others": max(0.0, busy) / (sum(times["ours"]) + sum(times["diffusers"])) / os.cpu_count(),
    }


def other_cpu_seconds():
    """CPU seconds used so far by everything on the machine except this process (from /proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    mine = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - mine.user - mine.system


# Run in a fresh interpreter: `python bench/forward.py --load-child FILE DTYPE`.
def load_child(path, dtype):
    def status():
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                  if line.startswith(("VmRSS", "VmHWM"))}
        return fields["VmRSS"], fields["VmHWM"]

    torch.ones(1 << 16).sum()  # warm-up allocation: import and allocator overhead is not the loader's
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        base = status()[0]
    except OSError:
        base = status()[1]  # cannot reset: measure from the import peak (underestimates, never over)
    model = load_transformer(path, compute_dtype=getattr(torch, dtype) if dtype != "file" else None)
    after_load = status()[1] - base
    # safetensors maps the file and get_tensor may return views of the mapping, so weights that were not
    # converted are only read from disk when first used: touch them all to count them
    for t in (*model.parameters(), *model.buffers()):
        t.sum()
    rss, peak = status()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(after_load, peak - base, rss - base, weights)


def bench_load(tmp):
    path = save_single_file(Path(tmp) / "medium-bf16.safetensors", random_state_dict(MEDIUM), dtype=torch.bfloat16)
    file_size = os.path.getsize(path)
    rows = []
    for label, dtype in (("bf16 file -> bf16 model", "file"), ("bf16 file -> fp32 model", "float32")):
        out = subprocess.run([sys.executable, __file__, "--load-child", str(path), dtype],
                             check=True, capture_output=True, text=True).stdout.split()
        rows.append((label, file_size, *map(int, out[-4:])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--load-child", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        return load_child(*args.load_child)

    mib = 2 ** 20
    reps = {"tiny": 10 if args.quick else 40, "medium": 3 if args.quick else 9}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores, fp32 CPU, "
          "inference_mode")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in SIZES:
            results[name] = bench_forward(name, reps[name], tmp)
            print(f"  {name}: {results[name]['size']}, {reps[name]} reps each after warm-up")
        load_rows = bench_load(tmp)

    print("\nForward, seconds (ratio: median over back-to-back pairs of ours/diffusers)")
    print(f"{'config':<8} {'ours med':>9} {'diff med':>9} {'ours min':>9} {'diff min':>9} {'ratio':>6} "
          f"{'max rel err':>12} {'other load':>11}")
    for name, r in results.items():
        print(f"{name:<8} {r['ours']:>9.4f} {r['diffusers']:>9.4f} {r['ours_min']:>9.4f} {r['diffusers_min']:>9.4f} "
              f"{r['ratio']:>6.2f} {r['rel_err']:>12.1e} {r['others']:>10.0%}")
    print("other load: CPU that other processes used while timing, as a share of all cores")
    if any(r["others"] > 0.1 for r in results.values()):
        print("WARNING: other processes were busy; the OpenMP threads wait on them, so times AND ratios are "
              "unreliable. Rerun on a quiet machine.")

    print("\nHost memory loading MEDIUM (fresh subprocess; MiB of peak RSS above the post-import baseline)")
    print("one copy = the loaded model's parameter + buffer bytes")
    print("peak in load: during load_transformer only; peak: also touching every weight once (safetensors may "
          "map the file lazily); kept: RSS at the end")
    print(f"{'case':<24} {'file':>7} {'one copy':>9} {'peak in load':>13} {'peak':>7} {'kept':>7}")
    for label, file_size, after_load, peak, kept, weights in load_rows:
        print(f"{label:<24} {file_size / mib:>7.1f} {weights / mib:>9.1f} {after_load / mib:>13.1f} "
              f"{peak / mib:>7.1f} {kept / mib:>7.1f}")

    print("\nRatios")
    for name, r in results.items():
        print(f"  forward {name:<7} ours / diffusers            {r['ratio']:.2f}")
    for label, file_size, after_load, peak, kept, weights in load_rows:
        print(f"  load {label}: peak / file {peak / file_size:.2f}, peak / one copy {peak / weights:.2f}")


if __name__ == "__main__":
    main()
