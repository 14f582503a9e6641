"""Shared model fixtures: the embedded SmolLM2 (loaded once per test session) and its transformers twin.

Ray fixtures live in tests/conftest.py. Loading the embedded model takes ~2 s from the safetensors cache that
`scripts/setup.sh` builds.
"""
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    from kvcomm.model_loading import load_model
    return load_model()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    from kvcomm.model_loading import build_hf_model
    return build_hf_model(smollm2)


@pytest.fixture(scope="session")
def smollm2_engine_parts(smollm2):
    """(runner, tokenizer) for building engines over the shared weights."""
    from kvcomm.runner import ModelRunner
    return ModelRunner(smollm2.spec, smollm2.state_dict), smollm2.tokenizer
