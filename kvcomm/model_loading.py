"""From a model source to weights the runner can use: `load_model` returns a `LoadedModel`.

A source is the embedded model's name (`kvcomm.names.EMBEDDED_MODEL`, from `kvcomm.embedded_model`'s cache), a
Hugging Face checkpoint directory, a ``.gguf`` file, or a preset with ``random_weights`` (timing runs). This module
only picks the reader and resolves device and dtype; the readers, `ModelLoadError` and the transformers oracle live
in `kvcomm.model_formats`. Run ``python -m kvcomm.model_loading prepare [--cache-dir DIR]`` to build the cache.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from kvcomm.embedded_model import (CACHE_DIR_ENV, DEFAULT_CACHE_DIR, EMBEDDED_PRESET, cache_is_complete,
                                   embedded_cache_dir, embedded_tokenizer_or_none, prepare_embedded)
from kvcomm.model_formats import (LoadedModel, ModelLoadError, build_hf_model, check_runner_support, default_dtype,
                                  expected_shapes, hf_config_from_spec, load_gguf, load_hf_directory,
                                  random_state_dict, read_directory_config, resolve_device, resolve_dtype,
                                  spec_from_config)
from kvcomm.model_spec import PRESETS, ModelSpec
from kvcomm.names import EMBEDDED_MODEL
from kvcomm.word_tokenizer import WordTokenizer

# The loading API in one import (the names defined in model_formats / embedded_model are their homes).
__all__ = ["LoadedModel", "ModelLoadError", "build_hf_model", "default_dtype", "expected_shapes", "hf_config_from_spec",
           "load_model", "model_spec_of", "prepare_embedded", "resolve_dtype"]


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or source.endswith((".gguf", ".safetensors", ".json")))


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith(("/", ".", "~"))


def _expected_sources() -> str:
    return (f"expected {EMBEDDED_MODEL!r}, a directory with config.json + *.safetensors, a .gguf file, "
            f"or a preset with random_weights=True (presets: {', '.join(PRESETS)})")


def _random_spec(source: str) -> tuple[ModelSpec, str]:
    """The architecture to randomize: a preset, the embedded model's, or a checkpoint directory's config."""
    if source == EMBEDDED_MODEL:
        return PRESETS[EMBEDDED_PRESET], EMBEDDED_MODEL
    if source in PRESETS:
        return PRESETS[source], source
    path = Path(source).expanduser()
    if path.is_dir():
        return spec_from_config(read_directory_config(path, source), source), source
    if path.exists() or _looks_like_path(source):
        raise ModelLoadError(f"random weights need a preset name or a directory with config.json, got {source!r} "
                             f"(presets: {', '.join(PRESETS)})")
    raise ModelLoadError(f"unknown preset {source!r}; presets: {', '.join(PRESETS)} (or {EMBEDDED_MODEL!r})")


def model_spec_of(source: str, *, random_weights: bool = False) -> ModelSpec:
    """The architecture of `source` without loading weights: a preset's or the embedded model's, or a checkpoint
    directory's config.json. Anything else (a .gguf, a path not on this machine) is a `ModelLoadError`."""
    source = os.fspath(source)
    if random_weights or source == EMBEDDED_MODEL or source in PRESETS:
        return _random_spec(source)[0]
    path = Path(source).expanduser()
    if path.is_dir():
        return spec_from_config(read_directory_config(path, source), source)
    raise ModelLoadError(f"cannot read the architecture of {source!r} on this machine (a directory with "
                         f"config.json is needed); name a preset instead ({', '.join(PRESETS)})")


def load_model(source: str = EMBEDDED_MODEL, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", random_weights: bool = False, seed: int = 0,
               cache_dir: str | Path | None = None, embedded_tokenizer: bool = True) -> LoadedModel:
    """Load `source` into a `LoadedModel` in `dtype` (default: `default_dtype(device)`) on `device`.

    `source`: the embedded name (converted once into the cache, then reloaded from safetensors), a Hugging Face
    checkpoint directory, a ``.gguf`` file, or with ``random_weights=True`` a preset name (random weights,
    deterministic from `seed`, created directly in `dtype` on `device`; their tokenizer is the embedded model's
    when installed and `embedded_tokenizer`, else a `WordTokenizer` over the preset's vocabulary).
    """
    source = os.fspath(source)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if random_weights:
        spec, label = _random_spec(source)
        check_runner_support(spec, label)
        state_dict = random_state_dict(spec, resolved_dtype, resolved_device, seed)
        tokenizer = embedded_tokenizer_or_none(cache_dir) if embedded_tokenizer else None
        if tokenizer is None:   # no embedded model here (a bare GPU machine): any ids do for random weights
            tokenizer = WordTokenizer(spec.vocab_size, spec.bos_token_id,
                                      spec.eos_token_ids[0] if spec.eos_token_ids else None)
        return LoadedModel(spec, state_dict, tokenizer, f"random weights for {label} (seed {seed})",
                           resolved_dtype, resolved_device)
    if source == EMBEDDED_MODEL:
        directory = embedded_cache_dir(cache_dir)
        if not cache_is_complete(directory):
            prepare_embedded(cache_dir, progress=lambda line: print(line, file=sys.stderr, flush=True))
        return load_hf_directory(directory, resolved_dtype, resolved_device, f"{EMBEDDED_MODEL} ({directory})")
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_directory(path, resolved_dtype, resolved_device, str(path))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, resolved_dtype, resolved_device)
        raise ModelLoadError(f"model file {path} is not a .gguf file; {_expected_sources()}")
    if source in PRESETS:
        raise ModelLoadError(f"{source!r} is a preset without weights; pass random_weights=True to load it")
    if _looks_like_path(source):
        hub_note = " (Hub ids are never downloaded; pass a local path)" if _looks_like_hub_id(source) else ""
        raise ModelLoadError(f"model path {source} does not exist{hub_note}; {_expected_sources()}")
    raise ModelLoadError(f"unknown model source {source!r}; {_expected_sources()}")


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcomm.model_loading",
                                     description="Prepare model weights for kvcomm.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the embedded GGUF model into the safetensors cache")
    prepare.add_argument("--cache-dir", default=None,
                         help=f"cache root (default: ${CACHE_DIR_ENV} or {DEFAULT_CACHE_DIR})")
    arguments = parser.parse_args(argv)
    try:
        prepare_embedded(arguments.cache_dir, progress=lambda line: print(line, flush=True))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
