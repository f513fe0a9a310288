"""FramePack MagCache Calibrate: the sampler run once uncached, writing its per-step magnitude ratios."""

import os
import re

import folder_paths
from comfy_api.latest import io

from ..framepack_core.cache import MagCacheCalibration, save_calibration
from .sampler import MAGCACHE_FOLDER, FramePackSampler, cache_inputs, sampler_inputs


class FramePackMagCacheCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        skip = {i.id for i in cache_inputs()} - {"cfg_batch"} | {"teacache"}  # it always runs uncached
        inputs = [i for i in sampler_inputs() if i.id not in skip]
        filename = io.String.Input("filename", default="framepack_magcache", tooltip="Name of the JSON file "
                                   "(letters, digits, - _ .); an existing file of that name is replaced.")
        required = [i for i in inputs if not i.optional]
        return io.Schema(
            node_id="FramePackMagCacheCalibrate",
            display_name="FramePack MagCache Calibrate",
            category="FramePack",
            description=("Runs the FramePack Sampler once without any cache and writes the per-step magnitude ratios "
                         "of your weights to models/framepack_magcache/<filename>.json, for the sampler's MagCache."),
            inputs=[*required, filename, *inputs[len(required):]],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The uncached video latents."),
                io.String.Output(display_name="calibration", tooltip="The calibration file's name, as the sampler "
                                 "lists it."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename, **inputs):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", filename) or filename.strip(".") == "":
            raise ValueError(f"Calibration filename {filename!r} may hold only letters, digits, '-', '_' and '.'.")
        recorder = MagCacheCalibration()
        latent = FramePackSampler.execute(**inputs, teacache=0.0, cache=recorder)[0]
        folder = folder_paths.get_folder_paths(MAGCACHE_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        name = filename if filename.endswith(".json") else filename + ".json"
        save_calibration(os.path.join(folder, name), recorder.ratios(), mode=latent["framepack_mode"],
                         window=latent["framepack_window"], source="FramePack MagCache Calibrate")
        return io.NodeOutput(latent, name)
