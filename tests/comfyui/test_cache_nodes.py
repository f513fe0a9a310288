"""Sampler cache inputs, batched CFG choice and the MagCache calibration node inside a real ComfyUI (CPU)."""

import json
import sys

import torch

from test_end_to_end import checkpoint, load_model, pack, run, sample, sampler_inputs  # noqa: F401  (fixtures)


def test_saved_workflows_keep_teacache_and_new_caches_run(pack, checkpoint):  # noqa: F811
    model = load_model(pack, checkpoint)
    plain = sample(pack, model, cache="none")["samples"]
    assert torch.equal(sample(pack, model)["samples"], plain)  # teacache 0 (the inputs' value): off
    tea = sample(pack, model, teacache=0.5, steps=5)["samples"]  # no cache input, as a saved workflow has
    assert torch.equal(sample(pack, model, teacache=0.5, steps=5, cache="teacache")["samples"], tea)
    assert not torch.equal(tea, sample(pack, model, steps=5, cache="none")["samples"])
    assert torch.equal(sample(pack, model, cache="magcache", magcache_threshold=0.0)["samples"], plain)
    assert torch.isfinite(sample(pack, model, cache="magcache", steps=8)["samples"]).all()


def test_calibration_node_writes_a_file_the_sampler_lists_and_uses(comfy, pack, checkpoint):  # noqa: F811
    import folder_paths

    folder_paths.add_model_folder_path("framepack_magcache", str(comfy.models / "framepack_magcache"), is_default=True)
    model = load_model(pack, checkpoint)
    cls = pack["FramePackMagCacheCalibrate"]
    assert "teacache" not in cls.INPUT_TYPES()["required"] and "cache" not in cls.INPUT_TYPES()["optional"]
    inputs = {k: v for k, v in sampler_inputs(pack, model, steps=4).items() if k != "teacache"}
    latent, name = run(cls, **inputs, filename="tiny_calibration")
    path = comfy.models / "framepack_magcache" / name
    first = json.loads(path.read_text())
    assert name == "tiny_calibration.json" and first["steps"] == 4 and first["ratios"][0] == 1.0
    assert torch.equal(latent["samples"], sample(pack, model, steps=4, cache="none")["samples"])
    run(cls, **inputs, filename="tiny_calibration")
    assert json.loads(path.read_text()) == first  # reproducible
    assert name in pack["FramePackSampler"].INPUT_TYPES()["optional"]["magcache_calibration"][1]["options"]
    cached = sample(pack, model, steps=6, cache="magcache", magcache_calibration=name, magcache_threshold=0.5)
    assert torch.isfinite(cached["samples"]).all()


def test_cfg_batch_choice(pack, checkpoint):  # noqa: F811
    node = sys.modules[pack["FramePackSampler"].__module__]
    assert node.choose_cfg_batch("auto", 3 << 30, 2 << 30) and not node.choose_cfg_batch("auto", 1 << 30, 2 << 30)
    assert node.choose_cfg_batch("batched", 0, 1) and not node.choose_cfg_batch("sequential", 1 << 40, 1)
    model = load_model(pack, checkpoint)
    out = {c: sample(pack, model, cfg=3.0, cfg_batch=c)["samples"] for c in ("batched", "sequential", "auto")}
    assert torch.allclose(out["batched"], out["sequential"], atol=1e-4, rtol=1e-4)
    assert torch.equal(out["auto"], out["batched"])  # a CPU ComfyUI has the RAM for a tiny batch of 2
