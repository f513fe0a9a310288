"""Section-wise VAE decoding nodes: to an IMAGE batch, or streamed straight into an mp4 file."""

import logging
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..framepack_core.checks import check_latent
from ..framepack_core.decode import TensorSink, VideoFileSink, decode_sections, section_ranges


def sections_of(latent, window):
    """(samples, mode, window, sections) of a LATENT; the sections follow from its mode, window and length."""
    samples = latent["samples"]
    check_latent("samples", samples, frames=None)
    # FramePack Sampler's LATENT says how it was sampled; latents from elsewhere (e.g. loaded from disk) are
    # decoded in forward clips of `window` frames
    mode, window = latent.get("framepack_mode", "forward"), latent.get("framepack_window", window)
    return samples, mode, window, section_ranges(mode, samples.shape[2], window)


def decode_with_vae(vae, samples, mode, window, sections, sink):
    pbar = comfy.utils.ProgressBar(len(sections))

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    return decode_sections(samples, mode, window, sections, vae.decode, sink=sink, progress=progress)


def decode_inputs():
    return [
        io.Latent.Input("samples", tooltip="Video latents from FramePack Sampler."),
        io.Vae.Input("vae", tooltip="The HunyuanVideo VAE (hunyuan_video_vae_bf16)."),
    ]


def window_input():
    return io.Int.Input("window", optional=True, default=9, min=1, max=33, tooltip="Only for latents that do not "
                        "come from FramePack Sampler (it records its own window): decode in clips of this many "
                        "latent frames, cross-faded.")


class FramePackDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackDecode",
            display_name="FramePack Decode",
            category="FramePack",
            description=("Decodes FramePack video latents section by section with the original's overlapping "
                         "cross-fade, so VAE memory stays that of one section however long the video."),
            inputs=[*decode_inputs(), window_input()],
            outputs=[io.Image.Output(tooltip="All frames of the video as an image batch.")],
        )

    @classmethod
    def execute(cls, samples, vae, window=9):
        samples, mode, window, sections = sections_of(samples, window)
        return io.NodeOutput(decode_with_vae(vae, samples, mode, window, sections, TensorSink()))


class FramePackDecodeToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackDecodeToVideo",
            display_name="FramePack Decode To Video",
            category="FramePack",
            description=("Decodes FramePack video latents section by section and writes each finished chunk of "
                         "frames straight into an mp4 in the output folder, so a long video never sits in RAM as "
                         "frames."),
            inputs=[
                *decode_inputs(),
                io.String.Input("filename_prefix", default="FramePack", tooltip="Name prefix under the output folder."),
                io.Float.Input("fps", default=30.0, min=1.0, max=120.0, tooltip="Frame rate of the file."),
                io.Int.Input("crf", default=16, min=0, max=51, tooltip="H.264 quality: lower is better, larger."),
                window_input(),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Path of the written mp4.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples, vae, filename_prefix, fps, crf, window=9):
        samples, mode, window, sections = sections_of(samples, window)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        file = f"{name}_{counter:05}_.mp4"
        with VideoFileSink(os.path.join(folder, file), fps=fps, crf=crf) as sink:
            decode_with_vae(vae, samples, mode, window, sections, sink)
        path, frames = sink.result()
        logging.info("[FramePack] wrote %s (%d frames)", path, frames)
        return io.NodeOutput(str(path), ui={"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                                            "animated": (True,)})
