"""The procedural world: closed-form motion with bounces, its fixed decoder and its quality measure."""

import pytest
import torch

from framepack_core import world
from framepack_core.packing import pixel_frames


def test_shapes_move_in_the_prompted_direction_and_bounce_off_the_walls():
    clip = world.Clip("right", 0, (0,), ("disc",), torch.tensor([2.0]), torch.tensor([[8.0, 12.0]]))
    x = clip.centres(torch.arange(0, 60))[:, 0, 1]
    assert torch.allclose(x[:6], 12.0 + world.SPEED * torch.arange(6.0))  # straight on at first
    assert x.max() <= 16 - 2.0 + 1e-5 and x.min() >= 2.0 - 1e-5  # never through a wall
    turn = int(x.argmax())
    assert 0 < turn < 59 and torch.allclose(x[turn + 1], x[turn] - world.SPEED, atol=world.SPEED)  # and back
    y = clip.centres(torch.arange(0, 60))[:, 0, 0]
    assert torch.all(y == 8.0)


def test_frames_and_start_agree_and_the_empty_prompt_exists():
    clip = world.held_out_clip(1)
    video = clip.frames(range(10))
    assert video.shape == (1, world.CHANNELS, 10, *world.LATENT_SIZE)
    assert torch.equal(video[:, :, :1], clip.start())
    assert not torch.equal(video[:, :, 0], video[:, :, 9])
    assert world.prompt(world.NO_DIRECTION).text.shape == (1, world.TEXT_TOKENS, world.TEXT_DIM)
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        world.prompt("sideways")


def test_decoder_follows_the_video_frame_rule():
    latents = world.held_out_clip(2).frames(range(4))
    frames = world.decode(latents)
    h, w = world.LATENT_SIZE
    assert frames.shape == (1, pixel_frames(4), h * world.SCALE, w * world.SCALE, 3)
    assert frames.min() >= 0 and frames.max() <= 1
    # every latent frame after the first ends its four video frames; the ones between interpolate
    assert torch.allclose(frames[0, 4], world.decode(latents[:, :, 1:2])[0, 0])
    assert torch.allclose(frames[0, 2], world.decode((latents[:, :, :1] + latents[:, :, 1:2]) / 2)[0, 0], atol=1e-6)


def test_world_error_is_low_for_true_frames_and_high_for_noise():
    clip = world.held_out_clip(0)
    truth = clip.frames(range(0, 40, 4))
    noisy = truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    assert world.world_error(truth, clip).mean() < 0.05
    assert world.world_error(noisy, clip).mean() > 0.25
    assert world.truth_error(truth, truth).abs().max() == 0


def test_motion_measures_smooth_moving_video():
    frames = world.decode(world.held_out_clip(0).frames(range(30)))[0]
    step, change = world.motion(frames)
    assert step < 0.15 and change > 0.5
    still = frames[:1].expand(10, -1, -1, -1) + 0.01 * torch.rand(10, *frames.shape[1:])
    assert world.motion(still)[0] > 0.5  # flicker around a still picture is not smooth motion
