"""Single-frame inference node: an image edit (pose, outfit, "a moment later") with FramePack weights."""

import comfy.model_management as mm
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..framepack_core.model import section_memory_bytes
from ..framepack_core.one_frame import Reference, generate_one_frame, one_frame_layout
from ..framepack_core.pipeline import SamplingSettings
from ..framepack_core.sampling import SAMPLERS
from .comfy_compat import combo_input
from .multigpu import one_device
from .sampler import image_embeddings, patched_model_call, prompt_from_conditioning, video_latent


def single_mask(mask, name):
    """One (h, w) mask of a ComfyUI MASK (B, h, w)."""
    if mask is None:
        return None
    if mask.ndim == 3 and mask.shape[0] != 1:
        raise ValueError(f"{name} holds {mask.shape[0]} masks; give one.")
    return mask.reshape(mask.shape[-2:])


class FramePackSingleFrame(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FramePackSingleFrame",
            display_name="FramePack Single Frame",
            category="FramePack",
            description=("Single-frame inference (one-frame / kisekaeichi): samples one frame at a chosen time index "
                         "after the start image, optionally with a reference image at its own index and masks, e.g. "
                         "to change a pose or an outfit. Decode the LATENT with VAEDecode."),
            inputs=[
                io.Model.Input("model", tooltip="From FramePack Model Loader (FramePackI2V_HY; F1 is not made for "
                               "it)."),
                io.Conditioning.Input("positive", tooltip="What the edited image shows (CLIPTextEncode, "
                                      "hunyuan_video)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg is not 1."),
                io.ClipVisionOutput.Input("image_embeds", tooltip="CLIPVisionEncode of the start image (SigLIP)."),
                io.Latent.Input("start_latent", tooltip="VAEEncode of the start image (HunyuanVideo VAE)."),
                io.Int.Input("target_index", default=9, min=0, max=64, tooltip="Time index of the generated frame: "
                             "larger moves further from the start image (9: a section later; kisekaeichi uses 1 to 5 "
                             "with the reference at 10)."),
                io.Boolean.Input("use_post", default=True, tooltip="Pass the zero 'post' frame after the window "
                                 "(off: the documented no_post, about 20% faster, less stable)."),
                io.Boolean.Input("use_2x", default=True, tooltip="Pass the zero 2x context (off: no_2x)."),
                io.Boolean.Input("use_4x", default=True, tooltip="Pass the zero 4x context (off: no_4x)."),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="Sampling steps."),
                io.Int.Input("seed", default=31337, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Float.Input("distilled_guidance", default=10.0, min=0.0, max=32.0, step=0.1,
                               tooltip="Embedded (distilled) guidance scale; 10 is the original's default."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=32.0, step=0.1,
                               tooltip="Real classifier-free guidance; above 1 it also runs the negative prompt."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Sigma shift; 0 derives it from the frame's token count."),
                combo_input("sampler", options=list(SAMPLERS), default="unipc_bh1",
                            tooltip="unipc_bh1 is the original's sampler."),
                io.Mask.Input("start_mask", optional=True, tooltip="Keeps the white regions of the start image's "
                              "latent and zeroes the rest (kisekaeichi: the face and body)."),
                io.Latent.Input("reference_latent", optional=True, tooltip="VAEEncode of a reference image (same size "
                                "as the start), e.g. the outfit to wear."),
                io.Int.Input("reference_index", optional=True, default=10, min=0, max=64, tooltip="Time index of the "
                             "reference image (kisekaeichi: 10, after the target index)."),
                io.Mask.Input("reference_mask", optional=True, tooltip="Keeps the white regions of the reference (e.g. "
                              "the clothes)."),
            ],
            outputs=[io.Latent.Output(tooltip="One latent frame; VAEDecode (HunyuanVideo VAE) turns it into an "
                                      "image.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, image_embeds, start_latent, target_index, use_post, use_2x, use_4x,
                steps, seed, distilled_guidance, cfg, shift, sampler, start_mask=None, reference_latent=None,
                reference_index=10, reference_mask=None):
        unloaded = model.get_model_object("diffusion_model")
        config, fmt = unloaded.config, model.model.latent_format
        scale = fmt.scale_factor
        start = video_latent(start_latent, "start_latent", scale, config, 1)
        if reference_mask is not None and reference_latent is None:
            raise ValueError("reference_mask is connected but reference_latent is not: connect the reference image's "
                             "VAEEncode, or remove the mask.")
        references = [] if reference_latent is None else [Reference(
            video_latent(reference_latent, "reference_latent", scale, config, 1), reference_index,
            single_mask(reference_mask, "reference_mask"))]
        settings = SamplingSettings(steps=steps, seed=seed, distilled_guidance=distilled_guidance, cfg=cfg,
                                    shift=shift or None, sampler=sampler)
        layout = one_frame_layout([r.index for r in references], target_index, post=use_post, use_2x=use_2x,
                                  use_4x=use_4x)
        layout.check_weights(config)  # before loading; generate_one_frame checks it again
        tokens = sum(layout.tokens(*start.shape[-2:]))
        model_call, transformer_options = patched_model_call(model)
        one_device(model, "FramePack Single Frame does not split them")  # a MODEL from MultiGPU CFG Split
        mm.load_models_gpu([model], memory_required=section_memory_bytes(config, tokens, unloaded.compute_dtype))
        transformer = model.get_model_object("diffusion_model")  # read again once loaded, object patches applied
        pbar = comfy.utils.ProgressBar(steps)
        previewer = latent_preview.get_previewer(model.load_device, fmt)

        def on_step(step, total, x0):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            pbar.update_absolute(step + 1, total, preview)

        model.pre_run()
        try:
            frame = generate_one_frame(
                transformer, start, image_embeddings(image_embeds, "start", config),
                prompt_from_conditioning(positive, "positive", config), prompt_from_conditioning(negative, "negative"),
                settings, references=references, start_mask=single_mask(start_mask, "start_mask"),
                target_index=target_index, post=use_post, use_2x=use_2x, use_4x=use_4x, on_step=on_step,
                interrupt=mm.throw_exception_if_processing_interrupted, device=model.load_device,
                model_call=model_call, transformer_options=transformer_options)
        finally:
            model.cleanup()
        return io.NodeOutput({"samples": frame / scale})
