"""Attention backends: torch SDPA, SageAttention, FlashAttention, xFormers, and ``auto``.

Every backend takes q, k, v shaped (batch, tokens, heads, head_dim). Padding only ever sits at the end
of a sequence (text padding), so a batch is described by each sample's valid prefix length. SDPA masks
natively; kernels without masks run each sample alone on its valid prefix (the padded rows are never
read by anything downstream, so they are left zero).
"""

import importlib.util

import torch
import torch.nn.functional as F

# backend name -> the pip package that provides it
PACKAGES = {"sageattention": "sageattention", "flash_attn": "flash-attn", "xformers": "xformers"}
BACKENDS = ("auto", "sdpa", *PACKAGES)


def _sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD")


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _xformers(q, k, v):
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)


_KERNELS = {"sdpa": _sdpa, "sageattention": _sage, "flash_attn": _flash, "xformers": _xformers}


def installed(name):
    return name == "sdpa" or importlib.util.find_spec(name) is not None


def check_backend(name):
    """Fail early, with the fix in the message, for an unknown or uninstalled backend."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name != "auto" and not installed(name):
        raise ImportError(
            f"Attention backend {name!r} needs the package {PACKAGES[name]!r}, which is not installed. "
            f"Install it (pip install {PACKAGES[name]}) or choose 'sdpa' or 'auto'."
        )
    return name


def _auto(q):
    # Fused kernels only run on CUDA in half precision; everything else (CPU, fp32) uses SDPA.
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        for name in ("sageattention", "flash_attn", "xformers"):
            if installed(name):
                return name
    return "sdpa"


def attention(q, k, v, lengths=None, backend="sdpa", transformer_options=None):
    """Scaled dot-product attention over (B, L, H, D) tensors.

    ``lengths``: None when every token is valid, else a list of per-sample valid prefix lengths.
    ``transformer_options``: a host's per-call options; an ``optimized_attention_override`` in it
    replaces the kernel (see ``_overridden``).
    """
    override = (transformer_options or {}).get("optimized_attention_override")
    if override is not None:
        return _overridden(override, q, k, v, lengths, backend, transformer_options)
    name = _auto(q) if backend == "auto" else backend
    if lengths is None:
        return _KERNELS[name](q, k, v)
    if name == "sdpa":
        return _sdpa(q, k, v, mask=_keep_mask(lengths, q))
    return per_sample(_KERNELS[name], q, k, v, lengths)


def _keep_mask(lengths, q):
    """Boolean (B, 1, 1, L) mask of the valid prefix of each sample's keys."""
    keep = torch.arange(q.shape[1], device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    return keep[:, None, None, :]


def per_sample(kernel, q, k, v, lengths):
    """Masked attention for kernels without masks: each sample alone on its valid prefix."""
    out = torch.zeros_like(q)
    for i, n in enumerate(lengths):
        out[i : i + 1, :n] = kernel(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
    return out


def _overridden(override, q, k, v, lengths, backend, transformer_options):
    """Attention through a host's override, with ComfyUI's calling convention.

    ComfyUI calls ``override(func, q, k, v, heads, mask=..., skip_reshape=True,
    transformer_options=...)`` with q/k/v shaped (B, H, L, D) and expects (B, L, H * D) back; ``func``
    is the attention the override may fall back to, here this module's own kernels. The mask is a
    boolean keep-mask (B, 1, 1, L), or None when every token is valid.
    """
    def own_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        if skip_reshape:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        out = attention(q, k, v, lengths, backend)
        return out.transpose(1, 2) if skip_output_reshape else out.flatten(-2)

    mask = None if lengths is None else _keep_mask(lengths, q)
    heads = q.shape[2]
    out = override(own_attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), heads, mask=mask,
                   skip_reshape=True, transformer_options=transformer_options)
    return out.unflatten(-1, (heads, -1))
