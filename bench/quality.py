"""Quality of the trained world model (framepack_core/world_model.safetensors) on held-out starts.

    python bench/quality.py [--starts 4] [--sections 16] [--steps 25] [--speed-modes inverted forward]

Every video starts from a held-out clip of world.py (``world.held_out_clip``) and runs through the real
``generate()``. Two per-frame measures, in latent units (RMS over channels and pixels):
- truth error: distance to the true continuation;
- world error: distance to the nearest frame the world can show with the start's shapes (needs no truth;
  blur, noise, colour drift and lost or doubled shapes raise it). The true frames' own value is the floor.
Table 1 also gives travel: how far the shapes get by the last frame, as a share of how far the true ones get.
Drift is the FramePack paper's |M(first 15 % of frames) - M(last 15 %)| for each measure M.

Tables (markdown, for the README):
1. modes: inverted (anti-drifting), forward (F1) and a no-history baseline (forward layout, counts 0/0/0:
   every section sees only the start frame), over ``--sections`` sections, with the per-section error,
   beside the start frame held still (no motion) and the true frames;
2. history budgets: 1x/2x/4x counts and their tokens per section, both modes;
3. speed and memory options against the plain run of the same mode: TeaCache and MagCache thresholds
   (MagCache calibrated on this model, on a start outside the evaluated ones), fp8 weights (e4m3fn storage
   of the block matrices), and real CFG (cfg 2 with the empty prompt as negative) batched against
   sequential. Each row gives the steps skipped, the difference to the plain run, both errors and the
   speed ratio, timed side by side: every start runs the plain video, then each option, in one loop;
4. one denoising step at high noise, where a section's layout is decided, on training examples: the
   predicted section with the clip's prompt and with the opposite direction's, against the true frame
   before the section repeated (does the model use the prompt, and the context?).

A benchmark, never run as a test. Time on the machine's CPU threads (``--threads``, default 2).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core import train, world  # noqa: E402
from framepack_core.cache import MagCache, TeaCache  # noqa: E402
from framepack_core.loading import load_transformer  # noqa: E402
from framepack_core.magcache_calibrate import calibrate  # noqa: E402
from framepack_core.packing import MODES, make_schedule  # noqa: E402
from framepack_core.pipeline import SamplingSettings, generate  # noqa: E402
from framepack_core.sampling import make_flow_denoiser, noise_to_sigma  # noqa: E402

CALIBRATION_START = 999  # held-out clip the MagCache ratios are measured on (not one of the evaluated starts)
BUDGETS = ((1, 2, 16), (1, 2, 4), (1, 2, 0), (1, 0, 0), (0, 0, 0))


@dataclasses.dataclass
class Run:
    latents: torch.Tensor
    seconds: float
    skipped: int = 0
    steps: int = 0


def run(model, clip, mode, sections, settings, counts=None):
    schedule = make_schedule(mode, sections, window=train.WINDOW, counts=counts)
    start, embeds, prompt = clip.conditioning()
    negative = world.prompt(world.NO_DIRECTION) if settings.cfg != 1 else None
    began = time.perf_counter()
    with torch.inference_mode():
        latents = generate(model, schedule, start, embeds, prompt, negative, settings=settings).latents
    cache = settings.cache
    return Run(latents, time.perf_counter() - began, getattr(cache, "skipped", 0), getattr(cache, "steps", 0))


def fifteen_percent(values):
    """(mean of the first 15 % of the generated frames, mean of the last 15 %); frame 0 (the start) left out."""
    values = values[1:]
    k = max(1, round(0.15 * len(values)))
    return values[:k].mean().item(), values[-k:].mean().item()


class Scores:
    """Per-frame truth and world errors of one variant, averaged over starts."""

    def __init__(self):
        self.truth, self.world, self.travel, self.seconds = [], [], [], []

    def add(self, result, clip):
        truth = clip.frames(range(result.latents.shape[2]))
        self.truth.append(world.truth_error(result.latents, truth))
        self.world.append(world.world_error(result.latents, clip))
        self.travel.append(world.travel(result.latents, clip))
        self.seconds.append(result.seconds)

    def summary(self):
        truth, quality = torch.stack(self.truth).mean(0), torch.stack(self.world).mean(0)
        (t0, t1), (w0, w1) = fifteen_percent(truth), fifteen_percent(quality)
        return dict(truth=truth[1:].mean().item(), truth_first=t0, truth_last=t1, truth_drift=abs(t1 - t0),
                    world=quality[1:].mean().item(), world_first=w0, world_last=w1, world_drift=abs(w1 - w0),
                    travel=torch.tensor(self.travel).nanmean().item(),
                    seconds=sum(self.seconds) / len(self.seconds), per_frame_truth=truth)


def per_section(values, sections):
    """Mean of per-frame values over each section's frames, in temporal order."""
    return [values[1 + i * train.WINDOW:1 + (i + 1) * train.WINDOW].mean().item() for i in range(sections)]


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def modes_table(model, clips, args):
    variants = {"inverted": ("inverted", None), "forward": ("forward", None),
                "no history (forward, counts 0/0/0)": ("forward", (0, 0, 0))}
    scores = {name: Scores() for name in variants}
    truth_world, still = Scores(), Scores()
    for i, clip in enumerate(clips):
        settings = SamplingSettings(steps=args.steps, seed=i)
        for name, (mode, counts) in variants.items():
            scores[name].add(run(model, clip, mode, args.sections, settings, counts), clip)
        truth = clip.frames(range(1 + args.sections * train.WINDOW))
        truth_world.add(Run(truth, 0.0), clip)
        still.add(Run(clip.start().expand_as(truth), 0.0), clip)
    baselines = {"start frame held still (no motion)": still}
    print(f"### 1. Modes: {args.sections} sections of {train.WINDOW} latent frames ({len(clips)} held-out starts, "
          f"{args.steps} steps)\n")
    rows = []
    for name, s in [*scores.items(), *baselines.items(), ("true frames (floor of the world error)", truth_world)]:
        r = s.summary()
        rows.append([name, f"{r['truth']:.3f}", f"{r['truth_first']:.3f} -> {r['truth_last']:.3f}",
                     f"{r['truth_drift']:.3f}", f"{r['world']:.3f}", f"{r['world_first']:.3f} -> {r['world_last']:.3f}",
                     f"**{r['world_drift']:.3f}**", f"{r['travel']:.2f}", f"{r['seconds']:.1f}"])
    table(["video", "truth error", "first 15% -> last 15%", "drift", "world error", "first 15% -> last 15%",
           "drift", "travel", "s / video"], rows)
    print("Travel: how far the shapes get from the start to the last frame, as a share of how far the true shapes "
          "get (1 follows the truth, 0 stands still).\n")
    print("Truth error per section (temporal order):\n")
    for name, s in {**scores, **baselines}.items():
        curve = per_section(s.summary()["per_frame_truth"], args.sections)
        print(f"- {name}: " + " ".join(f"{v:.2f}" for v in curve))
    print()
    return scores


def budgets_table(model, clips, args, defaults):
    height, width = world.LATENT_SIZE
    rows = []
    for mode in MODES:
        for counts in BUDGETS:
            if counts == (1, 2, 16):
                scores = defaults[mode]
            else:
                scores = Scores()
                for i, clip in enumerate(clips):
                    scores.add(run(model, clip, mode, args.sections, SamplingSettings(steps=args.steps, seed=i),
                                   counts), clip)
            r = scores.summary()
            budget = make_schedule(mode, 1, window=train.WINDOW, counts=counts).token_budget(height, width)
            rows.append([mode, "/".join(map(str, counts)), str(budget.context_tokens), str(budget.total_tokens),
                         f"{r['truth']:.3f}", f"{r['truth_drift']:.3f}", f"{r['world']:.3f}", f"{r['world_drift']:.3f}"])
    print(f"### 2. History budgets ({args.sections} sections, {len(clips)} starts)\n")
    table(["mode", "1x/2x/4x frames", "context tokens", "tokens / section", "truth error", "truth drift",
           "world error", "world drift"], rows)


def speed_table(model, fp8_model, clips, args):
    print(f"### 3. Speed and memory options ({args.sections} sections, {len(clips)} starts, {args.steps} steps; "
          "difference: relative L2 distance of the video latents to the plain run's)\n")
    rows = []
    for mode in args.speed_modes:
        ratios, _ = calibrate(model, make_schedule(mode, 2, window=train.WINDOW),
                              *world.held_out_clip(CALIBRATION_START).conditioning(),
                              SamplingSettings(steps=args.steps, seed=CALIBRATION_START))
        print(f"MagCache ratios calibrated on the trained model ({mode}, {args.steps} steps): "
              + " ".join(f"{r:.3f}" for r in ratios) + "\n")
        options = {f"TeaCache {t}": dict(cache=lambda t=t: TeaCache(t)) for t in args.teacache}
        options.update({f"MagCache {t}": dict(cache=lambda t=t: MagCache(t, ratios=ratios)) for t in args.magcache})
        options.update({f"MagCache {t}, K=3": dict(cache=lambda t=t: MagCache(t, max_skips=3, ratios=ratios))
                        for t in args.magcache})
        options["fp8 weights (e4m3fn)"] = dict(model=fp8_model)
        options["CFG 2, sequential"] = dict(cfg=2.0, cfg_batch=False)
        options["CFG 2, batched"] = dict(cfg=2.0, cfg_batch=True)

        def variant(option, settings):
            """(model, settings) of an option: its own model if it has one, a fresh cache each run."""
            option = dict(option)
            chosen = option.pop("model", model)
            if "cache" in option:
                option["cache"] = option["cache"]()
            return chosen, dataclasses.replace(settings, **option)

        plain, results = Scores(), {name: (Scores(), []) for name in options}
        for option in [{}, *options.values()]:  # one short run each first: one-off costs stay out of the ratios
            chosen, warm_settings = variant(option, SamplingSettings(steps=3))
            run(chosen, clips[0], mode, 1, warm_settings)
        for i, clip in enumerate(clips):
            settings = SamplingSettings(steps=args.steps, seed=i)
            reference = run(model, clip, mode, args.sections, settings)
            plain.add(reference, clip)
            for name, option in options.items():
                chosen, variant_settings = variant(option, settings)
                result = run(chosen, clip, mode, args.sections, variant_settings)
                scores, extra = results[name]
                scores.add(result, clip)
                difference = ((result.latents - reference.latents).norm() / reference.latents.norm()).item()
                extra.append((difference, result.skipped, result.steps, reference.seconds / result.seconds))
        base = plain.summary()
        rows.append([mode, "plain", "0", "0", f"{base['truth']:.3f}", f"{base['world']:.3f}", "1.00x"])
        for name, (scores, extra) in results.items():
            r = scores.summary()
            difference = sum(e[0] for e in extra) / len(extra)
            skipped = f"{sum(e[1] for e in extra)}/{sum(e[2] for e in extra)}" if extra[0][2] else "0"
            speed = sum(e[3] for e in extra) / len(extra)
            rows.append([mode, name, skipped, f"{difference:.1%}", f"{r['truth']:.3f}", f"{r['world']:.3f}",
                         f"{speed:.2f}x"])
    table(["mode", "option", "steps skipped", "difference", "truth error", "world error", "speed vs plain"], rows)
    print("CFG rows compare with the plain run (cfg 1); batched and sequential CFG differ from each other only by "
          "float rounding. Speed is the plain run's time over the option's, averaged over starts.")


PROBE_SIGMA = 0.95  # where a section's layout is decided
PROBES = {  # name: (mode, sections, position in sampling order)
    "forward, first section (direction only in the prompt)": ("forward", 1, 0),
    "forward, after 3 sections of history": ("forward", 4, 3),
    "inverted, the video's end, sampled first (direction only in the prompt)": ("inverted", 6, 0),
    "inverted, first section, between the start and the later sections": ("inverted", 6, 5),
}


def opposite(direction):
    return world.DIRECTIONS[(world.DIRECTIONS.index(direction) + 4) % len(world.DIRECTIONS)]


def probe_table(model, clips):
    """x0 predicted in one step at PROBE_SIGMA from a training example, with the clip's prompt and with the
    opposite direction's, against the frame before the section repeated: does the model use the prompt, and
    the context?"""
    def rms(a, b):
        return (a - b).pow(2).mean().sqrt().item()

    rows, noise = [], torch.Generator().manual_seed(0)
    for name, (mode, sections, position) in PROBES.items():
        errors = []
        for clip in clips:
            inputs, target = train.example_inputs(clip, mode, sections, position, clip.direction)
            swapped, _ = train.example_inputs(clip, mode, sections, position, opposite(clip.direction))
            before = make_schedule(mode, sections, window=train.WINDOW)[position].first_video_frame - 1
            x = noise_to_sigma(target, torch.randn(target.shape, generator=noise), PROBE_SIGMA)
            sigma = torch.tensor([PROBE_SIGMA])
            with torch.inference_mode():
                x0 = [make_flow_denoiser(model, c)(x, sigma) for c in (inputs, swapped)]
            errors.append([rms(x0[0], target), rms(x0[1], target),
                           rms(clip.frames([before]).expand_as(target), target)])
        low, high = torch.tensor(errors).aminmax(dim=0)
        rows.append([name, *(f"{a:.2f}-{b:.2f}" for a, b in zip(low.tolist(), high.tolist()))])
    print(f"### 4. One step at sigma {PROBE_SIGMA} ({len(clips)} held-out starts; RMS error of the predicted "
          "section against the truth, lowest-highest over the starts)\n")
    table(["section", "x0, the clip's prompt", "x0, the opposite direction's prompt", "the true frame before the section, repeated"],
          rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=train.positive_int, default=4)
    parser.add_argument("--sections", type=train.positive_int, default=16)
    parser.add_argument("--steps", type=train.positive_int, default=25)
    parser.add_argument("--threads", type=train.positive_int, default=2)
    parser.add_argument("--teacache", type=float, nargs="*", default=[0.1, 0.15, 0.25])
    parser.add_argument("--magcache", type=float, nargs="*", default=[0.05, 0.1, 0.25])
    parser.add_argument("--speed-modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--tables", nargs="*", type=int, default=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_transformer(train.WEIGHTS, compute_dtype=torch.float32)
    fp8 = load_transformer(train.WEIGHTS, compute_dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    clips = [world.held_out_clip(i) for i in range(args.starts)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {train.WEIGHTS.name}\n")
    began = time.perf_counter()
    defaults = None
    if 1 in args.tables or 2 in args.tables:
        defaults = modes_table(model, clips, args)
    if 2 in args.tables:
        budgets_table(model, clips, args, defaults)
    if 3 in args.tables:
        speed_table(model, fp8, clips, args)
    if 4 in args.tables:
        probe_table(model, clips)
    print(f"\n({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
