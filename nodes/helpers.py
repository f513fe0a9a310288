"""Small nodes the FramePack workflows need that core ComfyUI lacks."""

import comfy.utils

from ..framepack_core.buckets import nearest_bucket


class FramePackResolutionBucket:
    DESCRIPTION = ("Resizes and centre-crops an image to the FramePack training size nearest its aspect ratio "
                   "(buckets around 640x640, e.g. 480x832).")
    CATEGORY = "FramePack"
    RETURN_TYPES = ("IMAGE", "INT", "INT")
    RETURN_NAMES = ("image", "width", "height")
    OUTPUT_TOOLTIPS = ("The resized image.", "Bucket width.", "Bucket height.")
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The start (or end/keyframe) image."}),
            "resolution": ("INT", {"default": 640, "min": 32, "max": 1280, "step": 16,
                                   "tooltip": "Bucket size; 640 is what FramePack was trained at (much smaller "
                                   "sizes only make quick drafts)."}),
        }}

    def resize(self, image, resolution):
        height, width = nearest_bucket(image.shape[1], image.shape[2], resolution)
        resized = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "lanczos", "center")
        return (resized.movedim(1, -1).clamp(0, 1), width, height)


class FramePackKeyframe:
    DESCRIPTION = ("Adds a keyframe: the given section (0 = the one right after the start image) is sampled "
                   "to lead into this image. Inverted (anti-drifting) schedules only.")
    CATEGORY = "FramePack"
    RETURN_TYPES = ("FRAMEPACK_KEYFRAMES",)
    RETURN_NAMES = ("keyframes",)
    OUTPUT_TOOLTIPS = ("Connect to FramePack Sampler, or to another FramePack Keyframe.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "VAEEncode of the keyframe image, same size as the start image."}),
            "section": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Section that leads into it."}),
        }, "optional": {
            "keyframes": ("FRAMEPACK_KEYFRAMES", {"tooltip": "Keyframes to add this one to."}),
        }}

    def add(self, latent, section, keyframes=None):
        keyframes = dict(keyframes or {})
        if section in keyframes:
            raise ValueError(f"Section {section} already has a keyframe; give each keyframe its own section.")
        samples = latent["samples"]
        if samples.ndim != 5 or samples.shape[2] != 1:
            raise ValueError(f"A keyframe is one encoded image (1, 16, 1, h, w), got {tuple(samples.shape)}.")
        keyframes[section] = samples[:1].float()
        return (keyframes,)


class FramePackTimedPrompt:
    DESCRIPTION = "Uses this prompt for the sections that start between start_seconds and end_seconds."
    CATEGORY = "FramePack"
    RETURN_TYPES = ("FRAMEPACK_PROMPTS",)
    RETURN_NAMES = ("timed_prompts",)
    OUTPUT_TOOLTIPS = ("Connect to FramePack Sampler, or to another FramePack Timed Prompt.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The prompt for this time range (CLIPTextEncode)."}),
            "start_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 600.0, "step": 0.1,
                                        "tooltip": "Range start (inclusive)."}),
            "end_seconds": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 600.0, "step": 0.1,
                                      "tooltip": "Range end (exclusive)."}),
        }, "optional": {
            "timed_prompts": ("FRAMEPACK_PROMPTS", {"tooltip": "Prompts to add this one to."}),
            "blend_sections": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Blend into this prompt (and "
                               "back out of it, when the sampler's prompt follows) over this many sections instead "
                               "of switching at once; 0 switches abruptly."}),
        }}

    def add(self, conditioning, start_seconds, end_seconds, timed_prompts=None, blend_sections=0):
        if not start_seconds < end_seconds:
            raise ValueError(f"end_seconds ({end_seconds}) must be after start_seconds ({start_seconds}).")
        return (list(timed_prompts or []) + [(conditioning, start_seconds, end_seconds, blend_sections)],)
