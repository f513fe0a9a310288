"""Shared fixtures: tiny random FramePack checkpoints and diffusers' reference transformer."""

import pytest

from framepack_core.synthetic import TINY, random_state_dict, save_single_file
from oracle import diffusers_reference


@pytest.fixture(scope="session")
def tiny_state():
    return random_state_dict(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_file(tiny_state, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("ckpt") / "framepack_tiny.safetensors", tiny_state)


@pytest.fixture(scope="session")
def reference(tiny_state):
    return diffusers_reference(TINY, tiny_state)
