"""FramePack MagCache Calibrate: the sampler run once uncached, writing its per-step magnitude ratios."""

import os
import re

import folder_paths

from ..framepack_core.cache import MagCacheCalibration, save_calibration
from .sampler import MAGCACHE_FOLDER, FramePackSampler, cache_inputs


class FramePackMagCacheCalibrate(FramePackSampler):
    DESCRIPTION = ("Runs the FramePack Sampler once without any cache and writes the per-step magnitude ratios of "
                   "your weights to models/framepack_magcache/<filename>.json, for the sampler's MagCache.")
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "calibration")
    OUTPUT_TOOLTIPS = ("The uncached video latents.", "The calibration file's name, as the sampler lists it.")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        inputs = FramePackSampler.INPUT_TYPES()
        required = {k: v for k, v in inputs["required"].items() if k != "teacache"}
        required["filename"] = ("STRING", {"default": "framepack_magcache", "tooltip": "Name of the JSON file "
                                "(letters, digits, - _ .); an existing file of that name is replaced."})
        skip = set(cache_inputs()) - {"cfg_batch"}
        return {"required": required, "optional": {k: v for k, v in inputs["optional"].items() if k not in skip}}

    def calibrate(self, filename, **inputs):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", filename) or filename.strip(".") == "":
            raise ValueError(f"Calibration filename {filename!r} may hold only letters, digits, '-', '_' and '.'.")
        recorder = MagCacheCalibration()
        (latent,) = self.sample(**inputs, teacache=0.0, cache=recorder)
        folder = folder_paths.get_folder_paths(MAGCACHE_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        name = filename if filename.endswith(".json") else filename + ".json"
        save_calibration(os.path.join(folder, name), recorder.ratios(), mode=latent["framepack_mode"],
                         window=latent["framepack_window"], source="FramePack MagCache Calibrate")
        return (latent, name)
