"""Layer namespaces ("operations") the transformer is built from.

The model never creates a weight-holding layer directly: it asks an ``operations`` namespace for
``Linear``, ``Conv3d``, ``LayerNorm`` and ``RMSNorm``. ComfyUI passes its ``comfy.ops`` classes here
(partial loading, fp8, on-the-fly casting); outside ComfyUI these two namespaces do the job.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """Plain torch layers: weights are used in the dtype they are stored in."""

    Linear = nn.Linear
    Conv3d = nn.Conv3d
    LayerNorm = nn.LayerNorm
    RMSNorm = nn.RMSNorm


def _cast(param, like):
    return None if param is None else param.to(device=like.device, dtype=like.dtype)


class CastOps:
    """Layers whose weights may be stored in another dtype (fp8, bf16) than the activations.

    Each forward casts a temporary copy of the weight to the input's dtype and device, so fp8 storage
    with bf16 compute works and the stored weights are never modified.
    """

    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))

    class Conv3d(nn.Conv3d):
        def forward(self, x):
            return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)

    class RMSNorm(nn.RMSNorm):
        def forward(self, x):
            return F.rms_norm(x, self.normalized_shape, _cast(self.weight, x), self.eps)


def is_fp8(dtype):
    return dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
