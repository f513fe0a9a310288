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

from . import quantized
from .files import FLOAT_DTYPES, ITEM_SIZES, CheckpointError, non_float, open_safetensors, read_header
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
USE_FRAMEPACK = ("Load the FramePack weights (FramePackI2V_HY or FramePack_F1_I2V_HY_20250503) in "
                 "models/diffusion_models.")
USE_FRAMEPACK_NOT_HUNYUAN = (
    "FramePack is built on this model but cannot run it: keep it for ComfyUI's own HunyuanVideo workflows "
    "(Load Diffusion Model), and for FramePack load FramePackI2V_HY_bf16.safetensors (Kijai/HunyuanVideo_comfy) "
    "or the lllyasviel/FramePackI2V_HY folder.")
# what other popular checkpoints look like (every marker key present, any prefix), to say what a wrong file is
LOOKALIKES = (
    (("double_blocks.0.img_attn.qkv.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight"),
     "ComfyUI's repackaged HunyuanVideo transformer (double_blocks.N.img_attn.qkv names, e.g. "
     "hunyuan_video_t2v_720p_bf16.safetensors)", USE_FRAMEPACK_NOT_HUNYUAN),
    (("double_blocks.0.img_attn_qkv.weight",),
     "an original-format HunyuanVideo transformer (double_blocks/single_blocks)", USE_FRAMEPACK_NOT_HUNYUAN),
    (("double_blocks.0.img_attn.qkv.weight",), "a Flux transformer", USE_FRAMEPACK),
    (("patch_embedding.weight", "blocks.0.self_attn.q.weight"), "a Wan video transformer", USE_FRAMEPACK),
    (("input_blocks.0.0.weight",), "a Stable Diffusion / SDXL UNet", USE_FRAMEPACK),
    (("joint_blocks.0.x_block.attn.qkv.weight",), "a Stable Diffusion 3 MMDiT", USE_FRAMEPACK),
    (("decoder.conv_in.conv.weight",), "a video VAE", USE_FRAMEPACK),
    (("decoder.conv_in.weight",), "a VAE", USE_FRAMEPACK),
    (("text_model.encoder.layers.0.self_attn.q_proj.weight",), "a CLIP text encoder", USE_FRAMEPACK),
    (("vision_model.encoder.layers.0.self_attn.q_proj.weight",), "a CLIP/SigLIP vision encoder", USE_FRAMEPACK),
    (("model.layers.0.self_attn.q_proj.weight",), "a language model (text encoder)", USE_FRAMEPACK),
)
LORA_KEY = re.compile(r"(^|[._])lora_(A|B|up|down)[._]")
SAFETENSORS_DTYPES = FLOAT_DTYPES
MAX_CONFIG_BYTES = 1_000_000  # a diffusers config.json or shard index is a few kB


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
        shards = [path / name for name in _shard_names(indexes[0])]
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


def read_json(file, what):
    """A small JSON object (config.json, a shard index), or CheckpointError naming the file and the fix."""
    fix = f"Download {file.name} again (it is the {what} of the diffusers folder)."
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{file.name} is {file.stat().st_size} bytes, far too large for a {what}. {fix}")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file.name} is not valid JSON ({e}). {fix}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name} holds a JSON {type(data).__name__}, not the object a {what} is. {fix}")
    return data


def _shard_names(index):
    """Shard file names of a diffusers index, each a plain name inside the folder (never a path out of it)."""
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index.name} has no weight_map of tensor names to shard files. Download it again.")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or "\0" in name or Path(name).is_absolute() or Path(name).drive):
            raise CheckpointError(
                f"{index.name} names a shard {name!r} that is not a plain file name in its folder. Shards must sit "
                "next to the index; a path (separators, '..', absolute) could open any file on this machine, so it "
                "is refused. Use the model's original index file.")
    return names


def read_key_shapes(path):
    """{key: (shape, dtype name)} of every tensor in the checkpoint, read from (checked) headers only."""
    shapes = {}
    for file in _safetensors_files(path):
        shapes.update(read_header(file))
    return shapes


def read_metadata(path):
    """The safetensors metadata of the checkpoint (all shards merged); {} when it has none."""
    metadata = {}
    for file in _safetensors_files(path):
        with open_safetensors(file) as f:
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
    keys = set(keys)
    for markers, what, advice in LOOKALIKES:
        if all(any(k.endswith(m) for k in keys) for m in markers):
            return f"This checkpoint looks like {what}, not a FramePack transformer. {advice}"
    if any(LORA_KEY.search(k) for k in keys):
        return ("This is a LoRA, not a FramePack transformer. Put it in models/loras and apply it to the FramePack "
                "model with FramePack LoRA Loader; load the FramePack weights here.")
    missing = [k for k in REQUIRED if k not in keys]
    if any(k.startswith("transformer_blocks.") for k in keys) and missing and set(missing) <= {
            "clean_x_embedder.proj.weight", "image_projection.up.weight", "image_projection.down.weight"}:
        return ("This is a diffusers HunyuanVideo transformer without FramePack's clean_x_embedder and "
                "image_projection: the base text-to-video model, not FramePack. Load the FramePack weights instead.")
    return (f"Not a FramePack transformer: missing {', '.join(missing[:6])}"
            f"{' and more' if len(missing) > 6 else ''} ({len(keys)} tensors in the file).")


# dimensions of the tensors the config is read from
REQUIRED_NDIM = {ANCHOR: 5, "clean_x_embedder.proj.weight": 5, "transformer_blocks.0.attn.norm_q.weight": 1}


def _check_shapes_readable(shapes):
    """The tensors the config is read from have the ranks and sizes a FramePack transformer gives them."""
    for key in REQUIRED:
        ndim = REQUIRED_NDIM.get(key, 2)
        if len(shapes[key]) != ndim or not all(shapes[key]):
            raise CheckpointError(f"{key} is shaped {list(shapes[key])}, but a FramePack transformer's is "
                                  f"{ndim}-dimensional with no empty axis: the file's header is damaged.")
    inner, head_dim = shapes[ANCHOR][0], shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    patch = math.prod(shapes[ANCHOR][2:])
    if inner % head_dim or shapes["proj_out.weight"][0] % patch:
        raise CheckpointError(f"Inconsistent shapes: width {inner} is not a multiple of the head size {head_dim}, "
                              f"or proj_out's {shapes['proj_out.weight'][0]} rows not of the patch size {patch}: "
                              "the file's header is damaged.")


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
    _check_shapes_readable(shapes)
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
        rope_theta=_config_value(extra, "rope_theta", (int, float), 256.0),
        rope_axes=tuple(_config_value(extra, "rope_axes_dim", list, None) or default_rope_axes(head_dim)),
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        clean_kernels=tuple(k for k, (name, _) in CLEAN_EMBEDDERS.items() if f"clean_x_embedder.{name}.weight" in shapes),
    )
    if len(cfg.rope_axes) != 3 or not all(isinstance(a, int) and a > 0 and a % 2 == 0 for a in cfg.rope_axes):
        raise CheckpointError(f"config.json's rope_axes_dim {list(cfg.rope_axes)} must be three positive even "
                              "numbers (128-wide heads: [16, 56, 56]). Download config.json again.")
    if sum(cfg.rope_axes) != head_dim:
        raise CheckpointError(f"RoPE axes {cfg.rope_axes} do not add up to the head size {head_dim}.")
    return cfg


def _config_value(extra, key, types, default):
    value = extra.get(key, default)
    if value is not default and (not isinstance(value, types) or isinstance(value, bool)
                                 or (isinstance(value, float) and not math.isfinite(value))):
        raise CheckpointError(f"config.json's {key} is {value!r}, not a valid value. Download config.json again.")
    return value


# ---------------------------------------------------------------------------------------------
# loading


def _compute_dtype_for(stored):
    """bf16 compute for fp8 files, otherwise the dtype most weights are stored in."""
    if any(is_fp8(d) for d in stored):
        return torch.bfloat16
    return max(set(stored), key=stored.count) if stored else torch.float32


def _layout(path, shapes):
    """(prefix, {key without prefix: (shape, dtype)}, FramePackConfig) of a checkpoint, from its headers."""
    extra = {}
    if path.is_dir() and (path / "config.json").is_file():
        extra = read_json(path / "config.json", "model config")
    prefix = find_prefix(shapes)
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    return prefix, own, infer_config({k: shape for k, (shape, _) in own.items()}, extra)


def read_config(path):
    """The FramePackConfig of the checkpoint at ``path`` (file or diffusers folder), read from its headers
    (and config.json) only: no weight is read."""
    path = Path(path)
    try:
        return _layout(path, read_key_shapes(path))[2]
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(path.name) else f"{path.name}: {e}") from None


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
    shapes = read_key_shapes(path)
    try:
        prefix, own, config = _layout(path, shapes)
        foreign = len(shapes) - len(own)
        if foreign:
            log.warning("%s: ignoring %d tensors outside the transformer (prefix %r).", path.name, foreign, prefix)
        quant = _quantization(path, shapes, prefix)
        integers = non_float({k: v for k, v in own.items() if not (quant and quant.is_extra(k))})
        if integers:
            raise CheckpointError(
                f"{len(integers)} tensors hold integers or booleans ({', '.join(integers[:3])}), but every FramePack "
                "weight is floating point: the file is damaged or quantised in a format this loader does not read. "
                "Use a bf16, fp16, fp32 or fp8 .safetensors release.")
        with torch.device("meta"):  # what any layer set must be given
            expected = {k: tuple(v.shape) for k, v in FramePackTransformer(config).state_dict().items()}
        if quant is None and convert_state is None:  # a plain layout: checked before anything is read
            _check_against_model(own, expected)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(path.name) else f"{path.name}: {e}") from None
    if quant is not None and operations is None:
        raise CheckpointError(f"{path.name} is quantized in ComfyUI's {quant.format} layout, which only layers that "
                              "read it can run: load it in ComfyUI with FramePack Model Loader, or pass operations "
                              "for that layout.")

    stored = [FLOAT_DTYPES[d] for k, (_, d) in own.items() if not (quant and quant.is_extra(k))]
    compute_dtype = compute_dtype or _compute_dtype_for(stored)
    targets = {}  # key -> the dtype it is converted to; absent: kept as stored
    for key, (shape, dtype) in shapes.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and not (quant is not None and quant.keeps_dtype(name)):
            target = _storage_dtype(name, FLOAT_DTYPES[dtype], len(shape), storage_dtype, compute_dtype, fp32_output)
            if target != FLOAT_DTYPES[dtype]:
                targets[key] = target
    state = {}
    for file, keys in _read_batches(files, shapes, prefix, targets):
        with open_safetensors(file) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                state[key[len(prefix):]] = tensor.to(targets[key]) if key in targets else tensor
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


def _check_against_model(own, expected):
    """Every tensor the model needs is in the file with its shape, and nothing else."""
    missing = [k for k in expected if k not in own]
    unexpected = [k for k in own if k not in expected]
    if missing or unexpected:
        raise CheckpointError(_key_report(missing, unexpected))
    wrong = [f"{k} {list(own[k][0])} (expected {list(s)})" for k, s in expected.items() if tuple(own[k][0]) != s]
    if wrong:
        raise CheckpointError(f"{len(wrong)} tensors have shapes that do not fit the rest of the file: "
                              f"{', '.join(wrong[:3])}. The file is damaged or not a FramePack transformer; "
                              "download it again.")


def _read_batches(files, shapes, prefix, targets, batches=16):
    """(file, keys) groups to read with one opening (one mapping of the file) each.

    safetensors maps the whole file and its tensors are views of that mapping: a page read through it stays
    resident for as long as any view of the mapping lives. So per file the tensors kept as stored (no key in
    ``targets``) come first, all from one mapping that nothing else reads: until used they cost a page or so
    each (and the kernel's fault-around), then only their own pages. The converted ones follow in batches of
    about 1/``batches`` of the converted bytes, each from a mapping that no tensor outlives, so the pages read
    while converting are released batch by batch and host memory stays near one copy of the result.
    """
    def nbytes(key):
        shape, dtype = shapes[key]
        return math.prod(shape) * ITEM_SIZES[dtype]

    batch_bytes = sum(nbytes(k) for k in targets) / batches
    for file in files:
        keys = [k for k in read_header(file) if k.startswith(prefix)]
        kept = [k for k in keys if k not in targets]
        if kept:
            yield file, kept
        batch, size = [], 0
        for key in (k for k in keys if k in targets):
            batch.append(key)
            size += nbytes(key)
            if size >= batch_bytes:
                yield file, batch
                batch, size = [], 0
        if batch:
            yield file, batch


def _storage_dtype(key, dtype, ndim, storage_dtype, compute_dtype, fp32_output):
    if fp32_output and key.startswith("proj_out."):
        return torch.float32  # the last projection runs in fp32, as in the original
    if storage_dtype is not None and is_fp8(storage_dtype):
        # only the big matrices go to fp8; biases, norms and embedders stay precise
        big = ndim >= 2 and ("transformer_blocks." in key)
        return storage_dtype if big else compute_dtype
    if storage_dtype is not None:
        return storage_dtype
    return dtype if is_fp8(dtype) else compute_dtype


def _key_report(missing, unexpected):
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors that no layer uses (e.g. {', '.join(unexpected[:4])})")
    return "The checkpoint does not match a FramePack transformer: " + "; ".join(parts) + "."
