"""Flow-matching sampling: sigma schedules, the guidance denoiser, and the UniPC / Euler samplers.

Conventions (rectified flow, as in the original FramePack): a noisy sample at noise level sigma is
``x = (1 - sigma) * x0 + sigma * noise`` and the model predicts the velocity ``v = noise - x0``, so
``x0 = x - v * sigma``. Sigmas run from 1 (pure noise) down to 0.

The numerics (operation order, float32 coefficients) deliberately follow the original FramePack so
that the same inputs give the same video; tests pin this against values taken from it.
"""

import functools
import math

import torch

# Linear token-count -> mu rule of the original: mu = 0.5 at 256 tokens, 1.15 at 4096, at most ln 7.
_MU_SLOPE = (1.15 - 0.5) / (4096 - 256)
_MU_INTERCEPT = 0.5 - _MU_SLOPE * 256
_MU_MAX = math.log(7.0)


def flux_mu(token_count):
    """Time-shift exponent mu for a sequence of ``token_count`` noisy tokens (longer -> noisier)."""
    if not token_count > 0:
        raise ValueError(f"token_count must be > 0, got {token_count!r}; pass the number of noisy "
                         "tokens (frames * H * W / 4 in latent units) or an explicit shift")
    # slope-intercept form (not 0.5 + slope * (n - 256)) keeps mu bit-identical to the original
    return min(_MU_SLOPE * token_count + _MU_INTERCEPT, _MU_MAX)


def sigma_schedule(steps, token_count=None, shift=None):
    """``steps + 1`` float32 sigmas from 1 to 0: ``sigma = e^mu / (e^mu + 1/t - 1)``, t = linspace(1, 0).

    An explicit ``shift`` s means mu = ln s (larger s keeps sigmas high for longer); with
    ``shift=None`` mu comes from ``token_count`` via :func:`flux_mu`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if shift is None:
        if token_count is None:
            raise ValueError("sigma_schedule needs token_count when shift is None "
                             "(or pass an explicit shift > 0)")
        mu = flux_mu(token_count)
    else:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}; use e.g. 3.0, or shift=None to derive "
                             "it from token_count")
        mu = math.log(shift)  # exp(log(s)) rather than s itself: bit-identical to the original
    t = torch.linspace(1.0, 0.0, steps + 1)
    e_mu = math.exp(mu)
    return e_mu / (e_mu + (1.0 / t - 1.0))  # t = 0 gives 1/0 = inf and hence sigma = 0 exactly


def denoised_steps(steps, denoise):
    """How many of ``steps`` a re-noised start (video-to-video) samples: round(steps * denoise)."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1] (1: from pure noise, 0: keep the guide), got {denoise!r}")
    return round(steps * denoise)


def truncate_sigmas(sigmas, denoise):
    """The tail of a schedule that a start re-noised at strength ``denoise`` samples.

    Of n = len(sigmas) - 1 steps the last ``denoised_steps(n, denoise)`` remain: the start is noised to
    the first remaining sigma and sampled from there on the unchanged schedule. 1 keeps every sigma; a
    strength that rounds to 0 steps leaves only the final sigma (nothing to sample).
    """
    return sigmas[len(sigmas) - 1 - denoised_steps(len(sigmas) - 1, denoise):]


def noise_to_sigma(clean, noise, sigma):
    """The flow-matching point between ``clean`` (sigma 0) and ``noise`` (sigma 1)."""
    return (1.0 - sigma) * clean + sigma * noise


def make_flow_denoiser(model, positive, negative=None, cfg_scale=1.0, cfg_rescale=0.0,
                       dtype=torch.float32, t_scale=1000.0, transformer_options=None, batch_cfg=False):
    """Wrap a velocity model as ``denoise(x, sigma_vec) -> x0`` with classifier-free guidance.

    ``model(hidden_states=x, timestep=sigma * t_scale, **cond)`` gets both in ``dtype`` and returns the
    velocity. The negative prompt is only evaluated when ``cfg_scale != 1`` (real CFG doubles the cost).
    ``cfg_rescale`` in [0, 1] blends the guided velocity toward one with the positive's per-sample std,
    which counters the over-saturation strong CFG causes.
    ``transformer_options``: when given (a dict), every call also gets ``transformer_options`` holding
    it plus, as ComfyUI's samplers set them, "sigmas" (the current sigma per sample) and
    "cond_or_uncond" ([0] for the positive prompt, [1] for the negative).
    ``batch_cfg``: with real CFG, evaluate positive and negative as one batch (see
    :func:`batch_conditions`; "cond_or_uncond" is then [0, 1]); same result to float rounding, one call.
    """
    if cfg_scale != 1.0 and negative is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a negative conditioning; pass negative=... "
                         "or use cfg_scale=1.0")
    if not 0.0 <= cfg_rescale <= 1.0:
        raise ValueError(f"cfg_rescale must be in [0, 1], got {cfg_rescale!r}")

    both = batch_conditions(positive, negative) if batch_cfg and cfg_scale != 1.0 else None

    def denoise(x, sigma):
        sigma = sigma.float()
        x_in = x.to(dtype)
        timestep = (sigma * t_scale).to(dtype)
        def velocity(cond, cond_or_uncond):
            n = len(cond_or_uncond)  # a batch of n copies of x, one per conditioning
            xs, ts, sigmas = (x_in, timestep, sigma) if n == 1 else (torch.cat([t] * n) for t in (x_in, timestep, sigma))
            if transformer_options is None:
                return model(hidden_states=xs, timestep=ts, **cond).float()
            options = {**transformer_options, "sigmas": sigmas, "cond_or_uncond": cond_or_uncond}
            return model(hidden_states=xs, timestep=ts, transformer_options=options, **cond).float()

        if both is not None:  # one call on a batch of 2
            v_pos, v_neg = velocity(both, [0, 1]).chunk(2)
        else:
            v_pos = velocity(positive, [0])
            v_neg = velocity(negative, [1]) if cfg_scale != 1.0 else None
        v = v_pos if v_neg is None else v_neg + cfg_scale * (v_pos - v_neg)
        if cfg_rescale != 0.0:
            dims = list(range(1, v.ndim))
            rescaled = v * (v_pos.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True))
            v = cfg_rescale * rescaled + (1.0 - cfg_rescale) * v
        # x0 from the model-dtype input, as the original does (bf16 rounding of x included)
        x0 = x_in.float() - v * sigma.view(-1, *([1] * (x.ndim - 1)))
        return x0.to(x.dtype)

    return denoise


def batch_conditions(positive, negative):
    """The transformer's keyword arguments for positive and negative as one batch (positive first).

    Per-sample tensors are concatenated; prompts of different lengths are zero-padded at the end and
    masked (the model masks attention per sample); frame indices, shared by both, must be equal; cache
    states become a list, one per sample, so each stream keeps its own skip decisions.
    """
    batched = {}
    for key in positive.keys() | negative.keys():
        a, b = positive.get(key), negative.get(key)
        if key == "encoder_attention_mask":
            continue  # built with the hidden states
        if key == "cache":
            if (a is None) != (b is None):
                raise ValueError("Only one of the positive and negative conditions has a cache state; give both or none.")
            batched[key] = None if a is None else [a, b]
        elif key == "encoder_hidden_states":
            batched[key], batched["encoder_attention_mask"] = _padded_text(
                (a, positive.get("encoder_attention_mask")), (b, negative.get("encoder_attention_mask")))
        elif key.endswith("_indices") or not isinstance(a, torch.Tensor):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a is b or a == b
            if not same:
                raise ValueError(f"Batched CFG needs the same {key} for positive and negative; they differ "
                                 "(use batch_cfg=False).")
            batched[key] = a
        else:
            batched[key] = torch.cat([a, b])
    return batched


def condition_of_batch(batched, index):
    """Sample ``index`` of ``batch_conditions``' output, as a batch of 1 (0: the positive, 1: the negative).

    Per-sample tensors are sliced, frame indices stay shared and the cache state list gives that sample's
    state. The prompt keeps its zero padding, masked, which the model crops: the result computes exactly
    what that sample alone computes (how a host can run the two halves of a batched CFG call apart).
    """
    sample = {}
    for key, value in batched.items():
        if key == "cache":
            value = None if value is None else [value[index]]
        elif isinstance(value, torch.Tensor) and not key.endswith("_indices"):
            value = value[index : index + 1]
        sample[key] = value
    return sample


def _padded_text(*texts):
    """Concatenate (hidden states, mask or None) pairs along the batch, zero-padding the tokens at the end."""
    length = max(t.shape[1] for t, _ in texts)
    states, masks = [], []
    for t, m in texts:
        m = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m.bool()
        pad = length - t.shape[1]
        states.append(torch.nn.functional.pad(t, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(states), torch.cat(masks)


def _prepare(x, sigmas, interrupt, denoise):
    """Validate sampler inputs; return float32 sigmas on x's device and a denoise that checks interrupt."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 values, got {shape}; "
                         "use sigma_schedule(steps, ...)")
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing (noise -> data), got {sigmas.tolist()}")
    if not torch.isfinite(x).all():
        raise ValueError("x (the initial noisy latent) contains NaN or inf")
    if interrupt is None:
        return sigmas, denoise

    def checked(x, sigma):
        interrupt()  # raises to abort (ComfyUI's cancel); we let it propagate untouched
        return denoise(x, sigma)

    return sigmas, checked


def sample_euler(denoise, x, sigmas, callback=None, interrupt=None):
    """Euler steps along the flow ODE dx/dsigma = v = (x - x0) / sigma; returns x at sigmas[-1]."""
    sigmas, denoise = _prepare(x, sigmas, interrupt, denoise)
    out_dtype, x, steps = x.dtype, x.float(), len(sigmas) - 1
    for i in range(steps):
        x0 = denoise(x, sigmas[i].expand(x.shape[0])).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * ((x - x0) / sigmas[i])
        if callback is not None:
            callback(i, steps, x, x0)
    return x.to(out_dtype)


def _unipc_coefficients(hh, ratios, order, variant):
    """Predictor/corrector weights of one UniPC step of the given order (UniPC paper, B(h) variants).

    ``hh = -h`` with h the step in lambda = -log sigma; ``ratios`` are the older steps' lambda
    offsets relative to h. Returns (B_h, h_phi_1, predictor weights or None, corrector weights).
    """
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    # rhs_k = k! * hh * phi_{k+1}(hh) / B(h) for k = 1..order, with phi_1(hh) = expm1(hh) / hh and
    # hh * phi_{k+1} = phi_k - 1/k! (the exponential-integrator phi functions of the UniPC paper)
    rhs, hh_phi, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rhs.append(hh_phi * factorial / b_h)
        factorial *= k + 1
        hh_phi = hh_phi / hh - 1 / factorial
    rhs = torch.stack(rhs)
    nodes = torch.stack(ratios + [torch.ones_like(hh)])
    vandermonde = torch.stack([nodes ** k for k in range(order)])
    # With a single free weight the paper (and the original) fix it at 1/2 instead of solving for it.
    predictor = None if order == 1 else (
        torch.tensor([0.5], device=hh.device) if order == 2
        else torch.linalg.solve(vandermonde[:-1, :-1], rhs[:-1]))
    corrector = (torch.tensor([0.5], device=hh.device) if order == 1
                 else torch.linalg.solve(vandermonde, rhs))
    return b_h, h_phi_1, predictor, corrector


def _weighted_sum(tensors, weights):
    # stack on dim 1 and contract with one tensordot: the original's reduction order, so results match
    # it bit for bit (a Python sum of products differs in the last bits)
    return torch.tensordot(torch.stack(tensors, dim=1), weights, dims=([1], [0]))


def sample_unipc(denoise, x, sigmas, callback=None, interrupt=None, variant="bh1"):
    """UniPC (multistep predictor-corrector) in data prediction for flow matching.

    Matches the original FramePack: order ``min(3, len(sigmas) - 2)`` reached after a warm-up at lower
    orders, one model call per step at sigmas[0] .. sigmas[-2], and the result is the model's last x0
    prediction (made at sigmas[-2]); sigmas[-1] itself is never evaluated. With one step (two sigmas)
    that means a single model call at sigmas[0] whose x0 is returned, which is what the original does.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas, denoise = _prepare(x, sigmas, interrupt, denoise)
    out_dtype, x, steps = x.dtype, x.float(), len(sigmas) - 1
    max_order = max(min(3, steps - 1), 1)
    sigma = sigmas[0].expand(x.shape[0])
    x0 = denoise(x, sigma).float()
    history = [(sigma, -torch.log(sigma), x0)]  # (sigma, lambda, x0) of the last max_order steps
    if callback is not None:
        callback(0, steps, x, x0)
    for i in range(1, steps):
        order = min(i, max_order)
        sigma = sigmas[i].expand(x.shape[0])
        lam = -torch.log(sigma)
        sigma_prev, lam_prev, x0_prev = history[-1]
        h = lam - lam_prev
        older = history[-order:-1][::-1]  # most recent first
        ratios = [((lam_k - lam_prev) / h)[0] for _, lam_k, _ in older]
        diffs = [(x0_k - x0_prev) / r for (_, _, x0_k), r in zip(older, ratios)]
        b_h, h_phi_1, rho_p, rho_c = _unipc_coefficients(-h[0], ratios, order, variant)
        shape = (-1,) + (1,) * (x.ndim - 1)
        # first-order (DDIM-like) step from the newest prediction, then higher-order corrections
        x_base = (sigma / sigma_prev).view(shape) * x - h_phi_1 * x0_prev
        x_pred = x_base if rho_p is None else x_base - b_h * _weighted_sum(diffs, rho_p)
        x0 = denoise(x_pred, sigma).float()
        correction = rho_c[-1] * (x0 - x0_prev)
        if diffs:
            correction = _weighted_sum(diffs, rho_c[:-1]) + correction
        x = x_base - b_h * correction
        history = (history + [(sigma, lam, x0)])[-max_order:]
        if callback is not None:
            callback(i, steps, x, x0)
    return x0.to(out_dtype)


SAMPLERS = {
    "unipc_bh1": functools.partial(sample_unipc, variant="bh1"),
    "unipc_bh2": functools.partial(sample_unipc, variant="bh2"),
    "euler": sample_euler,
}


def sample(name, denoise, x, sigmas, callback=None, interrupt=None):
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](denoise, x, sigmas, callback=callback, interrupt=interrupt)
