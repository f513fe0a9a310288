"""The base directory the real-server tests run ComfyUI in (``main.py --base-directory``).

custom_nodes/ holds this pack (a link to the checkout) and the test-only encoder stand-ins
(``standin_encoders/``). models/ holds tiny stand-ins loaded by the real loaders: FramePack checkpoints with the
real outer widths (16 latent channels, text 4096, pooled 768, SigLIP 1152) for FramePack Model Loader, a broken
and a NaN-predicting one, a random-weight HunyuanVideo VAE for ComfyUI's VAELoader, a tiny random LoRA for
FramePack LoRA Loader and, where core has frame interpolation (0.33+), a tiny random RIFE model. input/ holds every
image and video the example workflows load. Text encoders, CLIP vision, upscale, SD 1.5 and ControlNet weights
cannot exist here.
"""

import dataclasses
import shutil
from pathlib import Path

import av
import torch
from safetensors.torch import save_file

from framepack_core.synthetic import TINY
from models import hunyuan_vae_state_dict, rife_state_dict, write_framepack, write_lora
from test_workflows import INPUT_FILES

HERE = Path(__file__).resolve().parent
PACK = HERE.parents[1]
PACK_NAME = "ComfyUI-FramePack"
# The FramePack transformer's real outer widths around a tiny inner model.
REAL_WIDTHS = dataclasses.replace(TINY, text_dim=4096, pooled_dim=768, image_dim=1152)
IMAGE_HW = (24, 40)                   # input images (height, width): landscape, so a swapped axis shows
VIDEO_FRAMES = 13                     # input videos (extension, video-to-video guide): 4 latent frames
BROKEN = "broken_download.safetensors"
NAN_WEIGHT = "one_nan_weight.safetensors"  # a corrupt checkpoint that loads but predicts NaN
LORA = "framepack_lora.safetensors"   # lora.json's LoRA, for these layers, with the checkpoint's key names
LORA_LAYERS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v",
               "single_transformer_blocks.0.attn.to_k")
RIFE = "rife_v4.26.safetensors"       # interpolate_60fps.json's frame interpolation model


def write_image(path, seed):
    from PIL import Image

    pixels = torch.rand(*IMAGE_HW, 3, generator=torch.Generator().manual_seed(seed))
    Image.fromarray((pixels * 255).byte().numpy()).save(path)


def write_video(path, frames):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = *IMAGE_HW, "yuv420p"
        gen = torch.Generator().manual_seed(5)
        for _ in range(frames):
            frame = (torch.rand(*IMAGE_HW, 3, generator=gen) * 255).byte().numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def populate(base):
    """Fill the empty folder ``base`` as above; returns it."""
    import nodes  # ComfyUI's, imported in-process by the comfy fixture

    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / PACK_NAME).symlink_to(PACK, target_is_directory=True)
    shutil.copytree(HERE / "standin_encoders", nodes_dir / "framepack_test_standins")
    models = base / "models"
    for kind in ("diffusion_models", "vae", "loras", "frame_interpolation"):
        (models / kind).mkdir(parents=True)
    with torch.device("cpu"):
        write_framepack(models / "diffusion_models" / "FramePackI2V_HY_bf16.safetensors", seed=0, config=REAL_WIDTHS)
        write_framepack(models / "diffusion_models" / "FramePack_F1_I2V_HY_20250503_bf16.safetensors", seed=1,
                        config=REAL_WIDTHS)
        good = (models / "diffusion_models" / "FramePackI2V_HY_bf16.safetensors").read_bytes()
        (models / "diffusion_models" / BROKEN).write_bytes(good[: len(good) // 2])  # an interrupted download
        state = write_framepack(models / "diffusion_models" / NAN_WEIGHT, seed=0, config=REAL_WIDTHS)
        state["transformer_blocks.0.attn.to_out.0.weight"][1, 2] = float("nan")
        save_file(state, str(models / "diffusion_models" / NAN_WEIGHT))
        vae = {k: v.to(torch.bfloat16) for k, v in hunyuan_vae_state_dict().items()}
        save_file(vae, str(models / "vae" / "hunyuan_video_vae_bf16.safetensors"))
        write_lora(models / "loras" / LORA, {layer: "generic" for layer in LORA_LAYERS})
        if "FrameInterpolationModelLoader" in nodes.NODE_CLASS_MAPPINGS:  # core frame interpolation (0.33+)
            save_file(rife_state_dict(), str(models / "frame_interpolation" / RIFE))
    inputs = base / "input"
    inputs.mkdir()
    for seed, name in enumerate(INPUT_FILES):
        if name.endswith(".mp4"):
            write_video(inputs / name, VIDEO_FRAMES)
        else:
            write_image(inputs / name, seed)
    return base
