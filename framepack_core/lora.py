"""LoRA files -> LoRA tensors keyed by the FramePack transformer's own module names.

Pure torch (no ComfyUI). The output uses ComfyUI's LoRA tensor names (``<module>.lora_up.weight``,
``.lora_down.weight``, ``.alpha``, ``.dora_scale``, ``.diff``, ``.diff_b``, LoHa/LoKr names unchanged) under
``diffusion_model.<our module>``, with a key map ``diffusion_model.<module>`` -> ``diffusion_model.<module>.weight``,
which is exactly what ``comfy.lora.load_lora(state_dict, key_map)`` consumes.

Formats understood (see ``FORMATS``):

* diffusers / PEFT names of our modules (``transformer_blocks.0.attn.to_q.lora_A.weight``), prefixed with
  ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.`` or nothing;
* kohya names, the module path with underscores (``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight``,
  as musubi-tuner writes FramePack LoRAs);
* original HunyuanVideo names, dotted or kohya-underscored (musubi-tuner / diffusion-pipe HunyuanVideo LoRAs),
  and ComfyUI's internal HunyuanVideo names (``img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``). Fused layers
  are split exactly: the rows of the LoRA's up matrix (and of any per-row tensor) are cut into the pieces
  of the fused weight, the down matrix and alpha are shared. ``double_blocks.N.img_attn_qkv`` ->
  ``attn.to_q|to_k|to_v``; ``single_blocks.N.linear1`` (rows ``[q, k, v, mlp]``) -> ``attn.to_q|to_k|to_v`` +
  ``proj_mlp``; ``final_layer.adaLN_modulation.1`` stores ``(shift, scale)`` where ours stores
  ``(scale, shift)``, so its rows are swapped. Every other modulation (``img_mod``, ``txt_mod``, single
  ``modulation``, refiner ``adaLN_modulation``) has the same chunk order as ours (shift, scale, gate / the two
  gates) and is only renamed.

A LoRA module that cannot be mapped exactly (unknown name, a module this model lacks, wrong shapes, or
a LoRA type that cannot be split along rows, such as LoKr on a fused layer) is left out and reported
with its reason, never applied wrong.
"""

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from .files import FLOAT_DTYPES, CheckpointError, open_safetensors, read_header

FORMATS = ("diffusers/PEFT (transformer.<module>.lora_A/lora_B.weight, optional .alpha), "
           "kohya/musubi-tuner (lora_unet_<module_with_underscores>.lora_down/lora_up.weight + .alpha), "
           "original HunyuanVideo (double_blocks.N.img_attn_qkv, single_blocks.N.linear1, ...; dotted or "
           "lora_unet_ underscored) and ComfyUI's HunyuanVideo names (img_attn.qkv, img_mod.lin, ...); "
           "key prefixes: none, diffusion_model., model.diffusion_model., transformer., base_model.model., lora_unet_, "
           "lora_transformer_, lycoris_; LoRA, LoCon, DoRA, LoHa, LoKr and full diff tensors")

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
            "lora_unet_", "lora_transformer_", "lycoris_")

# source tensor suffix -> ComfyUI's name for it (longest suffixes are tried first)
_DOWN = "lora_down.weight"
_UP = "lora_up.weight"
SUFFIXES = {
    ".lora_down.weight": _DOWN, ".lora_A.weight": _DOWN, ".lora_A.default.weight": _DOWN, ".lora.down.weight": _DOWN,
    ".lora_up.weight": _UP, ".lora_B.weight": _UP, ".lora_B.default.weight": _UP, ".lora.up.weight": _UP,
    ".lora_B.bias": "lora_B.bias", ".lora_A.bias": "lora_A.bias",
    ".lora_mid.weight": "lora_mid.weight", ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "w_norm", ".b_norm": "b_norm",
    ".set_weight": "set_weight", ".reshape_weight": "reshape_weight",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".oft_blocks": "oft_blocks", ".rescale": "rescale",
    ".a1.weight": "a1.weight", ".a2.weight": "a2.weight", ".b1.weight": "b1.weight", ".b2.weight": "b2.weight",
}
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)

# Tensors cut along their rows (output features) when a fused layer is split, and tensors every piece
# shares. A group holding any other tensor cannot be split exactly.
_ROW_TENSORS = {_UP, "diff", "diff_b", "hada_w1_a", "hada_w2_a"}
_SHARED_TENSORS = {_DOWN, "alpha", "hada_w1_b", "hada_w2_b"}

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def _split(*targets):
    return ("split", targets)


# original HunyuanVideo sub-module names (dots written as underscores) -> ours; several spellings each:
# tencent / musubi-tuner / diffusion-pipe ("img_attn_qkv", "img_mlp.fc1", "img_mod.linear") and
# ComfyUI's internal HunyuanVideo model ("img_attn.qkv", "img_mlp.0", "img_mod.lin").
_DOUBLE = {
    "img_attn_qkv": _split(*_QKV),
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_qkv": _split(*_ADD_QKV),
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp_fc1": "ff.net.0.proj", "img_mlp_0": "ff.net.0.proj",
    "img_mlp_fc2": "ff.net.2", "img_mlp_2": "ff.net.2",
    "txt_mlp_fc1": "ff_context.net.0.proj", "txt_mlp_0": "ff_context.net.0.proj",
    "txt_mlp_fc2": "ff_context.net.2", "txt_mlp_2": "ff_context.net.2",
    "img_mod_linear": "norm1.linear", "img_mod_lin": "norm1.linear",  # (shift, scale, gate) x 2, as ours
    "txt_mod_linear": "norm1_context.linear", "txt_mod_lin": "norm1_context.linear",
    "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
    "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k",
}
_SINGLE = {
    "linear1": _split(*_QKV, "proj_mlp"),  # rows [q, k, v, mlp]
    "linear2": "proj_out",
    "modulation_linear": "norm.linear", "modulation_lin": "norm.linear",  # (shift, scale, gate), as ours
    "q_norm": "attn.norm_q", "k_norm": "attn.norm_k",
}
_REFINER = {
    "self_attn_qkv": _split(*_QKV),
    "self_attn_proj": "attn.to_out.0",
    "mlp_fc1": "ff.net.0.proj", "mlp_0": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2", "mlp_2": "ff.net.2",
    "adaLN_modulation_1": "norm_out.linear",  # (attention gate, mlp gate), as ours
    "norm1": "norm1", "norm2": "norm2",
}
_TOP = {
    "img_in_proj": "x_embedder.proj",
    "time_in_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in_mlp_0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_mlp_2": "time_text_embed.guidance_embedder.linear_2",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in_input_embedder": "context_embedder.proj_in",
    "txt_in_t_embedder_mlp_0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in_t_embedder_in_layer": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in_t_embedder_mlp_2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in_t_embedder_out_layer": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in_c_embedder_linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in_c_embedder_in_layer": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in_c_embedder_linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "txt_in_c_embedder_out_layer": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    # the original chunks this into (shift, scale); our norm_out into (scale, shift): swap the row halves
    "final_layer_adaLN_modulation_1": ("swap", ("norm_out.linear",)),
}
_BLOCKS = (
    (re.compile(r"double_blocks_(\d+)_(.+)"), "transformer_blocks", _DOUBLE),
    (re.compile(r"single_blocks_(\d+)_(.+)"), "single_transformer_blocks", _SINGLE),
    (re.compile(r"txt_in_individual_token_refiner_blocks_(\d+)_(.+)"),
     "context_embedder.token_refiner.refiner_blocks", _REFINER),
)


class LoraConversion(NamedTuple):
    state_dict: dict   # "diffusion_model.<our module>.<tensor name>" -> tensor, for comfy.lora.load_lora
    key_map: dict      # "diffusion_model.<our module>" -> "diffusion_model.<our module>.weight"
    unmatched: list    # source keys left out (sorted)
    reasons: dict      # source module path (or the key itself: stray or duplicate keys) -> why it was left out
    targets: dict      # source module path -> our module names it patches
    total: int         # LoRA modules (groups of tensors sharing a module path) in the source


def read_lora(path):
    """{key: tensor} of a LoRA .safetensors file, its header checked before anything is read (files.py).

    Malformed files (truncated, random bytes, pickles, damaged headers) and integer or bool weights raise
    ``CheckpointError`` naming the file and the fix. Integer ``alpha`` scalars, as some trainers write
    them, are read as floats.
    """
    path = Path(path)
    header = read_header(path)
    if not header:
        raise CheckpointError(f"{path.name} holds no tensors, so it is no LoRA. Download it again.")
    integers = [f"{k} ({d})" for k, (shape, d) in header.items()
                if d not in FLOAT_DTYPES and not (k.endswith(".alpha") and math.prod(shape) == 1 and d != "BOOL")]
    if integers:
        raise CheckpointError(f"{path.name} holds integer or bool tensors ({describe_keys(integers, 3)}), but LoRA "
                              "weights are floating point: the file is damaged or not a LoRA. Download it again.")
    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in header}
    tensors = {k: t if t.is_floating_point() else t.float() for k, t in tensors.items()}
    broken = [k for k, t in tensors.items() if not torch.isfinite(t.to(torch.float16) if t.itemsize == 1 else t).all()]
    if broken:  # a NaN in a LoRA makes every prediction NaN: a black video
        raise CheckpointError(f"{path.name} holds NaN or inf values ({describe_keys(broken, 3)}): the LoRA is "
                              "corrupt or was saved after its training diverged. Download it again or use another.")
    return tensors


@lru_cache(maxsize=1)
def default_shapes():
    """Parameter shapes of the released FramePack transformer (full config), built on the meta device."""
    from .model import FramePackConfig, FramePackTransformer

    with torch.device("meta"):
        model = FramePackTransformer(FramePackConfig())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def split_key(key):
    """(module path without prefix, ComfyUI tensor name) of a LoRA key, or None if not a LoRA tensor."""
    rest = key
    for prefix in PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            break
    for suffix in _SUFFIX_ORDER:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], SUFFIXES[suffix]
    return None


def resolve(module, modules):
    """Our target(s) for a source module path: ("rename"|"split"|"swap", (our module names,)) or None.

    ``modules``: {our module name with dots as underscores: our module name} (modules holding a weight);
    see ``module_index``. Dotted and underscored spellings of the source path both work.
    """
    flat = module.replace(".", "_")
    ours = modules.get(flat)
    if ours is not None:
        return "rename", (ours,)
    spec = _TOP.get(flat)
    base = ""
    if spec is None:
        for pattern, block, table in _BLOCKS:
            m = pattern.fullmatch(flat)
            if m and m.group(2) in table:
                spec, base = table[m.group(2)], f"{block}.{m.group(1)}."
                break
    if spec is None:
        return None
    if isinstance(spec, str):
        return "rename", (base + spec,)
    kind, names = spec
    return kind, tuple(base + n for n in names)


def module_index(shapes):
    """{module with dots as underscores: module} for every module of ``shapes`` that holds a weight."""
    index = {}
    for key in shapes:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            index[module.replace(".", "_")] = module
    return index


def convert_lora(lora, shapes=None):
    """Convert a LoRA state dict to our module names. See the module docstring for the formats.

    lora: {key: tensor} as read from the file. shapes: our model's ``state_dict`` shapes
    ({"transformer_blocks.0.attn.to_q.weight": (3072, 3072), ...}, no "diffusion_model." prefix);
    default: the released full-size FramePack transformer. Returns a ``LoraConversion``.
    """
    if not isinstance(lora, dict):
        raise TypeError(f"A LoRA must be a dict of tensors, not {type(lora).__name__}.")
    bad = [k for k, v in lora.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"A LoRA must map string keys to tensors; these entries do not: {bad[:5]}")
    shapes = {k: tuple(v) for k, v in (default_shapes() if shapes is None else shapes).items()}
    index = module_index(shapes)
    modules = set(index.values())

    groups, unmatched, reasons = {}, [], {}
    for key, tensor in lora.items():
        parts = split_key(key)
        if parts is None:
            unmatched.append(key)
            reasons[key] = "not a LoRA tensor name"
            continue
        module, name = parts
        group = groups.setdefault(module, {})
        if name in group:  # e.g. the same module under two prefixes
            unmatched.append(key)
            reasons[key] = f"duplicate {name} for {module}"
            continue
        group[name] = (key, tensor)

    out, targets, patched = {}, {}, {}
    for module, group in groups.items():
        tensors = {name: t for name, (_, t) in group.items()}
        try:
            spec = resolve(module, index)
            if spec is None:
                raise _Skip("no FramePack or HunyuanVideo module of this name")
            kind, names = spec
            missing = [n for n in names if n not in modules]
            if missing:
                raise _Skip(f"this model has no {', '.join(missing)}")
            _check_ranks(tensors)
            pieces = _convert_group(kind, names, _peft_bias(tensors), shapes)
        except _Skip as e:
            unmatched += [k for k, _ in group.values()]
            reasons[module] = str(e)
            continue
        taken = [n for n in names if n in patched]
        if taken:  # one patch per weight: a second source module for the same layer is reported, not merged
            unmatched += [k for k, _ in group.values()]
            reasons[module] = f"{', '.join(taken)} already patched by {patched[taken[0]]} of this LoRA"
            continue
        for target, piece in pieces.items():
            for name, t in piece.items():
                out[f"diffusion_model.{target}.{name}"] = t
            patched[target] = module
        targets[module] = list(names)

    key_map = {f"diffusion_model.{n}": f"diffusion_model.{n}.weight" for n in patched}
    loose = sum(1 for k in lora if split_key(k) is None)  # each non-LoRA key counts as one module
    return LoraConversion(out, key_map, sorted(unmatched), reasons, targets, len(groups) + loose)


class _Skip(Exception):
    pass


def _peft_bias(tensors):
    """PEFT's ``lora_B.bias`` is added scaled like the product: it is a bias difference ``diff_b``."""
    if "lora_A.bias" in tensors:
        raise _Skip("lora_A.bias (a bias inside the LoRA product) is not supported")
    if "lora_B.bias" not in tensors:
        return tensors
    tensors = dict(tensors)
    bias = tensors.pop("lora_B.bias").float()
    if "alpha" in tensors and _DOWN in tensors:
        bias = bias * (_alpha(tensors["alpha"]) / tensors[_DOWN].shape[0])
    tensors["diff_b"] = bias if "diff_b" not in tensors else tensors["diff_b"].float() + bias
    return tensors


def _alpha(t):
    if t.numel() != 1:
        raise _Skip(f"alpha must be one number, got shape {tuple(t.shape)}")
    return float(t.reshape(()).item())


# tensors that are matrices (or conv kernels) in every adapter type
_MATRICES = {_UP, _DOWN, "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1_a",
             "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "a1.weight", "a2.weight", "b1.weight", "b2.weight"}


def _check_ranks(tensors):
    """Tensors have the rank their role needs and no empty axis (a rank-0 LoRA would divide by zero)."""
    for name, t in tensors.items():
        if name == "alpha":
            continue
        if t.ndim < (2 if name in _MATRICES else 1) or 0 in t.shape:
            raise _Skip(f"{name} is shaped {tuple(t.shape)}, which no {name.split('.')[0]} tensor can be")


def _convert_group(kind, names, tensors, shapes):
    """{our module: {tensor name: tensor}} for one source module, shape-checked against ``shapes``."""
    if "alpha" in tensors:
        _alpha(tensors["alpha"])
    if kind == "rename":
        pieces = {names[0]: dict(tensors)}
    else:
        unsupported = set(tensors) - _ROW_TENSORS - _SHARED_TENSORS - {"dora_scale"}
        if unsupported:
            raise _Skip(f"cannot split {', '.join(sorted(unsupported))} across the fused layer's parts")
        outs = [shapes[f"{n}.weight"][0] for n in names]
        rows = {t.shape[0] for n, t in tensors.items() if n in _ROW_TENSORS}
        if len(rows) != 1:
            raise _Skip("no up/diff tensor to split" if not rows else f"row counts disagree: {sorted(rows)}")
        total = rows.pop()
        if total != sum(outs):
            raise _Skip(f"fused layer has {total} rows, this model's {'+'.join(names)} have {sum(outs)}")
        if kind == "split":
            ranges = []
            start = 0
            for n in outs:
                ranges.append([(start, n)])
                start += n
        else:  # swap the two halves: (shift, scale) -> (scale, shift)
            half = total // 2
            ranges = [[(half, half), (0, half)]]
        row_names = set(_ROW_TENSORS)
        dora = tensors.get("dora_scale")
        if dora is not None:
            if dora.shape[0] == total:
                row_names.add("dora_scale")  # one magnitude per output row: cut with the rows
            elif kind == "split":
                raise _Skip("DoRA magnitudes per input column span the fused parts; cannot split exactly")
        pieces = {}
        for target, parts in zip(names, ranges):
            piece = {}
            for name, t in tensors.items():
                if name in row_names:
                    t = torch.cat([t.narrow(0, s, n) for s, n in parts]) if len(parts) > 1 else t.narrow(0, *parts[0])
                piece[name] = t
            pieces[target] = piece
    for target, piece in pieces.items():
        _check_shapes(target, piece, shapes)
    return pieces


# tensors that carry a weight change, and what each adapter needs besides
_NEEDS = {
    _UP: (_DOWN,), _DOWN: (_UP,),
    "hada_w1_a": ("hada_w1_b", "hada_w2_a", "hada_w2_b"), "hada_w2_a": ("hada_w1_a", "hada_w1_b", "hada_w2_b"),
    "lokr_w1_a": ("lokr_w1_b",), "lokr_w2_a": ("lokr_w2_b",),
    "a1.weight": ("a2.weight", "b1.weight", "b2.weight"), "oft_blocks": (),
    "diff": (), "diff_b": (), "w_norm": (), "b_norm": (), "set_weight": (),
}


_CARRIERS = (set(_NEEDS) - {_DOWN}) | {"lokr_w1", "lokr_w2"}


def _check_complete(piece):
    """Every adapter in the group has all its parts (ComfyUI would otherwise fail or skip it)."""
    for name, needs in _NEEDS.items():
        missing = [n for n in needs if n not in piece]
        if name in piece and missing:
            raise _Skip(f"{name} without {', '.join(missing)}")
    if not _CARRIERS & set(piece):
        raise _Skip(f"no weight change in it, only {', '.join(sorted(piece))}")
    if any(n.startswith("lokr_") for n in piece) and not all(
            f"lokr_w{i}" in piece or f"lokr_w{i}_a" in piece for i in (1, 2)):
        raise _Skip("LoKr needs both Kronecker factors (lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b)")


def _check_shapes(target, piece, shapes):
    weight = shapes[f"{target}.weight"]
    out, fan_in = weight[0], math.prod(weight[1:])

    def fail(what, got, want):
        raise _Skip(f"{what} shape {tuple(got)} does not fit {target}.weight {tuple(weight)} (expected {want})")

    _check_complete(piece)
    if _UP in piece:
        up, down = piece[_UP], piece[_DOWN]
        if up.shape[0] != out:
            fail("lora up", up.shape, f"{out} rows")
        if "lora_mid.weight" not in piece and (math.prod(down.shape[1:]) != fan_in or up.shape[1] != down.shape[0]):
            fail("lora down", down.shape, f"(rank {up.shape[1]}, {fan_in})")
    if "hada_w1_a" in piece and "hada_t1" not in piece:
        for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
            if piece[a].shape[0] != out or math.prod(piece[b].shape[1:]) != fan_in:
                fail(a[:-2], piece[a].shape, f"{out} rows and {fan_in} columns")
    for name in ("diff", "set_weight"):
        if name in piece and math.prod(piece[name].shape) != math.prod(weight):
            fail(name, piece[name].shape, weight)
    if "diff_b" in piece:
        bias = shapes.get(f"{target}.bias")
        if bias is None:
            raise _Skip(f"{target} has no bias for diff_b")
        if tuple(piece["diff_b"].shape) != tuple(bias):
            fail("diff_b", piece["diff_b"].shape, bias)
    if "dora_scale" in piece and piece["dora_scale"].shape[0] not in (out, 1):
        fail("dora_scale", piece["dora_scale"].shape, f"{out} or 1 rows")


def lora_delta(piece):
    """Reference weight difference of one converted LoRA module (lora up/down with optional alpha).

    What ComfyUI adds at strength 1: ``up @ down * alpha / rank`` (alpha absent: scale 1).
    """
    up, down = piece[_UP].float(), piece[_DOWN].float()
    scale = _alpha(piece["alpha"]) / down.shape[0] if "alpha" in piece else 1.0
    return (up.flatten(1) @ down.flatten(1)) * scale


def describe_keys(keys, n=5):
    """The first ``n`` keys and how many more, for messages."""
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
