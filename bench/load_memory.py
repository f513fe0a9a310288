"""Host memory of loading a FramePack checkpoint and of one generation, each in a fresh process.

    python bench/load_memory.py                                   # our loader; ComfyUI's if COMFYUI_PATH is set
    python bench/load_memory.py --comfyui ~/ComfyUI --original ~/FramePack

One random checkpoint with the real widths (3072 wide, 24 heads, the real embedders) and few blocks
(2 dual + 3 single, 2.83 GiB in bf16) is written as one .safetensors file and as a 3-shard diffusers folder
under bench/out/ (deleted afterwards unless --keep). Each case runs in its own interpreter, so nothing
another case allocated counts:
- ours: ``load_transformer`` from the file and the folder, bf16 as stored and converted to fp8 storage;
- ComfyUI: FramePack Model Loader's ``load_framepack`` with weight_dtype auto, bf16 and fp8_e4m3fn, on the
  CPU (needs --comfyui or COMFYUI_PATH and ComfyUI's requirements in this Python);
- the original: ``HunyuanVideoTransformer3DModelPacked.from_pretrained(folder, torch_dtype=bf16)`` from a
  checkout of lllyasviel/FramePack (needs --original and its requirements: diffusers, accelerate);
- generation: our bf16 model samples one inverted section twice; the peak, what is still resident after
  each return, which tensors are still referenced, and what is left once glibc gives back its free pages;
  with glibc's default malloc settings and with a fixed mmap threshold.

Memory is the process's resident set from /proc/self/status above its baseline just before the load
(after imports): anonymous pages (RssAnon: copies in RAM) and file pages (RssFile: the mapped checkpoint,
which the kernel can drop and read again). The peak is VmHWM, reset before the load. "after touch" is
measured once every weight was read once, since a mapped file is only read when used. Each figure is
divided by the loaded weights' bytes (parameters and buffers). A benchmark, never run as a test.
"""

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "load_memory"
# 2 dual + 3 single blocks: 2.83 GiB of bf16 with every outer layer at its real size
BLOCKS = dict(num_layers=2, num_single_layers=3)
# one generated section: latent 32x32 (256x256 pixels), window 9, 3 steps, 64 text + 729 image tokens
SECTION = dict(latent=(32, 32), window=9, steps=3, text=64, image=729)
# glibc's default, and a fixed mmap threshold: blocks of 1 MiB and more are mapped, and unmapped when freed
ALLOCATORS = (("default", {}), ("MALLOC_MMAP_THRESHOLD_=1048576", {"MALLOC_MMAP_THRESHOLD_": "1048576"}))
FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM")
MIB = 2**20
SHORT = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float8_e4m3fn": "fp8"}


# ---------------------------------------------------------------------------------------------
# in the child process


def status():
    """{field: bytes} of this process's resident memory."""
    found = {}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name in FIELDS:
            found[name] = int(value.split()[0]) * 1024
    return found


class Meter:
    """Resident memory above a baseline taken at creation; the peak (VmHWM) is reset then too."""

    def __init__(self):
        gc.collect()
        self.restart_peak()
        self.base = status()

    def now(self):
        s = status()
        return {"anon": s["RssAnon"] - self.base["RssAnon"],
                "file": s["RssFile"] + s["RssShmem"] - self.base["RssFile"] - self.base["RssShmem"],
                "peak": s["VmHWM"] - sum(self.base[k] for k in ("RssAnon", "RssFile", "RssShmem"))}

    def restart_peak(self):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def weights_of(module):
    """The module's parameters and buffers, each storage once."""
    seen, tensors = set(), []
    for t in (*module.parameters(), *module.buffers()):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return tensors


def touch(tensors):
    """Read one byte of every page of every tensor, allocating nothing that stays."""
    for t in tensors:
        assert t.is_contiguous(), "a non-contiguous weight would be copied to be read"
        t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def warm_up():
    torch.ones(1 << 16).sum()  # the allocator's and the op dispatcher's first-use costs are not the loader's


def load_ours(path, storage):
    sys.path.insert(0, str(ROOT))
    from framepack_core.loading import load_transformer

    warm_up()
    meter = Meter()
    model = load_transformer(path, storage_dtype=getattr(torch, storage) if storage != "as stored" else None)
    return meter, model


def load_comfyui(path, weight_dtype, comfyui):
    import importlib.util

    sys.path.insert(0, str(comfyui))  # ComfyUI's top-level modules first, as when it runs
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import utils.install_util  # noqa: F401  (before `nodes`, as main.py does)

    # the pack as ComfyUI imports it: a package whose modules import each other relatively
    spec = importlib.util.spec_from_file_location("framepack_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    from framepack_pack.nodes.model import load_framepack

    warm_up()
    meter = Meter()
    patcher = load_framepack(str(path), weight_dtype)
    return meter, patcher.model.diffusion_model


def load_original(folder, checkout):
    sys.path.insert(0, str(checkout))
    from diffusers_helper.models.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked

    warm_up()
    meter = Meter()
    model = HunyuanVideoTransformer3DModelPacked.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    return meter, model.eval().requires_grad_(False)


def measure_load(meter, model):
    """Figures after the load and after every weight was read once."""
    tensors = weights_of(model)
    after_load = meter.now()
    touch(tensors)
    return {"weights": sum(t.numel() * t.element_size() for t in tensors), "load": after_load,
            "touch": meter.now(), "mappings": file_mappings(), "dtypes": dtype_bytes(tensors)}


def dtype_bytes(tensors):
    out = {}
    for t in tensors:
        out[str(t.dtype)] = out.get(str(t.dtype), 0) + t.numel() * t.element_size()
    return out


def file_mappings():
    """How many regions of this process map a .safetensors file."""
    return sum(1 for line in open("/proc/self/maps") if line.rstrip().endswith(".safetensors"))


def live_tensor_bytes(exclude):
    """Bytes of CPU tensors Python still references, other than ``exclude`` (the model's weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no deprecation hooks
            s = obj.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def generation(path):
    """Two generations of one section with our bf16 model: the peak above the loaded weights, what is left
    after each, which tensors are still referenced, and what glibc hands back when asked (malloc_trim)."""
    sys.path.insert(0, str(ROOT))
    from framepack_core.loading import load_transformer
    from framepack_core.packing import make_schedule
    from framepack_core.pipeline import Prompt, SamplingSettings, generate

    model = load_transformer(path)
    weights = weights_of(model)
    touch(weights)
    config, (h, w) = model.config, SECTION["latent"]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, config.in_channels, 1, h, w, generator=g)
    image = torch.randn(1, SECTION["image"], config.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, SECTION["text"], config.text_dim, generator=g),
                    torch.randn(1, config.pooled_dim, generator=g))
    settings = SamplingSettings(steps=SECTION["steps"])
    schedule = make_schedule("inverted", 1, window=SECTION["window"])
    meter, found = Meter(), {}
    for run in ("first", "second"):
        meter.restart_peak()
        with torch.inference_mode():
            result = generate(model, schedule, start, image, prompt, settings=settings)
        found[f"{run} peak"] = meter.now()["peak"]
        del result
        gc.collect()
        found[f"after {run}"] = meter.now()
    found["live tensors"] = live_tensor_bytes([*weights, start, image, prompt.text, prompt.pooled])
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: give the free pages of every arena back to the kernel
    found["after malloc_trim"] = meter.now()
    return {"weights": sum(t.numel() * t.element_size() for t in weights), **found}


def child(case, path, option, extra):
    if case == "generation":
        result = generation(path)
    else:
        load = {"ours": lambda: load_ours(path, option), "comfyui": lambda: load_comfyui(path, option, extra),
                "original": lambda: load_original(path, extra)}[case]
        result = measure_load(*load())
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# in the parent


def make_checkpoint(out):
    """The bf16 single file and the sharded 3-shard folder of one random model (reused when --keep left them)."""
    sys.path.insert(0, str(ROOT))
    from framepack_core.model import FramePackConfig
    from framepack_core.synthetic import random_state_dict, save_diffusers_folder, save_single_file

    config = FramePackConfig(**BLOCKS)
    file, folder = out / "framepack-bf16.safetensors", out / "framepack-bf16"
    if not file.is_file() or not (folder / "config.json").is_file():
        state = random_state_dict(config, dtype=torch.bfloat16)
        save_single_file(file, state)
        save_diffusers_folder(folder, state, config)
        del state
    return file, folder


def run_child(case, path, option="", extra="", env=None):
    cmd = [sys.executable, __file__, "--child", case, str(path), option, str(extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def load_cases(file, folder, comfyui, original):
    cases = [("ours, file, bf16", "ours", file, "as stored"),
             ("ours, file -> fp8", "ours", file, "float8_e4m3fn"),
             ("ours, folder, bf16", "ours", folder, "as stored"),
             ("ours, folder -> fp8", "ours", folder, "float8_e4m3fn")]
    if comfyui:
        cases += [(f"ComfyUI loader, {d}", "comfyui", file, d, comfyui) for d in ("auto", "bf16", "fp8_e4m3fn")]
    if original:
        cases.append(("original from_pretrained, folder", "original", folder, "", original))
    return cases


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def print_loads(rows):
    print("| load | weights | peak | after load (anon + file) | after touch (anon + file) | mappings |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        if isinstance(r, str):
            print(f"| {label} | {r} | | | | |")
            continue
        w = r["weights"]

        def split(m):
            return f"{(m['anon'] + m['file']) / w:.2f}x ({m['anon'] / w:.2f} + {m['file'] / w:.2f})"

        parts = ", ".join(f"{SHORT.get(d, d)} {n / w:.0%}"
                          for d, n in sorted(r["dtypes"].items(), key=lambda x: -x[1]))
        print(f"| {label} | {gib(w)} ({parts}) | {r['touch']['peak'] / w:.2f}x | {split(r['load'])} | {split(r['touch'])} "
              f"| {r['mappings']} |")


def print_generation(rows):
    print(f"\nOne section, sampled twice in one process (latent {SECTION['latent'][0]}x{SECTION['latent'][1]}, "
          f"window {SECTION['window']}, {SECTION['steps']} steps, {SECTION['text']} text + {SECTION['image']} image "
          "tokens, bf16), MiB above our loaded and touched bf16 weights; 'left' (anon + file) = resident after "
          "generate() returned and its result was dropped")
    print("| glibc malloc | peak, 1st | left, 1st | peak, 2nd | left, 2nd | left after malloc_trim(0) "
          "| tensors still referenced |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        if isinstance(r, str):
            print(f"| {label} | {r} | | | | | |")
            continue

        def left(key):
            return f"{r[key]['anon'] / MIB:.0f} + {r[key]['file'] / MIB:.0f}"

        print(f"| {label} | {r['first peak'] / MIB:.0f} | {left('after first')} | {r['second peak'] / MIB:.0f} "
              f"| {left('after second')} | {left('after malloc_trim')} | {r['live tensors'] / MIB:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI tree (default: "
                        "$COMFYUI_PATH) to measure FramePack Model Loader's path")
    parser.add_argument("--original", help="a checkout of lllyasviel/FramePack to measure its from_pretrained")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint in bench/out/")
    parser.add_argument("--no-generation", action="store_true", help="loads only")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    OUT.mkdir(parents=True, exist_ok=True)
    try:
        file, folder = make_checkpoint(OUT)
        print(f"checkpoint: {file.stat().st_size / 2**30:.2f} GiB bf16 ({BLOCKS['num_layers']} dual + "
              f"{BLOCKS['num_single_layers']} single blocks, full width); ratios are over the loaded weights\n")
        rows = [(label, run_child(*case)) for label, *case in load_cases(file, folder, args.comfyui, args.original)]
        print_loads(rows)
        if not args.no_generation:
            print_generation([(label, run_child("generation", file, env=env)) for label, env in ALLOCATORS])
    finally:
        if not args.keep:
            shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
