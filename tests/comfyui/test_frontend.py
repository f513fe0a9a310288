"""Every example workflow, opened and queued in ComfyUI's own frontend as a user does it.

The real test server (conftest.py's ``server``) serves ComfyUI's frontend (the comfyui_frontend_package its
requirements pin) at ``/``. Headless Chromium (Debian's, driven by Playwright) opens it, loads each
example_workflows/*.json with ``app.loadGraphData`` (what opening a workflow file does) and queues it with
``app.queuePrompt`` (what the Queue button does): the frontend converts the graph with its own
``graphToPrompt`` and POSTs it to ``/prompt``. The test reads that request and ComfyUI's answer:

- the only validation errors allowed are for model weights that cannot exist here (text encoders, CLIP vision,
  upscale, SD 1.5, ControlNet); the server has every other file the workflows name;
- a workflow built on core nodes this ComfyUI does not have (``NEEDS_NEWER_COMFYUI``, e.g. frame interpolation
  before 0.33) is refused naming one of them, which is what its users see;
- the queued prompt equals what ``workflow_api.to_api`` makes of the same file with the server's
  ``/object_info``, so the server tests that convert with ``to_api`` run what the frontend queues. Left
  out of the comparison is what ComfyUI never reads: ``_meta`` (node titles, for display) and inputs the
  node's definition does not have (LoadVideo's ``video-preview`` widget, which the frontend adds, and then
  queues, once the preview has loaded).

Requests to anywhere but the test server are aborted, so the page never waits on the internet.
"""

import json
from pathlib import Path

import pytest

from server_base import PACK
from test_workflows import MODEL_FILES, NEEDS_NEWER_COMFYUI, lacks_core_nodes
from workflow_api import specs_from_object_info, to_api

WORKFLOWS = sorted((PACK / "example_workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000


class Frontend:
    """One page of ComfyUI's frontend, with what it logged and which outside requests it was refused."""

    def __init__(self, page, server):
        self.page, self.server = page, server
        self.errors, self.refused = [], []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.route("**/*", self._only_the_server)
        page.goto(server.url, timeout=TIMEOUT_MS)
        # the app is set up and has opened its startup workflow: nothing will replace the graph loaded next
        page.wait_for_function("() => window.app?.extensionManager?.workflow?.activeWorkflow", timeout=TIMEOUT_MS)

    def _only_the_server(self, route):
        if route.request.url.startswith(self.server.url + "/"):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def queue(self, workflow, name):
        """Open ``workflow`` and press Queue: (the body the frontend POSTed to /prompt, HTTP status, answer)."""
        self.errors.clear()
        self.refused.clear()
        with self.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                                       timeout=TIMEOUT_MS) as answer:
            self.page.evaluate("""async ([workflow, name]) => {
                await window.app.loadGraphData(workflow, true, true, name);
                await window.app.queuePrompt(0, 1);
            }""", [workflow, name])
        response = answer.value
        return response.request.post_data_json, response.status, response.json()

    def report(self):
        """The page's errors and refused requests since the last queue, for assertion messages."""
        return "\nfrontend console errors:\n  " + "\n  ".join(self.errors[-30:] or ["none"]) + (
            "\nrefused outside requests:\n  " + "\n  ".join(self.refused[-10:] or ["none"]))


@pytest.fixture(scope="module")
def frontend(server):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"The frontend test drives the system's Chromium at {CHROMIUM} (Debian: apt-get install chromium); "
                    "it never downloads a browser.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Frontend(browser.new_page(), server)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def missing_weights(server):
    """The README's model files that the test server does not have."""
    present = {p.name for p in (server.base / "models").rglob("*") if p.is_file()}
    return {name for names in MODEL_FILES.values() for name in names} - present


def unexpected_errors(answer, allowed_files):
    """The validation errors in ``answer`` other than a missing file of ``allowed_files``, as readable lines."""
    if "node_errors" not in answer or (answer.get("error") and not answer["node_errors"]):
        return [f"prompt rejected: {answer}"]
    return [f"node {node_id} ({errors['class_type']}) input {e.get('extra_info', {}).get('input_name')!r}: "
            f"{e['type']}: {e['message']}: {e['details']}"
            for node_id, errors in answer["node_errors"].items() for e in errors["errors"]
            if not (e["type"] == "value_not_in_list" and e["extra_info"].get("received_value") in allowed_files)]


def defined_inputs(node, specs):
    """A queued node's inputs that its definition has (DynamicCombo sub-inputs by their combo's name)."""
    names = {name for name, _, _ in specs(node["class_type"])}
    return {name: value for name, value in node["inputs"].items() if name.split(".")[0] in names}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_queues_from_the_frontend(server, frontend, object_info, path):
    workflow = json.loads(Path(path).read_text())
    sent, status, answer = frontend.queue(workflow, path.stem)
    if lacks_core_nodes(path.stem, workflow, object_info):
        # this ComfyUI lacks core nodes the workflow needs: queueing it is refused, naming one of them
        types = {f"Node ID '#{node['id']}'": node["type"] for node in workflow["nodes"]}
        assert status == 400 and types.get(answer["error"]["details"]) in NEEDS_NEWER_COMFYUI[path.stem][0], answer
        return
    if status == 200:  # valid as a whole: it would run at full size; only its validation is tested here
        server.cancel(answer["prompt_id"])
    else:
        errors = unexpected_errors(answer, missing_weights(server))
        assert not errors, "\n".join(errors) + frontend.report()

    specs = specs_from_object_info(object_info)
    queued = {node_id: {"class_type": node["class_type"], "inputs": defined_inputs(node, specs)}
              for node_id, node in sent["prompt"].items()}
    ours = to_api(workflow, specs)
    differences = [f"node {node_id}: frontend {queued.get(node_id)}\n    to_api   {ours.get(node_id)}"
                   for node_id in sorted(set(queued) | set(ours), key=int) if queued.get(node_id) != ours.get(node_id)]
    assert not differences, "the frontend queues another prompt than to_api makes:\n" + "\n".join(differences)
