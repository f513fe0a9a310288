"""Small nodes the FramePack workflows need that core ComfyUI lacks."""

import comfy.utils
from comfy_api.latest import io

from ..framepack_core.buckets import nearest_bucket

Keyframes = io.Custom("FRAMEPACK_KEYFRAMES")
TimedPrompts = io.Custom("FRAMEPACK_PROMPTS")


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


class FramePackKeyframe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackKeyframe",
            display_name="FramePack Keyframe",
            category="FramePack",
            description=("Adds a keyframe: the given section (0 = the one right after the start image) is sampled "
                         "to lead into this image. Inverted (anti-drifting) schedules only."),
            inputs=[
                io.Latent.Input("latent", tooltip="VAEEncode of the keyframe image, same size as the start image."),
                io.Int.Input("section", default=0, min=0, max=1000, tooltip="Section that leads into it."),
                Keyframes.Input("keyframes", optional=True, tooltip="Keyframes to add this one to."),
            ],
            outputs=[Keyframes.Output(display_name="keyframes", tooltip="Connect to FramePack Sampler, or to another "
                                      "FramePack Keyframe.")],
        )

    @classmethod
    def execute(cls, latent, section, keyframes=None):
        keyframes = dict(keyframes or {})
        if section in keyframes:
            raise ValueError(f"Section {section} already has a keyframe; give each keyframe its own section.")
        samples = latent["samples"]
        if samples.ndim != 5 or samples.shape[2] != 1:
            raise ValueError(f"A keyframe is one encoded image (1, 16, 1, h, w), got {tuple(samples.shape)}.")
        keyframes[section] = samples[:1].float()
        return io.NodeOutput(keyframes)


class FramePackTimedPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackTimedPrompt",
            display_name="FramePack Timed Prompt",
            category="FramePack",
            description="Uses this prompt for the sections that start between start_seconds and end_seconds.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt for this time range (CLIPTextEncode)."),
                io.Float.Input("start_seconds", default=0.0, min=0.0, max=600.0, step=0.1,
                               tooltip="Range start (inclusive)."),
                io.Float.Input("end_seconds", default=2.0, min=0.0, max=600.0, step=0.1,
                               tooltip="Range end (exclusive)."),
                TimedPrompts.Input("timed_prompts", optional=True, tooltip="Prompts to add this one to."),
                io.Int.Input("blend_sections", optional=True, default=0, min=0, max=100, tooltip="Blend into this "
                             "prompt (and back out of it, when the sampler's prompt follows) over this many sections "
                             "instead of switching at once; 0 switches abruptly."),
            ],
            outputs=[TimedPrompts.Output(display_name="timed_prompts", tooltip="Connect to FramePack Sampler, or to "
                                         "another FramePack Timed Prompt.")],
        )

    @classmethod
    def execute(cls, conditioning, start_seconds, end_seconds, timed_prompts=None, blend_sections=0):
        if not start_seconds < end_seconds:
            raise ValueError(f"end_seconds ({end_seconds}) must be after start_seconds ({start_seconds}).")
        return io.NodeOutput(list(timed_prompts or []) + [(conditioning, start_seconds, end_seconds, blend_sections)])
