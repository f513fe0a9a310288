"""A procedural video world in FramePack's latent space: exact ground truth for any start and any length.

Coloured shapes (discs and squares) slide across a plain background at one speed in the direction the prompt
names until they meet a wall, and come to rest against it (moving diagonally, a shape slides along the wall
into the corner). Resting, not bouncing: in inverted (anti-drifting) order the video's end is sampled first,
from the start frame and the prompt alone, at a distance the end-of-video paddings cap (packing.py); a world
whose shapes come to rest has an end that follows from the start and the direction, as a real clip's settled
last scene does, while a bouncing one leaves every point of its path equally likely (the first model trained
here, on bouncing shapes, blurred its ends into nothing). Everything is defined directly on the model's latent
grid (16 channels, ``LATENT_SIZE``), so a start frame has a true continuation for any number of frames:
``Clip.frames(times)`` renders any latent frame directly from the closed-form motion.

Colours: each pixel's 16 latent channels are a fixed orthogonal (Hadamard) mix (``MIX``) of 3 RGB features in [-1, 1]
and 13 extra features that each colour also carries (fixed random values), so the model has to predict all
16 channels, as with a real VAE's latents.

Conditioning, through the transformer's real inputs:
- prompt: one of ``DIRECTIONS`` (or "" for no direction, used for classifier-free guidance), encoded by a
  fixed random "text encoder" into 4 text tokens and a pooled vector (``prompt``);
- image embeddings: the start frame average-pooled to 4x4 tokens of 16 channels (``image_embeddings``).

The fixed decoder (``decode``) mirrors the video VAE's frame rule: latent frame 0 gives one pixel frame and
every later latent frame four, interpolated linearly from the frame before (4T-3 frames in all); each latent
pixel becomes ``SCALE`` x ``SCALE`` pixels (bilinear), and the RGB features map to [0, 1].
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pipeline import Prompt

CHANNELS = 16
LATENT_SIZE = (16, 16)  # latent height, width; the video is 8x that in pixels
SCALE = 8  # pixels per latent pixel, as the HunyuanVideo VAE
SPEED = 0.4  # latent pixels per latent frame (0.1 per video frame)
EDGE = 0.8  # softness of the shapes' edges, in latent pixels (soft edges: fewer fine details to learn)
DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
NO_DIRECTION = ""  # the empty prompt (classifier-free guidance's negative)
SHAPES = ("disc", "square")
PALETTE = ((0.95, 0.25, 0.2), (0.2, 0.85, 0.3), (0.25, 0.45, 1.0), (1.0, 0.85, 0.2), (0.9, 0.3, 0.9),
           (0.2, 0.9, 0.95))
BACKGROUNDS = ((0.1, 0.1, 0.12), (0.08, 0.12, 0.3), (0.25, 0.22, 0.2))
TEXT_DIM, POOLED_DIM, TEXT_TOKENS = 16, 8, 4
IMAGE_POOL = 4  # image embeddings: start frame pooled 4x4 -> (16 / 4)^2 tokens of 16 channels
IMAGE_DIM = CHANNELS


def _fixed(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hadamard(n):
    """Sylvester's orthogonal +-1 matrix, scaled to unit columns: exact on every machine, unlike a QR."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < n:
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), matrix)
    return matrix / n**0.5


MIX = _hadamard(CHANNELS)  # orthogonal: features -> latent channels, each feature spread over all 16
_EXTRAS = _fixed(2, len(PALETTE) + len(BACKGROUNDS), CHANNELS - 3) * 0.5
_WORDS = _fixed(3, len(DIRECTIONS) + 1, TEXT_TOKENS, TEXT_DIM)
_POOLED = _fixed(4, len(DIRECTIONS) + 1, POOLED_DIM)


def colour_code(index):
    """Latent vector (16,) of palette colour ``index``; backgrounds follow the palette (index >= len(PALETTE))."""
    rgb = (PALETTE + BACKGROUNDS)[index]
    return MIX @ torch.cat([torch.tensor(rgb) * 2 - 1, _EXTRAS[index]])


def prompt(direction):
    """The encoded prompt naming a direction of ``DIRECTIONS`` (or ``NO_DIRECTION``)."""
    words = DIRECTIONS + (NO_DIRECTION,)
    if direction not in words:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)} or '' for none.")
    i = words.index(direction)
    return Prompt(_WORDS[i : i + 1].clone(), _POOLED[i : i + 1].clone())


def image_embeddings(start_latent):
    """The world's vision encoder: (1, 16, 1, H, W) start latent -> (1, H*W/16, 16) tokens."""
    pooled = F.avg_pool2d(start_latent[:, :, 0].float(), IMAGE_POOL)
    return pooled.flatten(2).transpose(1, 2)


def shape_alpha(centres, sizes, kinds):
    """Coverage (T, K, H, W) in [0, 1] of K shapes (radii ``sizes``, ``kinds``) centred at ``centres`` (T, K, 2)."""
    ys, xs = (torch.arange(n, dtype=torch.float32) + 0.5 for n in LATENT_SIZE)
    dy = ys[None, None, :, None] - centres[..., 0, None, None]  # (T, K, H, 1)
    dx = xs[None, None, None, :] - centres[..., 1, None, None]  # (T, K, 1, W)
    square = torch.tensor([k == "square" for k in kinds])[None, :, None, None]
    distance = torch.where(square, torch.maximum(dy.abs(), dx.abs()), torch.sqrt(dy**2 + dx**2))
    return torch.sigmoid((sizes[None, :, None, None] - distance) / EDGE)


@dataclass(frozen=True)
class Clip:
    """One video of the world: its shapes at latent frame 0 and the prompt's direction.

    positions (K, 2) are (y, x) centres in latent pixels (pixel i spans [i, i + 1)); sizes (K,) are radii
    (half the side for squares). Shapes are drawn in order, later ones on top.
    """

    direction: str
    background: int
    colours: tuple
    kinds: tuple
    sizes: torch.Tensor
    positions: torch.Tensor

    @property
    def velocity(self):
        angle = DIRECTIONS.index(self.direction) * math.pi / 4
        return torch.tensor([math.sin(angle), math.cos(angle)]) * SPEED  # (dy, dx), y grows downwards

    def centres(self, times):
        """(T, K, 2) shape centres at latent frames ``times``: straight motion that stops at the walls."""
        times = torch.as_tensor(times, dtype=torch.float32).reshape(-1, 1, 1)
        low = self.sizes[:, None]  # (K, 1): a shape's edge touches the wall when its centre is one radius in
        high = torch.tensor(LATENT_SIZE, dtype=torch.float32) - low
        return torch.minimum(torch.maximum(self.positions + self.velocity * times, low), high)

    def frames(self, times):
        """Latent frames (1, 16, T, H, W) at ``times`` (latent frame numbers; frame 0 is the start)."""
        return self.render(self.centres(times))

    def render(self, centres):
        """Latent frames (1, 16, T, H, W) with the shapes at ``centres`` (T, K, 2)."""
        alpha = shape_alpha(centres, self.sizes, self.kinds)  # (T, K, H, W)
        out = colour_code(len(PALETTE) + self.background).reshape(1, -1, 1, 1).expand(len(centres), -1, *LATENT_SIZE)
        for k, colour in enumerate(self.colours):
            a = alpha[:, k, None]
            out = out * (1 - a) + colour_code(colour).reshape(1, -1, 1, 1) * a
        return out.transpose(0, 1).unsqueeze(0).contiguous()

    def start(self):
        return self.frames([0])

    def conditioning(self):
        """generate()'s inputs for this clip: (start latent, image embeddings, prompt)."""
        start = self.start()
        return start, image_embeddings(start), prompt(self.direction)


def sample_clip(generator, direction=None):
    """A random clip: 1-3 shapes of distinct colours, random sizes and positions, a random direction."""
    def randint(n):
        return int(torch.randint(n, (), generator=generator))

    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    count = 1 + randint(3)
    colours = tuple(int(c) for c in torch.randperm(len(PALETTE), generator=generator)[:count])
    kinds = tuple(SHAPES[randint(len(SHAPES))] for _ in range(count))
    sizes = uniform(count, 1.8, 3.0)
    positions = sizes[:, None] + torch.rand(count, 2, generator=generator) * (
        torch.tensor(LATENT_SIZE, dtype=torch.float32) - 2 * sizes[:, None])
    direction = DIRECTIONS[randint(len(DIRECTIONS))] if direction is None else direction
    return Clip(direction, randint(len(BACKGROUNDS)), colours, kinds, sizes, positions)


HELD_OUT_SEED = 1_000_000  # training draws its clips from one generator seeded with the training seed


def held_out_clip(index):
    """Clip ``index`` of the evaluation set (demo, bench): from its own seed, never a training draw."""
    return sample_clip(torch.Generator().manual_seed(HELD_OUT_SEED + index))


def decode(latents):
    """The fixed decoder: latents (1, 16, T, h, w) -> video frames (1, 4T-3, 8h, 8w, 3) in [0, 1]."""
    latents = latents.float()
    later = latents[:, :, 1:]
    steps = torch.arange(1, 5, dtype=torch.float32).div(4).reshape(1, 1, 1, 4, 1, 1)
    between = torch.lerp(latents[:, :, :-1, None], later[:, :, :, None], steps).flatten(2, 3)
    frames = torch.cat([latents[:, :, :1], between], dim=2)  # (1, 16, 4T-3, h, w)
    rgb = torch.einsum("dc,bcthw->btdhw", MIX.T[:3], frames)  # the RGB features, (1, N, 3, h, w)
    rgb = F.interpolate(rgb.flatten(0, 1), scale_factor=SCALE, mode="bilinear", align_corners=False)
    return (rgb * 0.5 + 0.5).clamp(0, 1).unflatten(0, (1, -1)).permute(0, 1, 3, 4, 2)


def fitted_centres(latents, clip, step=0.125):
    """(T, K, 2) where each of ``clip``'s shapes best fits each frame of ``latents`` (1, 16, T, H, W).

    Ground truth is not needed: each pixel is split into the shapes' colours over the background (least
    squares), and each shape is placed where its coverage map best matches the shape (positions on a ``step``
    grid).
    """
    frames = latents[0].float().flatten(2).transpose(0, 1)  # (T, 16, H*W)
    background = colour_code(len(PALETTE) + clip.background)
    codes = torch.stack([colour_code(c) - background for c in clip.colours], 1)  # (16, K)
    coverage = torch.linalg.pinv(codes) @ (frames - background[:, None])  # (T, K, H*W)
    centres = []
    for k in range(len(clip.colours)):
        size = clip.sizes[k]
        grids = [torch.arange(float(size), n - float(size) + 1e-6, step) for n in LATENT_SIZE]
        candidates = torch.cartesian_prod(*grids)  # (P, 2)
        templates = shape_alpha(candidates[:, None], size[None], clip.kinds[k:k + 1])[:, 0].flatten(1)  # (P, H*W)
        score = 2 * coverage[:, k] @ templates.T - (templates**2).sum(1)  # -|coverage - template|^2 + const
        centres.append(candidates[score.argmax(1)])
    return torch.stack(centres, 1)


def nearest_world_frames(latents, clip, step=0.125):
    """For each frame of ``latents`` (1, 16, T, H, W), a frame the world can show with ``clip``'s shapes: the
    shapes rendered where they best fit (``fitted_centres``). Blur, noise, colour drift and lost or doubled
    shapes all move a frame away from its nearest world frame; a true frame is its own nearest one (up to the
    grid step and heavy occlusion).
    """
    return clip.render(fitted_centres(latents, clip, step))


def travel(latents, clip, least=1.0):
    """How far the shapes get from the first frame of ``latents`` to the last, as a share of how far the true
    shapes get over as many frames (mean over the shapes that truly move at least ``least`` latent pixels;
    nan if none does): 1 follows the truth, 0 stands still, below 1 lags behind."""
    first, last = fitted_centres(latents[:, :, [0, -1]], clip)
    moved = (last - first).norm(dim=-1)  # (K,)
    true = clip.centres([0, latents.shape[2] - 1])
    true_moved = (true[1] - true[0]).norm(dim=-1)
    keep = true_moved >= least
    return (moved[keep] / true_moved[keep]).mean().item() if keep.any() else float("nan")


def world_error(latents, clip):
    """Per-frame RMS distance (T,) of ``latents`` to their nearest world frames: a quality that needs no truth."""
    return (latents.float() - nearest_world_frames(latents, clip)).pow(2).mean(dim=(0, 1, 3, 4)).sqrt()


def truth_error(latents, truth):
    """Per-frame RMS distance (T,) to the true frames, in latent units."""
    return (latents.float() - truth.float()).pow(2).mean(dim=(0, 1, 3, 4)).sqrt()


def motion(frames):
    """(mean frame-to-frame change, change from the first to the last frame), both relative to the frames'
    RMS spread around their temporal mean; ``frames`` (N, H, W, 3) video frames."""
    frames = frames.float()
    spread = (frames - frames.mean(0)).pow(2).mean().sqrt()
    step = (frames[1:] - frames[:-1]).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()
    return (step / spread).item(), ((frames[-1] - frames[0]).pow(2).mean().sqrt() / spread).item()
