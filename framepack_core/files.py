"""Opening .safetensors files defensively: say what a file is before trusting it.

Model and LoRA files come from downloads that stop half way, from Git LFS pointers and web pages saved in
place of the file, and as pickles. The header (length, JSON, dtypes, shapes, offsets) is parsed and checked
here before safetensors or torch read anything, so every malformed file becomes a ``CheckpointError`` that
names the file, what it looks like and the fix. Pickles are never unpickled.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# floating-point dtypes weights may have, by their safetensors names
FLOAT_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# the other dtypes safetensors defines, with their sizes in bytes: valid files, but never weights
OTHER_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
                "F8_E8M0": 1, "C64": 8}
ITEM_SIZES = {**{k: torch.empty((), dtype=v).element_size() for k, v in FLOAT_DTYPES.items()}, **OTHER_DTYPES}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DOWNLOAD_AGAIN = "The download was interrupted or the file is damaged: download it again."


class CheckpointError(ValueError):
    """A model or LoRA file that cannot be loaded; the message names the file, what it is and the fix."""


def _fail(file, looks, fix=DOWNLOAD_AGAIN):
    raise CheckpointError(f"{Path(file).name} {looks}. {fix}")


def _sniff(file, head, size):
    """Name what a file that is not a safetensors file is, from its first bytes."""
    text = head.lstrip()
    if size == 0:
        _fail(file, "is empty (0 bytes)")
    if size < 8:  # not even a header length: its first bytes (e.g. 0x80, a pickle's) say nothing
        _fail(file, f"is too short to be a safetensors file ({size} bytes); it is empty or truncated")
    if head.startswith(b"version https://git-lfs"):
        _fail(file, "is a Git LFS pointer (a small text file standing in for the weights), not the weights",
              "Download the real file (`git lfs pull`, or the file's download link).")
    if text[:1] == b"<":
        _fail(file, "is a web page (HTML), not weights: the download saved an error or login page")
    if text[:1] in (b"{", b"["):
        _fail(file, "is a JSON text file, not weights", "Pick the .safetensors weights file, not a config or index.")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        _fail(file, "is a pickled PyTorch checkpoint, not safetensors. Pickles can run arbitrary code and are "
              "never loaded", "Use a .safetensors release of the same weights.")
    if head.startswith(b"GGUF"):
        _fail(file, "is a GGUF file (a quantised format this loader does not read)",
              "Use a .safetensors release (bf16 or fp8).")
    _fail(file, "is not a safetensors file: its first bytes are neither a safetensors header nor another "
          "known format (random or damaged data)")


def read_header(file):
    """{tensor name: (shape, safetensors dtype name)} from a checked safetensors header.

    Raises CheckpointError for anything that is not a complete, consistent safetensors file.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(64)
        length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        # the header's JSON follows its length; a file cut right after the length has none of it (truncated)
        if head[8:9] not in (b"{", b"") or not 2 <= length <= MAX_HEADER_BYTES:
            _sniff(file, head, size)
        if 8 + length > size:
            _fail(file, f"is truncated: its header alone should take {length} bytes but the file has {size}")
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        _fail(file, f"has a damaged header (not valid JSON: {e})")
    if not isinstance(header, dict):
        _fail(file, "has a damaged header (not a JSON object of tensors)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _fail(file, "has damaged metadata (safetensors metadata maps names to strings)")
    tensors, spans = {}, []
    for key, entry in header.items():
        shape, dtype, offsets = _entry(file, key, entry)
        want = math.prod(shape) * ITEM_SIZES[dtype]
        if offsets[1] - offsets[0] != want:
            _fail(file, f"has an inconsistent header: tensor {key} ({dtype} {list(shape)}) needs {want} bytes "
                  f"but its offsets {list(offsets)} span {offsets[1] - offsets[0]}")
        tensors[key] = (shape, dtype)
        spans.append((offsets, key))
    end = 0
    for (start, stop), key in sorted(spans):
        if start != end:
            _fail(file, f"has an inconsistent header: tensor {key} starts at byte {start}, where the previous "
                  f"tensor ends at {end} (overlap or gap)")
        end = stop
    data = size - 8 - length
    if end > data:
        _fail(file, f"is truncated: its tensors need {end} bytes after the header but only {data} are there")
    if end < data:
        _fail(file, f"has {data - end} unexpected bytes after its last tensor (damaged or not one file)")
    return tensors


def _entry(file, key, entry):
    """(shape, dtype, offsets) of one header entry, checked."""
    def ints(value, n=None):
        return (isinstance(value, list) and (n is None or len(value) == n)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))

    if not isinstance(entry, dict) or not ints(entry.get("shape")) or not ints(entry.get("data_offsets"), 2):
        _fail(file, f"has a damaged header entry for tensor {key!r} ({str(entry)[:80]})")
    dtype, offsets = entry.get("dtype"), entry["data_offsets"]
    if dtype not in ITEM_SIZES:
        _fail(file, f"has a tensor {key!r} of dtype {dtype!r}, which this loader cannot read (damaged header, "
              "or a newer quantised format)", "Use a bf16, fp16, fp32 or fp8 .safetensors file.")
    if offsets[0] > offsets[1]:
        _fail(file, f"has an inconsistent header: tensor {key} ends (byte {offsets[1]}) before it starts "
              f"({offsets[0]})")
    return tuple(entry["shape"]), dtype, tuple(offsets)


def open_safetensors(file):
    """safe_open on a file whose header ``read_header`` already accepted (errors become CheckpointError)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        _fail(file, f"is not a readable safetensors file ({e})")


def non_float(tensors):
    """'name (dtype)' of the integer and bool tensors in {name: (shape, dtype)}, for error messages."""
    return [f"{k} ({d})" for k, (_, d) in tensors.items() if d not in FLOAT_DTYPES]
