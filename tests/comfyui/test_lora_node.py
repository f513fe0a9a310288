"""FramePack LoRA Loader in a real ComfyUI: the patched weights are W + delta for diffusers and original
HunyuanVideo (fused qkv / linear1) LoRAs, partial (low-VRAM) loading gives the same model, and LoRAs that
do not fit are named or refused."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from framepack_core.synthetic import TINY, random_state_dict, save_single_file, section_inputs
from test_end_to_end import run

MODEL_FILE = "framepack_lora_test_tiny.safetensors"
RANK = 4
D = TINY.inner_dim


@pytest.fixture(scope="module")
def tiny(comfy):
    state = random_state_dict(TINY, seed=7)
    save_single_file(comfy.models / "diffusion_models" / MODEL_FILE, state)
    return state


@pytest.fixture()
def model(comfy, tiny):
    return run(comfy.pack["FramePackModelLoader"], model_name=MODEL_FILE, weight_dtype="fp32", attention="sdpa")[0]


def write_lora(comfy, name, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(comfy.models / "loras" / name))
    return name


def patched_weights(patcher, **load):
    """The transformer's weights with the patches applied, then the model restored."""
    patcher.patch_model(**load)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def lora_pair(out, fan_in, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, RANK, generator=g) * 0.1, torch.randn(RANK, fan_in, generator=g) * 0.1


def test_node_is_registered_with_safetensors_choices(comfy, tiny):
    write_lora(comfy, "not_a_lora.txt.safetensors", {"x": torch.zeros(1)})
    (comfy.models / "loras" / "pickled.pt").write_bytes(b"")
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["FramePackLoraLoader"] == "FramePack LoRA Loader"
    node = comfy.pack["FramePackLoraLoader"]
    choices = node.INPUT_TYPES()["required"]["lora_name"][1]["options"]
    assert "not_a_lora.txt.safetensors" in choices and "pickled.pt" not in choices
    assert list(node.RETURN_TYPES) == ["MODEL"] and node.CATEGORY == "FramePack"


def test_diffusers_lora_gives_w_plus_delta(comfy, tiny, model, caplog):
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2",
               "single_transformer_blocks.1.proj_mlp", "context_embedder.token_refiner.refiner_blocks.0.attn.to_v",
               "norm_out.linear"]
    lora, expected = {}, {}
    strength, alpha = 0.7, 2.0
    for i, m in enumerate(modules):
        w = tiny[f"{m}.weight"]
        up, down = lora_pair(w.shape[0], w.shape[1], i)
        lora |= {f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up,
                 f"transformer.{m}.alpha": torch.tensor(alpha)}
        expected[f"{m}.weight"] = w + strength * (up @ down) * alpha / RANK
    name = write_lora(comfy, "fp_diffusers.safetensors", lora)
    with caplog.at_level(logging.INFO):
        out = run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=strength)[0]
    assert f"[FramePack] LoRA {name}: 5 of 5 modules applied" in caplog.text
    assert out is not model and not model.patches  # a patched clone; the input MODEL is untouched
    after = patched_weights(out)
    for k, w in tiny.items():
        torch.testing.assert_close(after[k], expected.get(k, w), msg=k)
    # unpatching restored the shared weights
    restored = model.model.diffusion_model.state_dict()
    assert all(torch.equal(restored[k], tiny[k]) for k in expected)


def test_original_hunyuan_video_lora_with_fused_qkv(comfy, tiny, model):
    """double_blocks.N.img_attn_qkv / single_blocks.N.linear1 / final_layer modulation, musubi-tuner style."""
    strength, alpha = 1.0, 1.0
    qkv = torch.cat([tiny[f"transformer_blocks.1.attn.{p}.weight"] for p in ("to_q", "to_k", "to_v")])
    up_qkv, down_qkv = lora_pair(3 * D, D, 1)
    up_l1, down_l1 = lora_pair(3 * D + TINY.mlp_dim, D, 2)
    up_fl, down_fl = lora_pair(2 * D, D, 3)
    up_mod, down_mod = lora_pair(6 * D, D, 4)
    sources = {"double_blocks_1_img_attn_qkv": (up_qkv, down_qkv), "single_blocks_0_linear1": (up_l1, down_l1),
               "final_layer_adaLN_modulation_1": (up_fl, down_fl), "double_blocks_0_txt_mod_linear": (up_mod, down_mod)}
    lora = {}
    for src, (up, down) in sources.items():
        lora |= {f"lora_unet_{src}.lora_down.weight": down, f"lora_unet_{src}.lora_up.weight": up,
                 f"lora_unet_{src}.alpha": torch.tensor(alpha)}
    name = write_lora(comfy, "hunyuan_video_original.safetensors", lora)
    out = run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=strength)[0]
    after = patched_weights(out)

    touched = set()
    delta = up_qkv @ down_qkv * alpha / RANK  # on the fused (3D, D) weight
    assert qkv.shape == delta.shape
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        k = f"transformer_blocks.1.attn.{p}.weight"
        torch.testing.assert_close(after[k], tiny[k] + delta[i * D:(i + 1) * D])
        touched.add(k)
    delta = up_l1 @ down_l1 * alpha / RANK  # rows [q, k, v, mlp]
    for part, rows in (("attn.to_q", slice(0, D)), ("attn.to_k", slice(D, 2 * D)),
                       ("attn.to_v", slice(2 * D, 3 * D)), ("proj_mlp", slice(3 * D, None))):
        k = f"single_transformer_blocks.0.{part}.weight"
        torch.testing.assert_close(after[k], tiny[k] + delta[rows])
        touched.add(k)
    delta = up_fl @ down_fl * alpha / RANK  # original (shift, scale) -> ours (scale, shift)
    k = "norm_out.linear.weight"
    torch.testing.assert_close(after[k], tiny[k] + torch.cat([delta[D:], delta[:D]]))
    k2 = "transformer_blocks.0.norm1_context.linear.weight"  # same chunk order: renamed only
    torch.testing.assert_close(after[k2], tiny[k2] + up_mod @ down_mod * alpha / RANK)
    touched |= {k, k2}
    assert all(torch.equal(after[k], tiny[k]) for k in set(tiny) - touched)


def test_low_vram_partial_loading_gives_the_same_model(comfy, tiny, model):
    m = "single_transformer_blocks.0.attn.to_k"
    up, down = lora_pair(D, D, 5)
    qkv_up, qkv_down = lora_pair(3 * D, D, 8)
    name = write_lora(comfy, "fp_lowvram.safetensors", {
        f"diffusion_model.{m}.lora_up.weight": up, f"diffusion_model.{m}.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down})
    out = run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=1.0)[0]
    inputs = section_inputs(TINY, seed=2)

    def forward(**load):
        out.patch_model(**load)
        try:
            lowvram = out.model.model_lowvram
            with torch.no_grad():
                return out.model.diffusion_model(**inputs), lowvram
        finally:
            out.unpatch_model()

    full, _ = forward()
    partial, lowvram = forward(device_to=torch.device("cpu"), lowvram_model_memory=1)
    assert lowvram  # weights were left to per-layer patching at run time
    torch.testing.assert_close(partial, full)
    with torch.no_grad():
        plain = model.model.diffusion_model(**inputs)
    assert not torch.allclose(plain, full)  # and the LoRA does change the output


def test_unmatched_keys_are_named(comfy, tiny, model, caplog):
    w = tiny["proj_out.weight"]
    up, down = lora_pair(w.shape[0], w.shape[1], 6)
    name = write_lora(comfy, "fp_partial.safetensors", {
        "transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": up,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, RANK),
        "double_blocks.9.img_attn_qkv.lora_down.weight": torch.zeros(RANK, D),
        "double_blocks.9.img_attn_qkv.lora_up.weight": torch.zeros(3 * D, RANK)})
    with caplog.at_level(logging.INFO):
        out = run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=1.0)[0]
    assert f"[FramePack] LoRA {name}: 1 of 3 modules applied" in caplog.text
    assert "4 keys not applied" in caplog.text
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in caplog.text
    assert "double_blocks.9.img_attn_qkv.lora_up.weight" in caplog.text
    assert "no transformer_blocks.9.attn.to_q" in caplog.text  # and why
    after = patched_weights(out)
    torch.testing.assert_close(after["proj_out.weight"], w + up @ down)


def test_lora_that_matches_nothing_is_refused(comfy, tiny, model):
    name = write_lora(comfy, "sdxl_style.safetensors", {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(RANK, 8),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, RANK),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0)})
    with pytest.raises(ValueError) as e:
        run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=1.0)
    msg = str(e.value)
    assert name in msg and "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in msg
    assert "diffusers/PEFT" in msg and "original HunyuanVideo" in msg and "kohya" in msg


def test_wrong_width_is_refused_not_silently_skipped(comfy, tiny, model):
    """A LoRA for the full-size model on this tiny one: shapes do not fit, so it is refused loudly."""
    name = write_lora(comfy, "full_size.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, RANK)})
    with pytest.raises(ValueError, match="does not fit"):
        run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=1.0)


def test_strength_zero_and_file_types(comfy, tiny, model):
    node = comfy.pack["FramePackLoraLoader"]
    assert run(node, model=model, lora_name="anything.safetensors", strength=0.0)[0] is model
    with pytest.raises(ValueError, match="safetensors"):
        run(node, model=model, lora_name="pickled.pt", strength=1.0)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "is truncated"),
    (lambda data: bytes(range(256)) * 4, "is not a safetensors file"),
    (lambda data: b"", "is empty"),
])
def test_malformed_lora_file_is_a_clear_error(comfy, tiny, model, damage, message):
    name = write_lora(comfy, "damaged_lora.safetensors", {"transformer.proj_out.lora_A.weight": torch.ones(RANK, D),
                                                          "transformer.proj_out.lora_B.weight": torch.ones(64, RANK)})
    path = comfy.models / "loras" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{name} {message}.*[Dd]ownload it again"):
        run(comfy.pack["FramePackLoraLoader"], model=model, lora_name=name, strength=1.0)
