"""Section-wise decoding: decode_sections must give exactly the original FramePack's pixels.

The original decodes while it samples (inverted mode: from the temporal end back to the start, prepending)
and cross-fades every new clip into the pixels so far. We decode afterwards, clip by clip in temporal order,
streaming to a sink. The reference loops below restate the original's decode-and-append procedure and run it
with a small but real causal 3D-conv video decoder, whose output for a frame depends on the latent frames
before it, so a clip decoded with a different context gives different pixels.
"""

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from framepack_core.decode import (TensorSink, VideoFileSink, decode_clips, decode_sections, overlap_frames,
                                   section_ranges, soft_append)
from framepack_core.packing import make_schedule

CHANNELS = 4
LATENT_H, LATENT_W = 3, 4


class CausalVideoDecoder:
    """A tiny video VAE decoder: (1, C, t, h, w) latents -> (1, 4t-3, 2h, 2w, 3) pixels in (0, 1).

    causal 3x3x3 conv over latent time -> 4x temporal upsample (the first latent frame gives one frame,
    every later one four) -> causal 3x3x3 conv over pixel time -> 2x nearest spatial upsample -> 1x3x3 conv
    to RGB -> sigmoid. Causal convs replicate-pad the first frame, like HunyuanVideo's VAE.
    """

    def __init__(self, channels=CHANNELS, features=6, seed=0):
        g = torch.Generator().manual_seed(seed)

        def weight(*shape):
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
            return torch.randn(*shape, generator=g) / fan_in ** 0.5

        self.features = features
        self.conv_in = weight(features, channels, 3, 3, 3)
        self.upsample_t = weight(4 * features, features, 1, 1, 1)
        self.conv_mid = weight(features, features, 3, 3, 3)
        self.conv_out = weight(3, features, 1, 3, 3)
        self.bias_out = torch.randn(3, generator=g) * 0.1
        self.calls = []  # latent frames of every call

    @staticmethod
    def _causal(x, w):
        x = torch.cat([x[:, :, :1]] * (w.shape[2] - 1) + [x], dim=2)
        return F.conv3d(x, w, padding=(0, w.shape[3] // 2, w.shape[4] // 2))

    def __call__(self, latents):
        self.calls.append(latents.shape[2])
        x = torch.tanh(self._causal(latents.float(), self.conv_in))
        u = F.conv3d(x, self.upsample_t)  # (1, 4F, t, h, w): four sub-frames per latent frame
        b, _, t, h, w = u.shape
        first = u[:, : self.features, :1]
        rest = u[:, :, 1:].reshape(b, 4, self.features, t - 1, h, w).permute(0, 2, 3, 1, 4, 5)
        x = torch.cat([first, rest.reshape(b, self.features, 4 * (t - 1), h, w)], dim=2)
        x = torch.tanh(self._causal(x, self.conv_mid))
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        x = F.conv3d(x, self.conv_out, self.bias_out, padding=(0, 1, 1))
        return torch.sigmoid(x).permute(0, 2, 3, 4, 1)  # (1, 4t-3, H, W, 3)


def video_latents(frames, seed=1):
    return torch.randn(1, CHANNELS, frames, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(seed))


def ref_soft_append(history, current, overlap):
    """The original's cross-fade, on (N, H, W, 3): history's tail fades out into current's head."""
    weights = torch.linspace(1, 0, overlap).view(-1, 1, 1, 1)
    blended = weights * history[-overlap:] + (1 - weights) * current[:overlap]
    return torch.cat([history[:-overlap], blended, current[overlap:]], dim=0)


def reference_inverted(video, window, n, vae):
    """The original's anti-drifting loop, decode part: sections sampled from the end, prepended to history."""
    start, frames = video[:, :, :1], video[:, :, 1:]
    history = torch.zeros(1, CHANNELS, 1 + 2 + 16, LATENT_H, LATENT_W)
    paddings = [3] + [2] * (n - 3) + [1, 0] if n > 4 else list(reversed(range(n)))
    total, pixels = 0, None
    for k, padding in enumerate(paddings):
        is_last = padding == 0
        temporal = n - 1 - k  # the k-th sampled window is the (n-1-k)-th in time
        generated = frames[:, :, temporal * window:(temporal + 1) * window]
        if is_last:
            generated = torch.cat([start, generated], dim=2)
        total += generated.shape[2]
        history = torch.cat([generated, history], dim=2)
        real = history[:, :, :total]
        if pixels is None:
            pixels = vae(real)[0]
        else:
            section_frames = 2 * window + 1 if is_last else 2 * window
            current = vae(real[:, :, :section_frames])[0]
            pixels = ref_soft_append(current, pixels, window * 4 - 3)
    return pixels


def reference_forward(video, window, n, vae):
    """The original F1 loop, decode part: sections appended after the start latent."""
    history = torch.cat([torch.zeros(1, CHANNELS, 16 + 2 + 1, LATENT_H, LATENT_W), video[:, :, :1]], dim=2)
    total, pixels = 1, None
    for i in range(n):
        generated = video[:, :, 1 + i * window:1 + (i + 1) * window]
        total += generated.shape[2]
        history = torch.cat([history, generated], dim=2)
        real = history[:, :, -total:]
        if pixels is None:
            pixels = vae(real)[0]
        else:
            current = vae(real[:, :, -2 * window:])[0]
            pixels = ref_soft_append(pixels, current, window * 4 - 3)
    return pixels


REFERENCES = {"inverted": reference_inverted, "forward": reference_forward}
CASES = ([("inverted", w, n) for w in (1, 3, 9) for n in (1, 2, 3, 5)]
         + [("forward", w, n) for w in (1, 3, 9) for n in (1, 2, 4)])


class RecordingSink:
    """Records chunk sizes and, for each chunk, how many decoder calls had happened."""

    def __init__(self, vae):
        self.vae, self.sizes, self.after_calls, self.chunks = vae, [], [], []

    def __call__(self, chunk):
        self.sizes.append(chunk.shape[0])
        self.after_calls.append(len(self.vae.calls))
        self.chunks.append(chunk.clone())


# -- the test decoder is meaningful ---------------------------------------------------------------------

def test_decoder_maps_t_latents_to_4t_minus_3_frames_and_depends_on_context():
    vae = CausalVideoDecoder()
    video = video_latents(7)
    whole = vae(video)[0]
    assert whole.shape == (25, 2 * LATENT_H, 2 * LATENT_W, 3)
    assert 0 < whole.min() and whole.max() < 1
    assert torch.equal(vae(video)[0], whole)  # deterministic
    clip = vae(video[:, :, 2:])[0]  # latent 2 decoded without its past: first frame of the clip
    assert clip.shape[0] == 17
    assert not torch.allclose(clip[:5], whole[5:10], atol=1e-3)  # the head sees a different context
    torch.testing.assert_close(clip[-4:], whole[-4:])  # far from the cut the receptive field agrees


# -- equality with the original -------------------------------------------------------------------------

@pytest.mark.parametrize("mode,window,n", CASES)
def test_decode_sections_equals_original(mode, window, n):
    video = video_latents(n * window + 1, seed=n * 100 + window)
    expected = REFERENCES[mode](video, window, n, CausalVideoDecoder())
    assert expected.shape[0] == 4 * (n * window + 1) - 3

    vae = CausalVideoDecoder()
    done = []
    with TensorSink() as sink:
        got = decode_sections(video, mode, window, section_ranges(mode, 1 + n * window, window), vae, sink=sink,
                              progress=lambda i, total: done.append((i, total)))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert done == [(i + 1, n) for i in range(n)]
    assert len(vae.calls) == n  # one decode per section, as the original
    if n > 2 or (n == 2 and window > 1):  # joined clips differ from one whole decode: the test can tell
        assert not torch.allclose(got, CausalVideoDecoder()(video)[0], atol=1e-3)


def test_default_sink_returns_the_tensor():
    video = video_latents(2 * 3 + 1)
    got = decode_sections(video, "inverted", 3, section_ranges("inverted", 7, 3), CausalVideoDecoder())
    torch.testing.assert_close(got, reference_inverted(video, 3, 2, CausalVideoDecoder()), rtol=0, atol=1e-6)


def test_decode_accepts_four_dimensional_output():
    video = video_latents(2 * 3 + 1)
    vae = CausalVideoDecoder()
    got = decode_sections(video, "forward", 3, section_ranges("forward", 7, 3), lambda x: vae(x)[0])
    torch.testing.assert_close(got, reference_forward(video, 3, 2, CausalVideoDecoder()), rtol=0, atol=1e-6)


# -- clip ranges -----------------------------------------------------------------------------------------

def test_clip_ranges():
    assert section_ranges("inverted", 28, 9) == [(0, 10), (10, 19), (19, 28)]
    assert section_ranges("forward", 28, 9) == [(1, 10), (10, 19), (19, 28)]
    assert decode_clips("inverted", 9, [(0, 10), (10, 19), (19, 28)]) == [(0, 19), (10, 28), (19, 28)]
    assert decode_clips("forward", 9, [(1, 10), (10, 19), (19, 28)]) == [(0, 10), (1, 19), (10, 28)]
    assert decode_clips("inverted", 9, [(0, 10)]) == [(0, 10)]
    assert decode_clips("forward", 9, [(1, 10)]) == [(0, 10)]
    # the clip sizes the original decodes: 2w+1 (first inverted), 2w, w (last inverted); w+1 then 2w forward
    sizes = [b - a for a, b in decode_clips("inverted", 9, section_ranges("inverted", 46, 9))]
    assert sizes == [19, 18, 18, 18, 9]
    sizes = [b - a for a, b in decode_clips("forward", 9, section_ranges("forward", 46, 9))]
    assert sizes == [10, 18, 18, 18, 18]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
@pytest.mark.parametrize("n", [1, 2, 6])
def test_section_ranges_match_packing_schedule(mode, n):
    """The ranges agree with where the packing schedule places each section's output in the video."""
    window = 5
    schedule = make_schedule(mode, n, window=window)
    placed = sorted((s.first_video_frame - int(s.joins_start), s.first_video_frame + window) for s in schedule)
    assert placed == section_ranges(mode, 1 + n * window, window)


# -- soft_append -----------------------------------------------------------------------------------------

def test_soft_append():
    a, b = torch.rand(6, 2, 2, 3), torch.rand(5, 2, 2, 3)
    out = soft_append(a, b, 3)
    assert out.shape[0] == 8
    torch.testing.assert_close(out[:3], a[:3])
    torch.testing.assert_close(out[3], a[3])  # weight 1: all earlier
    torch.testing.assert_close(out[4], 0.5 * a[4] + 0.5 * b[1])
    torch.testing.assert_close(out[5], b[2])  # weight 0: all later
    torch.testing.assert_close(out[6:], b[3:])
    torch.testing.assert_close(soft_append(a, b, 0), torch.cat([a, b]))
    with pytest.raises(ValueError, match="longer than a clip"):
        soft_append(a, b, 6)
    with pytest.raises(ValueError, match="frame shape"):
        soft_append(a, torch.rand(5, 2, 3, 3), 2)


# -- streaming -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_streaming_emits_each_frame_once_as_soon_as_final(mode):
    window, n = 3, 5
    video = video_latents(n * window + 1)
    vae = CausalVideoDecoder()
    sink = RecordingSink(vae)
    assert decode_sections(video, mode, window, section_ranges(mode, 1 + n * window, window), vae, sink=sink) is None
    expected = REFERENCES[mode](video, window, n, CausalVideoDecoder())
    # every frame exactly once, in order
    assert sum(sink.sizes) == expected.shape[0] and all(size > 0 for size in sink.sizes)
    torch.testing.assert_close(torch.cat(sink.chunks), expected, rtol=0, atol=1e-6)
    # progressive: after every decode call except the last, frames reach the sink before the next call
    assert sorted(set(sink.after_calls)) == list(range(1, n + 1))
    before_last = sum(size for size, calls in zip(sink.sizes, sink.after_calls) if calls < n)
    last_clip = decode_clips(mode, window, section_ranges(mode, 1 + n * window, window))[-1]
    held_back = 4 * (last_clip[1] - last_clip[0]) - 3 - overlap_frames(window)
    assert before_last == expected.shape[0] - overlap_frames(window) - held_back


def pixel_frames_alive():
    """Frames of (., 6, 8, 3) pixel storage that live tensors hold (a view counts its whole storage)."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.ndim >= 4 and tuple(obj.shape[-3:]) == (2 * LATENT_H, 2 * LATENT_W, 3):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) // (2 * LATENT_H * 2 * LATENT_W * 3 * 4)


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_memory_does_not_grow_with_sections(mode):
    """The decoder never sees more than 2*window+1 latent frames; at every decoder and sink call the pixel
    frames alive stay within two clips, the same bound however many sections there are."""
    window = 3
    clip = 4 * (2 * window + 1) - 3
    peaks = {}
    for n in (2, 4, 8):
        vae = CausalVideoDecoder()
        held = []

        def decode(latents):
            held.append(pixel_frames_alive())
            return vae(latents)

        def sink(chunk):
            held.append(pixel_frames_alive())

        decode_sections(video_latents(n * window + 1), mode, window, section_ranges(mode, 1 + n * window, window), decode,
                        sink=sink)
        assert max(vae.calls) <= 2 * window + 1
        assert len(held) > n and max(held) <= 2 * clip, held
        peaks[n] = max(held)
    assert peaks[8] == peaks[4], peaks


# -- mp4 sink --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(32, 48), (17, 23)])
def test_video_file_sink_writes_readable_mp4(tmp_path, height, width):
    import av  # a test requirement (requirements-test.txt)
    window, n = 3, 3
    torch.manual_seed(0)
    video = video_latents(n * window + 1)
    vae = CausalVideoDecoder()

    def decode(latents):  # resize to the wanted frame size
        pixels = vae(latents)[0].permute(0, 3, 1, 2)
        return F.interpolate(pixels, size=(height, width), mode="bilinear").permute(0, 2, 3, 1)

    path = tmp_path / "sub" / "video.mp4"
    with VideoFileSink(path, fps=30, crf=0) as sink:
        result = decode_sections(video, "inverted", window, section_ranges("inverted", 1 + n * window, window), decode, sink=sink)
    frames_expected = 4 * (n * window + 1) - 3
    assert result == (path, frames_expected)
    expected = decode_sections(video, "inverted", window, section_ranges("inverted", 1 + n * window, window), decode)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 30
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    even = (height + height % 2, width + width % 2)
    assert len(frames) == frames_expected
    assert frames[0].shape == (*even, 3)
    decoded = torch.from_numpy(frames[5][:height, :width]).float() / 255
    # crf 0 is lossless in YUV; the RGB <-> yuv420p round trip still blurs colour a little
    assert (decoded - expected[5]).abs().mean() < 0.05
    assert (decoded - expected[6]).abs().mean() < (decoded - expected[30]).abs().mean()  # frames are in order


def test_video_file_sink_writes_the_same_file_for_the_same_frames(tmp_path):
    # Smooth random frames, like a random-weight VAE's: on a CPU with AVX-512, x264's macroblock tree gave
    # 3 or 4 different files out of 8 for these (see X264_REPEATABLE); the same seed must give the same video.
    gen = torch.Generator().manual_seed(1)
    walk = torch.randint(-3, 4, (25, 32, 48, 3), generator=gen).float().cumsum(1).cumsum(2)
    frames = (walk - walk.min()) / (walk.max() - walk.min())
    files = set()
    for run in range(8):
        with VideoFileSink(tmp_path / f"{run}.mp4", fps=30) as sink:
            sink(frames)
        files.add((tmp_path / f"{run}.mp4").read_bytes())
    assert len(files) == 1


def test_video_file_sink_rejects_after_close_and_writes_nothing_when_empty(tmp_path):
    sink = VideoFileSink(tmp_path / "empty.mp4", fps=24)
    assert sink.result() == (tmp_path / "empty.mp4", 0)
    assert not (tmp_path / "empty.mp4").exists()
    with pytest.raises(RuntimeError, match="closed"):
        sink(torch.rand(1, 4, 4, 3))
    with pytest.raises(ValueError, match="fps"):
        VideoFileSink(tmp_path / "x.mp4", fps=0)


def test_core_imports_without_pyav_and_the_sink_says_how_to_get_it():
    code = ("import sys; sys.modules['av'] = None\n"  # makes `import av` fail as if PyAV were not installed
            "import framepack_core.decode as d\n"
            "try:\n    d.VideoFileSink('x.mp4', fps=30)\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "pip install av" in out.stdout


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,window,sections,message", [
    ("backwards", 3, [(0, 4)], "Unknown decode mode"),
    ("inverted", 0, [(0, 4)], "window must be an integer >= 1"),
    ("inverted", 2.5, [(0, 4)], "window must be an integer >= 1"),
    ("inverted", 3, [], "empty"),
    ("inverted", 3, [(0, 4), (5, 8)], "contiguous"),
    ("forward", 3, [(1, 4), (3, 7)], "contiguous"),
    ("inverted", 3, [(0, 4), (4, 4)], "empty or reversed"),
    ("inverted", 3, [(1, 4), (4, 7)], "must start at 0"),
    ("forward", 3, [(0, 4), (4, 7)], "must start at 1"),
    ("forward", 3, [(1, 4), (4, 5)], "too short"),
    ("inverted", 3, [(0, 4), (4, 7), (7, 9)], "too short"),
    ("inverted", 3, [(0, 4), (4, 5), (5, 9)], "too few to cross-fade"),
    ("forward", 3, [(1, 2), (2, 8)], "too few to cross-fade"),
])
def test_bad_arguments(mode, window, sections, message):
    with pytest.raises(ValueError, match=message):
        decode_clips(mode, window, sections)
    with pytest.raises(ValueError, match=message):
        decode_sections(video_latents(10), mode, window, sections, CausalVideoDecoder())


def test_latents_must_match_sections():
    with pytest.raises(ValueError, match="cover 7 latent frames but latents has 8"):
        decode_sections(video_latents(8), "inverted", 3, section_ranges("inverted", 7, 3), CausalVideoDecoder())
    with pytest.raises(ValueError, match=r"latents is not a video latent.*\(1, channels, frames, height, width\)"):
        decode_sections(video_latents(7)[0], "inverted", 3, section_ranges("inverted", 7, 3), CausalVideoDecoder())


def test_decode_returning_wrong_frame_count():
    vae = CausalVideoDecoder()
    with pytest.raises(ValueError, match=r"returned 28 frames for clip 0 \(0, 7\) of 7 latent frames.*= 25"):
        decode_sections(video_latents(7), "inverted", 3, section_ranges("inverted", 7, 3),
                        lambda x: vae(x)[:, :-1].repeat_interleave(2, dim=1)[:, :28])
    with pytest.raises(ValueError, match="frames, H, W, 3"):
        decode_sections(video_latents(7), "inverted", 3, section_ranges("inverted", 7, 3),
                        lambda x: vae(x).permute(0, 4, 1, 2, 3))


def test_decode_changing_frame_size():
    vae = CausalVideoDecoder()
    sizes = iter([(6, 8), (6, 10)])

    def decode(latents):
        pixels = vae(latents)[0].permute(0, 3, 1, 2)
        return F.interpolate(pixels, size=next(sizes)).permute(0, 2, 3, 1)

    with pytest.raises(ValueError, match="frames of shape"):
        decode_sections(video_latents(7), "inverted", 3, section_ranges("inverted", 7, 3), decode)


def test_progress_can_interrupt():
    vae = CausalVideoDecoder()
    frames = []

    def progress(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_sections(video_latents(16), "inverted", 3, section_ranges("inverted", 16, 3), vae,
                        sink=lambda c: frames.append(c.shape[0]), progress=progress)
    assert len(vae.calls) == 2 and sum(frames) > 0


@pytest.mark.parametrize("mode", ["inverted", "forward"])
@pytest.mark.parametrize("window", [1, 3, 9])
def test_section_ranges_tile_any_length_with_bounded_clips(mode, window):
    """Videos that continue an input video have lengths that are not start + n windows: they still tile
    into windows (the first section taking the rest), and no decode clip grows with the video."""
    start = 0 if mode == "inverted" else 1
    for frames in range(start + window + (mode == "inverted"), 12 * window + 3):
        ranges = section_ranges(mode, frames, window)
        assert ranges[0][0] == start and ranges[-1][1] == frames
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(b - a == window for a, b in ranges[1:])
        clips = decode_clips(mode, window, ranges)
        assert max(b - a for a, b in clips) <= 3 * window + 1
