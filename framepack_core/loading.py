"""Load a FramePack transformer from a .safetensors file or a sharded diffusers folder.

The model's shape is read off the tensors themselves, so the released 13B checkpoints and tiny test
checkpoints load through the same code. The model is built on the meta device and the loaded tensors
are assigned into it, so host memory peaks near one copy of the weights. Pickle checkpoints are never
unpickled.
"""

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import quantized
from .model import CLEAN_EMBEDDERS, FramePackConfig, FramePackTransformer
from .ops import CastOps, TorchOps, is_fp8

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
ANCHOR = "x_embedder.proj.weight"
# keys every FramePack transformer has, whatever its size
REQUIRED = (
    ANCHOR,
    "clean_x_embedder.proj.weight",
    "image_projection.up.weight",
    "image_projection.down.weight",
    "context_embedder.proj_in.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "transformer_blocks.0.ff.net.0.proj.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
# what other popular checkpoints look like, to say what a wrong file is instead
LOOKALIKES = (
    ("double_blocks.0.img_attn_qkv.weight", "an original-format HunyuanVideo transformer (double_blocks/single_blocks)"),
    ("input_blocks.0.0.weight", "a Stable Diffusion / SDXL UNet"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "a Stable Diffusion 3 MMDiT"),
    ("decoder.conv_in.conv.weight", "a video VAE"),
    ("decoder.conv_in.weight", "a VAE"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder"),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP/SigLIP vision encoder"),
    ("model.layers.0.self_attn.q_proj.weight", "a language model (text encoder)"),
)
DTYPES = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """The file is not a FramePack transformer checkpoint we can load; the message says why."""


# ---------------------------------------------------------------------------------------------
# reading tensors


def _safetensors_files(path):
    """The .safetensors files that make up the checkpoint at ``path`` (file or diffusers folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several shard indexes ({', '.join(i.name for i in indexes)}); keep one.")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{indexes[0].name} lists shards that are not in {path}: {', '.join(absent)}. "
                                  "Download the complete folder.")
        return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" It holds pickle files ({', '.join(pickles)}), which are not loaded." if pickles else ""
        raise CheckpointError(f"{path} has no .safetensors weights.{hint} Use the safetensors release of the model.")
    return files


def _check_not_pickle(file):
    with open(file, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte little-endian header length (any first bytes), then JSON
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{file.name} is a pickled PyTorch checkpoint, not safetensors. Pickles can run arbitrary code and are "
            "never loaded; use a .safetensors release of the FramePack transformer.")
    if len(head) < 8:
        raise CheckpointError(f"{file.name} is too short to be a safetensors file ({len(head)} bytes); "
                              "it is empty or truncated.")


def _open(file):
    _check_not_pickle(file)
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file.name} is not a readable safetensors file ({e}). It may be truncated "
                              "(an interrupted download) or not a safetensors file at all; download it again.") from e


def read_key_shapes(path):
    """{key: (shape, dtype name)} of every tensor in the checkpoint, read from headers only."""
    shapes = {}
    for file in _safetensors_files(path):
        with _open(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


def read_metadata(path):
    """The safetensors metadata of the checkpoint (all shards merged); {} when it has none."""
    metadata = {}
    for file in _safetensors_files(path):
        with _open(file) as f:
            metadata.update(f.metadata() or {})
    return metadata


def read_quantization(path):
    """The checkpoint's ``quantized.Quantization`` (ComfyUI scaled fp8 or comfy_quant), or None."""
    shapes = read_key_shapes(path)
    return _quantization(path, shapes, find_prefix(shapes))


def _quantization(path, shapes, prefix):
    try:
        return quantized.detect({k: d for k, (_, d) in shapes.items()}, read_metadata(path), prefix)
    except ValueError as e:
        raise CheckpointError(f"{Path(path).name}: {e}") from e


# ---------------------------------------------------------------------------------------------
# recognising the checkpoint and its shape


def find_prefix(keys):
    """The prefix the transformer's keys carry in this file, or an error saying what the file is."""
    keys = set(keys)
    for prefix in PREFIXES:
        if prefix + ANCHOR in keys:
            return prefix
    raise CheckpointError(describe_mismatch(keys))


def describe_mismatch(keys):
    for marker, what in LOOKALIKES:
        if any(k.endswith(marker) for k in keys):
            return (f"This checkpoint looks like {what}, not a FramePack transformer. Load the FramePack weights "
                    "(FramePackI2V_HY or FramePack_F1_I2V_HY_20250503) in models/diffusion_models.")
    missing = [k for k in REQUIRED if k not in keys]
    if any(k.startswith("transformer_blocks.") for k in keys) and missing and set(missing) <= {
            "clean_x_embedder.proj.weight", "image_projection.up.weight", "image_projection.down.weight"}:
        return ("This is a diffusers HunyuanVideo transformer without FramePack's clean_x_embedder and "
                "image_projection: the base text-to-video model, not FramePack. Load the FramePack weights instead.")
    return (f"Not a FramePack transformer: missing {', '.join(missing[:6])}"
            f"{' and more' if len(missing) > 6 else ''} ({len(keys)} tensors in the file).")


def _count(keys, pattern):
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"Block numbering under {pattern} has gaps ({sorted(found)}); the file is incomplete.")
    return len(found)


def default_rope_axes(head_dim):
    """HunyuanVideo splits each head's 128 channels as (16, 56, 56) over (t, y, x); scaled for other sizes."""
    t = head_dim // 8
    y = (head_dim - t) // 2
    if head_dim % 32:
        raise CheckpointError(f"Cannot infer RoPE axes for head size {head_dim}; put a config.json with "
                              "rope_axes_dim next to the weights.")
    return (t, y, y)


def infer_config(shapes, extra=None):
    """FramePackConfig from {key: shape} (prefix already stripped); ``extra``: a diffusers config.json dict."""
    missing = [k for k in REQUIRED if k not in shapes]
    if missing:
        raise CheckpointError(describe_mismatch(shapes))
    extra = extra or {}
    inner, in_channels, *patch = shapes[ANCHOR]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    patch = tuple(patch)
    cfg = FramePackConfig(
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] // (patch[0] * patch[1] * patch[2]),
        num_heads=inner // head_dim,
        head_dim=head_dim,
        num_layers=_count(shapes, r"transformer_blocks\.(\d+)\."),
        num_single_layers=_count(shapes, r"single_transformer_blocks\.(\d+)\."),
        num_refiner_layers=_count(shapes, r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."),
        mlp_ratio=shapes["transformer_blocks.0.ff.net.0.proj.weight"][0] / inner,
        patch_size=patch,
        text_dim=shapes["context_embedder.proj_in.weight"][1],
        pooled_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        image_dim=shapes["image_projection.up.weight"][1],
        rope_theta=float(extra.get("rope_theta", 256.0)),
        rope_axes=tuple(extra["rope_axes_dim"]) if "rope_axes_dim" in extra else default_rope_axes(head_dim),
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        clean_kernels=tuple(k for k, (name, _) in CLEAN_EMBEDDERS.items() if f"clean_x_embedder.{name}.weight" in shapes),
    )
    if sum(cfg.rope_axes) != head_dim:
        raise CheckpointError(f"RoPE axes {cfg.rope_axes} do not add up to the head size {head_dim}.")
    return cfg


# ---------------------------------------------------------------------------------------------
# loading


def _compute_dtype_for(stored):
    """bf16 compute for fp8 files, otherwise the dtype most weights are stored in."""
    if any(is_fp8(d) for d in stored):
        return torch.bfloat16
    return max(set(stored), key=stored.count) if stored else torch.float32


def load_transformer(path, compute_dtype=None, storage_dtype=None, operations=None, attention_backend="sdpa",
                     fp32_output=True, device="cpu", convert_state=None):
    """Load a FramePack transformer.

    path: a .safetensors file (bf16/fp16/fp32/fp8 weights; prefixes model.diffusion_model., diffusion_model.
        or transformer. are stripped) or a diffusers folder (config.json + *.safetensors.index.json shards).
    compute_dtype: dtype activations run in (default: bf16 for fp8 files, else the file's dtype).
    storage_dtype: dtype weights are kept in (default: fp8 tensors stay fp8, the rest is converted to the
        compute dtype). fp8 storage applies to the blocks' weight matrices; biases, norms and embedders
        stay in the compute dtype. Mixed storage runs through casting layers (ops.CastOps).
    operations: layer namespace (default: plain torch layers when storage == compute, casting layers otherwise).
        A quantized checkpoint (see quantized.py) needs layers that read its layout (ComfyUI's comfy.ops);
        its quantized weights and scales reach them as stored, whatever storage_dtype says.
    convert_state: optional ``f(state) -> state`` applied to the loaded tensors before they are assigned
        (a host's conversion of a quantized layout into the one its layers read).
    """
    path = Path(path)
    files = _safetensors_files(path)
    extra = {}
    if path.is_dir() and (path / "config.json").is_file():
        extra = json.loads((path / "config.json").read_text())
    shapes = read_key_shapes(path)
    prefix = find_prefix(shapes)
    own = {k[len(prefix):]: v[0] for k, v in shapes.items() if k.startswith(prefix)}
    foreign = len(shapes) - len(own)
    if foreign:
        log.warning("%s: ignoring %d tensors outside the transformer (prefix %r).", path.name, foreign, prefix)
    config = infer_config(own, extra)
    quant = _quantization(path, shapes, prefix)
    if quant is not None and operations is None:
        raise CheckpointError(f"{path.name} is quantized in ComfyUI's {quant.format} layout, which only layers that "
                              "read it can run: load it in ComfyUI with FramePack Model Loader, or pass operations "
                              "for that layout.")

    stored = [SAFETENSORS_DTYPES.get(d, torch.float32) for k, (_, d) in shapes.items()
              if k.startswith(prefix) and not (quant and quant.is_extra(k[len(prefix):]))]
    compute_dtype = compute_dtype or _compute_dtype_for(stored)
    state = {}
    for file, keys in _read_batches(files, shapes, prefix):
        with _open(file) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                name = key[len(prefix):]
                if quant is not None and quant.keeps_dtype(name):
                    state[name] = tensor
                else:
                    state[name] = tensor.to(_storage_dtype(name, tensor, storage_dtype, compute_dtype, fp32_output))
    if quant is not None:
        state.update(quant.metadata_tensors())
    if convert_state is not None:
        state = convert_state(state)
    state.pop(quantized.MARKER, None)
    if operations is None:
        uniform = all(t.dtype == compute_dtype for k, t in state.items() if not k.startswith("proj_out."))
        operations = TorchOps if uniform else CastOps

    with torch.device("meta"):
        model = FramePackTransformer(config, operations=operations, attention_backend=attention_backend,
                                     compute_dtype=compute_dtype, fp32_output=fp32_output)
        expected = FramePackTransformer(config).state_dict().keys()  # what any layer set must be given
    absent = sorted(set(expected) - set(state))
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _fill_identity_scale(model, k)]
    if result.unexpected_keys or missing or absent:
        raise CheckpointError(_key_report(sorted(set(missing + absent)), result.unexpected_keys))
    _check_materialized(model)
    return model.to(device).eval().requires_grad_(False)


def _fill_identity_scale(model, key):
    """Scaled-fp8 layers hold a weight scale even where the file stores the layer unscaled: it is 1."""
    layer, _, name = key.rpartition(".")
    if name not in quantized.IDENTITY_SCALES:
        return False
    setattr(model.get_submodule(layer), name, torch.nn.Parameter(torch.ones(()), requires_grad=False))
    return True


def _check_materialized(model):
    """Every tensor was given a value: layers may start empty (meta, or weight=None in newer comfy.ops)."""
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    empty += [f"{n}.weight" for n, m in model.named_modules()
              if hasattr(m, "in_features") and getattr(m, "weight", None) is None]
    if empty:
        raise CheckpointError(f"The checkpoint left {len(empty)} tensors without values (e.g. {', '.join(empty[:4])}); "
                              "the file is incomplete or its layout is not one these layers read.")


def _read_batches(files, shapes, prefix, batches=16):
    """(file, keys) batches of about 1/``batches`` of the checkpoint each.

    safetensors maps the file; tensors read without a dtype change stay views of that map (one copy), but
    when they are converted the mapped pages would stay resident until the file is closed. Closing and
    reopening it every batch keeps host memory near one copy of the converted weights.
    """
    def nbytes(key):
        shape, dtype = shapes[key]
        return math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES.get(dtype, torch.float32)).element_size()

    batch_bytes = sum(nbytes(k) for k in shapes if k.startswith(prefix)) / batches
    for file in files:
        with _open(file) as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]
        batch, size = [], 0
        for key in keys:
            batch.append(key)
            size += nbytes(key)
            if size >= batch_bytes:
                yield file, batch
                batch, size = [], 0
        if batch:
            yield file, batch


def _storage_dtype(key, tensor, storage_dtype, compute_dtype, fp32_output):
    if fp32_output and key.startswith("proj_out."):
        return torch.float32  # the last projection runs in fp32, as in the original
    if storage_dtype is not None and is_fp8(storage_dtype):
        # only the big matrices go to fp8; biases, norms and embedders stay precise
        big = tensor.ndim >= 2 and ("transformer_blocks." in key)
        return storage_dtype if big else compute_dtype
    if storage_dtype is not None:
        return storage_dtype
    return tensor.dtype if is_fp8(tensor.dtype) else compute_dtype


def _key_report(missing, unexpected):
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors that no layer uses (e.g. {', '.join(unexpected[:4])})")
    return "The checkpoint does not match a FramePack transformer: " + "; ".join(parts) + "."
