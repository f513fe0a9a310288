"""Step caches that skip transformer evaluations whose result barely changes.

A cache is a per-call strategy (``TeaCache(0.15)``, ``MagCache(...)``) handed to ``generate``. It holds
only its settings and running totals; every sampling run of every conditioning stream (positive,
negative) gets its own fresh state from ``start()``, so two streams, two sections or two calls never
share a skip decision or a residual. When a state says "skip", the model returns its input plus the
residual its blocks added the last time they ran for that stream.

TeaCache (as the original FramePack uses it): at each step, measure the relative L1 change of the first
dual block's modulated input, map it through a polynomial fitted for HunyuanVideo, and accumulate it.
While the accumulated value stays below the threshold the blocks are skipped. The first and last step
of a sampling run always compute.

MagCache (Ma et al., 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"): the residual's
magnitude changes by a nearly fixed ratio from one step to the next, the same for any input, so one
calibration run gives per-step ratios. Skipping k steps in a row is estimated to cost an error of
sum_j |1 - prod_{i<=j} ratio_i|; steps are skipped while that stays under the threshold, at most K in a
row, and never in the first ``retention`` share of the steps.
"""

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# Polynomial (highest power first) mapping the input's relative L1 change to the output's, fitted for
# HunyuanVideo by the TeaCache authors and used unchanged by the original FramePack.
TEACACHE_POLY = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

# FramePack-Studio's published MagCache ratios for the released FramePack weights at its 640 resolution
# group and 25 steps ("Original" = FramePackI2V_HY, inverted sampling; "F1" = FramePack_F1_I2V_HY), from
# colinurbs/FramePack-Studio, diffusers_helper/models/mag_cache_ratios.py (commit f4369da, July 2025),
# calibrated there with seed 31337 and its default settings. Not re-measured here.
FRAMEPACK_MAG_RATIOS = {
    "inverted": (1.0, 1.30469, 1.22656, 1.05469, 1.02344, 1.03906, 1.02344, 1.03906, 1.05469, 1.02344, 1.03906,
                 0.99609, 1.02344, 1.03125, 1.01562, 1.02344, 1.00781, 1.03906, 0.98828, 1.0, 1.0, 0.98828,
                 0.94531, 0.93359, 0.78516),
    "forward": (1.0, 1.27344, 1.07031, 1.03906, 1.00781, 1.00781, 1.00781, 1.03125, 1.04688, 1.00781, 1.03125,
                0.99219, 1.01562, 1.01562, 1.01562, 1.00781, 0.98438, 1.05469, 0.98438, 0.96875, 1.03125,
                0.97266, 0.92578, 0.95703, 0.77734),
}
CALIBRATION_FORMAT = "framepack_magcache"


def polyval(coefficients, x):
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def _check_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"A step cache needs num_steps >= 1, got {num_steps!r}.")


class _Stream:
    """One conditioning stream's state for one sampling run: step counter and the last residual."""

    def __init__(self, owner, num_steps):
        self.owner, self.num_steps = owner, num_steps
        self.step = 0
        self.residual = None

    def can_skip(self, modulated_input):
        """Advance one step and say whether the blocks may be skipped (reusing ``self.residual``)."""
        if self.step >= self.num_steps:
            raise RuntimeError(f"A {type(self.owner).__name__} state was used for more than its {self.num_steps} "
                               "steps; start() a fresh state for every sampling run.")
        skip = self.decide(modulated_input) and self.residual is not None
        self.step += 1
        self.owner.steps += 1
        self.owner.skipped += skip
        return skip

    def store(self, residual):
        self.residual = residual


class _Strategy:
    def __init__(self):
        self.steps = self.skipped = 0  # running totals over every state this object started

    def settings(self):
        """What decides this cache's skips (a resume fingerprint hashes it): its settings, not its totals."""
        return {k: v for k, v in vars(self).items() if k not in ("steps", "skipped", "rows")}

    def start(self, num_steps, stream="positive"):
        """A fresh state for one sampling run of ``num_steps`` steps of one conditioning stream."""
        _check_steps(num_steps)
        return self.stream_class(self, num_steps)


class _TeaStream(_Stream):
    accumulated = 0.0
    previous_input = None

    def decide(self, modulated_input):
        threshold = self.owner.threshold
        if self.step in (0, self.num_steps - 1) or self.residual is None:
            compute = True
        else:
            prev = self.previous_input
            change = ((modulated_input - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += polyval(TEACACHE_POLY, change)
            compute = self.accumulated >= threshold
        if compute:
            self.accumulated = 0.0
        self.previous_input = modulated_input
        return not compute


class TeaCache(_Strategy):
    """TeaCache with the original's rule. Threshold 0.15 gives about 2.1x, 0.1 about 1.6x."""

    stream_class = _TeaStream

    def __init__(self, threshold=0.15):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {threshold!r}.")
        self.threshold = threshold

    def __repr__(self):
        return f"TeaCache({self.threshold})"


def rescale_ratios(ratios, num_steps):
    """Per-step ratios for ``num_steps`` from a calibration made with another step count.

    Nearest-neighbour resampling over the step index, as MagCache's reference implementations do: step i
    of the new run takes the ratio of step round(i * (n_old - 1) / (n_new - 1)) of the calibrated one
    (half-way values round to even, numpy's rule that those implementations use).
    """
    _check_steps(num_steps)
    ratios = tuple(ratios)
    if num_steps == len(ratios):
        return ratios
    if num_steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (num_steps - 1)
    return tuple(ratios[round(i * scale)] for i in range(num_steps))


class _MagStream(_Stream):
    def __init__(self, owner, num_steps):
        super().__init__(owner, num_steps)
        self.ratios = owner.ratios_for(num_steps)
        self.retain = max(1, int(owner.retention * num_steps))  # step 0 has no residual to reuse anyway
        self._reset()

    def _reset(self):
        self.ratio, self.error, self.run = 1.0, 0.0, 0

    def decide(self, _modulated_input):
        if self.step < self.retain:
            return False
        self.ratio *= self.ratios[self.step]
        self.error += abs(1.0 - self.ratio)
        self.run += 1
        if self.error < self.owner.threshold and self.run <= self.owner.max_skips:
            return True
        self._reset()
        return False


class MagCache(_Strategy):
    """MagCache's skip rule over calibrated per-step magnitude ratios.

    threshold: accumulated ratio error allowed while skipping (0 never skips; FramePack-Studio uses 0.1).
    max_skips: K, the most consecutive skipped steps. retention: share of the first steps never skipped.
    ratios: per-step ratios (ratio[0] = 1), e.g. from ``load_calibration``; a calibration for another step
    count is rescaled (``rescale_ratios``). Default: FramePack-Studio's ratios for the inverted model.
    """

    stream_class = _MagStream

    def __init__(self, threshold=0.1, max_skips=2, retention=0.25, ratios=FRAMEPACK_MAG_RATIOS["inverted"]):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"MagCache threshold must be >= 0, got {threshold!r}.")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise ValueError(f"MagCache max_skips must be an integer >= 1, got {max_skips!r}.")
        if not 0 <= retention <= 1:
            raise ValueError(f"MagCache retention must be in [0, 1], got {retention!r}.")
        ratios = tuple(float(r) for r in ratios)
        if len(ratios) < 2 or not all(math.isfinite(r) and r > 0 for r in ratios):
            raise ValueError(f"MagCache ratios must be at least 2 finite positive numbers, got {list(ratios)}; "
                             "calibrate them with FramePack MagCache Calibrate or framepack_core.magcache_calibrate.")
        self.threshold, self.max_skips, self.retention, self.ratios = threshold, max_skips, retention, ratios

    def ratios_for(self, num_steps):
        if num_steps != len(self.ratios):
            log.info("MagCache: ratios calibrated for %d steps, rescaled to %d.", len(self.ratios), num_steps)
        return rescale_ratios(self.ratios, num_steps)

    def __repr__(self):
        return f"MagCache({self.threshold}, max_skips={self.max_skips}, retention={self.retention})"


class _RecordingStream(_Stream):
    def __init__(self, owner, num_steps, row):
        super().__init__(owner, num_steps)
        self.row = row  # where this stream's ratios go; None: not recorded

    def decide(self, _modulated_input):
        return False

    def store(self, residual):
        if self.row is not None and self.residual is not None:
            # mean over tokens of |r_t| / |r_{t-1}|, norms over the channels: the paper's magnitude ratio
            self.row.append((residual.float().norm(dim=-1) / self.residual.float().norm(dim=-1)).mean().item())
        super().store(residual)


class MagCacheCalibration(_Strategy):
    """A cache that never skips and records each step's magnitude ratio of the positive stream.

    Pass it as the cache of one generation; ``ratios()`` then averages the ratios over its sections.
    """

    def __init__(self):
        super().__init__()
        self.rows = []

    def start(self, num_steps, stream="positive"):
        _check_steps(num_steps)
        row = None
        if stream == "positive":  # the ratios describe the model, one stream is enough
            row = [1.0]
            self.rows.append(row)
        return _RecordingStream(self, num_steps, row)

    def ratios(self):
        rows = [r for r in self.rows if len(r) > 1]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("No complete calibration recorded: run one whole generation (at least 2 steps) "
                             "with this cache.")
        return tuple(sum(column) / len(column) for column in zip(*rows))


def save_calibration(path, ratios, **metadata):
    """Write ratios as a small JSON file that ``load_calibration`` (and the sampler node) read."""
    ratios = [float(r) for r in ratios]
    if not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"MagCache calibration produced non-finite ratios {ratios}; the model output NaN/inf.")
    data = {"format": CALIBRATION_FORMAT, "steps": len(ratios), "ratios": ratios, **metadata}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def load_calibration(path):
    """Ratios from a calibration JSON file, checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read MagCache calibration {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or not isinstance(data.get("ratios"), list):
        raise ValueError(f"{path} is not a FramePack MagCache calibration (expected JSON with "
                         f"\"format\": \"{CALIBRATION_FORMAT}\" and \"ratios\"); make one with FramePack MagCache "
                         "Calibrate.")
    ratios = data["ratios"]
    if data.get("steps") != len(ratios):
        raise ValueError(f"{path}: \"steps\" is {data.get('steps')} but it holds {len(ratios)} ratios.")
    return tuple(ratios)
