"""Context packing schedules: original layouts, history picking, O(1) token budget, options, validation."""

import math

import pytest
import torch

from framepack_core.packing import (
    TokenBudget,
    even_spread_counts,
    make_schedule,
    sections_for_length,
)

H, W = 6, 10  # small latent grid; not multiples of 4/8, so the 2x/4x replicate padding is exercised


def numbered_history(frames, h=H, w=W):
    """History whose frame i is filled with the value i: gathered frames say where they came from."""
    return torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1).expand(1, 16, frames, h, w).clone()


def start_latent(value=-1.0):
    return torch.full((1, 16, 1, H, W), value)


def frame_ids(latents):
    """The number each gathered frame was filled with (and check each frame is uniform)."""
    ids = latents[0, :, :, 0, 0]
    assert torch.equal(latents, ids.view(1, 16, -1, 1, 1).expand_as(latents))
    assert torch.equal(ids, ids[:1].expand_as(ids))
    return ids[0].tolist()


def original_inverted_paddings(n):
    paddings = list(reversed(range(n)))
    return [3] + [2] * (n - 3) + [1, 0] if n > 4 else paddings


def original_inverted_split(p, window):
    """Plain re-derivation of the original split: [start | blank | noisy | post | 2x | 4x]."""
    sizes = [1, p * window, window, 1, 2, 16]
    return [t.tolist() for t in torch.arange(sum(sizes)).split(sizes)]


# --- original layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [3, 9])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_inverted_default_layout_matches_original(n, window):
    schedule = make_schedule("inverted", n, window=window)
    assert len(schedule) == n
    assert [s.padding for s in schedule] == original_inverted_paddings(n)
    for i, section in enumerate(schedule):
        start, blank, noisy, post, h2, h4 = original_inverted_split(section.padding, window)
        assert section.index == i
        assert list(section.blank_indices) == blank
        assert list(section.noisy_indices) == noisy
        assert list(section.clean.indices) == start + post
        assert list(section.history_2x.indices) == h2
        assert list(section.history_4x.indices) == h4
        assert section.is_last == (i == n - 1)
        assert section.joins_start == (section.padding == 0) == section.is_last


def test_inverted_paddings_spelled_out():
    assert [s.padding for s in make_schedule("inverted", 4)] == [3, 2, 1, 0]
    assert [s.padding for s in make_schedule("inverted", 5)] == [3, 2, 2, 1, 0]
    assert [s.padding for s in make_schedule("inverted", 8)] == [3, 2, 2, 2, 2, 2, 1, 0]
    assert [s.padding for s in make_schedule("inverted", 8, anti_drift_padding=False)] == [7, 6, 5, 4, 3, 2, 1, 0]
    first = make_schedule("inverted", 5, window=9)[0]  # padding 3: 1 + 27 blank, then the window at 28..36
    assert first.noisy_indices == tuple(range(28, 37))
    assert first.clean.indices == (0, 37)
    assert first.history_2x.indices == (38, 39) and first.history_4x.indices == tuple(range(40, 56))


@pytest.mark.parametrize("window", [3, 9])
def test_forward_default_layout_matches_original(window):
    sizes = [1, 16, 2, 1, window]
    start, h4, h2, one, noisy = [t.tolist() for t in torch.arange(sum(sizes)).split(sizes)]
    schedule = make_schedule("forward", 4, window=window)
    for i, section in enumerate(schedule):
        assert section.index == i and section.padding == 0 and section.blank_indices == ()
        assert list(section.noisy_indices) == noisy
        assert list(section.clean.indices) == start + one
        assert list(section.history_2x.indices) == h2
        assert list(section.history_4x.indices) == h4
        assert not section.joins_start
    assert [s.is_last for s in schedule] == [False, False, False, True]


def test_first_video_frame():
    # Final video: [start latent, then windows in time order]. Inverted samples the end first.
    assert [s.first_video_frame for s in make_schedule("inverted", 3, window=9)] == [19, 10, 1]
    assert [s.first_video_frame for s in make_schedule("forward", 3, window=9)] == [1, 10, 19]


# --- gather: which frames go where --------------------------------------------------------------------


def test_inverted_gather_picks_front_of_history():
    schedule = make_schedule("inverted", 3, window=9)
    history = numbered_history(40)
    ctx = schedule[1].gather(start_latent(), history)
    assert frame_ids(ctx["clean_latents"]) == [-1, 0]  # start latent, then history[0]
    assert frame_ids(ctx["clean_latents_2x"]) == [1, 2]
    assert frame_ids(ctx["clean_latents_4x"]) == list(range(3, 19))
    assert ctx["clean_latents"].shape == (1, 16, 2, H, W)
    assert ctx["clean_latent_indices"].tolist() == [0, 1 + 9 + 9]
    assert ctx["latent_indices"].tolist() == list(range(10, 19))
    for key in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices"):
        assert ctx[key].dtype == torch.long and ctx[key].dim() == 1


def test_forward_gather_picks_end_of_history():
    schedule = make_schedule("forward", 2, window=9)
    history = numbered_history(40)
    ctx = schedule[0].gather(start_latent(), history)
    assert frame_ids(ctx["clean_latents"]) == [-1, 39]
    assert frame_ids(ctx["clean_latents_2x"]) == [37, 38]
    assert frame_ids(ctx["clean_latents_4x"]) == list(range(21, 37))
    assert ctx["clean_latent_indices"].tolist() == [0, 19]
    assert ctx["clean_latent_4x_indices"].tolist() == list(range(1, 17))
    assert ctx["clean_latent_2x_indices"].tolist() == [17, 18]
    assert ctx["latent_indices"].tolist() == list(range(20, 29))


def test_gather_casts_start_latent_to_history():
    history = numbered_history(19).to(torch.float64)
    ctx = make_schedule("inverted", 1)[0].gather(start_latent().to(torch.bfloat16), history)
    assert ctx["clean_latents"].dtype == torch.float64


# --- history buffer conventions -----------------------------------------------------------------------


def run_loop(schedule, window):
    """Mode-agnostic section loop; section i 'samples' a window filled with 100 + i."""
    start = start_latent()
    history = schedule.initial_history(start)
    seen = []
    for section in schedule:
        ctx = section.gather(start, history)
        seen.append(ctx)
        sampled = torch.full((1, 16, window, H, W), 100.0 + section.index)
        history = schedule.append(history, section.output(sampled, start))
    return history, seen


def test_inverted_history_prepends_and_joins_start():
    schedule = make_schedule("inverted", 3, window=2)
    assert frame_ids(schedule.initial_history(start_latent())) == [0] * 19
    history, seen = run_loop(schedule, window=2)
    assert frame_ids(seen[0]["clean_latents"]) == [-1, 0]  # first section sees zeros
    assert frame_ids(seen[1]["clean_latents"]) == [-1, 100]  # then the window sampled just before it
    assert frame_ids(seen[2]["clean_latents_2x"]) == [101, 100]
    assert frame_ids(schedule.video_latents(history)) == [-1, 102, 102, 101, 101, 100, 100]
    assert history.shape[2] == 19 + 7


def test_forward_history_appends():
    schedule = make_schedule("forward", 3, window=2)
    assert frame_ids(schedule.initial_history(start_latent())) == [0] * 19 + [-1]
    history, seen = run_loop(schedule, window=2)
    assert frame_ids(seen[0]["clean_latents"]) == [-1, -1]  # the original's first F1 section
    assert frame_ids(seen[1]["clean_latents"]) == [-1, 100]
    assert frame_ids(seen[2]["clean_latents_2x"]) == [100, 101]
    assert frame_ids(schedule.video_latents(history)) == [-1, 100, 100, 101, 101, 102, 102]


def test_initial_history_dtype_and_batch():
    start = torch.ones(2, 16, 1, 4, 6, dtype=torch.bfloat16)
    history = make_schedule("forward", 1, counts=(1, 0, 2)).initial_history(start)
    assert history.shape == (2, 16, 4, 4, 6) and history.dtype == torch.float32


# --- token budget: O(1) --------------------------------------------------------------------------------


def tokens_from_tensors(ctx):
    """Count tokens from the gathered tensors the way the model patchifies them."""
    def patched(x, k):
        if x is None:
            return 0
        _, _, t, h, w = x.shape
        if k == 1:
            return t * (h // 2) * (w // 2)
        return math.ceil(t / k) * math.ceil(h / (2 * k)) * math.ceil(w / (2 * k))

    context = (patched(ctx["clean_latents"], 1) + patched(ctx["clean_latents_2x"], 2)
               + patched(ctx["clean_latents_4x"], 4))
    return context, ctx["latent_indices"].numel() * (H // 2) * (W // 2)


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_token_budget_constant_for_every_section_and_length(mode):
    reference = make_schedule(mode, 1, window=3).token_budget(H, W)
    start = start_latent()
    for n in range(1, 41):
        schedule = make_schedule(mode, n, window=3)
        assert schedule.token_budget(H, W) == reference
        history = schedule.initial_history(start)
        for section in schedule:
            ctx = section.gather(start, history)
            assert tokens_from_tensors(ctx) == (reference.context_tokens, reference.noisy_tokens)
            history = schedule.append(history, section.output(torch.zeros(1, 16, 3, H, W), start))


def test_token_budget_numbers_and_report():
    budget = make_schedule("inverted", 5).token_budget(60, 104)  # 480x832 bucket
    assert (budget.frames_1x, budget.frames_2x, budget.frames_4x, budget.noisy_frames) == (2, 2, 16, 9)
    assert budget.tokens_1x == 2 * 30 * 52
    assert budget.tokens_2x == 1 * 15 * 26
    assert budget.tokens_4x == 4 * 8 * 13
    assert budget.noisy_tokens == 9 * 30 * 52
    assert budget.context_tokens == 3120 + 390 + 416
    assert budget.total_tokens == budget.context_tokens + 14040
    text = str(budget)
    for number in ("3120", "390", "416", "3926", "14040", "17966", "60x104"):
        assert number in text
    assert isinstance(budget, TokenBudget)


def test_token_budget_padding_rounds_up():
    budget = make_schedule("forward", 1, counts=(0, 3, 5)).token_budget(H, W)
    assert budget.tokens_1x == 1 * 3 * 5  # start frame only
    assert budget.tokens_2x == 2 * 2 * 3  # ceil(3/2), ceil(6/4), ceil(10/4)
    assert budget.tokens_4x == 2 * 1 * 2  # ceil(5/4), ceil(6/8), ceil(10/8)


# --- options: counts, even spread, first-frame priority -----------------------------------------------


def test_custom_counts_inverted_layout_and_gather():
    schedule = make_schedule("inverted", 2, window=4, counts=(2, 3, 4))
    first = schedule[0]  # padding 1: [start 1 | blank 4 | noisy 4 | post 2 | 2x 3 | 4x 4]
    assert first.blank_indices == (1, 2, 3, 4)
    assert first.noisy_indices == (5, 6, 7, 8)
    assert first.clean.indices == (0, 9, 10)
    assert first.history_2x.indices == (11, 12, 13)
    assert first.history_4x.indices == (14, 15, 16, 17)
    ctx = first.gather(start_latent(), numbered_history(30))
    assert frame_ids(ctx["clean_latents"]) == [-1, 0, 1]
    assert frame_ids(ctx["clean_latents_2x"]) == [2, 3, 4]
    assert frame_ids(ctx["clean_latents_4x"]) == [5, 6, 7, 8]
    assert schedule.initial_history(start_latent()).shape[2] == 9


def test_custom_counts_forward_layout_and_gather():
    section = make_schedule("forward", 1, window=2, counts={1: 2, 2: 1, 4: 3})[0]
    assert section.history_4x.indices == (1, 2, 3)
    assert section.history_2x.indices == (4,)
    assert section.clean.indices == (0, 5, 6)
    assert section.noisy_indices == (7, 8)
    ctx = section.gather(start_latent(), numbered_history(30))
    assert frame_ids(ctx["clean_latents"]) == [-1, 28, 29]
    assert frame_ids(ctx["clean_latents_2x"]) == [27]
    assert frame_ids(ctx["clean_latents_4x"]) == [24, 25, 26]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_zero_count_levels_are_none(mode):
    section = make_schedule(mode, 2, counts=(0, 0, 4), kernels_available=(1, 4))[0]
    ctx = section.gather(start_latent(), numbered_history(30))
    assert ctx["clean_latents_2x"] is None and ctx["clean_latent_2x_indices"] is None
    assert frame_ids(ctx["clean_latents"]) == [-1]  # start latent only
    assert ctx["clean_latents_4x"].shape[2] == 4


def test_first_frame_priority_off():
    inverted = make_schedule("inverted", 2, window=3, first_frame_priority=False)[0]
    # no start group: [blank 3 | noisy 3 | post 1 | 2x 2 | 4x 16]
    assert inverted.blank_indices == (0, 1, 2) and inverted.noisy_indices == (3, 4, 5)
    assert inverted.clean.indices == (6,) and not inverted.clean.with_start
    ctx = inverted.gather(start_latent(), numbered_history(19))
    assert frame_ids(ctx["clean_latents"]) == [0]

    forward = make_schedule("forward", 1, window=3, first_frame_priority=False)[0]
    assert forward.history_4x.indices == tuple(range(0, 16)) and forward.clean.indices == (18,)
    schedule = make_schedule("forward", 1, first_frame_priority=False)
    ctx = forward.gather(start_latent(), schedule.initial_history(start_latent()))
    assert frame_ids(ctx["clean_latents"]) == [-1]  # the start still arrives, as history

    none_at_all = make_schedule("inverted", 1, counts=(0, 0, 0), first_frame_priority=False)[0]
    ctx = none_at_all.gather(start_latent(), numbered_history(0))
    assert all(ctx[k] is None for k in ctx if k != "latent_indices")
    assert ctx["latent_indices"].tolist() == list(range(9))


def test_even_spread():
    assert even_spread_counts(19) == (7, 6, 6)
    assert even_spread_counts(2) == (1, 1, 0)
    assert even_spread_counts(0) == (0, 0, 0)
    assert even_spread_counts(9) == (3, 3, 3)
    assert even_spread_counts(19, kernels_available=(2, 4)) == (0, 10, 9)
    assert even_spread_counts(5, kernels_available=(4,)) == (0, 0, 5)
    schedule = make_schedule("inverted", 3, even_spread=19)
    assert schedule.counts == (7, 6, 6)
    assert schedule[0].clean.frames == 8 and schedule[0].history_4x.frames == 6
    assert make_schedule("forward", 1, even_spread=7, kernels_available=(1, 2)).counts == (4, 3, 0)


def test_sections_for_length():
    assert sections_for_length(5, window=9) == 4  # 150 / 36 = 4.17
    assert sections_for_length(60, window=9) == 50
    assert sections_for_length(1, window=9) == 1
    assert sections_for_length(0.1, window=9) == 1  # short videos still get one section
    assert sections_for_length(2.4, window=9) == 2  # round(2.0)
    assert sections_for_length(5, window=9, fps=15) == 2
    assert sections_for_length(5, window=3) == 12


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="backward", num_sections=2), "unknown packing mode 'backward'"),
    (dict(mode="inverted", num_sections=0), "num_sections must be an integer >= 1"),
    (dict(mode="inverted", num_sections=2.5), "num_sections must be an integer >= 1"),
    (dict(mode="forward", num_sections=2, window=0), "window must be an integer >= 1"),
    (dict(mode="inverted", num_sections=2, counts=(1, -2, 16)), "count for kernel 2 must be a non-negative"),
    (dict(mode="inverted", num_sections=2, counts=(1, 2)), "one count per kernel"),
    (dict(mode="inverted", num_sections=2, counts={1: 1, 8: 4}), "kernel 8"),
    (dict(mode="inverted", num_sections=2, counts=(1, 2, 3), even_spread=6), "either counts or even_spread"),
    (dict(mode="inverted", num_sections=2, even_spread=-1), "non-negative"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(**kwargs)


def test_kernel_availability_errors():
    with pytest.raises(ValueError, match=r"kernel 4 \(4x\).*proj_4x.*set that count to 0"):
        make_schedule("inverted", 2, kernels_available=(1, 2))
    with pytest.raises(ValueError, match=r"kernel 2 \(2x\).*proj_2x"):
        make_schedule("forward", 2, counts=(1, 1, 0), kernels_available=(1, 4))
    with pytest.raises(ValueError, match=r"first_frame_priority.*turn first_frame_priority off"):
        make_schedule("forward", 2, counts=(0, 2, 16), kernels_available=(2, 4))
    with pytest.raises(ValueError, match=r"kernel 8 is not a FramePack clean-latent kernel.*kernels_available"):
        make_schedule("inverted", 2, kernels_available=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="kernel 3"):
        even_spread_counts(6, kernels_available=(1, 3))
    # allowed: unavailable kernels with count 0, and first-frame priority off without kernel 1
    assert make_schedule("forward", 2, counts=(0, 2, 16), kernels_available=(2, 4),
                         first_frame_priority=False).counts == (0, 2, 16)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="window"):
        sections_for_length(5, window=0)
    for seconds in (-1, 0):
        with pytest.raises(ValueError, match="video length must be > 0 seconds"):
            sections_for_length(seconds)
    with pytest.raises(ValueError, match="latent_height"):
        make_schedule("inverted", 1).token_budget(0, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_sections=10 ** 9), r"num_sections must be at most 1000, got 1000000000 \(a typo\?\)"),
    (dict(num_sections=2, window=900), "window must be at most 64"),
    (dict(num_sections=2, counts=(1, 2, 16000)), "count for kernel 4 is 16000, more than 256"),
    (dict(num_sections=2, even_spread=10 ** 8), "more than 256 history frames"),
    (dict(num_sections=1000, window=64, anti_drift_padding=False), "turn anti_drift_padding on"),
])
def test_schedule_sizes_are_bounded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_schedule("inverted", **kwargs)


def test_largest_allowed_schedule_is_cheap():
    schedule = make_schedule("inverted", 1000, window=64, counts=(256, 256, 256))
    assert len(schedule) == 1000 and max(s.padding for s in schedule) == 3
    assert len(make_schedule("inverted", 200, window=9, anti_drift_padding=False)) == 200
