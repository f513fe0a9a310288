"""The README's first command: the trained model's demo, and the random-weight run behind --random."""

import re
import subprocess
import sys
from pathlib import Path

import av

from framepack_core import train, world

ROOT = Path(__file__).resolve().parents[1]


def run_demo(*args):
    result = subprocess.run([sys.executable, "-m", "framepack_core.demo", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def frames_and_size(path):
    with av.open(str(path)) as video:
        stream = video.streams.video[0]
        return sum(1 for _ in video.decode(video=0)), (stream.height, stream.width)


def test_trained_demo_writes_truth_inverted_and_forward_side_by_side(tmp_path):
    out, strip = tmp_path / "demo.mp4", tmp_path / "strip.png"
    stdout = run_demo("--sections", "2", "--steps", "3", "--out", str(out), "--strip", str(strip))
    errors = {mode: float(e) for mode, e in re.findall(r"(inverted|forward): error vs the true continuation "
                                                       r"([0-9.]+)", stdout)}
    assert set(errors) == {"inverted", "forward"}
    frames, (height, width) = frames_and_size(out)
    h, w = (n * world.SCALE for n in world.LATENT_SIZE)
    assert frames == 4 * (1 + 2 * train.WINDOW) - 3
    assert (height, width) == (h, 3 * w + 2 * 4)  # truth | inverted | forward with 4-pixel gaps
    assert strip.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_demo_writes_a_video_and_reports_flat_sections(tmp_path):
    out = tmp_path / "demo.mp4"
    stdout = run_demo("--random", "--seconds", "2", "--window", "3", "--steps", "2", "--size", "8", "12",
                      "--out", str(out))
    rows = [line.split() for line in stdout.splitlines() if len(line.split()) == 6 and line.split()[0].isdigit()]
    assert len(rows) == 5  # 2 s at 30 fps in sections of 3 latent frames (12 pixel frames)
    assert [int(r[1]) for r in rows] == [4, 3, 2, 1, 0]  # sampled from the end back to the start
    assert len({r[3] for r in rows}) == 1  # the same token count for every section
    frames, size = frames_and_size(out)
    assert size == (64, 96)
    assert frames == 4 * (1 + 5 * 3) - 3


def test_demo_rejects_zero_steps_and_sections():
    for option in ("--steps", "--sections"):
        result = subprocess.run([sys.executable, "-m", "framepack_core.demo", option, "0"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"{option}: must be 1 or more, got 0" in result.stderr
