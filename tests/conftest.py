"""The suite's shared fixtures, and the tier marker every test gets from its folder (tests/support/tiers.py).

Model fixtures: the embedded SmolLM2 (loaded once per session, ~2 s from the safetensors cache `scripts/setup.sh`
builds), its transformers twin, and a tiny random-weight model directory for tests that need a model server, not
the real weights; `oracle` and `tiny_model` are engines/models over those random weights, built once per module.
Ray: ONE local Ray cluster for the whole session, started only by tests that ask for it. Serve apps are started by
each module or package through `tests.support.serve_app.running_app`.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.support.tiers import TIERS, tier_of

os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # Ray 2.60 enables token auth by default; local only here
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier (`pytest -m unit` selects tests/unit, and so on) and run the tiers
    from the cheapest (unit, no Ray) to the dearest (a stable sort: each file's tests stay together, in order)."""
    order = {tier: index for index, tier in enumerate(TIERS)}
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)
    items.sort(key=lambda item: order.get(tier_of(item.path), len(order)))


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """tiny-llama's architecture with the embedded tokenizer's vocabulary, random weights (seed 3)."""
    from kvcomm.model_loading import load_model
    loaded = load_model(tiny_model_dir, random_weights=True, seed=3)
    assert loaded.tokenizer is not None
    return loaded


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    """The in-process engine over the tiny random weights a test Serve app loads (gamma 1.0): the results the app
    must reproduce in dense mode."""
    from kvcomm.config import KVCommConfig
    from kvcomm.engine import build_engine
    return build_engine(tiny_model_dir, random_weights=True, config=KVCommConfig(gamma=1.0))


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model's ops are too small to split: one thread is faster, and far faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# Ray
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=1 << 30,  # never another's
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if "ray.serve" in sys.modules:   # only when a test used Serve (importing it is slow and noisy)
            sys.modules["ray.serve"].shutdown()
        ray.shutdown()
