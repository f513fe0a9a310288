"""diffusers' FramePack transformer as the reference oracle, and helpers to compare with it."""

import torch

from framepack_core.synthetic import diffusers_config

# our keyword -> diffusers' HunyuanVideoFramepackTransformer3DModel keyword
DIFFUSERS_KWARGS = {
    "image_embeddings": "image_embeds",
    "latent_indices": "indices_latents",
    "clean_latents": "latents_clean",
    "clean_latent_indices": "indices_latents_clean",
    "clean_latents_2x": "latents_history_2x",
    "clean_latent_2x_indices": "indices_latents_history_2x",
    "clean_latents_4x": "latents_history_4x",
    "clean_latent_4x_indices": "indices_latents_history_4x",
}


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def diffusers_reference(config, state):
    """diffusers' FramePack transformer with the given weights, fp32, eval mode."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    kwargs = {k: v for k, v in diffusers_config(config).items() if k != "_class_name"}
    model = HunyuanVideoFramepackTransformer3DModel(**kwargs)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def run_reference(model, kwargs):
    """Run diffusers' forward on our keyword layout.

    diffusers only defines the 2x/4x RoPE tables when those inputs are given, so a call without history
    (1x clean latents only) fails inside its forward. For that layout we run the same diffusers modules
    in the same order with the missing tables set to None, which is what its forward intends.
    """
    kw = {DIFFUSERS_KWARGS.get(k, k): v for k, v in kwargs.items()}
    if kw.get("latents_history_2x") is not None and kw.get("latents_history_4x") is not None:
        return model(**kw, return_dict=False)[0]
    return _reference_without_history(model, **kw)


def _reference_without_history(m, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                               pooled_projections, image_embeds, indices_latents, guidance, latents_clean,
                               indices_latents_clean, **_):
    batch, _, frames, height, width = hidden_states.shape
    p = m.config.patch_size
    x = m.x_embedder(hidden_states)
    rope = m.rope(frame_indices=indices_latents, height=height, width=width, device=x.device)
    clean, _, _ = m.clean_x_embedder(latents_clean, None, None)
    rope_clean = m.rope(frame_indices=indices_latents_clean, height=height, width=width, device=x.device)
    x, rope = m._pack_history_states(x, clean, None, None, rope, rope_clean, None, None, height // p, width // p)
    temb, _ = m.time_text_embed(timestep, pooled_projections, guidance)
    ctx = m.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    ctx = torch.cat([m.image_projection(image_embeds), ctx], 1)
    mask = torch.cat([encoder_attention_mask.new_ones((batch, image_embeds.shape[1])), encoder_attention_mask], 1)
    assert batch == 1, "the history-free reference path is written for batch 1"
    ctx = ctx[:, : int(mask.sum())]
    for block in list(m.transformer_blocks) + list(m.single_transformer_blocks):
        x, ctx = block(x, ctx, temb, None, rope)
    x = m.proj_out(m.norm_out(x[:, -(frames * (height // p) * (width // p)):], temb))
    x = x.reshape(batch, frames, height // p, width // p, -1, 1, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
