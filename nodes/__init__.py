"""ComfyUI nodes of the FramePack pack. Thin glue: all math lives in ``framepack_core``."""

from .decode import FramePackDecode, FramePackDecodeToVideo
from .helpers import FramePackKeyframe, FramePackResolutionBucket, FramePackTimedPrompt
from .lora import FramePackLoraLoader
from .magcache import FramePackMagCacheCalibrate
from .model import FramePackModelLoader
from .sampler import FramePackSampler
from .schedule import FramePackSchedule
from .single_frame import FramePackSingleFrame

NODE_CLASS_MAPPINGS = {
    "FramePackModelLoader": FramePackModelLoader,
    "FramePackLoraLoader": FramePackLoraLoader,
    "FramePackSchedule": FramePackSchedule,
    "FramePackSampler": FramePackSampler,
    "FramePackMagCacheCalibrate": FramePackMagCacheCalibrate,
    "FramePackDecode": FramePackDecode,
    "FramePackDecodeToVideo": FramePackDecodeToVideo,
    "FramePackResolutionBucket": FramePackResolutionBucket,
    "FramePackKeyframe": FramePackKeyframe,
    "FramePackTimedPrompt": FramePackTimedPrompt,
    "FramePackSingleFrame": FramePackSingleFrame,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FramePackModelLoader": "FramePack Model Loader",
    "FramePackLoraLoader": "FramePack LoRA Loader",
    "FramePackSchedule": "FramePack Schedule",
    "FramePackSampler": "FramePack Sampler",
    "FramePackMagCacheCalibrate": "FramePack MagCache Calibrate",
    "FramePackDecode": "FramePack Decode",
    "FramePackDecodeToVideo": "FramePack Decode To Video",
    "FramePackResolutionBucket": "FramePack Resolution Bucket",
    "FramePackKeyframe": "FramePack Keyframe",
    "FramePackTimedPrompt": "FramePack Timed Prompt",
    "FramePackSingleFrame": "FramePack Single Frame",
}
