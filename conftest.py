"""Shared model fixtures: the embedded SmolLM2 (loaded once per test session), its transformers twin, and a tiny
random-weight model directory for tests that need a model server, not the real weights.

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A model directory (config only) with tiny-llama's architecture and the embedded tokenizer's 49152-token
    vocabulary; load it with ``random_weights=True``. Read-only: every test may share it."""
    from kvcomm.model_loading import hf_config_from_spec
    from kvcomm.model_spec import PRESETS
    directory = tmp_path_factory.mktemp("tiny-llama-49152")
    hf_config_from_spec(PRESETS["tiny-llama"].with_(vocab_size=49152)).save_pretrained(directory)
    return str(directory)
