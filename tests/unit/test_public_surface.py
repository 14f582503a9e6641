"""Each package's `__init__` names its public surface; the shared names and generation parameters have one home."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import actors
import cluster
import cluster.batch
import cluster.serve
import kvcomm
import kvcomm.harness
from kvcomm.errors import first_line
from kvcomm.harness.jobs import GenerationParams as JobGenerationParams
from kvcomm.sampling import GenerationParams, Sampling


@pytest.mark.parametrize("package", [kvcomm, kvcomm.harness, actors, cluster, cluster.batch, cluster.serve],
                         ids=lambda p: p.__name__)
def test_every_public_name_resolves_from_its_package(package):
    assert package.__all__, package.__name__
    for name in package.__all__:
        value = getattr(package, name)
        assert getattr(value, "__name__", name) == name or not callable(value), (package.__name__, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(package, "not_a_name")
    submodules = {p.stem for p in pathlib.Path(package.__file__).parent.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert not submodules & set(package.__all__), "a public name that is also a submodule hides the submodule"


def test_the_shared_names_import_without_torch():
    code = "import sys, kvcomm.names, kvcomm.cli_args, kvcomm.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_jobs_and_the_decoder_share_one_generation_params_class():
    assert JobGenerationParams is GenerationParams and issubclass(Sampling, GenerationParams)
    params = GenerationParams(max_new_tokens=8, min_new_tokens=2, temperature=0.5, top_p=0.9, seed=3, stop=["END"])
    sampling = Sampling.of(params, (2,))
    assert sampling.stop == ("END",) and sampling.stop_token_ids == (2,) and sampling.to_dict() == params.to_dict()
    assert params.to_dict() == {"max_new_tokens": 8, "min_new_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                                "seed": 3, "stop": ["END"]}
    assert GenerationParams(top_p=0).problem() == ("top_p", "must be in (0, 1], got 0")
    assert GenerationParams(max_new_tokens=9000).problem(8192) == ("max_new_tokens", "must be in [1, 8192], got 9000")
    with pytest.raises(ValueError, match=r"^min_new_tokens: must not exceed max_new_tokens \(4\), got 5$"):
        Sampling(max_new_tokens=4, min_new_tokens=5)


def test_first_line_names_the_type_and_keeps_one_line():
    assert first_line(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("x" * 500), limit=10) == "RuntimeError: " + "x" * 10
