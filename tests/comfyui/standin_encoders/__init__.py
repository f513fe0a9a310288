"""Test-only ComfyUI nodes standing in for the text and vision encoders, which cannot be downloaded here.

They take what ComfyUI's encoder nodes take and emit what those emit, with the real shapes: CONDITIONING of
llava-llama3 hidden states (1, tokens, 4096) with a CLIP-L pooled vector (1, 768), and a SigLIP-384
CLIP_VISION_OUTPUT whose last_hidden_state is (1, 729, 1152). Values are derived deterministically from the
text or image, so different prompts and images give different conditioning. The real-server tests copy
this folder into the server's custom_nodes/; it is never part of the pack.
"""

import hashlib

import comfy.clip_vision
import torch
import torch.nn.functional as F

TEXT_WIDTH, POOLED_WIDTH = 4096, 768  # llava-llama3 hidden states, CLIP-L pooled
SIGLIP_TOKENS, SIGLIP_WIDTH = 27 * 27, 1152  # sigclip_vision_patch14_384


def text_generator(text):
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


class StandinTextEncode:
    """Stands in for DualCLIPLoader (hunyuan_video) + CLIPTextEncode."""
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    def encode(self, text):
        gen = text_generator(text)
        tokens = 3 + len(text.split())  # the length varies with the prompt, as the real encoder's does
        hidden = torch.randn(1, tokens, TEXT_WIDTH, generator=gen)
        pooled = torch.randn(1, POOLED_WIDTH, generator=gen)
        return ([[hidden, {"pooled_output": pooled}]],)


class StandinVisionEncode:
    """Stands in for CLIPVisionLoader (sigclip_vision_patch14_384) + CLIPVisionEncode."""
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "crop": (["center", "none"],)}}

    def encode(self, image, crop):
        side = int(SIGLIP_TOKENS ** 0.5)
        pixels = F.interpolate(image.movedim(-1, 1).float(), size=(side, side), mode="bilinear")
        projection = torch.randn(3, SIGLIP_WIDTH, generator=torch.Generator().manual_seed(0))
        states = pixels.flatten(2).transpose(1, 2) @ projection  # (B, 729, 1152)
        output = comfy.clip_vision.Output()
        output["last_hidden_state"] = states
        output["image_embeds"] = states.mean(1)
        return (output,)


NODE_CLASS_MAPPINGS = {"StandinTextEncode": StandinTextEncode, "StandinVisionEncode": StandinVisionEncode}
