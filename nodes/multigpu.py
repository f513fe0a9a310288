"""FramePack Sampler on the work units of ComfyUI's MultiGPU CFG Split (``MultiGPU_WorkUnits``).

That node gives a MODEL copies of its model on other devices. Core's samplers then spread the conditionings
of each step over the devices; with real CFG (cfg > 1) FramePack has two per step, the positive and the
negative prompt, so here the positive runs on the MODEL's device while the negative runs at the same time on
the first work unit's device. With cfg 1 there is nothing to split: FramePack samples on one device and the
copies are neither loaded nor used. The copies are built without their weights (``model.rebuild_framepack``):
only the one the negative prompt runs on reads them, so unused copies cost no disk read and no memory.

Read (0.33): comfy_extras/nodes_multigpu.py ``MultiGPUCFGSplitNode``; comfy/multigpu.py
``create_multigpu_deepclones`` (one copy per extra device, built through the loader's ``cached_patcher_init``,
listed under the MODEL's additional models "multigpu" with ``is_multigpu_base_clone``) and
``MultiGPUThreadPool``; comfy/sampler_helpers.py ``_prepare_sampling`` (``match_multigpu_clones`` carries the
MODEL's patches to the copies) and ``prepare_model_patcher_multigpu_clones``; comfy/samplers.py
``_calc_cond_batch_multigpu`` (ceil(conds / devices) conds per device, each device's share run by the pool's
thread for that device on that device's copy, outputs moved back to the sampling device) and ``outer_sample``
(``pre_run`` / ``cleanup`` of every copy). 0.3.64 has no MultiGPU nodes: no MODEL has work units there.
"""

import logging

import torch

from ..framepack_core.sampling import condition_of_batch
from .model import read_weights_of

WORK_UNITS = "multigpu"  # the additional-models key MultiGPU CFG Split lists its copies under


def work_units(model):
    return [unit for unit in model.get_additional_models_with_key(WORK_UNITS)
            if getattr(unit, "is_multigpu_base_clone", False)]


def negative_work_unit(model, cfg):
    """The work unit (a ModelPatcher on another device) that runs the negative prompt, or None: one device.

    Says in the log which devices sample, and which copies stay unused.
    """
    if cfg == 1.0:
        one_device(model, "with cfg 1 there is no negative prompt")
        return None
    units = work_units(model)
    if not units:
        return None
    model.match_multigpu_clones()  # as core's samplers do: the copies get the MODEL's current patches
    unit, *idle = units
    read_weights_of(unit)  # built without weights: this copy is used, so it reads them now
    logging.info("[FramePack] CFG split over two devices: the positive prompt on %s, the negative on %s.%s",
                 model.load_device, unit.load_device,
                 f" The copies on {', '.join(str(u.load_device) for u in idle)} are not loaded and their weights "
                 "never read: FramePack has two conditionings per step." if idle else "")
    return unit


def one_device(model, why):
    """Say in the log that this run samples on the MODEL's device alone although it has work units."""
    units = work_units(model)
    if units:
        logging.info("[FramePack] FramePack samples on one device (%s): MultiGPU CFG Split runs the positive and the "
                     "negative prompt on separate devices, and %s. Its copies on %s are not loaded and their "
                     "weights are never read; MultiGPU CFG Split is not needed here.",
                     model.load_device, why, ", ".join(str(u.load_device) for u in units))


class CFGSplit:
    """A FramePack model call that runs each batched CFG call (positive and negative as one batch of 2, see
    ``framepack_core.sampling.batch_conditions``) as two calls at once: the positive here, on the MODEL's
    device, the negative in a worker thread on the work unit's device, as core's ``MultiGPUThreadPool`` runs a
    device's share. Other calls go to the MODEL unchanged. ``close()`` ends the worker."""

    def __init__(self, model_call, unit_call, unit_device):
        import comfy.multigpu  # only ComfyUIs with MultiGPU nodes make work units

        self.model_call, self.unit_call, self.unit_device = model_call, unit_call, unit_device
        self.pool = comfy.multigpu.MultiGPUThreadPool([unit_device])

    def __call__(self, hidden_states, timestep, transformer_options, **inputs):
        if transformer_options.get("cond_or_uncond") != [0, 1]:
            return self.model_call(hidden_states, timestep, transformer_options, **inputs)
        negative = self._half(1, hidden_states, timestep, transformer_options, inputs, self.unit_device)
        negative["transformer_options"]["multigpu_thread_device"] = self.unit_device
        self.pool.submit(self.unit_device, lambda: self.unit_call(**negative))
        try:
            positive = self.model_call(**self._half(0, hidden_states, timestep, transformer_options, inputs))
        finally:
            result, error = self.pool.get_result(self.unit_device)  # never leave the worker's result behind
        if error is not None:
            raise error
        return torch.cat([positive, result.to(positive.device)])

    @staticmethod
    def _half(index, hidden_states, timestep, options, inputs, device=None):
        """One sample of the batched call, as keyword arguments of a model call, on ``device`` (None: where it is)."""
        move = (lambda t: t) if device is None else (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
        sample = {k: move(v) for k, v in condition_of_batch(inputs, index).items()}
        options = {**options, "sigmas": move(options["sigmas"][index : index + 1]), "cond_or_uncond": [index]}
        if "sample_sigmas" in options:
            options["sample_sigmas"] = move(options["sample_sigmas"])
        return dict(hidden_states=move(hidden_states[index : index + 1]), timestep=move(timestep[index : index + 1]),
                    transformer_options=options, **sample)

    def close(self):
        self.pool.shutdown()
