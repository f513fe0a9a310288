"""The packed FramePack transformer (HunyuanVideo DiT with 1x/2x/4x history embedders).

State-dict keys are exactly those of the released checkpoints (diffusers-style names). Every
weight-holding leaf comes from the injected ``operations`` namespace (see ops.py), so ComfyUI can pass
its own layer classes; forward only casts activations, never weights.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention, check_backend
from .ops import TorchOps
from .packing import CLEAN_EMBEDDERS


# transformer_options key of the per-block hook (see FramePackTransformer._blocks)
BLOCK_HOOK = "framepack_block_hook"


@dataclass(frozen=True)
class FramePackConfig:
    """Shape of a FramePack transformer; the defaults are the released 13B model."""

    in_channels: int = 16
    out_channels: int = 16
    num_heads: int = 24
    head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 4096
    pooled_dim: int = 768
    image_dim: int = 1152
    rope_theta: float = 256.0
    rope_axes: tuple = (16, 56, 56)
    guidance_embeds: bool = True
    clean_kernels: tuple = (1, 2, 4)

    @property
    def inner_dim(self):
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self):
        return int(self.inner_dim * self.mlp_ratio)


# ---------------------------------------------------------------------------------------------
# small building blocks


def timestep_sinusoid(t, dim=256):
    """Sinusoidal embedding, cos half first (flip_sin_to_cos), max period 10000, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def layer_norm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim, dim, ops, **kw):
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, dim, **kw)
        self.linear_2 = ops.Linear(dim, dim, **kw)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Projection(nn.Module):
    """Holds a linear layer under the name ``proj`` (the checkpoints' ``ff.net.0.proj``)."""

    def __init__(self, in_dim, out_dim, ops, **kw):
        super().__init__()
        self.proj = ops.Linear(in_dim, out_dim, **kw)


class FeedForward(nn.Module):
    """net.0.proj -> activation -> net.2, keyed like the checkpoints."""

    def __init__(self, dim, hidden, activation, ops, **kw):
        super().__init__()
        self.net = nn.ModuleList([Projection(dim, hidden, ops, **kw), nn.Identity(), ops.Linear(hidden, dim, **kw)])
        self.activation = activation

    def forward(self, x):
        return self.net[2](self.activation(self.net[0].proj(x)))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class Modulation(nn.Module):
    """``linear(silu(temb))`` split into ``n`` per-sample vectors (shift/scale/gate), shaped (B, 1, D)."""

    def __init__(self, dim, n, ops, **kw):
        super().__init__()
        self.linear = ops.Linear(dim, n * dim, **kw)
        self.n = n

    def forward(self, temb):
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(self.n, dim=-1)


def modulate(x, shift, scale):
    return layer_norm(x) * (1 + scale) + shift


def apply_rope(x, cos, sin):
    """Rotate interleaved channel pairs of x (B, L, H, D) by the angles in cos/sin (B|1, L, D), in fp32."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(x.dtype)


def heads(x, n):
    return x.unflatten(-1, (n, -1))


# ---------------------------------------------------------------------------------------------
# text token refiner


class RefinerAttention(nn.Module):
    def __init__(self, dim, num_heads, ops, **kw):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (ops.Linear(dim, dim, **kw) for _ in range(3))
        self.to_out = nn.ModuleList([ops.Linear(dim, dim, **kw)])

    def forward(self, x, lengths, backend, options):
        q, k, v = (heads(f(x), self.num_heads) for f in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](attention(q, k, v, lengths, backend, options).flatten(-2))


class RefinerBlock(nn.Module):
    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = ops.LayerNorm(dim, eps=1e-6, **kw)
        self.attn = RefinerAttention(dim, cfg.num_heads, ops, **kw)
        self.norm2 = ops.LayerNorm(dim, eps=1e-6, **kw)
        self.ff = FeedForward(dim, cfg.mlp_dim, F.silu, ops, **kw)
        self.norm_out = Modulation(dim, 2, ops, **kw)

    def forward(self, x, temb, lengths, backend, options):
        gate_attn, gate_ff = self.norm_out(temb)
        x = x + self.attn(self.norm1(x), lengths, backend, options) * gate_attn
        return x + self.ff(self.norm2(x)) * gate_ff


class TimestepTextEmbedding(nn.Module):
    def __init__(self, dim, pooled_dim, ops, **kw):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim, ops, **kw)
        self.text_embedder = MLPEmbedder(pooled_dim, dim, ops, **kw)


class TokenRefiner(nn.Module):
    """Refines the LLM hidden states with a few self-attention blocks conditioned on the timestep."""

    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim = cfg.inner_dim
        self.time_text_embed = TimestepTextEmbedding(dim, cfg.text_dim, ops, **kw)
        self.proj_in = ops.Linear(cfg.text_dim, dim, **kw)
        self.token_refiner = nn.Module()
        self.token_refiner.refiner_blocks = nn.ModuleList(RefinerBlock(cfg, ops, **kw) for _ in range(cfg.num_refiner_layers))

    def forward(self, text, timestep, mask, lengths, backend, options):
        maskf = mask.float().unsqueeze(-1)
        pooled = ((text * maskf).sum(1) / maskf.sum(1)).to(text.dtype)
        embed = self.time_text_embed
        temb = embed.timestep_embedder(timestep_sinusoid(timestep).to(text.dtype)) + embed.text_embedder(pooled)
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, lengths, backend, options)
        return x


# ---------------------------------------------------------------------------------------------
# dual-stream and single-stream blocks


def project_qkv(x, num_heads, to_q, to_k, to_v, norm_q, norm_k):
    """Per-head queries, keys and values, with RMS-normalised queries and keys."""
    q, k, v = heads(to_q(x), num_heads), heads(to_k(x), num_heads), heads(to_v(x), num_heads)
    return norm_q(q), norm_k(k), v


class DualAttention(nn.Module):
    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim, self.num_heads = cfg.inner_dim, cfg.num_heads
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            setattr(self, name, ops.Linear(dim, dim, **kw))
        self.to_out = nn.ModuleList([ops.Linear(dim, dim, **kw)])
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, ops.RMSNorm(cfg.head_dim, eps=1e-6, **kw))

    def forward(self, x, ctx, rope, lengths, backend, options):
        q, k, v = project_qkv(x, self.num_heads, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cq, ck, cv = project_qkv(ctx, self.num_heads, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
        out = attention(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1), lengths, backend,
                        options).flatten(-2)
        n = x.shape[1]
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class DualStreamBlock(nn.Module):
    """Image and text tokens with separate weights, joined in one attention."""

    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = Modulation(dim, 6, ops, **kw)
        self.norm1_context = Modulation(dim, 6, ops, **kw)
        self.attn = DualAttention(cfg, ops, **kw)
        self.ff = FeedForward(dim, cfg.mlp_dim, gelu_tanh, ops, **kw)
        self.ff_context = FeedForward(dim, cfg.mlp_dim, gelu_tanh, ops, **kw)

    def forward(self, x, ctx, temb, rope, lengths, backend, options=None):
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.norm1(temb)
        c_shift, c_scale, c_gate, c_ff_shift, c_ff_scale, c_ff_gate = self.norm1_context(temb)
        attn_x, attn_ctx = self.attn(modulate(x, shift, scale), modulate(ctx, c_shift, c_scale), rope, lengths, backend,
                                     options)
        x = x + attn_x * gate
        ctx = ctx + attn_ctx * c_gate
        x = x + ff_gate * self.ff(modulate(x, ff_shift, ff_scale))
        ctx = ctx + c_ff_gate * self.ff_context(modulate(ctx, c_ff_shift, c_ff_scale))
        return x, ctx


class SingleAttention(nn.Module):
    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim, self.num_heads = cfg.inner_dim, cfg.num_heads
        self.to_q, self.to_k, self.to_v = (ops.Linear(dim, dim, **kw) for _ in range(3))
        self.norm_q = ops.RMSNorm(cfg.head_dim, eps=1e-6, **kw)
        self.norm_k = ops.RMSNorm(cfg.head_dim, eps=1e-6, **kw)

    def forward(self, x, rope, lengths, backend, options):
        q, k, v = project_qkv(x, self.num_heads, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        n = rope[0].shape[1]  # RoPE covers (and rotates) the image tokens, which come first
        q = torch.cat([apply_rope(q[:, :n], *rope), q[:, n:]], 1)
        k = torch.cat([apply_rope(k[:, :n], *rope), k[:, n:]], 1)
        return attention(q, k, v, lengths, backend, options).flatten(-2)


class SingleStreamBlock(nn.Module):
    """Image and text tokens as one sequence (image first), shared weights, attention and MLP in parallel."""

    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim = cfg.inner_dim
        self.norm = Modulation(dim, 3, ops, **kw)
        self.attn = SingleAttention(cfg, ops, **kw)
        self.proj_mlp = ops.Linear(dim, cfg.mlp_dim, **kw)
        self.proj_out = ops.Linear(dim + cfg.mlp_dim, dim, **kw)

    def forward(self, tokens, temb, rope, lengths, backend, options=None):
        shift, scale, gate = self.norm(temb)
        normed = modulate(tokens, shift, scale)
        mixed = torch.cat([self.attn(normed, rope, lengths, backend, options), gelu_tanh(self.proj_mlp(normed))], -1)
        return tokens + gate * self.proj_out(mixed)


# ---------------------------------------------------------------------------------------------
# RoPE over (frame, row, column)


def rope_axis(dim, positions, theta):
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)[: dim // 2] / dim)
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # pairs share one angle
    return angles.cos(), angles.sin()


def rope_grid(frame_indices, height, width, axes, theta):
    """cos/sin tables shaped (D, T, H, W) for one sample's frame indices on an H x W token grid."""
    t, y, x = torch.meshgrid(
        frame_indices.float(),
        torch.arange(height, dtype=torch.float32, device=frame_indices.device),
        torch.arange(width, dtype=torch.float32, device=frame_indices.device),
        indexing="ij",
    )
    parts = [rope_axis(d, p.reshape(-1), theta) for d, p in zip(axes, (t, y, x))]
    cos = torch.cat([c for c, _ in parts], -1)
    sin = torch.cat([s for _, s in parts], -1)
    return rearrange(torch.cat([cos, sin], -1), "(t h w) d -> d t h w", t=t.shape[0], h=height)


def pad_replicate(x, multiple):
    """Replicate-pad the last three dims of x up to multiples of ``multiple`` (t, h, w)."""
    pads = []
    for size, m in zip(reversed(x.shape[-3:]), reversed(multiple)):
        pads += [0, (m - size % m) % m]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="replicate")


# ---------------------------------------------------------------------------------------------
# the transformer


class ImageProjection(nn.Module):
    def __init__(self, image_dim, dim, ops, **kw):
        super().__init__()
        self.up = ops.Linear(image_dim, dim * 3, **kw)
        self.down = ops.Linear(dim * 3, dim, **kw)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class ConditionEmbedding(nn.Module):
    def __init__(self, cfg, ops, **kw):
        super().__init__()
        dim = cfg.inner_dim
        self.timestep_embedder = MLPEmbedder(256, dim, ops, **kw)
        self.text_embedder = MLPEmbedder(cfg.pooled_dim, dim, ops, **kw)
        self.guidance_embedder = MLPEmbedder(256, dim, ops, **kw) if cfg.guidance_embeds else None

    def forward(self, timestep, pooled, guidance):
        temb = self.timestep_embedder(timestep_sinusoid(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("This FramePack model embeds distilled guidance: pass `guidance` (scale x 1000).")
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).to(pooled.dtype))
        return temb + self.text_embedder(pooled)


class FramePackTransformer(nn.Module):
    """HunyuanVideo transformer with FramePack's packed clean-latent context.

    ``operations``: namespace of layer classes (``ops.TorchOps`` by default, ComfyUI's comfy.ops in
    ComfyUI). ``compute_dtype``: dtype activations run in (None: the dtype of the noisy latents).
    """

    def __init__(self, config=FramePackConfig(), operations=TorchOps, attention_backend="sdpa",
                 compute_dtype=None, fp32_output=True, device=None, dtype=None):
        super().__init__()
        cfg = self.config = config
        ops, kw = operations, dict(device=device, dtype=dtype)
        dim = cfg.inner_dim
        self.attention_backend = check_backend(attention_backend)
        self.compute_dtype = compute_dtype
        self.fp32_output = fp32_output  # the original runs the last projection in fp32

        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv3d(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.clean_x_embedder = nn.Module()
        for k in cfg.clean_kernels:
            name, kernel = CLEAN_EMBEDDERS[k]
            setattr(self.clean_x_embedder, name, ops.Conv3d(cfg.in_channels, dim, kernel, stride=kernel, **kw))
        self.context_embedder = TokenRefiner(cfg, ops, **kw)
        self.image_projection = ImageProjection(cfg.image_dim, dim, ops, **kw)
        self.time_text_embed = ConditionEmbedding(cfg, ops, **kw)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(cfg, ops, **kw) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(cfg, ops, **kw) for _ in range(cfg.num_single_layers))
        self.norm_out = Modulation(dim, 2, ops, **kw)
        self.proj_out = ops.Linear(dim, math.prod(cfg.patch_size) * cfg.out_channels, **kw)

    # -- input packing ------------------------------------------------------------------------

    def _rope(self, indices, batch, height, width, device, pool=1):
        """cos/sin (B|1, L, D) for frame indices (T,) or (B, T), average-pooled for 2x/4x history."""
        rows = indices.to(device).reshape(-1, indices.shape[-1])
        if rows.shape[0] not in (1, batch):
            raise ValueError(f"Frame indices have {rows.shape[0]} rows for a batch of {batch}.")
        tables = []
        for row in rows:
            table = rope_grid(row, height, width, self.config.rope_axes, self.config.rope_theta)
            if pool > 1:
                table = F.avg_pool3d(pad_replicate(table, (pool,) * 3), pool)
            tables.append(rearrange(table, "d t h w -> (t h w) d"))
        cos, sin = torch.stack(tables).chunk(2, dim=-1)
        return cos, sin

    def _embed_clean(self, kernel, latents, indices, batch, height, width, dtype, device):
        name, size = CLEAN_EMBEDDERS[kernel]
        if not hasattr(self.clean_x_embedder, name):
            raise ValueError(f"These weights have no {kernel}x clean-latent embedder (clean_x_embedder.{name}); "
                             f"use a packing schedule with no {kernel}x history.")
        if indices is None or latents.shape[2] != indices.shape[-1]:
            raise ValueError(f"{kernel}x context: {latents.shape[2]} latent frames need as many frame indices.")
        tokens = getattr(self.clean_x_embedder, name)(pad_replicate(latents.to(device, dtype), size))
        return tokens.flatten(2).transpose(1, 2), self._rope(indices, batch, height, width, device, pool=kernel)

    def pack_tokens(self, x, indices, context, dtype):
        """Embed noisy and clean latents into one sequence ordered [4x, 2x, 1x, noisy], with its RoPE."""
        batch, _, frames, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        grid_h, grid_w = h // ph, w // pw
        if indices is None:
            indices = torch.arange(frames // pt, device=x.device)
        tokens = [self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)]
        ropes = [self._rope(indices, batch, grid_h, grid_w, x.device)]
        for kernel, latents, idx in context:
            if latents is not None:
                if latents.shape[-2:] != x.shape[-2:]:
                    raise ValueError(f"{kernel}x context latents are {tuple(latents.shape[-2:])} but the noisy "
                                     f"latents are {tuple(x.shape[-2:])}; all must share one latent size.")
                t, r = self._embed_clean(kernel, latents, idx, batch, grid_h, grid_w, dtype, x.device)
                tokens.insert(0, t)
                ropes.insert(0, r)
        cos = torch.cat([c for c, _ in ropes], 1)
        sin = torch.cat([s for _, s in ropes], 1)
        return torch.cat(tokens, 1), (cos, sin)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                image_embeddings, guidance=None, latent_indices=None,
                clean_latents=None, clean_latent_indices=None,
                clean_latents_2x=None, clean_latent_2x_indices=None,
                clean_latents_4x=None, clean_latent_4x_indices=None, cache=None, transformer_options=None):
        """Velocity for the noisy latents ``hidden_states`` (B, C, T, H, W).

        timestep, guidance: (B,) already scaled by 1000. Text: hidden states (B, N, text_dim) with a
        prefix mask (B, N) (None: all valid) and pooled vector (B, pooled_dim). image_embeddings:
        SigLIP last_hidden_state (B, 729, image_dim). Each clean-latent group is optional.
        transformer_options: a host's per-call options, with ComfyUI's conventions: an
        ``optimized_attention_override`` replaces every attention kernel,
        ``patches_replace["dit"][("double_block", i)]`` / ``[("single_block", i)]`` replace a block
        and ``options[BLOCK_HOOK]`` sees each block before it runs (see ``_blocks``). None or {}: the
        plain forward.
        cache: a step-cache state (``cache.TeaCache(...).start(steps)``) for batch 1, or a list of one state
        per sample; samples whose state says "skip" reuse their cached residual, the others compute.
        """
        options = transformer_options or {}
        dtype = self.compute_dtype or hidden_states.dtype
        device = hidden_states.device  # every other input follows the latents' device
        batch, _, frames, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        if h % ph or w % pw or frames % pt:
            raise ValueError(f"Latent size {(frames, h, w)} is not divisible by the patch size {(pt, ph, pw)}.")
        context = [(1, clean_latents, clean_latent_indices), (2, clean_latents_2x, clean_latent_2x_indices),
                   (4, clean_latents_4x, clean_latent_4x_indices)]
        x, rope = self.pack_tokens(hidden_states, latent_indices, context, dtype)
        num_noisy = (frames // pt) * (h // ph) * (w // pw)

        timestep = timestep.to(device).reshape(-1).expand(batch)
        text = encoder_hidden_states.to(device, dtype)
        mask = encoder_attention_mask
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool)
        text_lengths = _prefix_lengths(mask)  # read where the mask is (a CPU mask needs no device sync)
        mask = mask.to(device)
        text = text[:, : max(text_lengths)]  # padding past the longest prompt is never attended to
        mask = mask[:, : text.shape[1]]
        same = len(set(text_lengths)) == 1
        ctx = self.context_embedder(text, timestep, mask, None if same else text_lengths, self.attention_backend, options)
        temb = self.time_text_embed(timestep, pooled_projections.to(device, dtype),
                                    None if guidance is None else guidance.to(device).reshape(-1).expand(batch))

        if image_embeddings is None:
            raise ValueError("FramePack needs image embeddings: pass the SigLIP (CLIP vision) last_hidden_state "
                             "of the start image as `image_embeddings`.")
        image = self.image_projection(image_embeddings.to(device, dtype))
        ctx = torch.cat([image, ctx], 1)  # image tokens first, so text padding stays at the end
        lengths = None if same else [x.shape[1] + image.shape[1] + n for n in text_lengths]

        x = self._run_blocks(x, ctx, temb, rope, lengths, cache, options)

        x = x[:, -num_noisy:]
        shift, scale = self.norm_out(temb)[::-1]  # stored as (scale, shift)
        x = modulate(x, shift, scale)
        x = self.proj_out(x.float() if self.fp32_output else x)
        return rearrange(x, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=frames // pt, h=h // ph, w=w // pw, pt=pt, ph=ph, pw=pw)

    def _blocks(self, x, ctx, temb, rope, lengths, options):
        """The dual- then single-stream blocks; returns the image tokens.

        A block listed in ``options["patches_replace"]["dit"]`` under ``("double_block", i)`` or
        ``("single_block", i)`` is replaced by that function, called as ComfyUI's DiTs call it:
        ``replace(args, {"original_block": run})`` with args {"img", "txt" (dual only), "vec": the
        conditioning vector, "pe": RoPE (cos, sin), "attention_mask": per-sample text lengths or None,
        "transformer_options"}; ``run(args)`` computes the block. It returns {"img", "txt"} (dual) or
        {"img"} (single, where "img" is the joined image + text sequence).
        Each block's transformer_options also say where it is ("block_type" "double" / "single",
        "block_index", "total_blocks"), as newer ComfyUI DiTs set them for patches and attention overrides.
        ``options[BLOCK_HOOK]``, when set, is called once with every block in the order they run and may
        return a function, which is then called with each block just before it runs (replaced or not)
        and with None after the last: how a host streams a block's weights in ahead of its compute.
        """
        backend = self.attention_backend
        replace = options.get("patches_replace", {}).get("dit", {})
        total = len(self.transformer_blocks) + len(self.single_transformer_blocks)
        hook = options.get(BLOCK_HOOK)
        before_block = hook([*self.transformer_blocks, *self.single_transformer_blocks]) if hook else None

        def where(kind, i):
            block_options = {**options, "block_type": kind, "block_index": i, "total_blocks": total}
            return block_options, {"vec": temb, "pe": rope, "attention_mask": lengths,
                                   "transformer_options": block_options}

        for i, block in enumerate(self.transformer_blocks):
            if before_block:
                before_block(block)
            block_options, common = where("double", i)
            if ("double_block", i) in replace:
                def run(args, block=block):
                    img, txt = block(args["img"], args["txt"], args["vec"], args["pe"], args["attention_mask"], backend,
                                     args["transformer_options"])
                    return {"img": img, "txt": txt}

                out = replace[("double_block", i)]({"img": x, "txt": ctx, **common}, {"original_block": run})
                x, ctx = out["img"], out["txt"]
            else:
                x, ctx = block(x, ctx, temb, rope, lengths, backend, block_options)
        n = x.shape[1]
        tokens = torch.cat([x, ctx], 1)
        for i, block in enumerate(self.single_transformer_blocks):
            if before_block:
                before_block(block)
            block_options, common = where("single", i)
            if ("single_block", i) in replace:
                def run(args, block=block):
                    return {"img": block(args["img"], args["vec"], args["pe"], args["attention_mask"], backend,
                                         args["transformer_options"])}

                tokens = replace[("single_block", i)]({"img": tokens, **common}, {"original_block": run})["img"]
            else:
                tokens = block(tokens, temb, rope, lengths, backend, block_options)
        if before_block:
            before_block(None)
        return tokens[:, :n]

    def _run_blocks(self, x, ctx, temb, rope, lengths, cache, options):
        """The blocks (``_blocks``), skipped per sample where that sample's cache state says so."""
        if cache is None:
            return self._blocks(x, ctx, temb, rope, lengths, options)
        states = list(cache) if isinstance(cache, (list, tuple)) else [cache]
        if len(states) != x.shape[0]:
            raise ValueError(f"{len(states)} cache states for a batch of {x.shape[0]}: pass one per sample.")
        shift, scale = self.transformer_blocks[0].norm1(temb)[:2]
        modulated = modulate(x, shift, scale)
        skip = [state.can_skip(modulated[i : i + 1]) for i, state in enumerate(states)]
        run = [i for i, s in enumerate(skip) if not s]
        out = None
        if run:  # only the samples that compute go through the blocks (all of them: the tensors as they are)
            pick = slice(None) if len(run) == len(states) else torch.tensor(run, device=x.device)
            cos, sin = (t if t.shape[0] == 1 else t[pick] for t in rope)
            sub_lengths = None if lengths is None else [lengths[i] for i in run]
            out = self._blocks(x[pick], ctx[pick], temb[pick], (cos, sin), sub_lengths, options)
            for j, i in enumerate(run):
                states[i].store(out[j : j + 1] - x[i : i + 1])
            if len(run) == len(states):
                return out
        rows = {i: out[j : j + 1] for j, i in enumerate(run)}
        return torch.cat([rows[i] if i in rows else x[i : i + 1] + states[i].residual for i in range(len(states))])


def _prefix_lengths(mask):
    """Valid lengths of a (B, N) prefix mask; any other mask shape is an error, never silently wrong."""
    mask = mask.bool()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("The text attention mask must mark a prefix of valid tokens (padding at the end only).")
    if (lengths == 0).any():
        raise ValueError("A text prompt has no valid tokens (its attention mask is all zero).")
    return lengths.tolist()


# a 10% margin over the fitted formula: bench/memory.py measures estimate / peak = 1.10 at the 640 and 960
# buckets, bf16 and fp32, batch 1 and 2
MEMORY_MARGIN = 1.10


def section_memory_bytes(config, tokens, dtype=torch.bfloat16, text_tokens=512 + 729, batch=1):
    """Peak activation memory of one transformer call over ``tokens`` latent tokens (``batch`` samples).

    Measured (bench/memory.py), the peak sits at a single-stream block's concat of attention and MLP
    output and does not depend on depth. Alive then, per token: the concat (D + M), the GELU output (M),
    the attention output, the block's input tokens and their modulated copy (3 D), and the residual
    stream twice (the packed input and the current one, 2 D), in the compute dtype; plus RoPE's fp32
    cos/sin tables for the latent tokens. Attention kernels' workspace (the fp32 log-sum-exp of SDPA's
    flash/efficient kernels and flash_attn, SageAttention's int8 q/k, the per-sample output buffer of
    masked batches) lives while at most 7 D per token are alive, so no backend moves the peak.
    """
    n = tokens + text_tokens
    width, mlp = config.inner_dim, config.mlp_dim
    concat_peak = n * torch.empty((), dtype=dtype).element_size() * (6 * width + 2 * mlp)
    rope_tables = 2 * tokens * config.head_dim * 4
    return int(MEMORY_MARGIN * batch * (concat_peak + rope_tables))
