"""ComfyUI entry point of the FramePack node pack.

ComfyUI imports this folder as a package; our own modules are imported relatively so that nothing here
shadows ComfyUI's top-level ``nodes``/``utils``/``comfy`` modules.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
