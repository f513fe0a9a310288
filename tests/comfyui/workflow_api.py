"""UI-format workflows (what the frontend saves) to API-format prompts (what it queues).

example_workflows/*.json are in the frontend's (litegraph) format, which ComfyUI's server never sees:
the frontend turns a graph into an API prompt ({node id: {"class_type", "inputs"}}) before queueing it.
ComfyUI has no Python version of that conversion, so ``to_api`` does what the frontend does: widget
values are assigned, in order, to the node's widget inputs (required, then optional, as the node
definition lists them), skipping the values of the frontend-only widgets (the control_after_generate
combo after a seed, the upload button after an image/video file), widgets a workflow saved by an older
version of a node has no value for keep their defaults, and linked inputs become [source node id, output
slot].

Node definitions come either from node classes (in-process) or from a server's ``/object_info`` (as the
frontend gets them), through the two ``specs_from_*`` functions.
"""

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # UI-only nodes, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload")


def _spec(name, value):
    kind, options = value[0], (value[1] if len(value) > 1 else {})
    return name, "COMBO" if isinstance(kind, (list, tuple)) else kind, options or {}


def input_specs(cls):
    """[(name, type, options)] of a node class in INPUT_TYPES order (required, then optional)."""
    return [_spec(name, value) for section in ("required", "optional")
            for name, value in cls.INPUT_TYPES().get(section, {}).items()]


def specs_from_classes(classes):
    """node type -> input specs, from node classes (e.g. ComfyUI's NODE_CLASS_MAPPINGS)."""
    return lambda node_type: input_specs(classes[node_type])


def specs_from_object_info(info):
    """node type -> input specs, from a server's /object_info answer (the frontend's source)."""
    def specs(node_type):
        node = info[node_type]
        order = node.get("input_order") or {s: list(v) for s, v in node["input"].items()}
        return [_spec(name, node["input"][section][name])
                for section in ("required", "optional") for name in order.get(section, [])]
    return specs


def is_widget(kind, options):
    return kind in WIDGET_TYPES and not options.get("forceInput")


def to_api(workflow, specs):
    """The API prompt the frontend would queue for a UI-format workflow; ``specs``: node type -> input specs."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, kind, options in specs(node["type"]):
            if not is_widget(kind, options):
                continue
            if not values:  # a workflow saved before this widget existed: the frontend keeps its default
                assert "default" in options, f"node {node['id']} ({node['type']}): no widget value left for {name!r}"
                inputs[name] = options["default"]
                continue
            inputs[name] = values.pop(0)
            if options.get("control_after_generate"):
                control = values.pop(0) if values else None
                assert control in CONTROL_VALUES, (
                    f"node {node['id']} ({node['type']}): {name!r} must be followed by its control_after_generate "
                    f"value, got {control!r}")
            if any(options.get(key) for key in UPLOAD_OPTIONS):
                values.pop(0)  # the upload button's value
        assert not values, f"node {node['id']} ({node['type']}): {len(values)} widget values too many: {values}"
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
