"""bench/gpu.py in its tiny CPU mode, so the GPU benchmark cannot rot while no GPU runs it."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu  # noqa: E402

from framepack_core.model import FramePackConfig  # noqa: E402


def test_tiny_cpu_mode_runs_every_variant(capsys):
    gpu.main(["--tiny", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line[: gpu.LABEL].rstrip(): line for line in lines}
    rows = {label: rows[label] for label, _ in gpu.variants("cpu", None)}
    assert len(rows) == len(gpu.variants("cpu", None))
    for label, line in rows.items():
        if "skipped" in line:  # only the ComfyUI/CUDA variants may be skipped on a CPU
            assert "fp8 fast" in label or "low-VRAM" in label
        else:
            assert math.isfinite(float(line[len(label):].split()[0]))


def test_flop_bound_of_the_640_bucket_section():
    # 18741 tokens at the 640 bucket: ~0.53 PFLOP per call, 25 calls; about 13.4 s on a 989 TFLOPS H100
    flops = gpu.section_flops(FramePackConfig(), 17500, 512, 729, 25, cfg=1.0)
    assert 12.5 < flops / 989.4e12 < 14.5
    assert gpu.section_flops(FramePackConfig(), 17500, 512, 729, 25, cfg=3.0) == 2 * flops
