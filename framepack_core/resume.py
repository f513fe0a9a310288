"""Resumable generations: the state after each finished section, its fingerprint, and where it is kept.

A FramePack generation is a loop of sections. After each one, everything the rest of the loop depends on
is small and explicit: the video latents so far (the history buffer is them plus zero padding), the
position in the schedule and the noise generator's state (one CPU generator draws every section's noise in
order). TeaCache starts afresh in every section, so it carries nothing over. Restoring those three gives
a continuation that is bit-identical to a run that was never interrupted.

A state is only valid for the generation that wrote it. Its *fingerprint* is a SHA-256 over everything
that determines the result: the weights' identity, every conditioning tensor and latent (dtype, shape and
bytes), the schedule, the sampler settings and the device type. ``generate()`` builds it; a state whose
fingerprint differs is ignored and the generation starts afresh.

States are safetensors files (tensors plus JSON metadata), never pickles, so loading one cannot run code.
They are written atomically (a temporary file in the same folder, fsync, ``os.replace``): a crash while
saving leaves the previous state intact.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FORMAT = 1  # bump when the state's meaning changes, so older files are not resumed
DEFAULT_MAX_BYTES = 2 * 1024 ** 3  # ResumeStore keeps the newest states that fit in this many bytes
WEIGHT_SAMPLES = 1024  # elements hashed per weight tensor by weights_digest
_STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a crash mid-save


@dataclass(frozen=True)
class GenerationState:
    """Where a generation stands after ``sections_done`` of its ``num_sections`` sections.

    latents: the video latents so far, (1, C, T, H, W) float32 in temporal order (model space, as
    ``GenerationResult.latents`` but without an extended video's prefix). generator_state: the noise
    generator's ``get_state()`` after the last finished section.
    """

    fingerprint: str
    sections_done: int
    num_sections: int
    latents: torch.Tensor
    generator_state: torch.Tensor

    @property
    def finished(self) -> bool:
        return self.sections_done >= self.num_sections


# ---------------------------------------------------------------------------------------------
# fingerprints


class Fingerprint:
    """SHA-256 over named values: tensors (dtype, shape, bytes), numbers, strings, containers, dataclasses.

    Each value is fed with a type tag and its length, so different inputs cannot collide by concatenation.
    """

    def __init__(self):
        self._hash = hashlib.sha256()

    def add(self, name: str, value) -> "Fingerprint":
        self._text("name", name)
        self._value(value)
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def _text(self, tag: str, text: str) -> None:
        data = text.encode()
        self._hash.update(f"{tag}:{len(data)}:".encode())
        self._hash.update(data)

    def _value(self, value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            self._text("tensor", f"{tensor.dtype}{tuple(tensor.shape)}")
            if tensor.device.type != "meta" and tensor.numel():
                self._hash.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
            self._text(type(value).__name__, value.hex() if isinstance(value, bytes) else repr(value))
        elif isinstance(value, enum.Enum):
            self._text("enum", f"{type(value).__qualname__}.{value.name}")
        elif isinstance(value, dict):
            self._text("dict", str(len(value)))
            for key in sorted(value, key=repr):
                self._value(key)
                self._value(value[key])
        elif isinstance(value, (list, tuple)):
            self._text("seq", str(len(value)))
            for item in value:
                self._value(item)
        elif dataclasses.is_dataclass(value):
            self._text("dataclass", type(value).__qualname__)
            for f in dataclasses.fields(value):
                self.add(f.name, getattr(value, f.name))
        elif callable(getattr(value, "settings", None)):  # a step-cache strategy: its settings decide the result
            self._text("object", type(value).__qualname__)
            self._value(value.settings())
        else:
            raise TypeError(f"cannot fingerprint a {type(value).__qualname__}; pass its identity as a string.")


def weights_digest(model: torch.nn.Module, samples: int = WEIGHT_SAMPLES) -> str:
    """A cheap identity of a model's weights: every name, dtype and shape, and ``samples`` evenly strided
    elements of each tensor. Much faster than hashing gigabytes; callers that know where the weights came
    from (a file, its LoRA patches) should pass that as the identity instead."""
    fp = Fingerprint()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(flat.numel() // samples, 1)
        fp.add(name, f"{tensor.dtype}{tuple(tensor.shape)}")
        fp.add("sample", flat[::step][:samples])
    return fp.hexdigest()


# ---------------------------------------------------------------------------------------------
# files


def save_state(path, state: GenerationState) -> Path:
    """Write ``state`` to ``path`` atomically: a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": STATE_FORMAT, "fingerprint": state.fingerprint, "sections_done": state.sections_done,
            "num_sections": state.num_sections}
    tensors = {"latents": state.latents.detach().float().cpu().contiguous(),
               "generator_state": state.generator_state.detach().cpu().contiguous()}
    fd, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata={"framepack_resume": json.dumps(meta)})
        with open(temp, "r+b") as f:  # a writable handle: Windows cannot fsync a read-only one
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open folders, and renames there are journaled."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path) -> GenerationState:
    """Read a state written by ``save_state``. Raises ValueError naming the file if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["framepack_resume"])
        tensors = load_file(str(path))
        state = GenerationState(str(meta["fingerprint"]), int(meta["sections_done"]), int(meta["num_sections"]),
                                tensors["latents"], tensors["generator_state"])
    except Exception as e:  # any malformed file is one answer: not a usable state
        raise ValueError(f"{path} is not a FramePack resume state ({type(e).__name__}: {e}); delete it.") from e
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is a resume state of format {meta.get('format')!r}, this version reads "
                         f"{STATE_FORMAT}; delete it.")
    if (state.latents.ndim != 5 or state.latents.dtype != torch.float32 or state.generator_state.ndim != 1
            or state.generator_state.dtype != torch.uint8 or not 0 <= state.sections_done <= state.num_sections):
        raise ValueError(f"{path} holds an inconsistent resume state; delete it.")
    return state


class ResumeStore:
    """Resume states in one folder, one file per fingerprint, the newest kept within ``max_bytes``.

    Use ``generate(..., resume_from=store.load, on_state=store.save)`` and ``store.delete(fingerprint)``
    once the generation has finished.
    """

    def __init__(self, folder, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
        self.folder, self.max_bytes = Path(folder), max_bytes

    def path(self, fingerprint: str) -> Path:
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"a fingerprint is a hex digest, got {fingerprint!r}.")
        return self.folder / f"{fingerprint}.safetensors"

    def load(self, fingerprint: str) -> Optional[GenerationState]:
        """The saved state for this fingerprint, or None. An unreadable file is reported and removed."""
        path = self.path(fingerprint)
        if not path.is_file():
            return None
        try:
            return load_state(path)
        except ValueError as e:
            log.warning("[FramePack] %s Starting afresh.", e)
            path.unlink(missing_ok=True)
            return None

    def save(self, state: GenerationState) -> Path:
        path = save_state(self.path(state.fingerprint), state)
        self.prune(keep=path)
        return path

    def delete(self, fingerprint: str) -> None:
        self.path(fingerprint).unlink(missing_ok=True)

    def prune(self, keep: Optional[Path] = None) -> None:
        """Delete the oldest states beyond ``max_bytes`` (never ``keep``) and temporaries left by crashes."""
        if not self.folder.is_dir():
            return
        now = time.time()
        for temp in self.folder.glob(".*.tmp"):
            if now - _mtime(temp) > _STALE_TEMP_SECONDS:
                temp.unlink(missing_ok=True)
        files = sorted(self.folder.glob("*.safetensors"), key=_mtime, reverse=True)
        total = sum(_size(f) for f in files if f == keep)
        for f in files:
            if f == keep:
                continue
            size = _size(f)
            if total + size > self.max_bytes:
                log.info("[FramePack] resume folder over %d bytes: removing the old state %s", self.max_bytes, f)
                f.unlink(missing_ok=True)
            else:
                total += size


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
