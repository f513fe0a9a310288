"""Peak activation memory of one transformer call at full width, against ``section_memory_bytes``.

    python bench/memory.py            # 640 and 960 buckets, bf16 and fp32, two depths
    python bench/memory.py --quick    # 640 bucket only

How it measures. A ``TorchDispatchMode`` sees every tensor operation of the forward pass and every tensor
it returns. Each new storage (not a view of one of the operation's inputs) is counted with its size until
it is freed (a weak reference to the storage, checked before the next operation), so the peak is the
largest total of tensor bytes alive at once, at operation granularity: what an allocator holds for
tensors, without allocator caching or fragmentation. Tensors made before the call (weights, inputs) are
not counted.

The full-size model (width 3072, 24 heads, the real outer dims: text 4096, 729 image tokens, 512 text
tokens) is built on PyTorch's meta device, so the pass allocates nothing and computes nothing: shapes
and lifetimes are real, values do not exist, and a 960-bucket section takes seconds on a laptop CPU. On
meta, SDPA would take its math path (an L x L score matrix no GPU backend builds), so attention is
dispatched to the fused flash kernel (efficient kernel with a padding mask), whose outputs are then
counted as on a GPU. ``tests/test_memory.py`` runs the same meter on real CPU tensors at a small width and
checks the formula there, so the meta measurement and the formula cannot drift apart unnoticed.

Depth: the peak of 1 dual + 1 single block is compared with 2 dual + 4 single blocks (the activation
peak should not grow with depth: each block's intermediates are freed before the next).

A benchmark, never run as a test.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benches run from a checkout, without installing the package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from framepack_core.model import FramePackConfig, FramePackTransformer, section_memory_bytes  # noqa: E402
from framepack_core.packing import make_schedule  # noqa: E402
from framepack_core.synthetic import section_inputs  # noqa: E402

BUCKETS = {640: (80, 76), 960: (120, 114)}  # latent (H, W) of the square-image bucket (640x608, 960x912 pixels)
TEXT_TOKENS, IMAGE_TOKENS, WINDOW = 512, 729, 9


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while this mode is active."""

    def __enter__(self):
        self.live, self.current, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, (ref, size) in list(self.live.items()):  # frees since the last operation
            if ref.expired():
                del self.live[key]
                self.current -= size
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in inputs:  # not a view of an input
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class FusedAttentionOnMeta(TorchFunctionMode):
    """On meta tensors, run SDPA as the fused GPU kernels do instead of its math fallback."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            if mask is None:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).expand(q.shape[0], q.shape[1], q.shape[2], -1)
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]
        return func(*args, **kwargs)


def measure(config, latent_size, dtype, device="meta", text_lengths=(TEXT_TOKENS,), image_tokens=IMAGE_TOKENS,
            window=WINDOW, model=None):
    """Peak activation bytes of one forward over a FramePack section (inverted layout)."""
    h, w = latent_size
    if model is None:
        with torch.device(device):
            model = FramePackTransformer(config, dtype=dtype).eval()
    kwargs = section_inputs(config, batch=len(text_lengths), height=h, width=w, window=window,
                            text_lengths=list(text_lengths))
    kwargs["image_embeddings"] = torch.randn(len(text_lengths), image_tokens, config.image_dim)
    kwargs = {k: v if k == "encoder_attention_mask" else
              v.to(device, dtype) if v.is_floating_point() and k not in ("timestep", "guidance") else v.to(device)
              for k, v in kwargs.items()}
    meter = LiveTensorBytes()
    with torch.inference_mode(), FusedAttentionOnMeta(), meter:
        model(**kwargs)
    return meter.peak


def section_tokens(latent_size, window=WINDOW):
    return make_schedule("inverted", 2, window=window).token_budget(*latent_size).total_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="640 bucket only")
    args = parser.parse_args()
    mib = 2**20
    depths = {"1+1": (1, 1), "2+4": (2, 4)}
    print("Peak activation memory of one transformer call, full width (3072, 24 heads), meta device, MiB")
    print(f"{'bucket':>6} {'tokens':>7} {'dtype':>9} " + " ".join(f"{'blocks ' + d:>12}" for d in depths)
          + f" {'estimate':>9} {'est/meas':>9}")
    ratios = []
    for bucket in ([640] if args.quick else [640, 960]):
        size = BUCKETS[bucket]
        tokens = section_tokens(size)
        for dtype in (torch.bfloat16, torch.float32):
            peaks = {d: measure(FramePackConfig(num_layers=a, num_single_layers=b), size, dtype)
                     for d, (a, b) in depths.items()}
            estimate = section_memory_bytes(FramePackConfig(), tokens, dtype)
            measured = max(peaks.values())
            ratios.append(estimate / measured)
            print(f"{bucket:>6} {tokens + TEXT_TOKENS + IMAGE_TOKENS:>7} {str(dtype)[6:]:>9} "
                  + " ".join(f"{p / mib:>12.1f}" for p in peaks.values())
                  + f" {estimate / mib:>9.1f} {estimate / measured:>9.3f}")
    # batched CFG: positive and negative prompt (of different lengths) as one batch of 2
    size = BUCKETS[640]
    peak = measure(FramePackConfig(num_layers=1, num_single_layers=1), size, torch.bfloat16, text_lengths=(512, 300))
    estimate = section_memory_bytes(FramePackConfig(), section_tokens(size), torch.bfloat16, batch=2)
    ratios.append(estimate / peak)
    print(f"batch of 2 (CFG), 640 bf16: measured {peak / mib:.1f}, estimate {estimate / mib:.1f}, "
          f"est/meas {estimate / peak:.3f}")
    print(f"\nestimate / measured: {min(ratios):.3f} .. {max(ratios):.3f} (target 1.05 .. 1.15)")


if __name__ == "__main__":
    main()
