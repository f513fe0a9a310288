"""Cost of resumable generations: bytes and milliseconds to save the state after each section.

    python bench/resume_state.py                     # 640 bucket (608x640 -> latent 76x80), 16 sections
    python bench/resume_state.py --folder /some/disk # where the state files go (default: a temp folder here)

Runs the real section loop (``generate``) with a sampler plug that returns its noise, so only the resume
machinery costs time: the fingerprint (once per generation, over full-size conditioning tensors) and the
atomic save after every section (safetensors, fsync, os.replace, prune) through a ``ResumeStore``.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core.packing import make_schedule  # noqa: E402
from framepack_core.pipeline import Prompt, SamplingSettings, generate  # noqa: E402
from framepack_core.resume import ResumeStore  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=608)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--sections", type=int, default=16)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--mode", default="inverted", choices=["inverted", "forward"])
    parser.add_argument("--folder", default=".", help="parent folder of the temporary state folder")
    args = parser.parse_args()

    h, w = args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 16, 1, h, w, generator=g)
    image = torch.randn(1, 729, 1152, generator=g)
    prompt = Prompt(torch.randn(1, 512, 4096, generator=g), torch.randn(1, 768, generator=g))
    schedule = make_schedule(args.mode, args.sections, window=args.window)
    settings = SamplingSettings(steps=25, seed=0)

    def noise_sampler(noise, positive, negative, on_step, interrupt):
        return noise

    def run(**kw):
        generate(None, schedule, start, image, prompt, None, settings, sample_section=noise_sampler, device="cpu",
                 weights_identity="bench", **kw)

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    def seconds_until_stopped(**kw):
        t = time.perf_counter()
        try:
            run(**kw)
        except Stop:
            pass
        return time.perf_counter() - t

    # generate() stopped at once: its input checks only, and with resume_from also the fingerprint
    seconds_until_stopped(interrupt=stop)  # warm-up
    checks = min(seconds_until_stopped(interrupt=stop) for _ in range(5))
    fingerprint = min(seconds_until_stopped(resume_from=stop) for _ in range(5)) - checks

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        store = ResumeStore(folder)
        saves = []

        def on_state(state):
            t = time.perf_counter()
            path = store.save(state)
            saves.append((state.sections_done, path.stat().st_size, time.perf_counter() - t))

        run(on_state=on_state)

    print(f"resume state cost: {args.mode}, {args.height}x{args.width} (latent {h}x{w}), {args.sections} sections "
          f"of {args.window} latent frames; states in {Path(args.folder).resolve()}")
    print(f"fingerprint (once per generation, 8 MiB prompt + image embeds + latents): "
          f"{1000 * fingerprint:.1f} ms")
    print(f"{'section':>8}{'state MiB':>12}{'save ms':>10}")
    for done, size, seconds in saves:
        print(f"{done:>8}{size / 2 ** 20:>12.2f}{1000 * seconds:>10.1f}")
    sizes, times = [s for _, s, _ in saves], [t for _, _, t in saves]
    print(f"per section: mean {statistics.mean(sizes) / 2 ** 20:.1f} MiB, {1000 * statistics.mean(times):.1f} ms; "
          f"largest {max(sizes) / 2 ** 20:.1f} MiB, slowest {1000 * max(times):.1f} ms; "
          f"all {len(saves)} saves {1000 * sum(times):.0f} ms")


if __name__ == "__main__":
    main()
