"""The context packing schedule node: how a video is cut into sections and what context each one sees."""

import logging
from dataclasses import dataclass

from comfy_api.latest import io

from ..framepack_core.packing import KERNELS, make_schedule, sections_for_length
from .comfy_compat import combo_input

Schedule = io.Custom("FRAMEPACK_SCHEDULE")


@dataclass(frozen=True)
class ScheduleSpec:
    """What the user chose; the sampler builds the schedule once it knows which embedders the weights have."""

    mode: str
    num_sections: int
    window: int
    fps: float
    counts: tuple
    first_frame_priority: bool
    anti_drift_padding: bool

    def build(self, kernels_available=KERNELS):
        return make_schedule(self.mode, self.num_sections, window=self.window, counts=self.counts,
                             first_frame_priority=self.first_frame_priority,
                             anti_drift_padding=self.anti_drift_padding, kernels_available=kernels_available)


class FramePackSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackSchedule",
            display_name="FramePack Schedule",
            category="FramePack",
            description=("Cuts the video into sections and packs each section's context (1x/2x/4x history) into a "
                         "constant token budget. inverted = anti-drifting (FramePackI2V_HY); forward = F1."),
            inputs=[
                combo_input("mode", options=["inverted", "forward"], tooltip="inverted: sample from the end back "
                            "to the start image (anti-drifting, for FramePackI2V_HY). forward: sample onward from "
                            "the start (for F1)."),
                io.Float.Input("seconds", default=5.0, min=0.1, max=600.0, step=0.1,
                               tooltip="Video length; ignored when sections > 0."),
                io.Int.Input("sections", default=0, min=0, max=1000,
                             tooltip="Number of sections (0: derive from seconds and fps)."),
                io.Int.Input("window", default=9, min=1, max=33, tooltip="Latent frames per section "
                             "(window*4-3 pixel frames). The released models were trained with 9."),
                io.Float.Input("fps", default=30.0, min=1.0, max=120.0, tooltip="Frames per second the "
                               "length is counted in (FramePack is trained at 30)."),
                io.Int.Input("history_1x", default=1, min=0, max=16, tooltip="History frames kept at full "
                             "resolution (kernel 1x2x2)."),
                io.Int.Input("history_2x", default=2, min=0, max=32, tooltip="History frames compressed 2x "
                             "in time and space (kernel 2x4x4)."),
                io.Int.Input("history_4x", default=16, min=0, max=64, tooltip="History frames compressed 4x "
                             "(kernel 4x8x8)."),
                io.Boolean.Input("first_frame_priority", default=True, tooltip="Keep the start image in the 1x "
                                 "context of every section (the image-to-video default)."),
                io.Boolean.Input("anti_drift_padding", default=True, tooltip="Inverted mode with more than 4 "
                                 "sections: paddings 3,2,..,2,1,0 as the original (looks better than n-1..0)."),
                io.Int.Input("width", optional=True, default=832, min=64, max=4096, step=16,
                             tooltip="Video width, only for the token budget report."),
                io.Int.Input("height", optional=True, default=480, min=64, max=4096, step=16,
                             tooltip="Video height, only for the token budget report."),
            ],
            outputs=[
                Schedule.Output(display_name="schedule", tooltip="Connect to FramePack Sampler."),
                io.String.Output(display_name="token_budget", tooltip="Tokens per section at the given preview size."),
            ],
        )

    @classmethod
    def execute(cls, mode, seconds, sections, window, fps, history_1x, history_2x, history_4x,
                first_frame_priority, anti_drift_padding, width=832, height=480):
        num = sections or sections_for_length(seconds, window, fps)
        spec = ScheduleSpec(mode, num, window, fps, (history_1x, history_2x, history_4x),
                            first_frame_priority, anti_drift_padding)
        schedule = spec.build()  # validates now, so mistakes show on this node
        budget = schedule.token_budget(height // 8, width // 8)
        frames = 4 * (1 + num * window) - 3  # the start frame plus every section's window, in pixel frames
        report = f"{num} sections, {frames} frames ({frames / fps:.1f} s at {fps:g} fps)\n{budget}"
        logging.info("[FramePack] %s", report)
        return io.NodeOutput(spec, report)
