"""Tests for framepack_core.sampling: schedules, guidance denoiser, UniPC / Euler samplers.

Reference values marked "from the original FramePack" were produced by running the original
implementation beside ours on the same inputs; ours matched them bit for bit. They are hard-coded
here because the original cannot be imported in CI.
"""

import math

import pytest
import torch

from framepack_core.sampling import (
    SAMPLERS, flux_mu, make_flow_denoiser, sample, sample_euler, sample_unipc, sigma_schedule,
)

# --------------------------------------------------------------------------- sigma schedules

# float32 schedules from the original FramePack (bit-exact; printed with full float32 precision)
ORIGINAL_SCHEDULES = {
    (5, 1000, None): [1.0, 0.8820753693580627, 0.7371876835823059, 0.5548958778381348,
                      0.31856879591941833, 0.0],
    (5, None, 3.0): [1.0, 0.9230769872665405, 0.8181818723678589, 0.6666666865348816,
                     0.4285714626312256, 0.0],
    (4, 8000, None): [1.0, 0.9483113288879395, 0.859462559223175, 0.6708917021751404, 0.0],
}


@pytest.mark.parametrize("key", list(ORIGINAL_SCHEDULES))
def test_sigma_schedule_bit_identical_to_original(key):
    steps, token_count, shift = key
    got = sigma_schedule(steps, token_count=token_count, shift=shift)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor(ORIGINAL_SCHEDULES[key], dtype=torch.float32))


def test_flux_mu_linear_rule_and_cap():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flux_mu(2176) == pytest.approx(0.825, abs=1e-12)  # midpoint
    assert flux_mu(1000) == pytest.approx(0.5 + 0.65 * (1000 - 256) / 3840, abs=1e-12)
    assert flux_mu(8000) < math.log(7.0)  # still on the line
    assert flux_mu(20000) == math.log(7.0)
    assert flux_mu(10**7) == math.log(7.0)


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("kwargs", [dict(token_count=300), dict(token_count=50000), dict(shift=1.0),
                                    dict(shift=0.5), dict(shift=10.0)])
def test_sigma_schedule_shape_endpoints_monotone(steps, kwargs):
    s = sigma_schedule(steps, **kwargs)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    # e^mu / (e^mu + 0) is computed as e^mu * (1 / e^mu) in float32 (bit-identical to the original),
    # so the first sigma may sit one float32 ulp below 1
    assert 1.0 - 6e-8 <= s[0].item() <= 1.0 and s[-1].item() == 0.0
    assert (s[1:] < s[:-1]).all()


def test_sigma_schedule_formula_and_shift_semantics():
    steps = 9
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    for mu, sched in [(flux_mu(3000), sigma_schedule(steps, token_count=3000)),
                      (math.log(3.0), sigma_schedule(steps, shift=3.0))]:
        expected = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
        torch.testing.assert_close(sched[:-1].double(), expected, rtol=1e-6, atol=0)
    # shift 1 is no shift at all: sigma = t
    torch.testing.assert_close(sigma_schedule(steps, shift=1.0), torch.linspace(1, 0, steps + 1))
    # shift = e^mu reproduces the token-count schedule with that mu; an explicit shift wins
    torch.testing.assert_close(sigma_schedule(steps, shift=math.exp(1.15)),
                               sigma_schedule(steps, token_count=4096), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sigma_schedule(steps, token_count=10, shift=3.0),
                               sigma_schedule(steps, shift=3.0), rtol=0, atol=0)
    # a larger shift keeps the noise level higher at every interior step
    assert (sigma_schedule(steps, shift=5.0)[1:-1] > sigma_schedule(steps, shift=2.0)[1:-1]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0, shift=3.0), r"steps must be an integer >= 1, got 0"),
    (dict(steps=-2, shift=3.0), r"got -2"),
    (dict(steps=2.5, shift=3.0), r"got 2\.5"),
    (dict(steps=True, shift=3.0), r"got True"),
    (dict(steps=5, shift=0.0), r"shift must be > 0, got 0\.0"),
    (dict(steps=5, shift=-1.0), r"shift must be > 0, got -1\.0"),
    (dict(steps=5), r"needs token_count"),
    (dict(steps=5, token_count=0), r"token_count must be > 0, got 0"),
    (dict(steps=5, token_count=-7), r"got -7"),
])
def test_sigma_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sigma_schedule(**kwargs)


def test_flux_mu_validation():
    with pytest.raises(ValueError, match="token_count must be > 0"):
        flux_mu(0)

# --------------------------------------------------------------------------- analytic Gaussian flow
# Data x0 ~ N(mu, s^2) per element, x_t = (1 - t) x0 + t eps. Then x_t ~ N((1-t) mu, var_t) with
# var_t = (1-t)^2 s^2 + t^2 and E[x0 | x_t] = mu + (1-t) s^2 / var_t * (x_t - (1-t) mu). The
# probability-flow ODE keeps the standardised value z = (x_t - (1-t) mu) / sqrt(var_t) fixed, so it
# carries eps at t = 1 exactly to mu + s * eps at t = 0.

_g = torch.Generator().manual_seed(1234)
G_MU = torch.randn(3, 4, 5, generator=_g)
G_S = 0.5 + torch.rand(3, 4, 5, generator=_g)
G_EPS = torch.randn(2, 3, 4, 5, generator=_g)
G_EXACT = G_MU + G_S * G_EPS


def gaussian_denoiser(x, sigma):
    t = sigma.to(x.dtype).view(-1, 1, 1, 1)
    mu, s = G_MU.to(x.dtype), G_S.to(x.dtype)
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    return mu + (1 - t) * s ** 2 / var * (x - (1 - t) * mu)


def test_gaussian_fixture_is_a_flow_ode_solution():
    # guards the test's own maths: x(t) = (1-t) mu + sqrt(var_t) z solves dx/dt = (x - E[x0|x]) / t
    z = G_EPS.double()
    mu, s = G_MU.double(), G_S.double()

    def path(t):
        return (1 - t) * mu + torch.sqrt((1 - t) ** 2 * s ** 2 + t ** 2) * z

    for t in [0.9, 0.5, 0.1]:
        dt = 1e-6
        slope = (path(t + dt) - path(t - dt)) / (2 * dt)
        x = path(t)
        v = (x - gaussian_denoiser(x, torch.full((2,), t, dtype=torch.float64))) / t
        torch.testing.assert_close(slope, v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path(1.0), z)
    torch.testing.assert_close(path(0.0), G_EXACT.double())


def _gaussian_error(name, steps, schedule):
    sigmas = sigma_schedule(steps, **schedule)
    return (sample(name, gaussian_denoiser, G_EPS, sigmas) - G_EXACT).abs().max().item()


@pytest.mark.parametrize("schedule", [dict(shift=1.0), dict(shift=3.0), dict(token_count=4096)])
def test_samplers_converge_to_exact_gaussian_transport(schedule):
    steps = [10, 20, 40, 80]
    errors = {name: [_gaussian_error(name, n, schedule) for n in steps] for name in SAMPLERS}
    for name, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
    # Euler is first order: doubling the steps roughly halves the error
    euler = errors["euler"]
    for a, b in zip(euler, euler[1:]):
        assert 1.7 < a / b < 2.3, euler
    for name in ("unipc_bh1", "unipc_bh2"):
        errs = errors[name]
        assert all(u < e for u, e in zip(errs, euler)), (name, errs, euler)
        assert errs[-1] < euler[-1] / 3
        assert errs[-2] / errs[-1] > 2.8  # clearly better than first order once steps are small
        assert errs[-1] < 2e-2


# --------------------------------------------------------------------------- UniPC fidelity

def toy_linear_denoiser(x, sigma):
    """Deterministic, sigma-dependent linear map that also mixes neighbouring elements."""
    s = sigma.view(-1, 1, 1)
    return (0.8 - 0.5 * s) * x + 0.3 * s * x.roll(1, dims=-1) + 0.1 * (1 - s)


TOY_X = torch.linspace(-1.5, 2.0, 8).reshape(2, 1, 4)

# sample_unipc(toy_linear_denoiser, TOY_X, sigma_schedule(steps, shift=3.0)) from the original FramePack.
# With 2 steps bh1 and bh2 agree: the only corrected x is never fed to another model call.
ORIGINAL_UNIPC = {
    ("bh1", 2): [-0.5093750357627869, -0.6518750190734863, -0.3931250274181366, -0.10062501579523087,
                 0.6606249809265137, 0.5181249976158142, 0.7768750190734863, 1.0693750381469727],
    ("bh1", 3): [-0.523065447807312, -0.5876789689064026, -0.3411112129688263, -0.060467429459095,
                 0.611674964427948, 0.5470615029335022, 0.7936291694641113, 1.074272871017456],
    ("bh1", 4): [-0.505138635635376, -0.5485320091247559, -0.31003502011299133, -0.037089753895998,
                 0.5965323448181152, 0.5531390309333801, 0.7916358709335327, 1.064581274986267],
    ("bh1", 8): [-0.4433257579803467, -0.44745224714279175, -0.23097896575927734, 0.01850181445479393,
                 0.5666711330413818, 0.5625447630882263, 0.7790180444717407, 1.0284987688064575],
    ("bh2", 2): [-0.5093750357627869, -0.6518750190734863, -0.3931250274181366, -0.10062501579523087,
                 0.6606249809265137, 0.5181249976158142, 0.7768750190734863, 1.0693750381469727],
    ("bh2", 3): [-0.5219531059265137, -0.5891953110694885, -0.34300559759140015, -0.06191232055425644,
                 0.6134819388389587, 0.5462397336959839, 0.792429506778717, 1.0735228061676025],
    ("bh2", 4): [-0.5050546526908875, -0.5486592650413513, -0.310337096452713, -0.037351515144109726,
                 0.5967234373092651, 0.553118884563446, 0.7914409637451172, 1.0644265413284302],
    ("bh2", 8): [-0.4433237314224243, -0.44745516777038574, -0.2309819459915161, 0.018499068915843964,
                 0.5666742324829102, 0.5625429749488831, 0.7790160775184631, 1.0284970998764038],
}


@pytest.mark.parametrize("key", list(ORIGINAL_UNIPC))
def test_unipc_matches_original_values(key):
    variant, steps = key
    got = sample_unipc(toy_linear_denoiser, TOY_X, sigma_schedule(steps, shift=3.0), variant=variant)
    expected = torch.tensor(ORIGINAL_UNIPC[key]).reshape(TOY_X.shape)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_unipc_pinned_values_tell_variants_apart():
    for steps in (3, 4):
        bh1 = torch.tensor(ORIGINAL_UNIPC[("bh1", steps)])
        bh2 = torch.tensor(ORIGINAL_UNIPC[("bh2", steps)])
        assert (bh1 - bh2).abs().max() > 1e-4


def test_unipc_one_step_returns_first_prediction():
    # The original's order is min(3, len(sigmas) - 2) = 0 here: one model call at sigmas[0], and that
    # x0 is the result. We keep that behaviour.
    sigmas = sigma_schedule(1, shift=3.0)
    calls = []

    def denoise(x, sigma):
        calls.append(sigma.clone())
        return toy_linear_denoiser(x, sigma)

    for variant in ("bh1", "bh2"):
        calls.clear()
        out = sample_unipc(denoise, TOY_X, sigmas, variant=variant)
        assert len(calls) == 1 and torch.equal(calls[0], torch.ones(2))
        assert torch.equal(out, toy_linear_denoiser(TOY_X, torch.ones(2)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_model_calls_visit_sigmas_in_order(name, steps):
    sigmas = sigma_schedule(steps, shift=3.0)
    seen = []

    def denoise(x, sigma):
        assert sigma.shape == (x.shape[0],) and x.dtype == torch.float32
        seen.append(sigma[0].item())
        return toy_linear_denoiser(x, sigma)

    sample(name, denoise, TOY_X, sigmas)
    # one model call per step, at every sigma but the last (0)
    assert seen == sigmas[:-1].tolist()


def test_sample_dispatch_equals_direct_calls():
    sigmas = sigma_schedule(5, shift=3.0)
    assert torch.equal(sample("euler", toy_linear_denoiser, TOY_X, sigmas),
                       sample_euler(toy_linear_denoiser, TOY_X, sigmas))
    for variant in ("bh1", "bh2"):
        assert torch.equal(sample(f"unipc_{variant}", toy_linear_denoiser, TOY_X, sigmas),
                           sample_unipc(toy_linear_denoiser, TOY_X, sigmas, variant=variant))


def test_euler_single_step_lands_on_prediction():
    # one step from sigma=1 to 0: x + (0 - 1) * (x - x0) / 1 == x0
    x0 = toy_linear_denoiser(TOY_X, torch.ones(2))
    torch.testing.assert_close(sample_euler(toy_linear_denoiser, TOY_X, sigma_schedule(1, shift=1.0)), x0)


def test_samplers_keep_input_dtype():
    sigmas = sigma_schedule(4, shift=3.0)
    for name in SAMPLERS:
        out = sample(name, toy_linear_denoiser, TOY_X.bfloat16(), sigmas)
        assert out.dtype == torch.bfloat16
        ref = sample(name, toy_linear_denoiser, TOY_X.bfloat16().float(), sigmas)
        assert torch.equal(out, ref.bfloat16())

# --------------------------------------------------------------------------- callback / interrupt


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_reports_every_step(name):
    steps, events = 5, []
    sigmas = sigma_schedule(steps, shift=3.0)
    out = sample(name, toy_linear_denoiser, TOY_X, sigmas,
                 callback=lambda i, n, x, x0: events.append((i, n, x.clone(), x0.clone())))
    assert [(i, n) for i, n, _, _ in events] == [(i, steps) for i in range(steps)]
    if name.startswith("unipc"):
        assert torch.equal(events[0][2], TOY_X)  # step 0 only evaluates the model at sigmas[0]
    last_x, last_x0 = events[-1][2], events[-1][3]
    # Euler returns the final x; UniPC returns its last x0 prediction
    assert torch.equal(out, last_x0 if name.startswith("unipc") else last_x)
    assert all(x.shape == TOY_X.shape and x0.shape == TOY_X.shape for _, _, x, x0 in events)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_interrupt_runs_before_each_model_call_and_propagates(name):
    log = []

    def denoise(x, sigma):
        log.append("model")
        return toy_linear_denoiser(x, sigma)

    sample(name, denoise, TOY_X, sigma_schedule(4, shift=3.0), interrupt=lambda: log.append("check"))
    assert log == ["check", "model"] * 4

    class Cancelled(Exception):
        pass

    def interrupt():
        log.append("check")
        if log.count("check") == 3:
            raise Cancelled

    log.clear()
    with pytest.raises(Cancelled):
        sample(name, denoise, TOY_X, sigma_schedule(4, shift=3.0), interrupt=interrupt)
    assert log == ["check", "model", "check", "model", "check"]

# --------------------------------------------------------------------------- sampler validation


@pytest.mark.parametrize("sigmas, match", [
    (torch.ones(2, 3), r"1-D tensor with at least 2 values, got \(2, 3\)"),
    (torch.tensor([1.0]), r"at least 2 values, got \(1,\)"),
    ([1.0, 0.5, 0.0], r"1-D tensor .* got list"),
    (torch.tensor([1.0, 0.5, 0.5, 0.0]), r"strictly decreasing"),
    (torch.tensor([0.0, 0.5, 1.0]), r"strictly decreasing"),
    (torch.tensor([1.0, 0.5, -0.1]), r"finite and >= 0"),
    (torch.tensor([1.0, float("nan"), 0.0]), r"finite and >= 0"),
])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_rejects_bad_sigmas(name, sigmas, match):
    with pytest.raises(ValueError, match=match):
        sample(name, toy_linear_denoiser, TOY_X, sigmas)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_rejects_non_finite_x(name, bad):
    x = TOY_X.clone()
    x[1, 0, 2] = bad
    with pytest.raises(ValueError, match="contains NaN or inf"):
        sample(name, toy_linear_denoiser, x, sigma_schedule(3, shift=3.0))


def test_unknown_sampler_and_variant():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm'; valid names: euler, unipc_bh1, unipc_bh2"):
        sample("dpm", toy_linear_denoiser, TOY_X, sigma_schedule(3, shift=3.0))
    with pytest.raises(ValueError, match=r"'bh1' or 'bh2', got 'bh3'"):
        sample_unipc(toy_linear_denoiser, TOY_X, sigma_schedule(3, shift=3.0), variant="bh3")

# --------------------------------------------------------------------------- guidance denoiser


class ToyVelocityModel:
    """v = scale * tanh(x) + bias + timestep / 1000, recording what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, hidden_states, timestep, scale, bias):
        self.calls.append(dict(hidden_states=hidden_states, timestep=timestep, scale=scale, bias=bias))
        t = timestep.view(-1, *([1] * (hidden_states.ndim - 1)))
        return scale * torch.tanh(hidden_states) + bias + t / 1000


POS = dict(scale=1.5, bias=0.2)
NEG = dict(scale=0.5, bias=-0.3)
CFG_X = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(7))
CFG_SIGMA = torch.tensor([0.8, 0.3])


def _velocity(cond, x=CFG_X, sigma=CFG_SIGMA):
    return ToyVelocityModel()(x, sigma * 1000.0, **cond)


def _sig():
    return CFG_SIGMA.view(-1, 1, 1, 1, 1)


def test_cfg_one_never_evaluates_negative():
    model = ToyVelocityModel()
    for negative in (None, NEG):
        model.calls.clear()
        x0 = make_flow_denoiser(model, POS, negative, cfg_scale=1.0)(CFG_X, CFG_SIGMA)
        assert len(model.calls) == 1 and model.calls[0]["scale"] == POS["scale"]
        torch.testing.assert_close(x0, CFG_X - _velocity(POS) * _sig(), rtol=1e-6, atol=1e-6)


def test_cfg_combines_positive_and_negative():
    model = ToyVelocityModel()
    x0 = make_flow_denoiser(model, POS, NEG, cfg_scale=3.0)(CFG_X, CFG_SIGMA)
    assert [c["scale"] for c in model.calls] == [POS["scale"], NEG["scale"]]
    pos, neg = _velocity(POS), _velocity(NEG)
    torch.testing.assert_close(x0, CFG_X - (neg + 3.0 * (pos - neg)) * _sig(), rtol=1e-6, atol=1e-6)


def test_cfg_rescale():
    pos, neg = _velocity(POS), _velocity(NEG)
    guided = neg + 4.0 * (pos - neg)

    def velocity_from(rescale):
        x0 = make_flow_denoiser(ToyVelocityModel(), POS, NEG, cfg_scale=4.0, cfg_rescale=rescale)(CFG_X, CFG_SIGMA)
        return (CFG_X - x0) / _sig()

    dims = [1, 2, 3, 4]
    full = velocity_from(1.0)
    # rescale 1: the guided velocity gets the positive's std, per sample
    torch.testing.assert_close(full.std(dim=dims), pos.std(dim=dims), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided.std(dim=dims), pos.std(dim=dims), rtol=1e-2)
    torch.testing.assert_close(velocity_from(0.0), guided, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(velocity_from(0.25), 0.25 * full + 0.75 * guided, rtol=1e-4, atol=1e-4)


def test_cfg_validation():
    with pytest.raises(ValueError, match=r"cfg_scale=2\.0 needs a negative"):
        make_flow_denoiser(ToyVelocityModel(), POS, None, cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"cfg_rescale must be in \[0, 1\], got 1\.5"):
        make_flow_denoiser(ToyVelocityModel(), POS, NEG, cfg_scale=2.0, cfg_rescale=1.5)


def test_denoiser_dtype_casting():
    model = ToyVelocityModel()
    denoise = make_flow_denoiser(model, POS, dtype=torch.bfloat16, t_scale=500.0)
    x0 = denoise(CFG_X, CFG_SIGMA.double())
    call = model.calls[0]
    # the model sees x and the scaled timestep in the model dtype
    assert call["hidden_states"].dtype == torch.bfloat16 and call["timestep"].dtype == torch.bfloat16
    assert torch.equal(call["hidden_states"], CFG_X.bfloat16())
    assert torch.equal(call["timestep"], (CFG_SIGMA * 500.0).bfloat16())
    # x0 keeps x's dtype and is computed in float32 from the bf16-rounded x (as the original does)
    assert x0.dtype == torch.float32
    v = model(CFG_X.bfloat16(), (CFG_SIGMA * 500.0).bfloat16(), **POS).float()
    assert torch.equal(x0, CFG_X.bfloat16().float() - v * _sig())
    # and a bf16 x comes back as bf16
    assert make_flow_denoiser(model, POS)(CFG_X.bfloat16(), CFG_SIGMA).dtype == torch.bfloat16


def test_denoiser_drives_a_sampler():
    # end to end: guided denoiser + UniPC on the 5-D latent layout, with per-step callbacks
    steps = []
    denoise = make_flow_denoiser(ToyVelocityModel(), POS, NEG, cfg_scale=2.0, cfg_rescale=0.5)
    out = sample("unipc_bh1", denoise, CFG_X, sigma_schedule(4, token_count=2 * 4 * 4 // 4),
                 callback=lambda i, n, x, x0: steps.append(i))
    assert out.shape == CFG_X.shape and torch.isfinite(out).all() and steps == [0, 1, 2, 3]
