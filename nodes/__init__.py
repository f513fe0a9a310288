"""ComfyUI nodes of the FramePack pack. Thin glue: all math lives in ``framepack_core``."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
