"""The architecture description the model runner needs: one frozen `ModelSpec` per model.

Built from a transformers config (``ModelSpec.from_hf_config``) or from a named preset (``PRESETS``) for
random-weight timing runs. Only the Llama family is supported: Llama 2/3 (with ``llama3`` rope scaling),
SmolLM2, Mistral without a sliding window, and Qwen2 (q/k/v bias).
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict, replace
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's architecture or one of its features is outside what the runner implements."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in ("default", "llama3"):
            raise UnsupportedModelError(
                f"unsupported rope scaling {self.rope_scaling.get('rope_type')!r}; supported: none, 'llama3'")

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """K and V elements per token (multiply by the dtype's size for bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> "ModelSpec":
        return replace(self, **changes)

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelSpec":
        """Read a transformers ``PretrainedConfig`` (Llama, Mistral or Qwen2)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if model_type == "mistral" and getattr(config, "sliding_window", None):
            if config.sliding_window < getattr(config, "max_position_embeddings", 0):
                raise UnsupportedModelError(
                    f"Mistral with a sliding window ({config.sliding_window}) is not supported")
        if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=True is not supported")
        # transformers 5 keeps rope settings in config.rope_parameters; older versions in rope_theta/rope_scaling.
        rope_params = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope_params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        scaling = getattr(config, "rope_scaling", None) or None
        if rope_params.get("rope_type") not in (None, "default"):
            scaling = rope_params
        if scaling is not None:
            scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
            elif "rope_type" not in scaling:
                scaling["rope_type"] = scaling.get("type")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            architecture=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(config.rms_norm_eps),
            attention_bias=bool(getattr(config, "attention_bias", False)) or model_type == "qwen2",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 8192)),
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

# Named architectures for random-weight runs (timing, where weights don't matter) and tiny test configs.
PRESETS: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec("llama", 128256, 4096, 14336, 32, 32, 8, 128, rope_theta=500000.0,
                              rope_scaling=_LLAMA3_SCALING, rms_norm_eps=1e-5, max_position_embeddings=131072,
                              bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "qwen2.5-7b": ModelSpec("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, rope_theta=1000000.0,
                            rms_norm_eps=1e-6, attention_bias=True, max_position_embeddings=32768,
                            eos_token_ids=(151645, 151643)),
    "smollm2-135m": ModelSpec("llama", 49152, 576, 1536, 30, 9, 3, 64, rope_theta=100000.0, rms_norm_eps=1e-5,
                              tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                              eos_token_ids=(2,)),
    "tiny-llama": ModelSpec("llama", 512, 64, 128, 3, 4, 2, 16, rope_theta=500000.0, rope_scaling=dict(
        _LLAMA3_SCALING, original_max_position_embeddings=256), max_position_embeddings=4096,
        bos_token_id=1, eos_token_ids=(2,)),
    "tiny-qwen2": ModelSpec("qwen2", 512, 64, 128, 3, 4, 2, 16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            attention_bias=True, tie_word_embeddings=True, max_position_embeddings=4096,
                            eos_token_ids=(2,)),
}
