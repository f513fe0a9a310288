"""ComfyUI's quantized checkpoint layouts, recognised from a file's tensor names and metadata.

The engine does no dequantizing of its own: a quantized checkpoint is loaded through layers that read
these tensors (in ComfyUI, comfy.ops' scaled-fp8 or mixed-precision layers, picked by the node layer).
This module says which layout a file uses, which tensors belong to it, and keeps them as stored.

Layouts (tensor names relative to the transformer):
- scaled fp8: a ``scaled_fp8`` marker tensor (its dtype is the fp8 type), fp8 ``<layer>.weight`` with an
  fp32 ``<layer>.scale_weight`` (weight = stored * scale) and optionally ``<layer>.scale_input``.
- comfy_quant: ``<layer>.comfy_quant`` (the layer's JSON config as uint8 bytes, e.g.
  {"format": "float8_e4m3fn"}) or the same configs in the safetensors metadata
  ``_quantization_metadata`` ({"layers": {layer: config}}), with ``<layer>.weight_scale`` and optionally
  ``<layer>.input_scale`` (NVFP4 adds ``weight_scale_2``).
"""

import json
from dataclasses import dataclass
from typing import Optional

import torch

MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
SCALED_FP8_SUFFIXES = (".scale_weight", ".scale_input")
COMFY_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")
# scaled-fp8 layers hold these even where the file has none (an unscaled layer); 1 means "no scale"
IDENTITY_SCALES = ("scale_weight", "scale_input")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint is quantized: its layout, the quantized layers, and what the host layers need."""

    format: str  # "scaled_fp8" or "comfy_quant"
    layers: tuple  # names of the quantized layers (e.g. "transformer_blocks.0.attn.to_q")
    dtype: Optional[torch.dtype] = None  # scaled fp8: the fp8 type the marker names
    input_scales: bool = False  # some layers carry activation scales
    configs: tuple = ()  # comfy_quant configs given in the metadata: ((layer, config), ...)

    def is_extra(self, key):
        """A tensor of the quantized layout rather than of the model (marker, scales, configs)."""
        return key.rpartition(".")[2] == MARKER or key.endswith(SCALED_FP8_SUFFIXES + COMFY_QUANT_SUFFIXES)

    def keeps_dtype(self, key):
        """Tensors that must reach the layers exactly as stored."""
        return self.is_extra(key) or (key.endswith(".weight") and key[: -len(".weight")] in self.layers)

    def metadata_tensors(self):
        """The metadata configs as per-layer ``<layer>.comfy_quant`` tensors, the form layers read."""
        return {f"{layer}.comfy_quant": json_tensor(config) for layer, config in self.configs}


def detect(dtypes, metadata, prefix=""):
    """The file's Quantization, or None for a plain checkpoint.

    dtypes: {key: safetensors dtype name} of every tensor; metadata: the safetensors metadata (or None);
    prefix: the transformer's key prefix in this file, stripped from the layer names returned.
    """
    keys = [k[len(prefix):] for k in dtypes if k.startswith(prefix)]
    configs = _metadata_configs(metadata, prefix)
    if MARKER in keys:
        marker = dtypes[prefix + MARKER]
        return Quantization("scaled_fp8", _layers(keys, ".scale_weight"),
                            dtype=torch.float8_e5m2 if marker == "F8_E5M2" else torch.float8_e4m3fn,
                            input_scales=any(k.endswith(".scale_input") for k in keys))
    layers = _layers(keys, ".comfy_quant") + tuple(layer for layer, _ in configs)
    if layers:
        return Quantization("comfy_quant", tuple(sorted(set(layers))),
                            input_scales=any(k.endswith(".input_scale") for k in keys), configs=configs)
    scaled = [k for k in keys if k.endswith(SCALED_FP8_SUFFIXES + (".weight_scale",))]
    if scaled:
        raise ValueError(f"The checkpoint has scale tensors ({scaled[0]}, ...) but no '{MARKER}' marker and no "
                         "comfy_quant layer configs, so how its weights are scaled is unknown. Re-export it with "
                         "ComfyUI's layout or use an unquantized checkpoint.")
    return None


def json_tensor(value):
    return torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8)


def _layers(keys, suffix):
    return tuple(k[: -len(suffix)] for k in keys if k.endswith(suffix))


def _metadata_configs(metadata, prefix):
    if not metadata or METADATA_KEY not in metadata:
        return ()
    try:
        layers = json.loads(metadata[METADATA_KEY])["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"The checkpoint's {METADATA_KEY} metadata is not the JSON {{\"layers\": {{...}}}} "
                         f"ComfyUI writes ({e}); the file is damaged or from an unknown tool.") from e
    return tuple((name[len(prefix):] if name.startswith(prefix) else name, config)
                 for name, config in sorted(layers.items()))
