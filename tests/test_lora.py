"""LoRA conversion to our module names: every format, the fused-layer split math, reporting, bad input."""

import re

import pytest
import torch
from safetensors.torch import save_file

from framepack_core.files import CheckpointError
from framepack_core.lora import FORMATS, convert_lora, default_shapes, lora_delta, read_lora, split_key
from framepack_core.synthetic import TINY, random_state_dict

RANK = 4


@pytest.fixture(scope="module")
def state():
    return random_state_dict(TINY, seed=3)


@pytest.fixture(scope="module")
def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def lora_pair(out, fan_in, rank=RANK, seed=0):
    g = gen(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, fan_in, generator=g)  # up, down


def apply(state, conv, strength=1.0):
    """Our own application of a converted LoRA: W + strength * delta, per ComfyUI's formulas."""
    out = {k: v.clone() for k, v in state.items()}
    modules = {}
    for key, t in conv.state_dict.items():
        rest, module, name = key[len("diffusion_model."):], None, None
        for suffix in ("lora_up.weight", "lora_down.weight", "alpha", "diff_b", "diff", "dora_scale",
                       "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if rest.endswith("." + suffix):
                module, name = rest[: -len(suffix) - 1], suffix
                break
        assert name is not None, key
        modules.setdefault(module, {})[name] = t
    for module, piece in modules.items():
        w = out[f"{module}.weight"]
        if "lora_up.weight" in piece:
            w += strength * lora_delta(piece).reshape(w.shape)
        if "hada_w1_a" in piece:
            scale = piece["alpha"].item() / piece["hada_w1_b"].shape[0] if "alpha" in piece else 1.0
            w += strength * scale * (piece["hada_w1_a"] @ piece["hada_w1_b"]) * (piece["hada_w2_a"] @ piece["hada_w2_b"])
        if "diff" in piece:
            w += strength * piece["diff"]
        if "diff_b" in piece:
            out[f"{module}.bias"] += strength * piece["diff_b"]
    return out


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# -- diffusers / PEFT / kohya names of our own modules -------------------------------------------------

OUR_MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
               "transformer_blocks.0.attn.add_v_proj",
               "transformer_blocks.1.ff_context.net.0.proj", "transformer_blocks.0.norm1_context.linear",
               "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.proj_out",
               "context_embedder.token_refiner.refiner_blocks.1.attn.to_out.0", "image_projection.up",
               "time_text_embed.guidance_embedder.linear_2", "proj_out"]


@pytest.mark.parametrize("prefix, a, b", [
    ("transformer.", "lora_A.weight", "lora_B.weight"),
    ("diffusion_model.", "lora_A.weight", "lora_B.weight"),
    ("", "lora_A.weight", "lora_B.weight"),
    ("model.diffusion_model.", "lora_down.weight", "lora_up.weight"),
    ("base_model.model.", "lora_A.default.weight", "lora_B.default.weight"),
    ("transformer.", "lora.down.weight", "lora.up.weight"),
])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_diffusers_and_peft_names(state, shapes, prefix, a, b, alpha):
    lora, expected = {}, {}
    for i, module in enumerate(OUR_MODULES):
        w = state[f"{module}.weight"]
        up, down = lora_pair(w.shape[0], w.shape[1], seed=i)
        lora[f"{prefix}{module}.{a}"], lora[f"{prefix}{module}.{b}"] = down, up
        if alpha is not None:
            lora[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
        expected[f"{module}.weight"] = w + up @ down * (1.0 if alpha is None else alpha / RANK)
    conv = convert_lora(lora, shapes)
    assert conv.unmatched == [] and conv.total == len(OUR_MODULES)
    assert set(conv.key_map) == {f"diffusion_model.{m}" for m in OUR_MODULES}
    assert all(conv.key_map[k] == k + ".weight" for k in conv.key_map)
    assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in conv.state_dict)
    after = apply(state, conv)
    assert changed(state, after) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v)


def test_kohya_underscored_names(state, shapes):
    """musubi-tuner writes FramePack LoRAs as lora_unet_<diffusers module with underscores>."""
    lora, expected = {}, {}
    for i, module in enumerate(OUR_MODULES):
        w = state[f"{module}.weight"]
        up, down = lora_pair(w.shape[0], w.shape[1], seed=i)
        name = "lora_unet_" + module.replace(".", "_")
        lora |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        expected[f"{module}.weight"] = w + up @ down / RANK
    conv = convert_lora(lora, shapes)
    assert conv.unmatched == []
    after = apply(state, conv)
    assert changed(state, after) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v)


def test_conv_lora_on_patch_embedder(state, shapes):
    w = state["x_embedder.proj.weight"]  # Conv3d (dim, 16, 1, 2, 2)
    g = gen(5)
    down, up = torch.randn(RANK, *w.shape[1:], generator=g), torch.randn(w.shape[0], RANK, 1, 1, 1, generator=g)
    conv = convert_lora({"lora_unet_img_in_proj.lora_down.weight": down, "lora_unet_img_in_proj.lora_up.weight": up}, shapes)
    assert conv.targets == {"img_in_proj": ["x_embedder.proj"]}
    after = apply(state, conv)
    torch.testing.assert_close(after["x_embedder.proj.weight"], w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape))


# -- original HunyuanVideo names ------------------------------------------------------------------------

QKV, ADD_QKV = ["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
REF = "context_embedder.token_refiner.refiner_blocks.1."
ORIGINAL = [  # (source module, our modules (fused rows in this order), kind)
    ("double_blocks.1.img_attn_qkv", [f"transformer_blocks.1.{m}" for m in QKV], "split"),
    ("double_blocks.1.img_attn.qkv", [f"transformer_blocks.1.{m}" for m in QKV], "split"),
    ("double_blocks.0.txt_attn_qkv", [f"transformer_blocks.0.{m}" for m in ADD_QKV], "split"),
    ("double_blocks.0.img_attn_proj", ["transformer_blocks.0.attn.to_out.0"], "rename"),
    ("double_blocks.0.img_attn.proj", ["transformer_blocks.0.attn.to_out.0"], "rename"),
    ("double_blocks.1.txt_attn_proj", ["transformer_blocks.1.attn.to_add_out"], "rename"),
    ("double_blocks.0.img_mlp.fc1", ["transformer_blocks.0.ff.net.0.proj"], "rename"),
    ("double_blocks.0.img_mlp.0", ["transformer_blocks.0.ff.net.0.proj"], "rename"),
    ("double_blocks.0.img_mlp.fc2", ["transformer_blocks.0.ff.net.2"], "rename"),
    ("double_blocks.1.txt_mlp.fc1", ["transformer_blocks.1.ff_context.net.0.proj"], "rename"),
    ("double_blocks.1.txt_mlp.2", ["transformer_blocks.1.ff_context.net.2"], "rename"),
    ("double_blocks.0.img_mod.linear", ["transformer_blocks.0.norm1.linear"], "rename"),
    ("double_blocks.0.img_mod.lin", ["transformer_blocks.0.norm1.linear"], "rename"),
    ("double_blocks.1.txt_mod.linear", ["transformer_blocks.1.norm1_context.linear"], "rename"),
    ("single_blocks.1.linear1", [f"single_transformer_blocks.1.{m}" for m in QKV + ["proj_mlp"]], "split"),
    ("single_blocks.0.linear2", ["single_transformer_blocks.0.proj_out"], "rename"),
    ("single_blocks.0.modulation.linear", ["single_transformer_blocks.0.norm.linear"], "rename"),
    ("single_blocks.1.modulation.lin", ["single_transformer_blocks.1.norm.linear"], "rename"),
    ("txt_in.individual_token_refiner.blocks.1.self_attn_qkv", [REF + m for m in QKV], "split"),
    ("txt_in.individual_token_refiner.blocks.1.self_attn.qkv", [REF + m for m in QKV], "split"),
    ("txt_in.individual_token_refiner.blocks.1.self_attn_proj", [REF + "attn.to_out.0"], "rename"),
    ("txt_in.individual_token_refiner.blocks.1.mlp.fc1", [REF + "ff.net.0.proj"], "rename"),
    ("txt_in.individual_token_refiner.blocks.1.mlp.2", [REF + "ff.net.2"], "rename"),
    ("txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1", [REF + "norm_out.linear"], "rename"),
    ("txt_in.input_embedder", ["context_embedder.proj_in"], "rename"),
    ("txt_in.t_embedder.mlp.0", ["context_embedder.time_text_embed.timestep_embedder.linear_1"], "rename"),
    ("txt_in.t_embedder.out_layer", ["context_embedder.time_text_embed.timestep_embedder.linear_2"], "rename"),
    ("txt_in.c_embedder.linear_1", ["context_embedder.time_text_embed.text_embedder.linear_1"], "rename"),
    ("time_in.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], "rename"),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], "rename"),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], "rename"),
    ("guidance_in.mlp.2", ["time_text_embed.guidance_embedder.linear_2"], "rename"),
    ("final_layer.linear", ["proj_out"], "rename"),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
]


def fused(state, targets):
    return torch.cat([state[f"{t}.weight"] for t in targets])


@pytest.mark.parametrize("spelling", ["dotted", "kohya"])
@pytest.mark.parametrize("source, targets, kind", ORIGINAL, ids=[s for s, _, _ in ORIGINAL])
def test_original_hunyuan_video_names(state, shapes, source, targets, kind, spelling):
    """Applying the converted LoRA to our (split) weights equals applying the original LoRA to the fused
    weight, then cutting it like our layers (row halves swapped for the final layer's modulation)."""
    w = fused(state, targets)
    up, down = lora_pair(w.shape[0], w.shape[1], seed=len(source))
    alpha = 3.0
    name = ("lora_unet_" + source.replace(".", "_")) if spelling == "kohya" else "diffusion_model." + source
    lora = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    conv = convert_lora(lora, shapes)
    assert conv.unmatched == [], conv.reasons
    assert list(conv.targets.values()) == [targets]
    delta = up @ down * alpha / RANK  # the original LoRA's change of the original (fused) layer
    if kind == "swap":  # original rows (shift, scale) -> ours (scale, shift)
        half = w.shape[0] // 2
        delta = torch.cat([delta[half:], delta[:half]])
    after = apply(state, conv)
    assert changed(state, after) == {f"{t}.weight" for t in targets}
    torch.testing.assert_close(fused(after, targets), w + delta)  # `w` is already in our layout
    if kind == "split":
        for t in targets:  # each piece shares the down matrix and alpha
            assert torch.equal(conv.state_dict[f"diffusion_model.{t}.lora_down.weight"], down)
            assert conv.state_dict[f"diffusion_model.{t}.alpha"].item() == alpha


def test_single_linear1_split_sizes(shapes):
    """linear1 rows are [q (inner), k (inner), v (inner), mlp (mlp_dim)], not four equal parts."""
    inner, mlp = TINY.inner_dim, TINY.mlp_dim
    up, down = lora_pair(3 * inner + mlp, inner)
    conv = convert_lora({"single_blocks.0.linear1.lora_up.weight": up,
                         "single_blocks.0.linear1.lora_down.weight": down}, shapes)
    sd = conv.state_dict
    assert torch.equal(sd["diffusion_model.single_transformer_blocks.0.attn.to_q.lora_up.weight"], up[:inner])
    assert torch.equal(sd["diffusion_model.single_transformer_blocks.0.attn.to_k.lora_up.weight"], up[inner:2 * inner])
    assert torch.equal(sd["diffusion_model.single_transformer_blocks.0.attn.to_v.lora_up.weight"], up[2 * inner:3 * inner])
    assert torch.equal(sd["diffusion_model.single_transformer_blocks.0.proj_mlp.lora_up.weight"], up[3 * inner:])


def test_chunk_orders_match_diffusers_checkpoint_conversion():
    """Oracle: diffusers' own HunyuanVideo checkpoint conversion (original -> diffusers layout).

    Patching the original weights with an original-format LoRA and then converting them must equal
    converting them and patching with our converted LoRA. diffusers hard-codes hidden size 3072 for
    linear1, so rows are full size here; columns (input features) are kept small.
    """
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    hidden, fan_in = 3072, 8
    sources = {
        "double_blocks.0.img_attn_qkv": 3 * hidden, "double_blocks.0.txt_attn_qkv": 3 * hidden,
        "double_blocks.0.img_attn_proj": hidden, "double_blocks.0.txt_attn_proj": hidden,
        "double_blocks.0.img_mlp.fc1": 4 * hidden, "double_blocks.0.img_mlp.fc2": hidden,
        "double_blocks.0.txt_mlp.fc1": 4 * hidden, "double_blocks.0.txt_mlp.fc2": hidden,
        "double_blocks.0.img_mod.linear": 6 * hidden, "double_blocks.0.txt_mod.linear": 6 * hidden,
        "single_blocks.0.linear1": 7 * hidden, "single_blocks.0.linear2": hidden,
        "single_blocks.0.modulation.linear": 3 * hidden,
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": 3 * hidden,
        "txt_in.individual_token_refiner.blocks.0.self_attn_proj": hidden,
        "txt_in.individual_token_refiner.blocks.0.mlp.fc1": 4 * hidden,
        "txt_in.individual_token_refiner.blocks.0.mlp.fc2": hidden,
        "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": 2 * hidden,
        "txt_in.input_embedder": hidden, "txt_in.t_embedder.mlp.0": hidden, "txt_in.t_embedder.mlp.2": hidden,
        "txt_in.c_embedder.linear_1": hidden, "txt_in.c_embedder.linear_2": hidden,
        "time_in.mlp.0": hidden, "time_in.mlp.2": hidden, "vector_in.in_layer": hidden,
        "vector_in.out_layer": hidden, "guidance_in.mlp.0": hidden, "guidance_in.mlp.2": hidden,
        "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * hidden,
    }
    g = gen(11)
    original = {f"{s}.weight": torch.randn(rows, fan_in, generator=g) for s, rows in sources.items()}
    lora, patched = {}, {}
    for s, rows in sources.items():
        up, down = torch.randn(rows, 2, generator=g), torch.randn(2, fan_in, generator=g)
        lora |= {f"lora_unet_{s.replace('.', '_')}.lora_up.weight": up,
                 f"lora_unet_{s.replace('.', '_')}.lora_down.weight": down,
                 f"lora_unet_{s.replace('.', '_')}.alpha": torch.tensor(1.0)}
        patched[f"{s}.weight"] = original[f"{s}.weight"] + up @ down / 2
    ours = convert_hunyuan_video_transformer_to_diffusers({k: v.clone() for k, v in original.items()})
    expected = convert_hunyuan_video_transformer_to_diffusers(patched)
    assert set(ours) == set(expected)
    conv = convert_lora(lora, {k: tuple(v.shape) for k, v in ours.items()})
    assert conv.unmatched == [], conv.reasons
    after = apply(ours, conv)
    assert changed(ours, after) == set(ours)
    for k in ours:
        torch.testing.assert_close(after[k], expected[k], msg=k)


# -- other LoRA tensor types on fused layers ------------------------------------------------------------

def test_diff_and_bias_split(state, shapes):
    targets = [f"transformer_blocks.0.{m}" for m in QKV]
    w = fused(state, targets)
    g = gen(2)
    diff, diff_b = torch.randn(w.shape, generator=g), torch.randn(w.shape[0], generator=g)
    conv = convert_lora({"double_blocks.0.img_attn_qkv.diff": diff, "double_blocks.0.img_attn_qkv.diff_b": diff_b}, shapes)
    assert conv.unmatched == []
    after = apply(state, conv)
    torch.testing.assert_close(fused(after, targets), w + diff)
    torch.testing.assert_close(torch.cat([after[f"{t}.bias"] for t in targets]),
                               torch.cat([state[f"{t}.bias"] for t in targets]) + diff_b)


def test_loha_split(state, shapes):
    targets = [f"single_transformer_blocks.0.{m}" for m in QKV + ["proj_mlp"]]
    w = fused(state, targets)
    g = gen(4)
    w1a, w1b = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
    w2a, w2b = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
    lora = {"lora_unet_single_blocks_0_linear1.hada_w1_a": w1a, "lora_unet_single_blocks_0_linear1.hada_w1_b": w1b,
            "lora_unet_single_blocks_0_linear1.hada_w2_a": w2a, "lora_unet_single_blocks_0_linear1.hada_w2_b": w2b,
            "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(1.0)}
    conv = convert_lora(lora, shapes)
    assert conv.unmatched == []
    after = apply(state, conv)
    torch.testing.assert_close(fused(after, targets), w + (w1a @ w1b) * (w2a @ w2b) / 2)


def test_dora_scale_per_row_is_split_per_column_is_refused(state, shapes):
    w = fused(state, [f"transformer_blocks.0.{m}" for m in QKV])
    up, down = lora_pair(w.shape[0], w.shape[1])
    base = {"double_blocks.0.img_attn_qkv.lora_up.weight": up, "double_blocks.0.img_attn_qkv.lora_down.weight": down}
    rows = torch.arange(w.shape[0], dtype=torch.float32)[:, None]
    conv = convert_lora(base | {"double_blocks.0.img_attn_qkv.dora_scale": rows}, shapes)
    assert conv.unmatched == []
    d = TINY.inner_dim
    assert torch.equal(conv.state_dict["diffusion_model.transformer_blocks.0.attn.to_k.dora_scale"], rows[d:2 * d])
    conv = convert_lora(base | {"double_blocks.0.img_attn_qkv.dora_scale": torch.ones(1, w.shape[1])}, shapes)
    assert len(conv.unmatched) == 3 and "DoRA" in conv.reasons["double_blocks.0.img_attn_qkv"]
    assert conv.state_dict == {}


def test_peft_lora_b_bias_becomes_scaled_bias_diff(state, shapes):
    module = "transformer_blocks.0.attn.to_q"
    w = state[f"{module}.weight"]
    up, down = lora_pair(w.shape[0], w.shape[1])
    bias = torch.randn(w.shape[0], generator=gen(9))
    lora = {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up,
            f"transformer.{module}.lora_B.bias": bias, f"transformer.{module}.alpha": torch.tensor(8.0)}
    after = apply(state, convert_lora(lora, shapes))
    torch.testing.assert_close(after[f"{module}.bias"], state[f"{module}.bias"] + bias * 8.0 / RANK)


@pytest.mark.parametrize("tensors, reason", [
    ({"alpha": torch.tensor(1.0)}, "no weight change in it, only alpha"),
    ({"lora_down.weight": torch.zeros(RANK, 64)}, "lora_down.weight without lora_up.weight"),
    ({"hada_w1_a": torch.zeros(64, 2), "hada_w1_b": torch.zeros(2, 64)}, "hada_w1_a without hada_w2_a, hada_w2_b"),
    ({"lokr_w1": torch.zeros(4, 4)}, "both Kronecker factors"),
    ({"a1.weight": torch.zeros(2, 64)}, "a1.weight without a2.weight"),
])
def test_incomplete_adapters_are_reported(shapes, tensors, reason):
    conv = convert_lora({f"lora_unet_proj_out.{k}": v for k, v in tensors.items()}, shapes)
    assert conv.state_dict == {} and len(conv.unmatched) == len(tensors)
    assert reason in conv.reasons["proj_out"]


def test_lokr_renamed_but_not_split(shapes):
    lokr = {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(16, 16)}
    conv = convert_lora({f"double_blocks.0.img_attn_proj.{k}": v for k, v in lokr.items()}, shapes)
    assert conv.unmatched == [] and set(conv.state_dict) == {
        f"diffusion_model.transformer_blocks.0.attn.to_out.0.{k}" for k in lokr}
    conv = convert_lora({f"double_blocks.0.img_attn_qkv.{k}": v for k, v in lokr.items()}, shapes)
    assert len(conv.unmatched) == 2 and "cannot split" in conv.reasons["double_blocks.0.img_attn_qkv"]


# -- reporting and bad input ----------------------------------------------------------------------------

def test_unmatched_keys_are_reported_with_reasons(state, shapes):
    w = state["transformer_blocks.0.attn.to_q.weight"]
    up, down = lora_pair(w.shape[0], w.shape[1])
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}
    bad = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,  # text encoder
        "double_blocks.7.img_attn_proj.lora_down.weight": down,  # TINY has 2 dual blocks
        "double_blocks.7.img_attn_proj.lora_up.weight": up,
        "transformer.transformer_blocks.1.attn.to_k.lora_A.weight": torch.randn(RANK, 3 * w.shape[1]),  # wrong width
        "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": up,
        "double_blocks.0.img_attn_qkv.lora_up.weight": torch.randn(2 * w.shape[0], RANK),  # not 3 x inner rows
        "double_blocks.0.img_attn_qkv.lora_down.weight": down,
        "single_blocks.0.linear2.lora_up.weight": torch.randn(w.shape[0], RANK),  # no down
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": down,  # same module again
        "some_metadata": torch.zeros(1),
    }
    conv = convert_lora(good | bad, shapes)
    assert conv.unmatched == sorted(bad)
    assert conv.targets == {"transformer_blocks.0.attn.to_q": ["transformer_blocks.0.attn.to_q"]}
    assert conv.total == 7  # six module paths (the duplicate joins its module) and one stray key
    r = conv.reasons
    assert "no FramePack or HunyuanVideo module" in r["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert "no transformer_blocks.7.attn.to_out.0" in r["double_blocks.7.img_attn_proj"]
    assert "does not fit" in r["transformer_blocks.1.attn.to_k"]
    assert "rows" in r["double_blocks.0.img_attn_qkv"]
    assert "lora_up.weight without lora_down.weight" in r["single_blocks.0.linear2"]
    assert "duplicate" in r["diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight"]
    assert "not a LoRA tensor" in r["some_metadata"]


def test_two_sources_for_one_layer_are_not_merged_silently(state, shapes):
    w = state["transformer_blocks.0.attn.to_out.0.weight"]
    up, down = lora_pair(w.shape[0], w.shape[1])
    conv = convert_lora({"double_blocks.0.img_attn_proj.lora_up.weight": up,
                         "double_blocks.0.img_attn_proj.lora_down.weight": down,
                         "transformer_blocks.0.attn.to_out.0.lora_B.weight": up,
                         "transformer_blocks.0.attn.to_out.0.lora_A.weight": down}, shapes)
    assert len(conv.targets) == 1 and len(conv.unmatched) == 2
    assert any("already patched" in r for r in conv.reasons.values())


def test_nothing_matches(shapes):
    conv = convert_lora({"lora_te1_foo.lora_up.weight": torch.zeros(2, 2), "x": torch.zeros(1)}, shapes)
    assert conv.state_dict == {} and conv.key_map == {} and conv.targets == {} and len(conv.unmatched) == 2
    assert convert_lora({}, shapes) == ({}, {}, [], {}, {}, 0)


def test_bad_input(shapes):
    with pytest.raises(TypeError, match="dict"):
        convert_lora([torch.zeros(1)], shapes)
    with pytest.raises(TypeError, match="tensors"):
        convert_lora({"transformer.proj_out.lora_A.weight": [[1.0]]}, shapes)
    conv = convert_lora({"proj_out.lora_up.weight": torch.zeros(64, RANK),
                         "proj_out.lora_down.weight": torch.zeros(RANK, 64),
                         "proj_out.alpha": torch.ones(3)}, shapes)
    assert "alpha" in conv.reasons["proj_out"] and len(conv.unmatched) == 3


def test_default_shapes_are_the_released_model():
    shapes = default_shapes()
    assert len(shapes) == 1274 and shapes["single_transformer_blocks.39.proj_mlp.weight"] == (12288, 3072)
    up, down = torch.zeros(3 * 3072 + 12288, 2), torch.zeros(2, 3072)
    conv = convert_lora({"lora_unet_single_blocks_39_linear1.lora_up.weight": up,
                         "lora_unet_single_blocks_39_linear1.lora_down.weight": down})
    assert conv.unmatched == [] and len(conv.key_map) == 4


def test_split_key_and_formats_text():
    assert split_key("transformer.a.b.lora_A.weight") == ("a.b", "lora_down.weight")
    assert split_key("lora_unet_a_b.alpha") == ("a_b", "alpha")
    assert split_key("model.diffusion_model.a.lora_B.default.weight") == ("a", "lora_up.weight")
    assert split_key("alpha") is None and split_key("a.weight") is None
    for word in ("diffusers", "PEFT", "kohya", "HunyuanVideo", "lora_unet_"):
        assert word in FORMATS


# ---------------------------------------------------------------------------------------------
# reading LoRA files: malformed files are clear errors, never raw ones


@pytest.mark.parametrize("tensors, reason", [
    ({"lora_B.weight": torch.zeros(()), "lora_A.weight": torch.zeros(4, 64)}, r"lora_up.weight is shaped \(\)"),
    ({"lora_B.weight": torch.zeros(64), "lora_A.weight": torch.zeros(4, 64)}, r"lora_up.weight is shaped \(64,\)"),
    ({"lora_B.weight": torch.zeros(64, 0), "lora_A.weight": torch.zeros(0, 64), "alpha": torch.tensor(1.0)},
     r"is shaped \((64, 0|0, 64)\)"),
    ({"lora_B.weight": torch.zeros(64, 4), "lora_A.weight": torch.zeros(4, 64), "dora_scale": torch.zeros(())},
     r"dora_scale is shaped \(\)"),
    ({"hada_w1_a": torch.zeros(()), "hada_w1_b": torch.zeros(()), "hada_w2_a": torch.zeros(()),
      "hada_w2_b": torch.zeros(())}, "hada_w1_a is shaped"),
])
def test_tensors_of_impossible_rank_are_left_out_with_a_reason(shapes, tensors, reason):
    for stem in ("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn_qkv"):
        converted = convert_lora({f"{stem}.{k}": v for k, v in tensors.items()}, shapes)
        assert not converted.state_dict and len(converted.reasons) == 1
        assert re.search(reason, next(iter(converted.reasons.values())))


def _lora_file(path, **extra):
    save_file({"transformer.proj_out.lora_A.weight": torch.ones(4, 8), "transformer.proj_out.lora_B.weight":
               torch.ones(16, 4), **extra}, str(path))
    return path


def test_read_lora(tmp_path):
    lora = read_lora(_lora_file(tmp_path / "l.safetensors", **{"transformer.proj_out.alpha": torch.tensor(2)}))
    assert lora["transformer.proj_out.alpha"].dtype == torch.float32  # integer alpha, as some trainers save it
    assert lora["transformer.proj_out.lora_B.weight"].shape == (16, 4)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(_lora_file(p).read_bytes()[:-10]), "is truncated"),
    (lambda p: p.write_bytes(bytes(range(200, 256)) * 20), "is not a safetensors file"),
    (lambda p: torch.save({"a": torch.ones(2)}, p), "is a pickled PyTorch checkpoint"),
    (lambda p: _lora_file(p, **{"transformer.proj_out.diff_b": torch.ones(16, dtype=torch.int32)}),
     r"holds integer or bool tensors \(transformer.proj_out.diff_b \(I32\)\)"),
    (lambda p: _lora_file(p, **{"transformer.proj_out.alpha": torch.tensor(True)}), "holds integer or bool tensors"),
    (lambda p: _lora_file(p, **{"transformer.proj_out.diff_b": torch.full((16,), float("nan"))}),
     r"holds NaN or inf values \(transformer.proj_out.diff_b\)"),
    (lambda p: save_file({}, str(p)), "holds no tensors"),
])
def test_malformed_lora_files(tmp_path, make, message):
    path = tmp_path / "style.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match="style.safetensors " + message):
        read_lora(path)
