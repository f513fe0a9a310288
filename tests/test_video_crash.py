"""VideoFileSink files survive a killed writer: SIGKILL a child process mid-write, then reopen its mp4."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
FPS, CHUNK = 8, 6  # fragments of 8 frames (fragment_seconds=1), chunks of 6 frames as sections arrive


def gray(i):
    """Frame i's gray level: frames are told apart after lossy coding."""
    return (i % 10) / 10 + 0.05


CHILD = textwrap.dedent(f"""
    import sys, time, torch
    from framepack_core.decode import VideoFileSink
    sink = VideoFileSink(sys.argv[1], fps={FPS}, crf=10)
    for c in range(1000):
        chunk = torch.stack([torch.full((32, 48, 3), ((c * {CHUNK} + k) % 10) / 10 + 0.05) for k in range({CHUNK})])
        sink(chunk)
        if sink.flushed_frames >= int(sys.argv[2]):
            print(sink.frames, sink.flushed_frames, flush=True)
            time.sleep(600)  # "still writing": the test kills us here
""")


def decode_all(path):
    with av.open(str(path)) as container:
        return [torch.from_numpy(f.to_ndarray(format="rgb24")).float() / 255 for f in container.decode(video=0)]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killed_writer_leaves_a_playable_file(tmp_path):
    path = tmp_path / "partial.mp4"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(2 * FPS)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    written, flushed = map(int, line.split())
    assert flushed >= 2 * FPS and written > flushed, "the kill must hit a file still being written"

    frames = decode_all(path)
    assert len(frames) == flushed, "every frame of every flushed fragment, and only those, is in the file"
    for i, frame in enumerate(frames):
        assert frame.shape == (32, 48, 3)
        assert abs(frame.mean().item() - gray(i)) < 0.03, f"frame {i} does not hold what was written"


def test_completed_file_is_fragmented_h264_with_every_frame(tmp_path):
    from framepack_core.decode import VideoFileSink

    path = tmp_path / "whole.mp4"
    with VideoFileSink(path, fps=FPS, crf=10) as sink:
        for c in range(5):
            sink(torch.stack([torch.full((31, 47, 3), gray(c * CHUNK + k)) for k in range(CHUNK)]))
    assert sink.flushed_frames == sink.frames == 5 * CHUNK
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert container.format.name.startswith("mov,mp4")
        assert abs(float(container.duration / av.time_base) - 5 * CHUNK / FPS) < 0.2
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and b"moof" in data, "a fragmented mp4: an empty moov, then moof fragments"
    frames = decode_all(path)
    assert len(frames) == 5 * CHUNK and frames[0].shape == (32, 48, 3)  # padded to even sizes
    assert all(abs(f[:31, :47].mean().item() - gray(i)) < 0.03 for i, f in enumerate(frames))
