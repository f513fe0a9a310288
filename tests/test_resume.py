"""Resumable generations: interrupted, saved, loaded and resumed runs equal uninterrupted ones bit for bit."""

import dataclasses
import os

import pytest
import torch

from framepack_core.cache import MagCache
from framepack_core.model import FramePackTransformer
from framepack_core.packing import make_schedule
from framepack_core.pipeline import Prompt, SamplingSettings, generate
from framepack_core.resume import (GenerationState, ResumeStore, load_state, save_state, weights_digest)
from framepack_core.synthetic import TINY, random_state_dict

H, W, SECTIONS, WINDOW = 2, 4, 3, 3


def tiny_model(seed=11):
    m = FramePackTransformer(TINY).eval().requires_grad_(False)
    m.load_state_dict(random_state_dict(TINY, seed=seed))
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(start_latent=torch.randn(1, 16, 1, H, W, generator=g),
                image_embeddings=torch.randn(1, 9, TINY.image_dim, generator=g),
                prompt=Prompt(torch.randn(1, 6, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g)),
                negative=Prompt(torch.randn(1, 4, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g)))


class Stop(Exception):
    pass


def run(model, mode, settings, inputs=None, **kw):
    inputs = inputs or make_inputs()
    with torch.no_grad():
        return generate(model, make_schedule(mode, SECTIONS, window=WINDOW), settings=settings, **inputs, **kw)


def interrupted(model, mode, settings, after, store):
    """Run until ``after`` sections are saved, then stop the way a cancel does (interrupt() raises)."""
    saved = []

    def on_state(state):
        saved.append(state.sections_done)
        store.save(state)

    def interrupt():
        if len(saved) == after:
            raise Stop

    with pytest.raises(Stop):
        run(model, mode, settings, on_state=on_state, interrupt=interrupt)
    assert saved == list(range(1, after + 1))


CASES = [
    ("inverted", dict(cfg=3.0, cfg_rescale=0.5)),
    ("inverted", dict(teacache_threshold=0.15, steps=4)),
    ("forward", dict(teacache_threshold=0.15, steps=4, cfg=2.0)),
    ("forward", dict(cache=MagCache(0.1, ratios=[1.0, 0.98, 0.97, 0.96]), steps=4, cfg=2.0)),  # batched CFG too
]


@pytest.mark.parametrize("mode, overrides", CASES,
                         ids=["inverted-cfg", "inverted-teacache", "forward-cfg-teacache", "forward-cfg-magcache"])
def test_resume_is_bit_identical(model, tmp_path, mode, overrides):
    settings = SamplingSettings(**{"steps": 3, "seed": 5, **overrides})
    whole = run(model, mode, settings)
    for after in (1, SECTIONS - 1):  # interrupted after the first and after the last-but-one section
        store = ResumeStore(tmp_path / str(after))
        interrupted(model, mode, settings, after, store)
        [path] = store.folder.glob("*.safetensors")  # one file per generation, overwritten each section
        assert load_state(path).sections_done == after

        resumed_sections = []
        result = run(model, mode, settings, resume_from=store.load,
                     on_section=lambda section, _: resumed_sections.append(section.index))
        assert resumed_sections == list(range(after, SECTIONS)), "finished sections must not be sampled again"
        assert torch.equal(result.latents, whole.latents)
        assert result.sections == whole.sections and result.fingerprint == path.stem


def test_states_hold_the_video_so_far(model):
    settings = SamplingSettings(steps=2)
    states = []
    whole = run(model, "inverted", settings, on_state=states.append)
    assert [s.sections_done for s in states] == [1, 2, 3] and all(s.num_sections == 3 for s in states)
    assert states[-1].finished and not states[-2].finished
    assert torch.equal(states[-1].latents, whole.latents)
    # inverted: each section lands in front of the ones before it (temporal order)
    assert torch.equal(states[1].latents, whole.latents[:, :, -2 * WINDOW:])
    # resuming a finished state samples nothing and returns the same video
    calls = []
    again = run(model, "inverted", settings, resume_from=states[-1], sample_section=None,
                on_step=lambda *a: calls.append(a))
    assert torch.equal(again.latents, whole.latents) and calls == []


def test_state_files_round_trip_and_are_atomic(tmp_path):
    state = GenerationState("ab" * 32, 2, 5, torch.randn(1, 16, 7, H, W), torch.Generator().manual_seed(1).get_state())
    path = save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(path)
    assert (loaded.fingerprint, loaded.sections_done, loaded.num_sections) == (state.fingerprint, 2, 5)
    assert torch.equal(loaded.latents, state.latents) and torch.equal(loaded.generator_state, state.generator_state)
    assert os.listdir(tmp_path) == ["s.safetensors"], "no temporary file may stay behind"
    # a failed write leaves the previous state whole (safetensors refuses tensors that share memory)
    latents = torch.randn(1, 16, 8, H, W)
    bad = dataclasses.replace(state, sections_done=3, latents=latents, generator_state=latents.view(-1).view(torch.uint8))
    with pytest.raises(RuntimeError, match="share memory"):
        save_state(path, bad)
    assert load_state(path).sections_done == 2 and os.listdir(tmp_path) == ["s.safetensors"]


def test_bad_state_files_are_reported_and_dropped(tmp_path, caplog):
    store = ResumeStore(tmp_path)
    fingerprint = "cd" * 32
    assert store.load(fingerprint) is None
    store.path(fingerprint).write_bytes(b"\x80\x04K\x01.")  # a pickle, not a safetensors file
    with pytest.raises(ValueError, match="not a FramePack resume state"):
        load_state(store.path(fingerprint))
    assert store.load(fingerprint) is None
    assert "Starting afresh" in caplog.text and not store.path(fingerprint).exists()
    with pytest.raises(ValueError, match="hex digest"):
        store.path("../escape")


def test_store_prunes_oldest_states_under_the_cap(tmp_path):
    def state(i):
        return GenerationState(f"{i:064x}", 1, 2, torch.zeros(1, 16, 4, H, W), torch.zeros(8, dtype=torch.uint8))

    one = len(save_state(tmp_path / "probe.safetensors", state(0)).read_bytes())
    (tmp_path / "probe.safetensors").unlink()
    store = ResumeStore(tmp_path, max_bytes=2 * one)
    for i in range(4):
        path = store.save(state(i))
        os.utime(path, (1000 + i, 1000 + i))  # distinct ages, independent of the file system's clock
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == [f"{i:064x}" for i in (2, 3)]
    # the state just saved is kept even when it alone is over the cap
    ResumeStore(tmp_path, max_bytes=0).save(state(9))
    assert [p.stem for p in tmp_path.glob("*.safetensors")] == [f"{9:064x}"]
    store.delete(f"{9:064x}")
    assert list(tmp_path.iterdir()) == []


def fingerprint(model, mode="inverted", inputs=None, **settings):
    states = []
    settings = SamplingSettings(**{"steps": 1, "cfg": 2.0, **settings})
    schedule = make_schedule(mode, 1, window=WINDOW)
    inputs = inputs or make_inputs()
    with torch.no_grad():
        generate(model, schedule, settings=settings, on_state=states.append, **inputs)
    return states[0].fingerprint


def test_any_changed_input_changes_the_fingerprint(model):
    base = fingerprint(model)
    assert fingerprint(model) == base
    changed_latent = make_inputs()
    changed_latent["start_latent"][0, 0, 0, 0, 0] += 1e-6
    changed_prompt = make_inputs()
    changed_prompt["prompt"].text[0, 0, 0] += 1e-6
    changed_negative = make_inputs()
    changed_negative["negative"].pooled[0, 0] += 1e-6
    variants = [
        fingerprint(model, seed=1), fingerprint(model, steps=2), fingerprint(model, cfg=2.5),
        fingerprint(model, teacache_threshold=0.1), fingerprint(model, mode="forward"),
        fingerprint(model, inputs=changed_latent), fingerprint(model, inputs=changed_prompt),
        fingerprint(model, inputs=changed_negative), fingerprint(tiny_model(seed=12)),
    ]
    assert base not in variants and len(set(variants)) == len(variants)
    assert weights_digest(tiny_model(seed=12)) != weights_digest(model)


def test_changed_input_starts_afresh(model, tmp_path):
    settings = SamplingSettings(steps=2, seed=5)
    store = ResumeStore(tmp_path)
    interrupted(model, "inverted", settings, 2, store)
    [saved] = tmp_path.glob("*.safetensors")
    other = dataclasses.replace(settings, seed=6)
    sampled = []
    result = run(model, "inverted", other, resume_from=load_state(saved),
                 on_section=lambda section, _: sampled.append(section.index))
    assert sampled == list(range(SECTIONS)), "a state of another generation must not be resumed"
    assert torch.equal(result.latents, run(model, "inverted", other).latents)
    assert result.fingerprint != saved.stem
    # a caller-given weights identity replaces the sampled weights hash
    a = run(model, "inverted", settings, on_state=lambda s: None, weights_identity="file-a").fingerprint
    assert a != run(model, "inverted", settings, on_state=lambda s: None, weights_identity="file-b").fingerprint
