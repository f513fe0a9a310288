"""UI-format workflows (what the frontend saves) to API-format prompts (what it queues), as the frontend does.

example_workflows/*.json are in the frontend's (litegraph) format, which ComfyUI's server never sees: the
frontend turns a graph into an API prompt ({node id: {"class_type", "inputs"}}) before queueing it. ComfyUI
has no Python version of that conversion, so ``to_api`` does what ComfyUI's frontend does (read in the
comfyui_frontend_package 1.27.10 and 1.49.6 bundles; test_frontend.py compares the two on every example):

- A node's widgets come from its definition's inputs in ``input_order``, required then optional. The upload
  button of an image or video loader ("upload", which the frontend adds for the first required combo with
  image_upload / video_upload / animated_image_upload) comes after all of them.
- An INT with control_after_generate (by default every INT named seed or noise_seed) is followed by its
  control combo; a COMBO with control_after_generate by a control combo and a filter-list text.
- A V3 DynamicCombo is a combo whose chosen option's inputs become widgets named "<combo>.<input>" right
  after it (required, then optional; nested DynamicCombos the same way).
- The saved ``widgets_values`` go to those widgets by position, whatever their types; widgets left without a
  value (a workflow saved before a node gained inputs) keep their defaults (a combo without one: its first
  option).
- The prompt holds each widget's value by name, except the control, filter-list and upload widgets, and
  [source node id, output slot] for each linked input.

Stricter than the frontend, which takes whatever lands: a value where a control value belongs must be one,
no saved value may be left over, and a widget without a saved value needs a default.

Node definitions come either from node classes (in-process) or from a server's ``/object_info`` (as the
frontend gets them), through the two ``specs_from_*`` functions.
"""

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # UI-only nodes, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
UPLOAD = "IMAGEUPLOAD"  # the frontend's upload button of image and video loaders
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
SEED_NAMES = ("seed", "noise_seed")
MUTED, BYPASSED = 2, 4  # litegraph node modes


def _spec(name, value):
    kind, options = value[0], dict(value[1]) if len(value) > 1 and value[1] else {}
    if isinstance(kind, (list, tuple)):  # a V1 combo: its type is the option list
        kind, options["options"] = "COMBO", list(kind)
    return name, kind, options


def _section_specs(inputs, order):
    return [_spec(name, inputs[section][name]) for section in ("required", "optional") for name in order.get(section, [])]


def node_specs(inputs, order=None):
    """[(name, type, options)] of a node definition's inputs in the frontend's widget order, the upload
    button included. ``inputs``: {"required": {...}, "optional": {...}}; ``order``: its input_order."""
    order = order or {section: list(inputs.get(section, {})) for section in ("required", "optional")}
    specs = _section_specs(inputs, order)
    required = specs[:len(order.get("required", []))]
    assert not any(options.get("audio_upload") for _, _, options in required), "audio upload widgets are not emulated"
    if any(kind == "COMBO" and any(options.get(key) for key in UPLOAD_OPTIONS) for _, kind, options in required):
        specs.append(("upload", UPLOAD, {}))
    return specs


def input_specs(cls):
    """[(name, type, options)] of a node class, as ``node_specs``."""
    return node_specs(cls.INPUT_TYPES())


def specs_from_classes(classes):
    """node type -> input specs, from node classes (e.g. ComfyUI's NODE_CLASS_MAPPINGS)."""
    return lambda node_type: input_specs(classes[node_type])


def specs_from_object_info(info):
    """node type -> input specs, from a server's /object_info answer (the frontend's source)."""
    return lambda node_type: node_specs(info[node_type]["input"], info[node_type].get("input_order"))


def is_widget(kind, options):
    return kind in WIDGET_TYPES | {DYNAMIC_COMBO} and not options.get("forceInput")


def _combo_options(kind, options):
    return [o["key"] for o in options["options"]] if kind == DYNAMIC_COMBO else options["options"]


def _default(name, kind, options, where):
    if kind in ("COMBO", DYNAMIC_COMBO):
        return options.get("default") or _combo_options(kind, options)[0]
    assert "default" in options, f"{where}: no widget value left for {name!r}, which has no default"
    return options["default"]


def _companions(name, kind, options):
    """The frontend-only widgets that follow a widget: its control combo, and a combo's filter list."""
    if kind == "COMBO" and options.get("control_after_generate"):
        return ["control", "filter"]
    if kind == "INT" and options.get("control_after_generate", name in SEED_NAMES):
        return ["control"]
    return ["control"] if kind == "FLOAT" and options.get("control_after_generate") else []


def _assign(specs, values, inputs, where, prefix=""):
    """Give the widgets of ``specs`` their values from ``values`` (consumed in order) into ``inputs``."""
    for name, kind, options in specs:
        if kind == UPLOAD:
            if values:
                values.pop(0)  # the upload button's value, which is not sent
            continue
        if not is_widget(kind, options):
            continue
        inputs[prefix + name] = values.pop(0) if values else _default(name, kind, options, where)
        for companion in _companions(name, kind, options):
            if values:
                value = values.pop(0)
                assert companion != "control" or value in CONTROL_VALUES, (
                    f"{where}: {name!r} must be followed by its control_after_generate value, got {value!r}")
        if kind == DYNAMIC_COMBO:
            chosen = {o["key"]: o["inputs"] for o in options["options"]}.get(inputs[prefix + name], {})
            children = [_spec(child, value) for section in ("required", "optional")
                        for child, value in chosen.get(section, {}).items()]
            _assign(children, values, inputs, where, prefix=f"{prefix}{name}.")


def to_api(workflow, specs):
    """The API prompt the frontend would queue for a UI-format workflow; ``specs``: node type -> input specs."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        assert node.get("mode", 0) != BYPASSED, f"{where}: bypassed nodes (rerouted by the frontend) are not emulated"
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == MUTED:
            continue
        values = node.get("widgets_values") or []
        assert isinstance(values, list), f"{where}: widgets_values must be a list"
        values, inputs = list(values), {}
        _assign(specs(node["type"]), values, inputs, where)
        assert not values, f"{where}: {len(values)} widget values too many: {values}"
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
