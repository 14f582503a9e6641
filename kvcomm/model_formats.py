"""Reading model weights and tokenizers, format by format, into checked tensors; and transformers' twin model.

Owns `ModelLoadError` (every load failure, one line naming the source), `LoadedModel` (what a load returns), dtype
and device resolution, the state-dict checks against a `ModelSpec` (`expected_shapes`), the readers of a Hugging Face
checkpoint directory (config.json + *.safetensors, sharded or not) and of a ``.gguf`` file, random weights for a
preset, and `build_hf_model` (transformers' own model holding the same weights: the parity oracle).
It is not the choice of reader for a source name (`kvcomm.model_loading`) nor the embedded model's cache
(`kvcomm.embedded_model`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from kvcomm.errors import first_line
from kvcomm.model_spec import SUPPORTED_ARCHITECTURES, ModelSpec, UnsupportedModelError

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    import transformers
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RANDOM_INIT_STD = 0.02

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


def resolve_device(device: str | torch.device) -> torch.device:
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


def check_runner_support(spec: ModelSpec, source: str) -> None:
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


def random_state_dict(spec: ModelSpec, dtype: torch.dtype, device: torch.device,
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

def import_transformers() -> Any:
    """Import transformers with the hub switched off (this project never downloads models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    return transformers


@contextlib.contextmanager
def quiet_transformers(silence_stderr: bool = False) -> Iterator[None]:
    """Hold transformers' warnings and progress bars for the duration; restore the previous settings after.

    `silence_stderr` also swallows direct stderr writes (the GGUF dequantizer's own tqdm bar ignores
    transformers' progress-bar switch); exceptions still propagate.
    """
    hf_logging = import_transformers().utils.logging
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
    transformers = import_transformers()
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
    with quiet_transformers(), torch.device("meta"):
        model = model_class(config)  # parameters and buffers on the meta device: no memory, no random init
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)
    with quiet_transformers():   # the RoPE buffers are computed, not loaded: build them for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config).to(loaded.device)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"transformers' {model_class.__name__} kept tensors without data: {', '.join(left)}")
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# loaders per source kind
# ----------------------------------------------------------------------------------------------------------

def spec_from_config(config: Any, source: str) -> ModelSpec:
    try:
        spec = ModelSpec.from_hf_config(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: config is incomplete ({first_line(exc)})") from None
    check_runner_support(spec, source)
    return spec


def read_directory_config(directory: Path, source: str) -> Any:
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
    transformers = import_transformers()
    try:
        with quiet_transformers():
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


def load_tokenizer(directory: Path) -> "PreTrainedTokenizerBase":
    transformers = import_transformers()
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {first_line(exc)}") from None


def load_hf_directory(directory: Path, dtype: torch.dtype, device: torch.device, source: str, *,
                       with_tokenizer: bool = True) -> LoadedModel:
    from safetensors import safe_open

    spec = spec_from_config(read_directory_config(directory, source), source)
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
    tokenizer = load_tokenizer(directory) if with_tokenizer and has_tokenizer else None
    return LoadedModel(spec, state_dict, tokenizer, source, dtype, device)


def load_gguf_model(path: Path, dtype: torch.dtype) -> Any:
    transformers = import_transformers()
    try:
        with quiet_transformers(silence_stderr=True):
            return transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, unknown GGUF architecture, unsupported quantization
        raise ModelLoadError(f"cannot load GGUF file {path}: {first_line(exc)}") from None


def load_gguf_tokenizer(path: Path) -> "PreTrainedTokenizerBase":
    transformers = import_transformers()
    try:
        with quiet_transformers(silence_stderr=True):
            return transformers.AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of GGUF file {path}: {first_line(exc)}") from None


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    source = str(path)
    model = load_gguf_model(path, dtype)
    spec = spec_from_config(model.config, source)
    tensors = {name: tensor.detach().to(device=device, dtype=dtype) for name, tensor in model.state_dict().items()}
    del model
    state_dict = _finish_state_dict(spec, tensors, source)
    return LoadedModel(spec, state_dict, load_gguf_tokenizer(path), source, dtype, device)
