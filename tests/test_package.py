"""Project invariants: the core never imports ComfyUI, and the pack root is a valid ComfyUI entry."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "nodes", "node_helpers", "latent_preview", "execution"}


def test_core_imports_in_a_fresh_interpreter_without_comfy():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {sorted(COMFY_MODULES)!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, framepack_core\n"
        "for m in pkgutil.iter_modules(framepack_core.__path__): importlib.import_module('framepack_core.' + m.name)\n"
        "print('ok', sorted(k for k in sys.modules if k.split('.')[0] in {'comfy', 'folder_paths'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def test_core_source_has_no_comfy_import():
    for path in (ROOT / "framepack_core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not {n.split(".")[0] for n in names} & COMFY_MODULES, f"{path.name} imports ComfyUI"


def test_pack_has_no_top_level_module_shadowing_comfyui():
    # our glue lives in nodes/ but is imported relatively, never as top-level `nodes`
    init = (ROOT / "__init__.py").read_text()
    assert "from .nodes import" in init and "sys.path" not in init
    for path in (ROOT / "nodes").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


def test_pyproject_has_registry_metadata():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] and meta["project"]["version"]
    assert meta["project"]["urls"]["Repository"].startswith("https://")
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert comfy["Icon"].endswith("/" + "docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    # the registry's format (comfy-cli): operator + major.minor.patch; the lower bound is the oldest tree CI tests
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"]), comfy["requires-comfyui"]


def test_published_package_leaves_out_what_does_not_run():
    ignored = {line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests/", "bench/", ".ci/"} <= ignored
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [name for name in tracked if name.endswith((".whl", ".zip"))], "archives are committed"
