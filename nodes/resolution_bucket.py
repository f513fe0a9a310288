"""FramePack Resolution Bucket: resize an image to the training size nearest its aspect ratio."""

import comfy.utils
from comfy_api.latest import io

from ..framepack_core.buckets import nearest_bucket


class FramePackResolutionBucket(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackResolutionBucket",
            display_name="FramePack Resolution Bucket",
            category="FramePack",
            description=("Resizes and centre-crops an image to the FramePack training size nearest its aspect ratio "
                         "(buckets around 640x640, e.g. 480x832)."),
            inputs=[
                io.Image.Input("image", tooltip="The start (or end/keyframe) image."),
                io.Int.Input("resolution", default=640, min=32, max=1280, step=16,
                             tooltip="Bucket size; 640 is what FramePack was trained at (much smaller "
                             "sizes only make quick drafts)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The resized image."),
                io.Int.Output(display_name="width", tooltip="Bucket width."),
                io.Int.Output(display_name="height", tooltip="Bucket height."),
            ],
        )

    @classmethod
    def execute(cls, image, resolution):
        height, width = nearest_bucket(image.shape[1], image.shape[2], resolution)
        resized = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "lanczos", "center")
        return io.NodeOutput(resized.movedim(1, -1).clamp(0, 1), width, height)
