"""Train a tiny FramePack on the procedural world (world.py): ``python -m framepack_core.train --seed 0``.

A training example is one section of one clip, laid out exactly as generation lays it out: the packing
schedule (packing.py) is walked in sampling order with the clip's true frames standing in for the sampled
ones, so the history, the 1x/2x/4x context ``section.gather`` picks from it and the transformer's keyword
arguments (``pipeline.model_inputs``) are the ones ``generate()`` would pass at that section. Inverted
(anti-drifting, with the end-of-video paddings) and forward (F1) sections train one model; the loss is
flow matching on the section's window (velocity noise - x0 at a sigma drawn from the sampling schedule's
shifted distribution, stratified over the batch). Three in ten examples are sections that see only the start
frame and the prompt, where the prompt alone sets the motion; one in ten gets the empty prompt, so
classifier-free guidance works.

The command reproduces the committed weights (``WEIGHTS``) from its seed: every random draw comes from
seeded generators and the thread count is fixed, so the same torch build on the same kind of CPU gives the
same bits. It prints the loss curve, its elapsed time and steps/s, and saves bf16 safetensors with the
command, seed and final loss in the metadata.
"""

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from . import world
from .loading import default_rope_axes
from .model import FramePackConfig, FramePackTransformer, Modulation
from .packing import make_schedule
from .pipeline import SamplingSettings, model_inputs
from .sampling import flux_mu

WEIGHTS = Path(__file__).with_name("world_model.safetensors")
WINDOW = 5
THREADS = 2  # fixed, so the bits do not depend on the machine's core count
CONFIG = FramePackConfig(num_heads=3, head_dim=32, num_layers=2, num_single_layers=4, num_refiner_layers=1,
                         text_dim=world.TEXT_DIM, pooled_dim=world.POOLED_DIM, image_dim=world.IMAGE_DIM,
                         rope_axes=default_rope_axes(32))
MAX_SECTIONS = 16  # inverted clips have 1..16 sections (the end-of-video paddings from 5 on)
FORWARD_POSITIONS = 6  # forward sections 0..5: from an empty history to a full one (19 frames)
EMPTY_PROMPT_SHARE = 0.1
# Sections that see only the start frame and the prompt (forward's first section; the end of an inverted video
# of 1-4 sections, sampled first) are where the prompt alone sets the motion: drawn this often on top of the rest.
PROMPT_ONLY_SHARE = 0.3
PROMPT_ONLY_INVERTED_SECTIONS = 4  # longer videos cap the end's padding (packing.py): its distance is unknown
SETTINGS = SamplingSettings()  # the distilled guidance the model is trained and sampled with


def example_inputs(clip, mode, num_sections, position, direction, window=WINDOW):
    """(model inputs of batch 1, true window) for the section sampled ``position``-th in a ``mode`` video of
    ``clip`` with ``num_sections`` sections, prompted with ``direction``.

    The schedule is walked exactly as ``generate()`` walks it, each earlier section contributing its true
    frames, so the inputs equal what generation passes at that section when every earlier one came out right.
    """
    schedule = make_schedule(mode, num_sections, window=window)
    video = clip.frames(range(1 + num_sections * window))
    start = video[:, :, :1]

    def true_window(section):
        return video[:, :, section.first_video_frame:section.first_video_frame + window]

    history = schedule.initial_history(start)
    for section in schedule.sections[:position]:
        history = schedule.append(history, section.output(true_window(section), start))
    section = schedule[position]
    inputs = model_inputs(world.prompt(direction), world.image_embeddings(start), section.gather(start, history),
                          SETTINGS, torch.float32, "cpu")
    return inputs, true_window(section)


def random_example(generator, window=WINDOW):
    """A random clip, mode, video length and section (prompt-only sections ``PROMPT_ONLY_SHARE`` of the time);
    the empty prompt one time in ten."""
    def randint(n):
        return int(torch.randint(n, (), generator=generator))

    clip = world.sample_clip(generator)
    if torch.rand((), generator=generator) < PROMPT_ONLY_SHARE:
        if randint(2):
            mode, num_sections, position = "forward", 1, 0
        else:
            mode, num_sections, position = "inverted", 1 + randint(PROMPT_ONLY_INVERTED_SECTIONS), 0
    elif randint(2):
        mode, num_sections = "inverted", 1 + randint(MAX_SECTIONS)
        position = randint(num_sections)
    else:
        mode, position = "forward", randint(FORWARD_POSITIONS)
        num_sections = position + 1
    direction = world.NO_DIRECTION if torch.rand((), generator=generator) < EMPTY_PROMPT_SHARE else clip.direction
    return example_inputs(clip, mode, num_sections, position, direction, window)


def random_batch(generator, size, window=WINDOW):
    """(model inputs, target windows) of ``size`` random examples: tensors concatenated along the batch,
    frame indices stacked per sample (B, T), which the transformer takes."""
    examples = [random_example(generator, window) for _ in range(size)]
    batch = {}
    for key, value in examples[0][0].items():
        values = [inputs[key] for inputs, _ in examples]
        if value is None:
            batch[key] = None
        elif key.endswith("_indices"):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.cat(values)
    return batch, torch.cat([target for _, target in examples])


def sigma_from_uniform(u, token_count):
    """Sigmas distributed as the sampler's shifted schedule spaces them (mu from the section's token count)."""
    e_mu = math.exp(flux_mu(token_count))
    return e_mu / (e_mu + (1.0 / u - 1.0))


def flow_loss(model, inputs, target, generator):
    """Flow-matching loss: the model's velocity at a random sigma against noise - x0."""
    noise = torch.randn(target.shape, generator=generator)
    batch = target.shape[0]  # one uniform draw per stratum of [0, 1): the batch covers every noise level
    u = ((torch.arange(batch) + torch.rand(batch, generator=generator)) / batch).clamp(1e-3, 1 - 1e-3)
    sigma = sigma_from_uniform(u, target[0, 0].numel() // 4).view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * target + sigma * noise
    velocity = model(hidden_states=noisy, timestep=sigma.flatten() * 1000.0, **inputs)
    return torch.nn.functional.mse_loss(velocity, noise - target)


def new_model(config=CONFIG, seed=0):
    """A freshly initialised model: torch's default layers, with adaLN-zero modulations and output (each
    block starts as the identity, the velocity as zero), which makes a small DiT train much faster."""
    torch.manual_seed(seed)
    model = FramePackTransformer(config)
    for module in model.modules():
        if isinstance(module, Modulation):
            torch.nn.init.zeros_(module.linear.weight)
            torch.nn.init.zeros_(module.linear.bias)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    return model


def optimize(model, optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def learning_rate(step, steps, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


def train(seed=0, steps=5000, batch_size=8, lr=2e-3, ema=0.998, config=CONFIG, window=WINDOW, log_every=100,
          out=lambda line: print(line, flush=True)):
    """Train and return (EMA model, loss curve as (step, mean loss) rows)."""
    model = new_model(config, seed)
    averaged = new_model(config, seed)
    averaged.load_state_dict(model.state_dict())
    averaged.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    curve, running, began = [], [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss = flow_loss(model, *random_batch(generator, batch_size, window), generator)
        optimize(model, optimizer, loss)
        decay = min(ema, (1 + step) / (10 + step))  # a short average early on, while the weights move fast
        with torch.no_grad():
            for a, p in zip(averaged.parameters(), model.parameters()):
                a.lerp_(p, 1 - decay)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, sum(running) / len(running)))
            elapsed = time.perf_counter() - began
            out(f"step {step + 1:>6}  loss {curve[-1][1]:.4f}  {elapsed:7.0f} s  {(step + 1) / elapsed:.2f} steps/s")
            running = []
    return averaged.eval(), curve


def save_weights(model, path, **metadata):
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def positive_int(text):
    """argparse type for counts (steps, sections, ...): 0 or less is an error, not a silent default."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=5000)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    command = "python -m framepack_core.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    model, curve = train(args.seed, args.steps, args.batch, args.lr)
    elapsed = time.perf_counter() - began
    path = save_weights(model, args.out, command=command, seed=args.seed, steps=args.steps, batch=args.batch,
                        final_loss=f"{curve[-1][1]:.4f}", train_seconds=f"{elapsed:.0f}",
                        torch=torch.__version__, threads=THREADS)
    print(f"trained {args.steps} steps in {elapsed:.0f} s ({args.steps / elapsed:.2f} steps/s) on {THREADS} threads; "
          f"final loss {curve[-1][1]:.4f}; wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
