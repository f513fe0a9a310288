"""Every example workflow is well formed and passes ComfyUI's own prompt validation.

Each workflow is converted to the API prompt the frontend would queue (``workflow_api.to_api``) and goes
through ``execution.validate_prompt`` with placeholder model and input files named as the workflows
reference them.
"""

import asyncio
import copy
import json
from pathlib import Path

import pytest

import workflow_api
from workflow_api import DYNAMIC_COMBO, FRONTEND_ONLY, UPLOAD, input_specs, is_widget, specs_from_classes

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
# The only file names the example workflows may use: the ones the README tells users to download.
MODEL_FILES = {
    "diffusion_models": ["FramePackI2V_HY_bf16.safetensors", "FramePack_F1_I2V_HY_20250503_bf16.safetensors"],
    "text_encoders": ["clip_l.safetensors", "llava_llama3_fp16.safetensors"],
    "clip_vision": ["sigclip_vision_patch14_384.safetensors"],
    "vae": ["hunyuan_video_vae_bf16.safetensors"],
    "upscale_models": ["RealESRGAN_x2plus.pth"],
    "checkpoints": ["v1-5-pruned-emaonly-fp16.safetensors"],
    "controlnet": ["control_v11p_sd15_openpose_fp16.safetensors"],
    "loras": ["framepack_lora.safetensors"],
    "frame_interpolation": ["rife_v4.26.safetensors"],
}
INPUT_FILES = ["example.png", "end_frame.png", "keyframe_1.png", "keyframe_2.png", "input_video.mp4", "pose.png",
               "reference.png", "start_mask.png", "reference_mask.png"]
EXPECTED_WORKFLOWS = {"image_to_video", "f1_forward", "start_end_frame", "keyframes_timed_prompts",
                      "extend_video", "upscale", "single_frame_edit", "video_to_video", "controlnet_start_image",
                      "lora", "magcache_calibration", "interpolate_60fps"}
# Workflows built on core nodes that not every supported ComfyUI has: name -> (those nodes, the first ComfyUI
# version with them, which the workflow's note names)
NEEDS_NEWER_COMFYUI = {"interpolate_60fps": ({"FrameInterpolationModelLoader", "FrameInterpolate"}, "0.33")}


def load(path):
    return json.loads(Path(path).read_text())


def output_types(cls):
    return list(cls.RETURN_TYPES)


def to_api(workflow, classes):
    return workflow_api.to_api(workflow, specs_from_classes(classes))


def lacks_core_nodes(name, workflow, available):
    """Whether this ComfyUI lacks core nodes the workflow needs (``available``: the node types it has).

    When it does, what a user of this ComfyUI sees is asserted instead: exactly the nodes of
    NEEDS_NEWER_COMFYUI are missing, and the workflow's note says which ComfyUI version has them.
    """
    missing = {n["type"] for n in workflow["nodes"]} - set(available) - FRONTEND_ONLY
    if not missing:
        return False
    needed, version = NEEDS_NEWER_COMFYUI.get(name, (set(), None))
    assert missing == needed, f"{name}: nodes missing in this ComfyUI: {sorted(missing)}"
    notes = " ".join(v for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY for v in n["widgets_values"])
    assert f"Needs ComfyUI {version} or newer" in notes, f"{name}: its note must say it needs ComfyUI {version}+"
    return True


def check_well_formed(workflow, classes):
    """Links join existing nodes and slots, both ends agree, and slot types match the node definitions."""
    assert workflow.get("version") == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] >= max(nodes)
    links = {}
    for link in workflow["links"]:
        assert len(link) == 6, link
        assert link[0] not in links, f"duplicate link id {link[0]}"
        links[link[0]] = link
    if links:
        assert workflow["last_link_id"] >= max(links)
    for link_id, origin, origin_slot, target, target_slot, kind in links.values():
        assert origin in nodes and target in nodes, f"link {link_id} joins a missing node"
        source, dest = nodes[origin], nodes[target]
        assert origin_slot < len(source["outputs"]), f"link {link_id}: {source['type']} has no output {origin_slot}"
        assert target_slot < len(dest["inputs"]), f"link {link_id}: {dest['type']} has no input {target_slot}"
        output, input_ = source["outputs"][origin_slot], dest["inputs"][target_slot]
        assert link_id in output["links"], f"link {link_id} missing from {source['type']} output {origin_slot}"
        assert input_["link"] == link_id, f"link {link_id} missing from {dest['type']} input {input_['name']}"
        assert output["type"] == kind == input_["type"], (
            f"link {link_id}: {source['type']}.{output['name']} ({output['type']}) -> "
            f"{dest['type']}.{input_['name']} ({input_['type']}), link says {kind}")
    for node in nodes.values():
        for output in node.get("outputs", []):
            for link_id in output.get("links") or []:
                assert links[link_id][1] == node["id"], f"{node['type']} lists link {link_id} it is not the origin of"
        for input_ in node.get("inputs", []):
            if input_.get("link") is not None:
                assert links[input_["link"]][3] == node["id"]
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in classes, f"unknown node type {node['type']}"
        cls = classes[node["type"]]
        # the frontend matches saved outputs by position: a node that gained outputs since keeps the new ones
        saved = [o["type"] for o in node["outputs"]]
        assert saved == output_types(cls)[:len(saved)], f"{node['type']} outputs {saved} != {output_types(cls)}"
        # ... and saved inputs by name, with the type of the definition's input
        specs = {name: (kind, options) for name, kind, options in input_specs(cls)}
        for input_ in node.get("inputs", []):
            name = input_["name"]
            kind, options = specs.get(name) or specs.get(name.split(".")[0], (None, {}))
            assert kind is not None, f"{node['type']} has no input {name}"
            if "." in name:  # a DynamicCombo's sub-input
                assert kind == DYNAMIC_COMBO, f"{node['type']}.{name}: {name.split('.')[0]} is no DynamicCombo"
            elif input_.get("link") is not None:
                assert input_["type"] == kind, f"{node['type']}.{name}: {input_['type']} != {kind}"
            if input_.get("widget"):
                assert input_["widget"] == {"name": name} and (is_widget(kind, options) or kind == UPLOAD), (
                    f"{node['type']}.{name} is no widget")


@pytest.fixture(scope="module")
def files(comfy):
    """Placeholder model files and input files with the names the workflows use (validation checks names)."""
    import folder_paths

    written = []
    for kind, names in MODEL_FILES.items():
        if kind not in folder_paths.folder_names_and_paths:
            continue  # a model type this ComfyUI does not know (its workflows lack core nodes here)
        if not (comfy.models / kind).is_dir():
            (comfy.models / kind).mkdir()
            folder_paths.add_model_folder_path(kind, str(comfy.models / kind), is_default=True)
        for name in names:
            path = comfy.models / kind / name
            path.write_bytes(b"")
            written.append(path)
    old_input = folder_paths.get_input_directory()
    input_dir = comfy.models.parent / (comfy.models.name + "_input")
    input_dir.mkdir(exist_ok=True)
    for name in INPUT_FILES:
        (input_dir / name).write_bytes(b"")
    folder_paths.set_input_directory(str(input_dir))
    yield comfy
    folder_paths.set_input_directory(old_input)
    for path in written:
        path.unlink()


def validate(prompt):
    import execution

    return asyncio.run(execution.validate_prompt("example-workflow-test", prompt, None))


def test_the_example_workflows_are_there():
    assert {p.stem for p in WORKFLOWS} == EXPECTED_WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed(comfy, path):
    workflow, classes = load(path), comfy.nodes.NODE_CLASS_MAPPINGS
    if not lacks_core_nodes(path.stem, workflow, classes):
        check_well_formed(workflow, classes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_passes_comfyui_validation(files, path):
    workflow = load(path)
    if lacks_core_nodes(path.stem, workflow, files.nodes.NODE_CLASS_MAPPINGS):
        return
    prompt = to_api(workflow, files.nodes.NODE_CLASS_MAPPINGS)
    valid, error, good_outputs, node_errors = validate(prompt)
    assert valid, (error, node_errors)
    assert not node_errors, node_errors
    outputs = {i for i, n in prompt.items() if getattr(files.nodes.NODE_CLASS_MAPPINGS[n["class_type"]],
                                                        "OUTPUT_NODE", False)}
    assert outputs and set(good_outputs) == outputs
    assert {n["class_type"] for n in prompt.values()} & set(files.pack), "uses no FramePack node"


SAVED = sorted((Path(__file__).parent / "saved_workflows").glob("*.json"))


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.stem)
def test_workflows_saved_by_earlier_versions_still_validate(files, path):
    """Workflows saved with version 0.1.0 of the pack (fewer sampler/timed-prompt widgets) still load: every
    saved value lands on its old widget, the widgets added since keep their defaults, and ComfyUI accepts it."""
    workflow = load(path)
    classes = files.nodes.NODE_CLASS_MAPPINGS
    check_well_formed(workflow, classes)
    prompt = to_api(workflow, classes)
    valid, error, _, node_errors = validate(prompt)
    assert valid and not node_errors, (error, node_errors)
    sampler = next(n for n in workflow["nodes"] if n["type"] == "FramePackSampler")
    inputs = prompt[str(sampler["id"])]["inputs"]
    assert (inputs["steps"], inputs["seed"], inputs["teacache"]) == (25, 31337, 0.15)  # old values, old places
    defaults = {name: opts["default"] for name, _, opts in input_specs(classes["FramePackSampler"])
                if "default" in opts}
    for name in ("cache", "cfg_batch", "resume", "denoise"):
        assert inputs[name] == defaults[name]


def test_workflows_use_only_documented_files():
    readme = (ROOT / "README.md").read_text()
    names = {n for names in MODEL_FILES.values() for n in names}
    for name in names:
        assert name in readme, f"{name} is not in the README"
    for path in WORKFLOWS:
        used = {v for node in load(path)["nodes"] for v in node.get("widgets_values") or []
                if isinstance(v, str) and v.endswith((".safetensors", ".pth"))}
        assert used <= names, f"{path.name} uses {used - names}"


def mutate(workflow, classes, node_type, change):
    """A copy of workflow with change(node, workflow) applied to its first node of node_type."""
    broken = copy.deepcopy(workflow)
    node = next(n for n in broken["nodes"] if n["type"] == node_type)
    change(node, broken)
    return broken


def test_validation_fails_on_broken_workflows(files):
    """The checks above have teeth: typical mistakes in a workflow make them fail."""
    classes = files.nodes.NODE_CLASS_MAPPINGS
    workflow = load(ROOT / "example_workflows" / "image_to_video.json")
    assert validate(to_api(workflow, classes))[0]

    def rename_vae(node, wf):
        node["widgets_values"][0] = "hunyuan_video_vae_fp32.safetensors"

    def drop_seed_control(node, wf):  # widget values shifted by one, as when the control value is forgotten
        index = node["widgets_values"].index("fixed")
        del node["widgets_values"][index]

    def latent_into_embeds(node, wf):  # the start latent wired into the image-embeddings input
        embeds = next(i for i in node["inputs"] if i["name"] == "start_image_embeds")
        latent = next(i for i in node["inputs"] if i["name"] == "start_latent")
        latent_link = next(link for link in wf["links"] if link[0] == latent["link"])
        embeds_link = next(link for link in wf["links"] if link[0] == embeds["link"])
        embeds_link[1:3] = latent_link[1:3]

    def bad_mode(node, wf):
        node["widgets_values"][0] = "backward"

    def steps_too_many(node, wf):
        node["widgets_values"][0] = 5000

    for node_type, change in [("VAELoader", rename_vae), ("FramePackSchedule", bad_mode),
                              ("FramePackSampler", steps_too_many), ("FramePackSampler", latent_into_embeds)]:
        broken = mutate(workflow, classes, node_type, change)
        valid, _, _, node_errors = validate(to_api(broken, classes))
        assert not valid and node_errors, f"{change.__name__} went unnoticed"

    with pytest.raises(AssertionError, match="control_after_generate|too many|no widget value"):
        to_api(mutate(workflow, classes, "FramePackSampler", drop_seed_control), classes)
    with pytest.raises(AssertionError, match="link"):
        check_well_formed(mutate(workflow, classes, "FramePackSampler", latent_into_embeds), classes)


def test_an_upload_value_saved_before_other_widgets_is_caught(files):
    """The frontend puts an image loader's upload button after all the node's widgets: LoadImageMask values
    saved in the order image/upload/channel put "image" into channel, which ComfyUI rejects, as on Queue."""
    classes = files.nodes.NODE_CLASS_MAPPINGS
    workflow = load(ROOT / "example_workflows" / "single_frame_edit.json")
    mask = next(n for n in workflow["nodes"] if n["type"] == "LoadImageMask")
    assert mask["widgets_values"][1:] == ["red", "image"]  # channel, then the upload button

    def upload_before_channel(node, wf):
        node["widgets_values"] = [node["widgets_values"][0], "image", "red"]

    valid, _, _, node_errors = validate(to_api(mutate(workflow, classes, "LoadImageMask", upload_before_channel),
                                               classes))
    errors = node_errors[str(mask["id"])]["errors"]
    assert not valid and [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_not_in_list",
                                                                                           "channel")]
