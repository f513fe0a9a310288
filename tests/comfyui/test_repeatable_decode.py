"""The same latents decode to the same frames, also after ComfyUI drops the VAE and loads it again (what
``POST /free`` does between two runs in a server).

Frames written by ComfyUI's own SaveVideo can still differ between two such runs: its libx264 encoder, with
its default options, makes different files from identical frames on CPUs with AVX-512 (x264's macroblock
tree). That is outside this pack; FramePack Decode To Video's writer turns the macroblock tree off
(``framepack_core.decode.X264_REPEATABLE``, tested in tests/test_decode.py).
"""

import gc

import pytest
import torch
from safetensors.torch import save_file

from models import hunyuan_vae_state_dict
from test_end_to_end import run

VAE_FILE = "repeatable_hunyuan_video_vae_bf16.safetensors"
WINDOW, SECTIONS = 3, 2
H, W = 2, 4  # 16 x 32 pixels


@pytest.fixture(scope="module")
def vae_file(comfy):
    state = {k: v.to(torch.bfloat16) for k, v in hunyuan_vae_state_dict().items()}  # as the server test's VAE
    save_file(state, str(comfy.models / "vae" / VAE_FILE))
    return VAE_FILE


def latent():
    samples = torch.randn(1, 16, 1 + SECTIONS * WINDOW, H, W, generator=torch.Generator().manual_seed(3))
    return {"samples": samples, "framepack_mode": "inverted", "framepack_window": WINDOW}


def load_vae_again(comfy, name):
    """As a server after POST /free: every model unloaded, the cached VAE dropped, the file loaded anew."""
    import comfy.model_management as mm  # noqa: F811 (ComfyUI's module, not the fixture)

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return run(comfy.nodes.NODE_CLASS_MAPPINGS["VAELoader"], vae_name=name)[0]


def test_decode_gives_the_same_frames_after_the_vae_is_loaded_again(comfy, vae_file):
    frames = []
    for attempt in range(2):
        vae = load_vae_again(comfy, vae_file)
        frames.append(run(comfy.pack["FramePackDecode"], samples=latent(), vae=vae)[0])
        del vae
    assert frames[0].shape == (4 * (1 + SECTIONS * WINDOW) - 3, 8 * H, 8 * W, 3)
    assert torch.equal(frames[0], frames[1])
