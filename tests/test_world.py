"""The procedural world: closed-form motion that comes to rest at the walls, its fixed decoder and its quality
measure."""

import math

import pytest
import torch

from framepack_core import world
from framepack_core.packing import pixel_frames


def test_shapes_move_in_the_prompted_direction_and_come_to_rest_at_the_wall():
    clip = world.Clip("right", 0, (0,), ("disc",), torch.tensor([2.0]), torch.tensor([[8.0, 12.0]]))
    x = clip.centres(torch.arange(0, 60))[:, 0, 1]
    assert torch.allclose(x[:6], torch.clamp(12.0 + world.SPEED * torch.arange(6.0), max=14.0))  # straight on
    assert torch.all(x[1:] >= x[:-1]) and x.max() == 16 - 2.0  # never back, never through the wall
    assert torch.all(x[int(2.0 / world.SPEED) + 1:] == 14.0)  # and resting against it
    assert torch.all(clip.centres(torch.arange(0, 60))[:, 0, 0] == 8.0)


def test_a_diagonal_shape_slides_along_the_wall_into_the_corner():
    clip = world.Clip("down-right", 0, (0,), ("square",), torch.tensor([2.0]), torch.tensor([[8.0, 12.0]]))
    step = world.SPEED / math.sqrt(2)
    at_wall = int(2.0 / step) + 1  # x meets the right wall first
    centres = clip.centres(torch.arange(0, 60))[:, 0]
    assert torch.allclose(centres[at_wall:, 1], torch.tensor(14.0))
    assert centres[at_wall + 1, 0] > centres[at_wall, 0]  # y goes on down along the wall
    assert torch.allclose(centres[-1], torch.tensor([14.0, 14.0]))  # into the corner


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


def test_travel_says_how_far_the_shapes_get_against_the_truth():
    clip = world.Clip("right", 0, (0, 2), ("disc", "square"), torch.tensor([2.0, 2.5]),
                      torch.tensor([[4.0, 3.0], [11.0, 3.0]]))  # 8 frames: 3.2 pixels, far from the wall
    times = torch.arange(9.0)
    assert world.travel(clip.frames(times), clip) == pytest.approx(1.0, abs=0.05)
    assert world.travel(clip.frames(times * 0.5), clip) == pytest.approx(0.5, abs=0.05)  # lagging behind
    assert world.travel(clip.start().expand(-1, -1, 9, -1, -1), clip) == pytest.approx(0.0, abs=0.05)
    assert torch.allclose(world.fitted_centres(clip.frames([0, 8]), clip), clip.centres([0, 8]), atol=0.07)
