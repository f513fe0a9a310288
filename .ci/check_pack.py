"""The node package `comfy node pack` built holds what runs in ComfyUI and nothing else.

Usage: python .ci/check_pack.py node.zip
"""

import sys
import zipfile

# what a user's ComfyUI loads or shows, and the files the registry and the license ask for
SHIPPED = ("__init__.py", "nodes/", "framepack_core/", "example_workflows/", "pyproject.toml", "requirements.txt",
           "README.md", "LICENSE")
REQUIRED = {"__init__.py", "nodes/__init__.py", "nodes/sampler.py", "framepack_core/model.py",
            "example_workflows/image_to_video.json", "pyproject.toml", "requirements.txt", "LICENSE"}

names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if not n.endswith("/")]
stray = sorted(n for n in names if not n.startswith(SHIPPED))
missing = sorted(REQUIRED - set(names))
if stray or missing:
    sys.exit(f"{sys.argv[1]}: files that do not run in ComfyUI: {stray}; missing: {missing}. "
             "Fix .comfyignore (or what is committed).")
print(f"[ci] {sys.argv[1]}: {len(names)} files, all of them parts of the pack")
