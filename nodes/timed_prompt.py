"""FramePack Timed Prompt: a prompt for a time range of the video."""

from comfy_api.latest import io

TimedPrompts = io.Custom("FRAMEPACK_PROMPTS")


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
