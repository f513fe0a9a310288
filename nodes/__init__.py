"""ComfyUI nodes of the FramePack pack, on ComfyUI's V3 schema. Thin glue: all math lives in ``framepack_core``.

ComfyUI's loader (0.3.64, 0.33 and 0.38.x alike) registers a pack through ``NODE_CLASS_MAPPINGS`` when it has
them and only otherwise calls ``comfy_entrypoint``, so offering both never registers a node twice.
"""

from comfy_api.latest import ComfyExtension

from .decode import FramePackDecode, FramePackDecodeToVideo
from .keyframe import FramePackKeyframe
from .lora import FramePackLoraLoader
from .magcache import FramePackMagCacheCalibrate
from .model import FramePackModelLoader
from .resolution_bucket import FramePackResolutionBucket
from .sampler import FramePackSampler
from .schedule import FramePackSchedule
from .single_frame import FramePackSingleFrame
from .timed_prompt import FramePackTimedPrompt

NODES = [
    FramePackModelLoader, FramePackLoraLoader, FramePackSchedule, FramePackSampler, FramePackMagCacheCalibrate,
    FramePackDecode, FramePackDecodeToVideo, FramePackResolutionBucket, FramePackKeyframe, FramePackTimedPrompt,
    FramePackSingleFrame,
]

NODE_CLASS_MAPPINGS = {node.GET_SCHEMA().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES}


class FramePackExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint():
    return FramePackExtension()
