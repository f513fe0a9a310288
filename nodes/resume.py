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
    fp.add("object_patches", {key: weights_digest(value) if isinstance(value, torch.nn.Module) else _shape_of(value)
                              for key, value in patcher.object_patches.items()})
    fp.add("transformer_options", _shape_of(patcher.model_options.get("transformer_options", {})))
    fp.add("wrappers", _shape_of(patcher.wrappers)).add("callbacks", _shape_of(patcher.callbacks))
    return fp.hexdigest()


def _shape_of(value, depth=0):
    """Model options as hashable values: containers walked, tensors and plain values kept, functions by
    name, any other object by its type only (it may hold the model itself, or change between runs)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if depth > 8:
        return type(value).__qualname__
    if isinstance(value, dict):
        return {repr(k): _shape_of(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_shape_of(v, depth + 1) for v in value]
    if isinstance(value, functools.partial):
        return ["partial", _shape_of(value.func, depth + 1), _shape_of(value.args, depth + 1),
                _shape_of(value.keywords, depth + 1)]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _files(path):
    """(name, size, mtime) of a checkpoint file, or of every file in a diffusers folder."""
    if os.path.isdir(path):
        names = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    else:
        names = [path]
    return [(os.path.abspath(n), os.stat(n).st_size, os.stat(n).st_mtime_ns) for n in names]


def _plain(value):
    """A patch entry (strengths, LoRA adapter objects, tensors, functions) as values Fingerprint hashes."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(v) for v in value)
    if isinstance(value, dict):
        return {repr(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)) or dataclasses.is_dataclass(value):
        return repr(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return [type(value).__qualname__, _plain(vars(value))]  # e.g. comfy.weight_adapter.LoRAAdapter
