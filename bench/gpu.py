"""One FramePack section on a GPU: seconds per output frame, peak VRAM and the ratio to the FLOP bound.

    python bench/gpu.py                         # full size on cuda (needs ~30 GB for bf16 weights)
    python bench/gpu.py --comfyui ~/ComfyUI     # adds fp8 fast (ComfyUI ops) and the 6 GB low-VRAM path
    python bench/gpu.py --tiny --device cpu     # the tiny model on CPU: the script's own smoke test

Full size is the released architecture (20 dual + 40 single blocks, width 3072, the real outer dims) with
random weights, built on the meta device and materialised on the device. Each variant samples one section
of the 640 bucket (640x608 pixels), window 9, 25 steps, 512 text tokens, changing one thing at a time from
the baseline (sdpa, bf16 weights, no cache, cfg 1):
attention sdpa / sageattention / flash_attn (those installed); weights bf16 / fp8 / fp8 fast; cache off /
TeaCache 0.15 / MagCache (built-in ratios); cfg 3 batched and sequential; ComfyUI's low-VRAM path with a
6 GB budget (partial load; weights not loaded stream in per layer).

The FLOP bound is the transformer's matrix-multiply FLOPs for the section (linear layers and attention,
25 steps, twice with cfg > 1) at the GPU's dense bf16 peak; ratio = measured / bound. Times are wall clock
of the whole section (sampler included), after one warm-up section. A benchmark, never run as a test
(the test runs ``--tiny --device cpu``).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from framepack_core.attention import installed  # noqa: E402
from framepack_core.cache import MagCache, TeaCache  # noqa: E402
from framepack_core.model import FramePackConfig, FramePackTransformer  # noqa: E402
from framepack_core.ops import CastOps  # noqa: E402
from framepack_core.packing import make_schedule  # noqa: E402
from framepack_core.pipeline import Prompt, SamplingSettings, generate  # noqa: E402
from framepack_core.synthetic import TINY  # noqa: E402

FULL = dict(config=FramePackConfig(), latent=(80, 76), window=9, steps=25, text=512, image=729)
SMALL = dict(config=TINY, latent=(8, 8), window=3, steps=3, text=7, image=9)
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}
LOWVRAM_BUDGET = 6 * 2**30
LABEL = 38  # width of the variant column


def section_flops(config, tokens, text, image, steps, cfg):
    """Matrix-multiply FLOPs of one section's transformer calls (linear layers + attention)."""
    d, m, n = config.inner_dim, config.mlp_dim, tokens + text + image
    dual = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    single = 2 * n * (3 * d * d + d * m + (d + m) * d) + 4 * n * n * d
    calls = steps * (2 if cfg != 1 else 1)
    return calls * (config.num_layers * dual + config.num_single_layers * single)


def build(config, device, weights, attention, comfy_ops=None):
    """Random weights on ``device``: built on meta, materialised there, big matrices fp8 if asked."""
    fp8 = weights.startswith("fp8")
    ops = comfy_ops or CastOps  # casts per layer: fp8 storage, and the fp32 final projection
    compute = torch.bfloat16
    with torch.device("meta"):
        model = FramePackTransformer(config, operations=ops, attention_backend=attention, compute_dtype=compute,
                                     dtype=compute)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0.0, 0.02, generator=gen)
            if fp8 and p.ndim == 2 and "blocks" in name:
                p.data = p.data.to(torch.float8_e4m3fn)
    return model.eval().requires_grad_(False)


def inputs(size, device):
    config, (h, w) = size["config"], size["latent"]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, config.in_channels, 1, h, w, generator=g)
    image = torch.randn(1, size["image"], config.image_dim, generator=g)
    prompts = [Prompt(torch.randn(1, size["text"], config.text_dim, generator=g),
                      torch.randn(1, config.pooled_dim, generator=g)) for _ in range(2)]
    return start, image, prompts


def variants(device, comfyui):
    base = dict(attention="sdpa", weights="bf16", cache=None, cfg=1.0, cfg_batch=True, lowvram=False)
    rows = [("baseline: sdpa, bf16, no cache, cfg 1", {})]
    for backend in ("sageattention", "flash_attn"):
        if device != "cpu" and installed(backend):
            rows.append((f"attention {backend}", {"attention": backend}))
    rows += [("weights fp8", {"weights": "fp8"}),
             ("weights fp8 fast (ComfyUI ops)", {"weights": "fp8_fast"}),
             ("TeaCache 0.15", {"cache": lambda: TeaCache(0.15)}),
             ("MagCache 0.1 (built-in ratios)", {"cache": lambda: MagCache(0.1)}),
             ("cfg 3 batched", {"cfg": 3.0, "cfg_batch": True}),
             ("cfg 3 sequential", {"cfg": 3.0, "cfg_batch": False}),
             ("ComfyUI low-VRAM, 6 GB budget", {"lowvram": True})]
    return [(name, {**base, **change}) for name, change in rows]


def comfy_modules(path):
    if path is None:
        return None
    sys.path.insert(0, str(path))
    import comfy.model_management as mm
    import comfy.ops

    return mm, comfy.ops


def run_variant(size, device, v, comfy):
    """(seconds for one section, peak bytes) or a reason it was skipped."""
    needs_comfy = v["weights"] == "fp8_fast" or v["lowvram"]
    if needs_comfy and (comfy is None or device == "cpu"):
        return "skipped: needs --comfyui and a CUDA device"
    ops = None
    if needs_comfy:
        mm, comfy_ops = comfy
        storage = torch.float8_e4m3fn if v["weights"] == "fp8_fast" else torch.bfloat16
        ops = comfy_ops.pick_operations(storage, torch.bfloat16, load_device=torch.device(device),
                                        fp8_optimizations=v["weights"] == "fp8_fast")
    model = build(size["config"], "cpu" if v["lowvram"] else device, v["weights"], v["attention"], ops)
    if v["lowvram"]:
        model = lowvram_load(model, device, comfy)
    start, image, (positive, negative) = inputs(size, device)
    settings = SamplingSettings(steps=size["steps"], cfg=v["cfg"], cfg_batch=v["cfg_batch"],
                                cache=v["cache"]() if v["cache"] else None)
    schedule = make_schedule("inverted", 1, window=size["window"])

    def section():
        with torch.inference_mode():
            generate(model, schedule, start, image, positive, negative, settings, device=device)

    section()  # warm-up: kernels, allocator
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    section()
    sync(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return seconds, peak


def lowvram_load(transformer, device, comfy):
    """Wrap in ComfyUI's ModelPatcher and load it partially, as load_models_gpu does on a small GPU."""
    mm, _ = comfy
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    class Config(comfy.supported_models_base.BASE):
        unet_config = {"disable_unet_model_creation": True}
        latent_format = comfy.latent_formats.HunyuanVideo

    base = comfy.model_base.BaseModel(Config(Config.unet_config), comfy.model_base.ModelType.FLOW, device="cpu")
    base.diffusion_model = transformer
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device="cpu")
    mm.LoadedModel(patcher).model_load(lowvram_model_memory=LOWVRAM_BUDGET)
    return transformer


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, small section (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--comfyui", help="a ComfyUI checkout, for fp8 fast and the low-VRAM path")
    args = parser.parse_args(argv)
    size = SMALL if args.tiny else FULL
    comfy = comfy_modules(args.comfyui)
    config, (h, w) = size["config"], size["latent"]
    tokens = make_schedule("inverted", 1, window=size["window"]).token_budget(h, w).total_tokens
    frames = 4 * size["window"]  # output frames per section
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak_tflops = next((t for k, t in DENSE_BF16_TFLOPS.items() if k in name), None)
    print(f"torch {torch.__version__}, {name}; {'tiny' if args.tiny else 'full-size'} FramePack, latent {h}x{w}, "
          f"window {size['window']}, {size['steps']} steps, {tokens} + {size['text']} text + {size['image']} image "
          f"tokens, {frames} output frames")
    print(f"{'variant':<{LABEL}} {'s/frame':>9} {'peak VRAM GiB':>14} {'x FLOP bound':>13}")
    for label, v in variants(args.device, comfy):
        result = run_variant(size, args.device, v, comfy)
        if isinstance(result, str):
            print(f"{label:<{LABEL}} {result}")
            continue
        seconds, peak = result
        bound = None
        if peak_tflops:
            bound = section_flops(config, tokens, size["text"], size["image"], size["steps"], v["cfg"]) / (peak_tflops * 1e12)
        print(f"{label:<{LABEL}} {seconds / frames:>9.4f} {'n/a' if peak is None else f'{peak / 2**30:.2f}':>14} "
              f"{'n/a' if bound is None else f'{seconds / bound:.2f}':>13}")
    if peak_tflops is None:
        print("x FLOP bound: n/a (no dense bf16 peak known for this device)")


if __name__ == "__main__":
    main()
