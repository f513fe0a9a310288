"""Adversarial files: truncations and header corruptions of a real tiny checkpoint and a real LoRA.

Every case must either load (a valid file that happens to differ) or raise the project's CheckpointError;
never a raw struct / JSON / torch error and never a crash. Cases are drawn from a fixed seed.
"""

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from framepack_core.files import CheckpointError
from framepack_core.loading import load_transformer
from framepack_core.lora import convert_lora, read_lora
from framepack_core.synthetic import TINY, random_state_dict, save_single_file

CASES = 100  # per file and kind of corruption
DTYPES = ["F32", "F16", "BF16", "F64", "F8_E4M3", "I8", "I64", "BOOL", "U16", "F8_E8M0", "C64", "F4", "Q4_K", "",
          7, None, ["F32"]]


def split(data):
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header, payload, length_delta=0):
    raw = json.dumps(header).encode()
    return (len(raw) + length_delta).to_bytes(8, "little", signed=False) + raw + payload


def shape_mutations(shape):
    numel = 1
    for d in shape:
        numel *= d
    return [shape + [1], shape[:-1], [numel], list(reversed(shape)), [], [0] + shape, [d + 1 for d in shape],
            [-1] + shape[1:], [2 ** 62] + shape[1:], [1.5] + shape[1:], ["8"] + shape[1:], "shape", None]


def header_mutation(data, rng):
    header, payload = split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    kind = rng.randrange(9)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        entry["shape"] = rng.choice(shape_mutations(list(entry["shape"])))
    elif kind == 2:
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[stop, start], [start + 4, stop + 4], [start, stop + 1], [-4, stop],
                                            [start, 2 ** 64], [start], [start, stop, 0], "0-8", [start, str(stop)]])
    elif kind == 3:  # two tensors swap offsets: consistent only when their sizes match
        other = header[rng.choice([k for k in header if k != "__metadata__"])]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header[name] = rng.choice([None, [], "tensor", 3, {"dtype": "F32"}])
    elif kind == 6:
        header["__metadata__"] = rng.choice([{"a": 1}, [], "meta", {"format": "pt"}])
    elif kind == 7:
        return join(header, payload, length_delta=rng.choice([-2, -1, 1, 7, 2 ** 40]))
    else:
        return join(header, payload[:-rng.randrange(1, 64)])
    return join(header, payload)


def byte_flip(data, rng):
    length = int.from_bytes(data[:8], "little")
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(0, 8 + length)
        out[at] = rng.choice([rng.randrange(256), ord("{"), ord("}"), ord('"'), ord("9"), ord("-"), ord(","), 0])
    return bytes(out)


def truncation(data, rng):
    length = int.from_bytes(data[:8], "little")
    return data[:rng.choice([0, 1, 7, 8, 9, 8 + length - 1, 8 + length, 8 + length + 1, len(data) - 1,
                             rng.randrange(len(data))])]


CORRUPTIONS = {"truncation": truncation, "byte_flip": byte_flip, "header": header_mutation}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = save_single_file(tmp_path_factory.mktemp("fuzz") / "tiny.safetensors", random_state_dict(TINY, seed=2))
    return path.read_bytes()


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory):
    shapes = random_state_dict(TINY)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "proj_out"):
        out, fan_in = shapes[f"{module}.weight"].shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, fan_in, generator=gen)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
        tensors[f"transformer.{module}.alpha"] = torch.tensor(4.0)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = torch.randn(4, TINY.num_heads * TINY.head_dim,
                                                                                     generator=gen)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(3 * TINY.num_heads * TINY.head_dim,
                                                                                   4, generator=gen)
    path = tmp_path_factory.mktemp("fuzz") / "lora.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def load_lora(path):
    lora = read_lora(path)
    return convert_lora(lora, {k: tuple(v.shape) for k, v in random_state_dict(TINY).items()})


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("target", ["checkpoint", "lora"])
def test_corrupted_files_load_or_fail_clearly(request, tmp_path, target, corruption):
    data = request.getfixturevalue(f"{target}_bytes")
    load = load_transformer if target == "checkpoint" else load_lora
    rng = random.Random(f"{target}-{corruption}")
    outcomes = {"loaded": 0, "clear error": 0}
    for case in range(CASES):
        path = tmp_path / f"{case}.safetensors"
        mutated = CORRUPTIONS[corruption](data, rng)
        path.write_bytes(mutated)
        try:
            result = load(path)
        except CheckpointError as e:
            assert str(e).startswith(path.name), f"case {case}: the message must name the file: {e}"
            outcomes["clear error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - any other error type is the bug this test looks for
            pytest.fail(f"{target} {corruption} case {case} raised {type(e).__name__}: {e}\n"
                        f"first bytes: {mutated[:200]!r}")
        outcomes["loaded"] += 1
        if target == "checkpoint":
            assert result.config == TINY
        else:
            assert result.total > 0
    assert outcomes["clear error"] > CASES // 2, outcomes  # the corruptions mostly break the file
