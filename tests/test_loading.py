"""Loading real safetensors checkpoints: layouts, prefixes, dtypes, and clear errors for wrong files."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from oracle import diffusers_reference, relative_error, run_reference
from framepack_core.loading import CheckpointError, load_transformer, read_key_shapes
from framepack_core.model import FramePackConfig
from framepack_core.ops import CastOps, TorchOps
from framepack_core.synthetic import MEDIUM, TINY, random_state_dict, save_diffusers_folder, save_single_file, section_inputs


def _same_weights(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    return all(torch.equal(loaded[k].float(), state[k].float()) for k in state)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "transformer."])
def test_single_file_with_any_prefix(tiny_state, tmp_path, prefix):
    model = load_transformer(save_single_file(tmp_path / "m.safetensors", tiny_state, prefix=prefix))
    assert model.config == TINY
    assert _same_weights(model, tiny_state)


def test_sharded_diffusers_folder(tiny_state, tmp_path):
    folder = save_diffusers_folder(tmp_path / "FramePackI2V_HY", tiny_state, TINY, shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    model = load_transformer(folder)
    assert model.config == TINY
    assert _same_weights(model, tiny_state)


def test_config_is_inferred_from_shapes(tmp_path):
    state = random_state_dict(MEDIUM, seed=3, dtype=torch.bfloat16)
    shapes = read_key_shapes(save_single_file(tmp_path / "medium.safetensors", state))
    from framepack_core.loading import infer_config

    assert infer_config({k: s for k, (s, _) in shapes.items()}) == MEDIUM


def test_released_shapes_infer_the_released_config():
    """The 13B checkpoint's shapes (read off a meta model) give the full config of DESIGN.md."""
    from framepack_core.loading import infer_config
    from framepack_core.model import FramePackConfig, FramePackTransformer

    shapes = {k: tuple(v.shape) for k, v in FramePackTransformer(device="meta").state_dict().items()}
    cfg = infer_config(shapes)
    assert cfg == FramePackConfig()
    assert (cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.num_single_layers, cfg.rope_axes) == (24, 128, 20, 40, (16, 56, 56))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_dtype_becomes_compute_dtype(tiny_state, tmp_path, stored):
    model = load_transformer(save_single_file(tmp_path / "m.safetensors", tiny_state, dtype=stored))
    assert model.compute_dtype == stored
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == stored
    assert model.proj_out.weight.dtype == torch.float32  # fp32 output projection
    with torch.no_grad():
        assert model(**section_inputs(TINY)).isfinite().all()


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_file_matches_diffusers_on_dequantised_weights(tiny_state, tmp_path, fp8):
    """fp8-stored weights with fp32 compute equal the reference run on the same (rounded) weights."""
    quantised = {k: v.to(fp8) if v.ndim >= 2 else v.to(torch.bfloat16) for k, v in tiny_state.items()}
    model = load_transformer(save_single_file(tmp_path / "fp8.safetensors", quantised), compute_dtype=torch.float32)
    assert model.transformer_blocks[0].ff.net[2].weight.dtype == fp8
    assert isinstance(model.transformer_blocks[0].attn.to_q, CastOps.Linear)
    kwargs = section_inputs(TINY)
    with torch.no_grad():
        expected = run_reference(diffusers_reference(TINY, {k: v.float() for k, v in quantised.items()}), kwargs)
        assert relative_error(model(**kwargs), expected) <= 1e-5


def test_fp8_file_defaults_to_bf16_compute(tiny_state, tmp_path):
    quantised = {k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v.to(torch.bfloat16) for k, v in tiny_state.items()}
    model = load_transformer(save_single_file(tmp_path / "fp8.safetensors", quantised))
    assert model.compute_dtype == torch.bfloat16


def test_fp8_storage_from_bf16_file(tiny_file, reference):
    model = load_transformer(tiny_file, compute_dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    blocks = model.transformer_blocks[0]
    assert blocks.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert blocks.attn.to_q.bias.dtype == torch.float32 and model.x_embedder.proj.weight.dtype == torch.float32
    kwargs = section_inputs(TINY)
    with torch.no_grad():
        assert relative_error(model(**kwargs), run_reference(reference, kwargs)) < 0.1  # fp8 rounding only


def file_mappings(files):
    """(regions, resident bytes) of this process's memory maps of ``files``, from /proc/self/smaps."""
    names = {str(Path(f).resolve()) for f in files}
    regions = resident = 0
    mapped = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a region's header: address range ... path
            parts = line.split(maxsplit=5)
            mapped = len(parts) == 6 and parts[5] in names
            regions += mapped
        elif mapped and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return regions, resident


# real head size, few blocks: the fp8 matrices outweigh the many small norms and biases, as in the real model
WIDE = FramePackConfig(num_heads=4, head_dim=128, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                       text_dim=64, pooled_dim=32, image_dim=64)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_fp8_from_bf16_holds_one_copy(tmp_path, layout):
    """Converting a bf16 checkpoint to fp8 keeps about one copy of the result (issue #17: it was 2.16x).

    The tensors that stay bf16 (norms, biases, embedders) are views of the file's mapping, and a page read
    through a mapping stays resident while any view of it lives: the pages read while converting must come
    from mappings that no kept tensor outlives. Resident = the converted tensors (copies) + the mapped
    pages once every weight was read (the kernel also maps up to 64 KiB around each page it faults in).
    """
    state = random_state_dict(WIDE, dtype=torch.bfloat16)
    if layout == "file":
        files = [save_single_file(tmp_path / "m.safetensors", state)]
        path = files[0]
    else:
        path = save_diffusers_folder(tmp_path / "m", state, WIDE, shards=3)
        files = sorted(path.glob("*.safetensors"))
    model = load_transformer(path, storage_dtype=torch.float8_e4m3fn)
    weights = list(model.state_dict().values())
    assert {torch.float8_e4m3fn, torch.bfloat16} <= {t.dtype for t in weights}  # converted and kept ones
    regions, _ = file_mappings(files)
    assert regions <= len(files), f"{regions} mappings of {len(files)} files outlive the load"
    for t in weights:
        t.reshape(-1).view(torch.uint8)[::4096].sum()  # read every page once
    copies = sum(t.nbytes for t in weights if t.dtype != torch.bfloat16)
    ratio = (copies + file_mappings(files)[1]) / sum(t.nbytes for t in weights)
    assert ratio <= 1.15, f"{ratio:.2f}x the weights resident"


def test_same_dtype_uses_plain_layers(tiny_file):
    model = load_transformer(tiny_file)
    assert type(model.transformer_blocks[0].attn.to_q) is TorchOps.Linear


def test_unknown_attention_backend_is_rejected(tiny_file):
    with pytest.raises(ValueError, match="Unknown attention backend 'fastest'"):
        load_transformer(tiny_file, attention_backend="fastest")


# ---------------------------------------------------------------------------------------------
# files that are not a FramePack transformer


def _save(path, tensors):
    save_file({k: torch.zeros(2, 2) for k in tensors}, str(path))
    return path


def test_original_hunyuan_video_format_is_named(tmp_path):
    path = _save(tmp_path / "hunyuan_video_720_cfgdistill_bf16.safetensors",
                 ["img_in.proj.weight", "double_blocks.0.img_attn_qkv.weight", "single_blocks.0.linear1.weight"])
    with pytest.raises(CheckpointError, match="original-format HunyuanVideo"):
        load_transformer(path)


def test_sdxl_unet_is_named(tmp_path):
    path = _save(tmp_path / "sd_xl_base.safetensors",
                 ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"])
    with pytest.raises(CheckpointError, match="SDXL UNet"):
        load_transformer(path)


def test_diffusers_hunyuan_video_without_framepack_parts(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if not k.startswith(("clean_x_embedder", "image_projection"))}
    with pytest.raises(CheckpointError, match="without FramePack's clean_x_embedder"):
        load_transformer(save_single_file(tmp_path / "hv.safetensors", state))


def test_missing_tensors_are_listed(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != "transformer_blocks.1.attn.to_k.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e.g. transformer_blocks.1.attn.to_k.weight"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))


def test_extra_tensors_are_reported(tiny_state, tmp_path):
    state = {**tiny_state, "transformer_blocks.0.attn.lora_A.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="no layer uses .*lora_A"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(cut)


def test_empty_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.safetensors is empty \(0 bytes\).*download it again"):
        load_transformer(tmp_path / "empty.safetensors")


def test_pickle_is_never_unpickled(tiny_state, tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, payload in [("model.ckpt", {"state_dict": tiny_state}), ("evil.pt", Boom())]:
        torch.save(payload, tmp_path / name)
        with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint"):
            load_transformer(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_safetensors_header_length_that_starts_like_a_pickle(tmp_path, first_bytes):
    # a safetensors file starts with its header length (8 bytes, little endian): 0x..80 or 0x..4b50 are as
    # valid as any other, and must not be taken for a pickle's magic bytes
    path = tmp_path / "model.safetensors"
    for pad in range(0, 20000, 8):
        save_file({"x": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:len(first_bytes)] == first_bytes:
            break
    else:
        pytest.fail(f"found no header length starting with {first_bytes!r}")
    assert read_key_shapes(path) == {"x": ((2,), "F32")}


def test_folder_of_pickles(tmp_path):
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files \\(diffusion_pytorch_model.bin\\)"):
        load_transformer(tmp_path)


def test_folder_with_missing_shard(tiny_state, tmp_path):
    folder = save_diffusers_folder(tmp_path / "sharded", tiny_state, TINY, shards=2)
    next(folder.glob("*-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in"):
        load_transformer(folder)


def test_gap_in_block_numbering(tiny_state, tmp_path):
    state = {k.replace("single_transformer_blocks.1.", "single_transformer_blocks.2."): v for k, v in tiny_state.items()}
    with pytest.raises(CheckpointError, match="gaps"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_transformer("/nonexistent/framepack.safetensors")


def test_uninferable_rope_axes_ask_for_config(tmp_path):
    from framepack_core.model import FramePackConfig

    odd = FramePackConfig(num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                          text_dim=16, pooled_dim=8, image_dim=8, rope_axes=(4, 6, 6))
    state = random_state_dict(odd)
    with pytest.raises(CheckpointError, match="config.json with rope_axes_dim"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))
    folder = save_diffusers_folder(tmp_path / "folder", state, odd, shards=1)
    assert load_transformer(folder).config == odd
    assert json.loads((folder / "config.json").read_text())["rope_axes_dim"] == [4, 6, 6]


class LazyOps(TorchOps):
    """Layers that start without a weight and take it when the state dict is loaded (as Dynamic-VRAM comfy.ops
    Linear layers do in newer ComfyUI)."""

    class Linear(torch.nn.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = self.bias = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            for name in ("weight", "bias"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.nn.Parameter(state_dict[prefix + name], requires_grad=False))


def test_layers_that_start_without_weights_load(tiny_state, tiny_file, reference):
    model = load_transformer(tiny_file, operations=LazyOps)
    assert isinstance(model.proj_out, LazyOps.Linear) and model.proj_out.weight is not None
    assert _same_weights(model, tiny_state)
    inputs = section_inputs(TINY)
    assert relative_error(model(**inputs), run_reference(reference, inputs)) < 1e-5


def test_a_layer_left_without_its_weight_is_named(tiny_state, tmp_path):
    # a lazy layer that is not given its tensor stays empty without telling load_state_dict
    state = {k: v for k, v in tiny_state.items() if k != "transformer_blocks.0.attn.to_q.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e.g. transformer_blocks.0.attn.to_q.weight\)"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state), operations=LazyOps)


# ---------------------------------------------------------------------------------------------
# shard names stay inside the folder; symlinked shards (the Hugging Face cache) load


def _rewrite_index(folder, change):
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: change(v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/shard.safetensors",
                                  "..\\outside.safetensors", "..", ""])
def test_shard_names_cannot_leave_the_folder(tiny_state, tmp_path, name):
    folder = save_diffusers_folder(tmp_path / "model", tiny_state, TINY, shards=2)
    (tmp_path / "outside.safetensors").write_bytes(next(folder.glob("*.safetensors")).read_bytes())
    _rewrite_index(folder, lambda v: name if v.endswith("00001-of-00002.safetensors") else v)
    with pytest.raises(CheckpointError, match=f"names a shard {re.escape(repr(name))} that is not a plain file name"):
        load_transformer(folder)


def test_symlinked_shards_as_in_the_hugging_face_cache(tiny_state, tmp_path):
    """snapshots/<rev>/ holds symlinks into ../../blobs/, as huggingface_hub lays out its cache."""
    source = save_diffusers_folder(tmp_path / "download", tiny_state, TINY, shards=3)
    repo = tmp_path / "models--lllyasviel--FramePackI2V_HY"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    model = load_transformer(snapshot)
    assert model.config == TINY and _same_weights(model, tiny_state)


# ---------------------------------------------------------------------------------------------
# malformed files: each names the file, what it looks like and the fix


INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize("file, content, message", [
    (INDEX, "{not json", rf"{INDEX} is not valid JSON .*Download .* again"),
    (INDEX, "[1, 2]", "holds a JSON list, not the object a shard index is"),
    (INDEX, '{"weight_map": []}', "has no weight_map of tensor names to shard files"),
    (INDEX, '{"weight_map": {"x": 3}}', "names a shard 3 that is not a plain file name"),
    ("config.json", "\x00\x01 binary", r"config.json is not valid JSON"),
    ("config.json", '"a string"', "config.json holds a JSON str, not the object a model config is"),
    ("config.json", '{"rope_axes_dim": "16,56,56"}', r"config.json's rope_axes_dim is '16,56,56', not a valid value"),
    ("config.json", '{"rope_axes_dim": [4, 14, 13.5]}', r"rope_axes_dim \[4, 14, 13.5\] must be three positive even"),
    ("config.json", '{"rope_theta": NaN}', "config.json's rope_theta is nan"),
])
def test_malformed_index_or_config(tiny_state, tmp_path, file, content, message):
    folder = save_diffusers_folder(tmp_path / "model", tiny_state, TINY, shards=2)
    (folder / file).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_transformer(folder)


def _header_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"),
     "is a Git LFS pointer .*git lfs pull"),
    (lambda p: p.write_bytes(b"<!DOCTYPE html><html>Sign in</html>"), r"is a web page \(HTML\)"),
    (lambda p: p.write_bytes(b'{"weight_map": {}}'), "is a JSON text file, not weights"),
    (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64)), "is a GGUF file"),
    (lambda p: p.write_bytes(bytes(range(256)) * 8), r"is not a safetensors file: .*\(random or damaged data\)"),
    (lambda p: p.write_bytes(b"\x05\x00"), "is too short to be a safetensors file"),
    # cut inside or right after the header length: 0x80 is a length byte here, not a pickle's magic
    (lambda p: p.write_bytes(b"\x80\x02\x00"), r"is too short to be a safetensors file \(3 bytes\).*download it again"),
    (lambda p: p.write_bytes((640).to_bytes(8, "little")), "is truncated: its header alone should take 640 bytes but "
     "the file has 8"),
    (lambda p: p.write_bytes((5000).to_bytes(8, "little") + b'{"x": '), "is truncated: its header alone should take 5000"),
    (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [2]}}), "has a damaged header entry for tensor 'x'"),
    (lambda p: _header_file(p, {"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "has a tensor 'x' of dtype 'Q4', which this loader cannot read"),
    (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     r"has an inconsistent header: tensor x \(F32 \[3\]\) needs 12 bytes but its offsets \[0, 8\] span 8"),
    (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
     "has an inconsistent header: tensor x starts at byte 4, where the previous tensor ends at 0"),
    (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
     "is truncated: its tensors need 16 bytes after the header but only 8"),
    (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
     "has 4 unexpected bytes after its last tensor"),
    (lambda p: _header_file(p, {"__metadata__": {"a": 1}}), "has damaged metadata"),
])
def test_malformed_files_say_what_they_look_like(tmp_path, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match="model.safetensors " + message):
        load_transformer(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_tensors_are_not_weights(tiny_state, tmp_path, dtype):
    state = dict(tiny_state)
    state["transformer_blocks.0.attn.to_q.weight"] = state["transformer_blocks.0.attn.to_q.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=r"m.safetensors: 1 tensors hold integers or booleans "
                                              r"\(transformer_blocks.0.attn.to_q.weight \((I8|I64|BOOL|U8)\)\)"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))


def test_wrong_shape_is_named_before_reading(tiny_state, tmp_path):
    state = {**tiny_state, "transformer_blocks.1.ff.net.2.weight": torch.zeros(TINY.num_heads * TINY.head_dim, 7)}
    with pytest.raises(CheckpointError, match=r"transformer_blocks.1.ff.net.2.weight \[64, 7\] \(expected \[64, 256\]\)"):
        load_transformer(save_single_file(tmp_path / "m.safetensors", state))


# ---------------------------------------------------------------------------------------------
# lookalikes


def _comfy_hunyuan_video():
    z = torch.zeros
    return {"img_in.proj.weight": z(3072, 16, 1, 2, 2), "double_blocks.0.img_attn.qkv.weight": z(9216, 8),
            "double_blocks.0.img_mod.lin.weight": z(8, 8), "single_blocks.0.linear1.weight": z(8, 8),
            "txt_in.individual_token_refiner.blocks.0.norm1.weight": z(8),
            "txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight": z(24, 8),
            "final_layer.linear.weight": z(64, 8)}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_repackaged_hunyuan_video_is_named(tmp_path, prefix):
    path = save_single_file(tmp_path / "hunyuan_video_t2v_720p_bf16.safetensors", _comfy_hunyuan_video(), prefix=prefix)
    with pytest.raises(CheckpointError, match="hunyuan_video_t2v_720p_bf16.safetensors: This checkpoint looks like "
                       r"ComfyUI's repackaged HunyuanVideo transformer .*Load Diffusion Model.*FramePackI2V_HY_bf16"):
        load_transformer(path)


def test_flux_and_lora_are_named(tmp_path):
    flux = {"img_in.weight": torch.zeros(8, 4), "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)}
    with pytest.raises(CheckpointError, match="looks like a Flux transformer"):
        load_transformer(save_single_file(tmp_path / "flux.safetensors", flux))
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(CheckpointError, match="This is a LoRA, not a FramePack transformer.*models/loras"):
        load_transformer(save_single_file(tmp_path / "lora.safetensors", lora))
