"""Ray fixtures: ONE local Ray cluster for the whole test session, started only by tests that ask for it.

Model fixtures (the embedded SmolLM2 and its transformers twin) live in the repository's root conftest.py.
"""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # Ray 2.60 enables token auth by default; local only here


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
