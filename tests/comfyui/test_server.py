"""The pack inside a real ComfyUI server, driven the way the frontend drives it.

ComfyUI's own ``main.py --cpu`` runs in a child process (the ``server`` fixture of conftest.py) with a
temporary base directory (``server_base.py``) whose custom_nodes/ holds this pack and a test-only pair of
encoder stand-ins. The example workflows are fetched from the server's template route, converted to API
prompts with the server's own ``/object_info`` and queued through ``POST /prompt``; the websocket reports
progress, previews and the end.

Models are tiny stand-ins loaded by the real loaders; text and vision encoders become the stand-in nodes.
To keep the VAE affordable on a CPU the graphs run at a tiny resolution bucket, a 3-frame window and 2 steps;
everything else is the example workflows' own.
"""

import copy
import json

import av
import pytest
import torch

from framepack_core.buckets import nearest_bucket
from framepack_core.cache import load_calibration
from server_base import BROKEN, IMAGE_HW, LORA, LORA_LAYERS, NAN_WEIGHT, PACK, PACK_NAME, VIDEO_FRAMES
from test_workflows import lacks_core_nodes
from workflow_api import specs_from_object_info, to_api

RESOLUTION, WINDOW, STEPS = 32, 3, 2  # bucket, latent frames per section, steps per section
BUCKET = nearest_bucket(*IMAGE_HW, RESOLUTION)
SAMPLING_NODES = ("FramePackSampler", "FramePackMagCacheCalibrate")


def template(server, name):
    """An example workflow as the frontend gets it: from the pack's template route."""
    status, workflow = server.request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.json")
    assert status == 200, f"template {name}: HTTP {status}"
    return workflow


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_server_lists_and_serves_every_example_workflow(server, object_info):
    listed = server.get("/api/workflow_templates")
    names = sorted(p.stem for p in (PACK / "example_workflows").glob("*.json"))
    assert sorted(listed[PACK_NAME]) == names
    for name in names:
        workflow = template(server, name)
        if not lacks_core_nodes(name, workflow, object_info):  # else: the nodes it needs are named as missing
            to_api(workflow, specs_from_object_info(object_info))  # every widget value lands on a widget


def test_pack_nodes_load_in_the_server(server, object_info):
    assert "Import times for custom nodes" in server.log()
    assert "IMPORT FAILED" not in server.log(), server.log_tail()
    for node in ("FramePackModelLoader", "FramePackSampler", "FramePackSchedule", "FramePackDecode",
                 "FramePackDecodeToVideo", "FramePackResolutionBucket", "FramePackKeyframe", "FramePackTimedPrompt",
                 "FramePackLoraLoader", "FramePackSingleFrame", "FramePackMagCacheCalibrate"):
        assert object_info[node]["category"] == "FramePack"


def prompt_for(server, object_info, name, sections=2, steps=STEPS, seed=None, resolution=RESOLUTION):
    """The example workflow ``name`` as an API prompt, with stand-in encoders and test-sized settings."""
    prompt = to_api(template(server, name), specs_from_object_info(object_info))
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("DualCLIPLoader", "CLIPVisionLoader"):
            del prompt[node_id]  # their only consumers become stand-ins
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "StandinTextEncode", "inputs": {"text": inputs["text"]}}
        elif kind == "CLIPVisionEncode":
            prompt[node_id] = {"class_type": "StandinVisionEncode",
                               "inputs": {"image": inputs["image"], "crop": inputs["crop"]}}
        elif kind == "FramePackResolutionBucket":
            inputs["resolution"] = resolution
        elif kind == "FramePackSchedule":
            inputs.update(sections=sections, window=WINDOW)
        elif kind in (*SAMPLING_NODES, "FramePackSingleFrame"):
            inputs["steps"] = steps
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "FramePackTimedPrompt":  # the workflow's 2 s ranges over sections of 0.4 s
            inputs["start_seconds"] /= 5
            inputs["end_seconds"] /= 5
    return prompt


def node_of(prompt, kind):
    return next(i for i, n in prompt.items() if n["class_type"] == kind)


def video_files(server, run):
    files = [server.output_file(entry) for output in server.outputs(run).values()
             for key in ("images", "gifs", "videos") for entry in output.get(key, [])]
    return [f for f in files if f.suffix == ".mp4"]


def read_video(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape[:2]


def video_frames(server, run):
    """(frames, frame rate) of the run's one mp4."""
    [path] = video_files(server, run)
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], rate


def saving_latents(prompt):
    """``prompt`` with core SaveLatent on the sampler's output: latents are what a generation promises to repeat
    exactly (an mp4's bytes are not: libx264's AVX-512 code encodes the same frames differently from run to
    run, see FramePack Decode To Video's VideoFileSink)."""
    sampler = next(i for i, n in prompt.items() if n["class_type"] in SAMPLING_NODES)
    prompt["save_latent"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [sampler, 0], "filename_prefix": "latents/framepack_test"}}
    return prompt


def saved_latent(server, run):
    """The LATENT samples SaveLatent wrote in ``run``."""
    from safetensors.torch import load_file

    [entry] = server.outputs(run)["save_latent"]["latents"]
    return load_file(str(server.output_file(entry)))["latent_tensor"]


# (workflow, mode's sections, latent frames the output video holds)
WORKFLOWS = {
    "image_to_video": (2, 1 + 2 * WINDOW),
    "f1_forward": (2, 1 + 2 * WINDOW),
    "start_end_frame": (2, 1 + 2 * WINDOW),
    "keyframes_timed_prompts": (4, 1 + 4 * WINDOW),  # keyframes at sections 1 and 3
    "extend_video": (2, (VIDEO_FRAMES + 3) // 4 + 2 * WINDOW),  # the input video, then 2 new sections
    "video_to_video": (1, 1 + WINDOW),  # a guide of 4 latent frames covers one section
    "lora": (2, 1 + 2 * WINDOW),
    "magcache_calibration": (2, 1 + 2 * WINDOW),  # the calibration run's uncached video
}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs_in_the_server(server, object_info, name):
    sections, latent_frames = WORKFLOWS[name]
    prompt = prompt_for(server, object_info, name, sections=sections)
    run = server.run(prompt)
    assert run.status == "execution_success", (run.error, server.log_tail())

    # the output mp4: frame count and size as the README promises (4T - 3 frames, the bucket's size)
    videos = video_files(server, run)
    assert len(videos) == 1, server.outputs(run)
    frames, size = read_video(videos[0])
    assert frames == 4 * latent_frames - 3
    assert size == BUCKET

    # progress over all of the sampler's steps, and latent previews on the way
    sampler = next(i for i, n in prompt.items() if n["class_type"] in SAMPLING_NODES)
    steps = round(STEPS * prompt[sampler]["inputs"]["denoise"])  # a guided sampler runs the schedule's tail
    progress = [p for p in run.of_type("progress") if p["node"] == sampler]
    assert progress and {p["max"] for p in progress} == {sections * steps}
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == sections * steps
    assert run.previews and all(p[:2] == b"\xff\xd8" for p in run.previews)  # JPEG latent previews
    executed = {e["node"] for e in run.of_type("executing") if e.get("node")}
    cached = {n for e in run.of_type("execution_cached") for n in e["nodes"]}
    assert sampler in executed and node_of(prompt, "FramePackModelLoader") in executed | cached


def test_single_frame_workflow_saves_one_image(server, object_info):
    from PIL import Image

    run = server.run(prompt_for(server, object_info, "single_frame_edit"))
    assert run.status == "execution_success", (run.error, server.log_tail())
    images = [server.output_file(entry) for output in server.outputs(run).values() for entry in output.get("images", [])]
    assert len(images) == 1 and images[0].suffix == ".png"
    with Image.open(images[0]) as image:
        assert image.size[::-1] == BUCKET


def test_interrupt_mid_run_then_the_next_run_completes(server, object_info):
    prompt = prompt_for(server, object_info, "image_to_video", sections=3, steps=3, seed=101)
    sampler = node_of(prompt, "FramePackSampler")

    def after_first_step(run):
        return any(p["node"] == sampler and p["value"] >= 1 for p in run.of_type("progress"))

    run = server.run(prompt, interrupt_when=after_first_step)
    assert run.status == "execution_interrupted", (run.error, server.log_tail())
    assert run.of_type("execution_interrupted")[0]["node_id"] == sampler
    assert server.alive

    again = server.run(prompt)
    assert again.status == "execution_success", (again.error, server.log_tail())
    assert read_video(video_files(server, again)[0])[0] == 4 * (1 + 3 * WINDOW) - 3


def failed_run(server, object_info, model_name, seed):
    """image_to_video with the checkpoint ``model_name``; the run must end in an execution error."""
    prompt = prompt_for(server, object_info, "image_to_video", seed=seed)
    prompt[node_of(prompt, "FramePackModelLoader")]["inputs"]["model_name"] = model_name
    run = server.run(prompt)
    assert run.status == "execution_error"
    return run


def test_bad_checkpoint_is_an_execution_error_and_the_server_stays_up(server, object_info):
    error = failed_run(server, object_info, BROKEN, seed=202).error
    assert error["node_type"] == "FramePackModelLoader"
    assert BROKEN in error["exception_message"] and "truncated" in error["exception_message"].lower(), error
    assert server.alive and server.get("/system_stats")

    good = prompt_for(server, object_info, "image_to_video", seed=202)
    assert server.run(good).status == "execution_success"


def test_nan_prediction_is_an_execution_error_naming_step_and_fix(server, object_info):
    run = failed_run(server, object_info, NAN_WEIGHT, seed=203)
    error = run.error
    assert error["node_type"] == "FramePackSampler" and error["exception_type"].endswith("NonFiniteError"), error
    message = error["exception_message"]
    assert "section 1 of 2" in message and f"step 1 of {STEPS}" in message, message
    assert "transformer_blocks.0.attn.to_out.0.weight contains NaN" in message and "Download it again" in message
    assert not video_files(server, run), "no black video is written"
    assert server.alive


def test_a_value_a_combo_does_not_offer_is_rejected_naming_that_input_alone(server, object_info):
    """On POST /prompt, a missing model file (or any value a FramePack combo does not offer) is a node error
    naming only that input: the frontend marks red exactly the inputs node_errors name."""
    checked = set()
    for name in sorted(p.stem for p in (PACK / "example_workflows").glob("*.json")):
        if lacks_core_nodes(name, template(server, name), object_info):
            continue  # it cannot be queued on this ComfyUI at all
        prompt = prompt_for(server, object_info, name)
        for node_id, node in prompt.items():
            kind = node["class_type"]
            if object_info[kind]["category"] != "FramePack":
                continue
            for input_name, input_type, _ in specs_from_object_info(object_info)(kind):
                if input_type != "COMBO" or (kind, input_name) in checked:
                    continue
                broken = copy.deepcopy(prompt)
                broken[node_id]["inputs"][input_name] = "not_downloaded.safetensors"
                status, answer = server.post("/prompt", {"prompt": broken})
                assert status == 400, answer
                errors = [(e["type"], e["extra_info"]["input_name"]) for e in answer["node_errors"][node_id]["errors"]]
                assert errors == [("value_not_in_list", input_name)], (kind, answer["node_errors"][node_id])
                checked.add((kind, input_name))
    assert {("FramePackModelLoader", "model_name"), ("FramePackModelLoader", "weight_dtype"),
            ("FramePackModelLoader", "attention"), ("FramePackSchedule", "mode"), ("FramePackSampler", "sampler"),
            ("FramePackSampler", "cache"), ("FramePackSingleFrame", "sampler")} <= checked, checked


def test_interrupted_run_queued_again_resumes_and_gives_the_uninterrupted_video(server, object_info):
    sections, steps = 3, 8  # steps enough that the cancel lands while the sampler still runs
    prompt = saving_latents(prompt_for(server, object_info, "image_to_video", sections=sections, steps=steps,
                                       seed=303))
    sampler = node_of(prompt, "FramePackSampler")
    states = server.base / "output" / "framepack_resume"

    def in_second_section(run):  # the first section is finished and saved by now
        return any(p["node"] == sampler and p["value"] > steps for p in run.of_type("progress"))

    log_start = len(server.log())
    run = server.run(prompt, interrupt_when=in_second_section)
    assert run.status == "execution_interrupted", (run.error, server.log_tail())
    assert run.of_type("execution_interrupted")[0]["node_id"] == sampler, "the cancel must hit the sampler"
    saved = [f.name for f in states.glob("*.safetensors")]
    assert len(saved) == 1, server.log_tail()
    log = server.log()[log_start:]
    assert f"of {sections} sections are saved in {states}. Queue the same generation again to resume" in log, log

    # the same prompt again: it resumes after the saved sections, finishes, and removes its state
    again = server.run(prompt)
    assert again.status == "execution_success", (again.error, server.log_tail())
    assert "resuming after section " in server.log()[log_start:], server.log_tail()
    done = [p["value"] for p in again.of_type("progress") if p["node"] == sampler]
    assert done[0] > steps, "finished sections are not sampled again"
    assert list(states.glob("*.safetensors")) == []

    # an uninterrupted run (resume off, so ComfyUI's cache does not answer it) gives the same video
    prompt[sampler]["inputs"]["resume"] = False
    reference = server.run(prompt)
    assert reference.status == "execution_success", (reference.error, server.log_tail())
    assert sampler in {e["node"] for e in reference.of_type("executing") if e.get("node")}

    resumed, uninterrupted = saved_latent(server, again), saved_latent(server, reference)
    assert resumed.shape[2] == 1 + sections * WINDOW
    assert torch.equal(resumed, uninterrupted)
    assert len(video_frames(server, again)[0]) == 4 * (1 + sections * WINDOW) - 3


def test_lora_workflow_applies_the_lora_and_it_changes_the_video(server, object_info):
    prompt = saving_latents(prompt_for(server, object_info, "lora", sections=1, seed=404))
    lora = node_of(prompt, "FramePackLoraLoader")
    assert prompt[lora]["inputs"]["lora_name"] == LORA
    log_start = len(server.log())
    with_lora = server.run(prompt)
    assert with_lora.status == "execution_success", (with_lora.error, server.log_tail())
    n = len(LORA_LAYERS)
    assert f"[FramePack] LoRA {LORA}: {n} of {n} modules applied" in server.log()[log_start:], server.log_tail()

    prompt[lora]["inputs"]["strength"] = 0.0  # off: the model as loaded
    without = server.run(prompt)
    assert without.status == "execution_success", (without.error, server.log_tail())
    assert len(video_frames(server, with_lora)[0]) == 4 * (1 + WINDOW) - 3
    assert not torch.equal(saved_latent(server, with_lora), saved_latent(server, without)), \
        "the LoRA did not change the video"


def test_magcache_calibration_workflow_writes_a_calibration_the_sampler_uses(server, object_info):
    prompt = prompt_for(server, object_info, "magcache_calibration", sections=1, seed=505)
    name = prompt[node_of(prompt, "FramePackMagCacheCalibrate")]["inputs"]["filename"] + ".json"
    path = server.base / "models" / "framepack_magcache" / name
    path.unlink(missing_ok=True)
    run = server.run(prompt)
    assert run.status == "execution_success", (run.error, server.log_tail())
    assert len(load_calibration(path)) == STEPS  # one ratio per step (averaged over the sections)
    assert json.loads(path.read_text())["mode"] == "inverted"

    # the sampler lists it, and samples with it: calibrated for STEPS steps, used at STEPS + 1
    options = server.get("/object_info/FramePackSampler")["FramePackSampler"]["input"]["optional"]
    assert name in options["magcache_calibration"][1]["options"]
    sampling = prompt_for(server, object_info, "image_to_video", sections=1, steps=STEPS + 1, seed=505)
    sampling[node_of(sampling, "FramePackSampler")]["inputs"].update(cache="magcache", magcache_calibration=name)
    log_start = len(server.log())
    used = server.run(sampling)
    assert used.status == "execution_success", (used.error, server.log_tail())
    assert f"ratios calibrated for {STEPS} steps, rescaled to {STEPS + 1}" in server.log()[log_start:]


def test_frame_interpolation_workflow_saves_twice_the_frames_at_60_fps(server, object_info):
    workflow = template(server, "interpolate_60fps")
    if lacks_core_nodes("interpolate_60fps", workflow, object_info):
        return  # this ComfyUI has no core frame interpolation: the nodes are missing and the note says so
    # RIFE pads frames to multiples of 64 by reflection, which needs frames larger than 32 pixels
    resolution = 64
    prompt = prompt_for(server, object_info, "interpolate_60fps", sections=1, resolution=resolution)
    run = server.run(prompt)
    assert run.status == "execution_success", (run.error, server.log_tail())
    frames, fps = video_frames(server, run)
    decoded = 4 * (1 + WINDOW) - 3
    assert len(frames) == 2 * decoded - 1  # a new frame between every two: the same length at twice the rate
    assert fps == 60
    assert frames[0].shape[:2] == nearest_bucket(*IMAGE_HW, resolution)
