"""Where FramePack Sampler keeps its resume states, and the model identity that goes into their fingerprint.

States live in ``<ComfyUI output>/framepack_resume/`` (not temp/, which ComfyUI empties at start), one
safetensors file per generation, deleted when it completes; the newest states are kept within
``framepack_core.resume.DEFAULT_MAX_BYTES`` (2 GiB).
"""

import dataclasses
import enum
import functools
import os

import folder_paths
import torch

from ..framepack_core.resume import Fingerprint, ResumeStore, weights_digest

RESUME_FOLDER = "framepack_resume"


def resume_store():
    return ResumeStore(os.path.join(folder_paths.get_output_directory(), RESUME_FOLDER))


def model_identity(patcher):
    """What makes this MODEL's output what it is: the checkpoint (path, size, modification time), how it
    was loaded (weight dtype, attention), every weight patch (LoRA): key, strengths and tensors, every
    object patch (a module by its weights), and the model patches that reach the transformer calls
    (wrappers, callbacks, ``transformer_options``: block replacements, attention override).

    Functions count by their module and qualified name, other objects by their type: a patch whose
    function stays the same but captures other values is not told apart."""
    fp = Fingerprint()
    source = getattr(patcher.model, "framepack_source", None)
    if source is None:  # a FramePack transformer not made by our loader: fall back to its weights
        fp.add("weights", weights_digest(patcher.model.diffusion_model))
    else:
        path, options = source
        fp.add("checkpoint", _files(path)).add("options", options)
    fp.add("compute_dtype", patcher.model.diffusion_model.compute_dtype)
    fp.add("patches", {key: [_plain(p) for p in patches] for key, patches in patcher.patches.items()})
    calls = {"transformer_options": patcher.model_options.get("transformer_options", {}),
             "wrappers": patcher.wrappers, "callbacks": patcher.callbacks}
    fp.add("object_patches", {key: weights_digest(value) if isinstance(value, torch.nn.Module)
                              else _plain(value, open_objects=False) for key, value in patcher.object_patches.items()})
    fp.add("model_options", _plain(calls, open_objects=False))
    return fp.hexdigest()


def _files(path):
    """(name, size, mtime) of a checkpoint file, or of every file in a diffusers folder."""
    if os.path.isdir(path):
        names = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    else:
        names = [path]
    return [(os.path.abspath(n), os.stat(n).st_size, os.stat(n).st_mtime_ns) for n in names]


def _plain(value, open_objects=True, depth=0):
    """Patch entries and model options as values Fingerprint hashes: containers walked, tensors and plain
    values kept, functions by module and name. Other objects: with ``open_objects`` (weight patches, e.g.
    comfy.weight_adapter.LoRAAdapter) by their type and attributes, else (options, which may hold the
    model itself or change between runs) by their type only."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if depth > 8:
        return type(value).__qualname__
    if isinstance(value, dict):
        return {repr(k): _plain(v, open_objects, depth + 1)
                for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v, open_objects, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)) or dataclasses.is_dataclass(value):
        return repr(value)
    if isinstance(value, functools.partial):
        return ["partial", *(_plain(v, open_objects, depth + 1) for v in (value.func, value.args, value.keywords))]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if open_objects:
        return [type(value).__qualname__, _plain(vars(value), open_objects, depth + 1)]
    return f"{type(value).__module__}.{type(value).__qualname__}"
