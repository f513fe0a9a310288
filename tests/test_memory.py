"""The memory estimate handed to ComfyUI against a real measurement (small width, CPU tensors)."""

import sys
from pathlib import Path

import pytest
import torch

from framepack_core.model import FramePackConfig, section_memory_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from memory import measure, section_tokens  # noqa: E402

SMALL = FramePackConfig(num_heads=4, head_dim=32, num_layers=1, num_single_layers=2, text_dim=64, pooled_dim=16,
                        image_dim=24, rope_axes=(8, 12, 12))


@pytest.mark.parametrize("batch", [1, 2])
def test_estimate_is_5_to_15_percent_above_the_measured_peak(batch):
    size = (24, 24)
    text = 64
    peak = measure(SMALL, size, torch.float32, device="cpu", text_lengths=(text,) * batch, image_tokens=64)
    estimate = section_memory_bytes(SMALL, section_tokens(size), torch.float32, text_tokens=text + 64, batch=batch)
    assert 1.05 <= estimate / peak <= 1.15, estimate / peak
