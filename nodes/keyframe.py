"""FramePack Keyframe: an image a chosen section leads into (inverted schedules)."""

from comfy_api.latest import io

from ..framepack_core.checks import check_latent

Keyframes = io.Custom("FRAMEPACK_KEYFRAMES")


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
        check_latent(f"keyframe {section}", latent["samples"], frames=1)
        keyframes[section] = latent["samples"].float()
        return io.NodeOutput(keyframes)
