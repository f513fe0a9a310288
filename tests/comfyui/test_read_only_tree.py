"""The ComfyUI tree is only read: ComfyUI writes under the temporary base directory the `comfy` fixture
sets, and the session guard (conftest.py) would name anything written into the tree."""

import sys
from pathlib import Path

from read_only_tree import changes, snapshot


def test_comfyui_writes_under_the_temporary_base(comfy):
    """conftest's `comfy` fixture checks all of ComfyUI's folders; here a core node that writes shows it."""
    import folder_paths

    inputs = Path(folder_paths.get_input_directory())
    assert comfy.path not in inputs.resolve().parents and sys.dont_write_bytecode
    if "Load3D" in comfy.nodes.NODE_CLASS_MAPPINGS:  # a core node that creates input/3d when asked its inputs
        comfy.nodes.NODE_CLASS_MAPPINGS["Load3D"].INPUT_TYPES()
        assert (inputs / "3d").is_dir()


def test_the_guard_names_every_change(tmp_path):
    tree = tmp_path / "ComfyUI"
    (tree / "input").mkdir(parents=True)
    (tree / "nodes.py").write_text("x = 1\n")
    (tree / "main.py").write_text("")
    before = snapshot(tree)
    assert changes(before, snapshot(tree)) == []
    (tree / "input" / "3d").mkdir()
    (tree / "__pycache__").mkdir()
    (tree / "nodes.py").write_text("x = 22\n")
    (tree / "main.py").unlink()
    assert changes(before, snapshot(tree)) == [
        "added __pycache__", "added input/3d", "removed main.py", "modified input", "modified nodes.py"]
