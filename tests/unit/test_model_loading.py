"""Tests for kvcomm.model_loading: every source kind, dtype handling, the embedded cache and the error messages.

The embedded-model tests use the default cache directory (``$KVCOMM_CACHE_DIR`` or ``~/.cache/kvcomm``), so the
one-time GGUF conversion done by ``scripts/setup.sh`` is reused; without it the first test converts (~40 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from kvcomm.embedded_model import _move_into_place, embedded_cache_dir, embedded_gguf_path  # noqa: E402
from kvcomm.model_loading import (  # noqa: E402
    LoadedModel, ModelLoadError, build_hf_model, default_dtype, expected_shapes, hf_config_from_spec, load_model,
    prepare_embedded,
)
from kvcomm.names import EMBEDDED_MODEL  # noqa: E402
from kvcomm.model_spec import PRESETS, ModelSpec  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_IDS = torch.tensor([[1, 504, 3458, 314, 260, 3821, 30, 28, 7]])


def logits_of(model: transformers.PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(token_ids).logits


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    prepare_embedded(progress=lambda line: None)  # no-op when setup.sh already converted
    return load_model(EMBEDDED_MODEL)


# ---------------------------------------------------------------------------------------------- embedded model

def test_embedded_model_spec_and_tensors(embedded: LoadedModel) -> None:
    spec = embedded.spec
    assert (spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert spec.rope_theta == 100000.0 and spec.rope_scaling is None
    assert spec.vocab_size == 49152 and spec.tie_word_embeddings
    assert embedded.dtype == torch.float32 and embedded.device == torch.device("cpu")
    assert embedded.state_dict["lm_head.weight"] is embedded.state_dict["model.embed_tokens.weight"]
    assert list(embedded.state_dict) == list(expected_shapes(spec))
    assert all(tensor.dtype == torch.float32 for tensor in embedded.state_dict.values())
    assert EMBEDDED_MODEL in embedded.source


def test_embedded_tokenizer_round_trips_and_has_chat_template(embedded: LoadedModel) -> None:
    tokenizer = embedded.tokenizer
    assert tokenizer is not None
    text = "KV caches can be shared between agents: 3 + 4 = 7."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 5 and max(ids) < embedded.spec.vocab_size
    assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_embedded_cache_layout_and_prepare_is_idempotent(embedded: LoadedModel) -> None:
    directory = embedded_cache_dir()
    lines: list[str] = []
    assert prepare_embedded(progress=lines.append) == directory
    assert len(lines) == 1 and "already prepared" in lines[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (directory / name).is_file(), name
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert not [entry.name for entry in directory.parent.iterdir() if "partial" in entry.name]


@pytest.mark.slow
def test_gguf_load_matches_safetensors_cache(embedded: LoadedModel) -> None:
    from_gguf = load_model(str(embedded_gguf_path()))
    assert from_gguf.spec == embedded.spec
    assert from_gguf.tokenizer is not None
    assert from_gguf.tokenizer("hello world").input_ids == embedded.tokenizer("hello world").input_ids
    for name, tensor in embedded.state_dict.items():
        assert torch.equal(tensor, from_gguf.state_dict[name]), name
    expected = logits_of(build_hf_model(from_gguf), SAMPLE_IDS)
    actual = logits_of(build_hf_model(embedded), SAMPLE_IDS)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_embedded_load_prints_nothing(embedded: LoadedModel, capfd: pytest.CaptureFixture[str]) -> None:
    load_model(EMBEDDED_MODEL)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_prepare_command_line_entry() -> None:
    completed = subprocess.run([sys.executable, "-m", "kvcomm.model_loading", "prepare"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert str(embedded_cache_dir()) in completed.stdout


def test_move_into_place_replaces_a_partial_cache(tmp_path: Path) -> None:
    target, staging = tmp_path / "model", tmp_path / ".model.partial-1"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker: a leftover to replace
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    _move_into_place(staging, target)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model"]
    assert (target / "model.safetensors").read_text() == "new" and not (target / "config.json").exists()


# ---------------------------------------------------------------------------------------- Hugging Face dirs

def _save_tiny_hf_model(directory: Path, config: transformers.PretrainedConfig,
                        **save_options: object) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory, **save_options)
    return model


def test_hf_directory_round_trip_llama(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    original = _save_tiny_hf_model(tmp_path, config)
    loaded = load_model(str(tmp_path))
    assert loaded.spec.rope_theta == 12345.0 and loaded.spec.num_kv_heads == 2 and not loaded.spec.attention_bias
    assert loaded.tokenizer is None  # no tokenizer files were saved
    reference = original.state_dict()
    assert set(loaded.state_dict) == set(reference)
    for name, tensor in loaded.state_dict.items():
        assert torch.equal(tensor, reference[name]), name
    ids = torch.tensor([[3, 17, 250, 9, 42]])
    torch.testing.assert_close(logits_of(build_hf_model(loaded), ids), logits_of(original, ids), rtol=0, atol=1e-6)


def test_hf_directory_sharded_tied_qwen2_in_bf16(tmp_path: Path) -> None:
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    original = _save_tiny_hf_model(tmp_path, config, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path, dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.spec.attention_bias and loaded.spec.tie_word_embeddings
    assert loaded.state_dict["lm_head.weight"] is loaded.state_dict["model.embed_tokens.weight"]
    assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.state_dict.values())
    reference = original.state_dict()
    for name in ("model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(loaded.state_dict[name], reference[name].to(torch.bfloat16)), name


# ------------------------------------------------------------------------------------------ random presets

def test_random_presets_are_deterministic_and_shaped() -> None:
    for preset in ("tiny-llama", "tiny-qwen2"):
        first = load_model(preset, random_weights=True, seed=7)
        again = load_model(preset, random_weights=True, seed=7)
        other = load_model(preset, random_weights=True, seed=8)
        assert first.spec == PRESETS[preset]
        shapes = expected_shapes(first.spec)
        assert {name: tuple(tensor.shape) for name, tensor in first.state_dict.items()} == shapes
        assert all(torch.equal(first.state_dict[name], again.state_dict[name]) for name in shapes)
        assert not torch.equal(first.state_dict["model.layers.0.self_attn.q_proj.weight"],
                               other.state_dict["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(first.state_dict["model.norm.weight"], torch.ones(first.spec.hidden_size))
        std = first.state_dict["model.layers.0.mlp.up_proj.weight"].std().item()
        assert 0.015 < std < 0.025
    qwen = load_model("tiny-qwen2", random_weights=True)
    assert qwen.state_dict["model.layers.2.self_attn.v_proj.bias"].shape == (2 * 16,)
    assert qwen.state_dict["model.layers.2.self_attn.v_proj.bias"].abs().sum() > 0
    assert qwen.state_dict["lm_head.weight"] is qwen.state_dict["model.embed_tokens.weight"]
    llama = load_model("tiny-llama", random_weights=True)
    assert not any(name.endswith(".bias") for name in llama.state_dict)
    assert llama.state_dict["lm_head.weight"] is not llama.state_dict["model.embed_tokens.weight"]


def test_random_weights_in_bf16_and_embedded_tokenizer_attached() -> None:
    loaded = load_model("tiny-llama", random_weights=True, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.state_dict.values())
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template  # the embedded package is installed
    embedded_shape = load_model(EMBEDDED_MODEL, random_weights=True)
    assert embedded_shape.spec == PRESETS["smollm2-135m"]


def test_random_weights_from_a_config_only_directory(tmp_path: Path) -> None:
    hf_config_from_spec(PRESETS["tiny-qwen2"]).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), random_weights=True, seed=3)
    assert loaded.spec == PRESETS["tiny-qwen2"]
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))  # without random weights the missing weights are an error


# ------------------------------------------------------------------------------------------------- dtypes

def test_default_dtype_depends_on_device_only() -> None:
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert load_model("tiny-llama", random_weights=True).dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model("tiny-llama", random_weights=True, dtype="fp8")


# -------------------------------------------------------------------------------------------------- errors

def _load_error(source: str, **options: object) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(source, **options)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_missing_path_error(tmp_path: Path) -> None:
    message = _load_error(str(tmp_path / "nowhere"))
    assert "nowhere" in message and "does not exist" in message


def test_corrupt_gguf_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "x.gguf"
    corrupt.write_bytes(os.urandom(4096))
    message = _load_error(str(corrupt))
    assert "x.gguf" in message and "GGUF" in message


def test_directory_without_config_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _load_error(str(tmp_path))
    assert "no config.json" in message and str(tmp_path) in message


def test_unsupported_architecture_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    message = _load_error(str(tmp_path))
    assert "'gpt2'" in message and "llama, mistral, qwen2" in message


def test_unknown_preset_error_lists_presets() -> None:
    message = _load_error("llama-9b", random_weights=True)
    assert "unknown preset 'llama-9b'" in message
    assert all(name in message for name in PRESETS)


def test_preset_without_random_weights_says_how() -> None:
    message = _load_error("tiny-llama")
    assert "random_weights=True" in message


def test_missing_tensor_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    hf_config_from_spec(PRESETS["tiny-llama"]).save_pretrained(tmp_path)
    tensors = dict(load_model("tiny-llama", random_weights=True).state_dict)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp_path / "model.safetensors"))
    message = _load_error(str(tmp_path))
    assert "model.layers.1.mlp.up_proj.weight" in message


# ---------------------------------------------------------------------------------------- transformers oracle

@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_config_round_trips_through_model_spec(preset: str) -> None:
    spec = PRESETS[preset]
    assert ModelSpec.from_hf_config(hf_config_from_spec(spec)) == spec


def test_build_hf_model_matches_spec_and_gives_finite_logits() -> None:
    loaded = load_model("tiny-llama", random_weights=True, seed=1)
    model = build_hf_model(loaded)
    config = model.config
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert config._attn_implementation == "sdpa"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    # The model shares the loaded tensors instead of copying them.
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == \
        loaded.state_dict["model.layers.0.mlp.up_proj.weight"].data_ptr()
    logits = logits_of(model, torch.tensor([[1, 5, 300, 7, 2]]))
    assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()
    qwen = build_hf_model(load_model("tiny-qwen2", random_weights=True))
    assert isinstance(qwen, transformers.Qwen2ForCausalLM)
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.isfinite(logits_of(qwen, torch.tensor([[4, 8, 15, 16, 23, 42]]))).all()


def test_mistral_oracle_equals_llama_with_the_same_weights() -> None:
    llama_spec = PRESETS["tiny-llama"].with_(rope_scaling=None)
    mistral_spec = llama_spec.with_(architecture="mistral")
    weights = load_model("tiny-llama", random_weights=True, seed=5).state_dict
    as_llama = LoadedModel(llama_spec, weights, None, "test", torch.float32, torch.device("cpu"))
    as_mistral = LoadedModel(mistral_spec, weights, None, "test", torch.float32, torch.device("cpu"))
    mistral = build_hf_model(as_mistral)
    assert isinstance(mistral, transformers.MistralForCausalLM) and mistral.config.sliding_window is None
    ids = torch.tensor([[1, 9, 99, 199, 299, 399]])
    torch.testing.assert_close(logits_of(mistral, ids), logits_of(build_hf_model(as_llama), ids), rtol=0, atol=1e-6)
