"""The README's first command: a whole tiny generation on CPU, written to an mp4."""

import subprocess
import sys
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_a_video_and_reports_flat_sections(tmp_path):
    out = tmp_path / "demo.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "framepack_core.demo", "--seconds", "2", "--window", "3", "--steps", "2",
         "--size", "8", "12", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if len(line.split()) == 6 and line.split()[0].isdigit()]
    assert len(rows) == 5  # 2 s at 30 fps in sections of 3 latent frames (12 pixel frames)
    assert [int(r[1]) for r in rows] == [4, 3, 2, 1, 0]  # sampled from the end back to the start
    assert len({r[3] for r in rows}) == 1  # the same token count for every section
    with av.open(str(out)) as video:
        frames = sum(1 for _ in video.decode(video=0))
        assert (video.streams.video[0].height, video.streams.video[0].width) == (64, 96)
    assert frames == 4 * (1 + 5 * 3) - 3
