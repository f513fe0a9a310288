"""Integration tests against a real ComfyUI tree (no fakes of ComfyUI).

ComfyUI is found through ``COMFYUI_PATH`` or by this pack sitting in ``ComfyUI/custom_nodes/``. Without
one, every test here is skipped with that reason, unless ``FRAMEPACK_REQUIRE_COMFYUI`` is set (CI sets it),
which makes a missing tree an error. ComfyUI runs in this process on the CPU (``--cpu``);
its built-in nodes are registered and this pack is loaded through ComfyUI's own custom-node loader.
Every directory ComfyUI writes to (models, input, output, temp, user) lies under a temporary base directory.

The ComfyUI tree is only read: no bytecode is written next to its modules, and the run fails if any file or
folder in the tree was added, removed or modified by the time the session ends.
"""

import asyncio
import os
import sys
from pathlib import Path

import pytest

import read_only_tree

PACK = Path(__file__).resolve().parents[2]


def find_comfyui():
    candidates = [os.environ.get("COMFYUI_PATH"), PACK.parent.parent if PACK.parent.name == "custom_nodes" else None]
    for path in filter(None, candidates):
        path = Path(path).resolve()
        if (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file():
            return path
    return None


COMFYUI = find_comfyui()
SKIP_REASON = ("no ComfyUI tree: set COMFYUI_PATH to a ComfyUI checkout (with its requirements installed) or "
               "put this pack in ComfyUI/custom_nodes/ to run the integration tests")


if COMFYUI is not None:
    sys.dont_write_bytecode = True  # ComfyUI's modules are imported from its tree, which tests only read
    TREE_BEFORE = read_only_tree.snapshot(COMFYUI)  # before any test module here is imported


@pytest.fixture(scope="session", autouse=True)
def comfyui_tree_is_only_read():
    """Fails the run (an error at session teardown) when the ComfyUI tree changed while the tests ran."""
    yield
    if COMFYUI is None:
        return
    changes = read_only_tree.changes(TREE_BEFORE, read_only_tree.snapshot(COMFYUI))
    if changes:
        pytest.fail(f"The tests wrote into the ComfyUI tree {COMFYUI}, which they must only read ({len(changes)} "
                    f"changes: {', '.join(changes[:10])}). Point what wrote it at a temporary folder (ComfyUI's "
                    "base directory, folder_paths) and run python with -B.", pytrace=False)


def pytest_collection_modifyitems(config, items):
    if COMFYUI is None and os.environ.get("FRAMEPACK_REQUIRE_COMFYUI"):
        raise pytest.UsageError(f"FRAMEPACK_REQUIRE_COMFYUI is set (as in CI) but there is {SKIP_REASON}")
    if COMFYUI is None:
        here = Path(__file__).parent
        for item in items:
            if here in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process on the CPU, built-in nodes and this pack registered.

    Returns a namespace: ``nodes`` (ComfyUI's nodes module), ``pack`` (this pack's NODE_CLASS_MAPPINGS),
    ``models`` (the temporary models folder, with one sub-folder per ComfyUI model type).
    """
    # ComfyUI's own modules (nodes, utils, comfy, ...) must come before the pack root on sys.path.
    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = True
    args.disable_all_custom_nodes = True  # only this pack, loaded explicitly below
    # as --base-directory does, read when folder_paths is imported: core nodes write under these folders when
    # they load (0.33's Load3D creates input/3d)
    base = tmp_path_factory.mktemp("comfyui_base")
    args.base_directory = str(base)
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    # As main.py does: ComfyUI's utils package must be imported before `nodes` puts comfy/ (which has a
    # utils.py) first on sys.path, or comfy_extras modules that import `server` fail (e.g. ImageFromBatch).
    import utils.install_util  # noqa: F401
    import folder_paths
    import nodes

    assert Path(nodes.__file__).resolve().parent == COMFYUI, f"`nodes` resolved to {nodes.__file__}, not ComfyUI's"
    folders = [folder_paths.models_dir, folder_paths.get_input_directory(), folder_paths.get_output_directory(),
               folder_paths.get_temp_directory(), folder_paths.get_user_directory()]
    assert all(Path(f).parent == base for f in folders), f"folder_paths was imported before its base was set: {folders}"
    models = Path(folder_paths.models_dir)
    for kind in ("diffusion_models", "diffusers", "vae", "text_encoders", "clip_vision", "loras", "upscale_models",
                 "checkpoints", "controlnet"):
        (models / kind).mkdir(parents=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(str(PACK))), "ComfyUI's custom-node loader failed to import the pack"
    pack = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before}

    class Comfy:
        pass

    env = Comfy()
    env.nodes, env.pack, env.models, env.path = nodes, pack, models, COMFYUI
    return env


@pytest.fixture(scope="session")
def server(comfy, tmp_path_factory):
    """ComfyUI's own main.py serving this pack from a temporary base directory (``server_base.py``, whose VAE
    is shaped by the in-process ComfyUI), shared by the real-server and frontend tests because starting one
    costs time; always stopped at the end."""
    from comfy_server import ComfyServer
    from server_base import populate

    running = ComfyServer(comfy.path, populate(tmp_path_factory.mktemp("comfy_base")))
    try:
        yield running.start()
    finally:
        running.stop()
