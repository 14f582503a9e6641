"""Deployment configuration of the Ray cluster: `ClusterConfig`, a pydantic model loadable from YAML.

This module owns every deployment knob (model and device, workers and their resources, placement, batching,
restarts, caches, the anchor-pool actor's name) with one default each. The algorithm's knobs keep their one home
in `kvcomm.config.KVCommConfig`: `KVCommSettings` is generated from that dataclass's fields (same names, types
and defaults), validated by the dataclass itself, and turned back into it with `to_kvcomm()`. The memory plan's
knobs likewise live in `kvcomm.memory_plan.MemoryConfig` (`memory:`, see `MemorySettings`). Unknown keys are
errors that name the key (``extra="forbid"``), in YAML files as in code.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from actors.agent_worker import WorkerSettings
from actors.anchor_pool_actor import PoolSnapshotSettings, PoolSpec
from kvcomm.calibration import resolve as resolve_calibration
from kvcomm.config import KVCommConfig
from kvcomm.memory_plan import MemoryConfig
from kvcomm.names import EMBEDDED_MODEL

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DEFAULT_ANCHOR_CACHE_BYTES = 256 << 20   # the least a worker's anchor cache gets when the config sets none
POOL_QUESTIONS = 4                       # an unset pool budget holds this many questions' anchors (at least 2 GiB)
ANCHOR_CACHE_QUESTIONS = 1               # an unset anchor cache holds this many (at least 256 MiB)


def _settings_model(dataclass_type: type, name: str) -> type[BaseModel]:
    """A pydantic model with exactly a dataclass's fields, types and defaults (derived, never restated)."""
    hints = typing.get_type_hints(dataclass_type)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(dataclass_type)}
    return create_model(name, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


_KVCommSettingsBase = _settings_model(KVCommConfig, "KVCommSettings")
_MemorySettingsBase = _settings_model(MemoryConfig, "MemorySettings")


class KVCommSettings(_KVCommSettingsBase):  # type: ignore[misc, valid-type]
    """`kvcomm.config.KVCommConfig` as a pydantic model: the algorithm knobs inside a cluster config."""

    @model_validator(mode="after")
    def _valid_as_dataclass(self) -> "KVCommSettings":
        self.to_kvcomm()   # the dataclass's own __post_init__ checks are the one set of rules
        return self

    def to_kvcomm(self) -> KVCommConfig:
        return KVCommConfig(**self.model_dump())

    @classmethod
    def from_kvcomm(cls, config: KVCommConfig) -> "KVCommSettings":
        return cls(**config.to_dict())


class MemorySettings(_MemorySettingsBase):  # type: ignore[misc, valid-type]
    """`kvcomm.memory_plan.MemoryConfig` as a pydantic model: each replica's memory plan (`kvcomm plan`)."""

    @model_validator(mode="after")
    def _valid_as_dataclass(self) -> "MemorySettings":
        self.to_memory()   # the dataclass's own __post_init__ checks are the one set of rules
        return self

    def to_memory(self) -> MemoryConfig:
        return MemoryConfig(**self.model_dump())


class ClusterConfig(BaseModel):
    """Everything a cluster deployment needs besides the algorithm (which is `kvcomm`)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- the model every worker serves ---
    model: str = EMBEDDED_MODEL   # embedded name, HF checkpoint dir, .gguf, or preset (random_weights)
    random_weights: bool = False
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str | None = None               # float32 / bfloat16 / float16; None: fp32 on CPU, bf16 on GPU
    # --- workers and their resources ---
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)         # 0 on CPU; 1 on GPU nodes
    simulate_gpus: bool = False                       # device cpu with GPU bundles: placed as on GPU nodes, the
                                                      # model on the CPU (a simulated cluster's fake GPUs: tests,
                                                      # `kvcomm bench scale`)
    threads_per_worker: int | None = Field(None, ge=1)  # torch threads in a worker; None: ceil(cpus_per_worker)
    placement_strategy: PlacementStrategy = "PACK"
    placement_timeout_s: float = Field(60.0, gt=0)
    worker_start_timeout_s: float = Field(300.0, gt=0)   # model load in every worker (first run converts it)
    # --- continuous batching in a worker ---
    max_batch_size: int = Field(16, ge=1)             # sequences decoded together in one step
    max_queued_turns: int = Field(256, ge=1)          # turns admitted per worker (queued + decoding); more wait
    prefill_step_tokens: int = Field(0, ge=0)         # chunked prefill: a decode step waits for at most this many
                                                      # prefill tokens (0: off, prefills run whole). 16 prefill in
                                                      # about one decode step of SmolLM2-135M on a CPU core. Off by
                                                      # default: each chunk costs a forward of its own, so turns
                                                      # arriving together stop batching (a chunk's steps finish
                                                      # short turns before the next is admitted)
    # --- fault tolerance ---
    worker_max_restarts: int = Field(1, ge=-1)        # Ray restarts a dead worker this often (-1: forever)
    worker_max_task_retries: int = Field(0, ge=-1)    # Ray retries of a method on a restarted worker
    job_retries: int = Field(1, ge=0)                 # orders (turns, user inputs) of one job whose worker
                                                      # died are sent to another worker this often in all
    # --- routing (kvcomm submit's worker actors; Serve replicas: serve.route_slack_tokens) ---
    affinity_slack: int = Field(0, ge=0)              # keep a namespace on its worker while it runs at most this
                                                      # many more jobs than the least loaded worker (0: affinity
                                                      # only breaks ties; fetching anchors costs ~1% of a reused
                                                      # turn's TTFT on CPU, so load comes first there)
    # --- caches and the anchor pool actor ---
    anchor_cache_bytes: int = Field(DEFAULT_ANCHOR_CACHE_BYTES, ge=0)  # fetched anchor tensors cached per worker
                                                      # (LRU); unset: derived from the model (`budgets`)
    anchor_device_cache_bytes: int | None = Field(None, ge=0)  # on an accelerator: device copies of cached anchor
                                                      # parts (their own LRU; the anchor cache itself is pinned host
                                                      # memory there); unset: anchor_cache_bytes
    content_cache_bytes: int = Field(256 << 20, ge=0) # shared contents' base KV cached per worker (LRU)
    pool_actor_name: str = "kvcomm-anchor-pool"
    pool_cpus: float = Field(0, ge=0)                 # CPUs Ray reserves for the pool actor (0: packs anywhere)
    pool_nice: int = Field(0, ge=0, le=19)            # the pool actor's CPU priority below the workers' (os.nice)
    ray_namespace: str = "kvcomm"
    pool_detached: bool = False                       # the pool outlives the runner (and the driver)
    pool_call_timeout_s: float = Field(10.0, gt=0)    # past this, a pool call counts as a lost pool
    pool_retry_after_s: float = Field(5.0, ge=0)      # a worker that lost the pool asks again after this long
    pool_snapshot_path: str | None = None             # the pool saved to this file (msgpack) and loaded from it
                                                      # when it (re)starts; None: no snapshots (a restarted pool
                                                      # is empty). On the pool actor's node; relative to the cwd
    pool_snapshot_every_commits: int = Field(100, ge=1)   # save once this many commits are unsaved ...
    pool_snapshot_every_s: float = Field(60.0, gt=0)      # ... or once the oldest unsaved one is this old
    # --- the algorithm, and each replica's memory plan ---
    kvcomm: KVCommSettings = Field(default_factory=KVCommSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError("device 'cuda' needs gpus_per_worker > 0 (one GPU per worker: gpus_per_worker: 1)")
        if self.device == "cpu" and self.gpus_per_worker > 0 and not self.simulate_gpus:
            raise ValueError(f"device 'cpu' with gpus_per_worker={self.gpus_per_worker}: set device: cuda or "
                             "gpus_per_worker: 0 (or simulate_gpus: true on a simulated cluster's fake GPUs)")
        if self.simulate_gpus and self.device != "cpu":
            raise ValueError("simulate_gpus runs the model on the CPU: it needs device: cpu")
        return self

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        """Load a YAML file (a mapping of these fields; `kvcomm:` holds algorithm knobs). Errors name the file."""
        data = read_yaml_mapping(path, "cluster config", "a mapping of settings")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"cluster config {path}: {describe_validation_error(exc)}") from None

    def with_(self, **changes: Any) -> "ClusterConfig":
        """A validated copy with `changes` applied (`kvcomm` may be a dict of algorithm knobs)."""
        data = self.model_dump(exclude_unset=True)    # unset budgets stay unset: still derived from the model
        kvcomm_changes = changes.pop("kvcomm", None)
        data.update(changes)
        if kvcomm_changes is not None:
            data["kvcomm"] = {**data.get("kvcomm", {}), **(kvcomm_changes if isinstance(kvcomm_changes, dict)
                                                           else kvcomm_changes.model_dump(exclude_unset=True))}
        return ClusterConfig.model_validate(data)

    # ---- derived ------------------------------------------------------------------------------------------------
    def anchor_bytes_per_question(self, architecture: Any = None) -> int | None:
        """Bytes of one question's anchors in this model's KV (`kvcomm.memory_plan.JobShape`, the paper's Table-2
        setting: every placeholder an anchor); `architecture`: a `ModelSpec` to use instead of the model's
        config. None when the model's architecture cannot be read on this machine."""
        return _question_bytes(self.model, self.random_weights, self.dtype, self.device, architecture)

    def budgets(self, architecture: Any = None) -> dict[str, int]:
        """The pool's byte budget and each worker's anchor cache: as set in the config, else derived from the
        model's KV bytes per token (`POOL_QUESTIONS` / `ANCHOR_CACHE_QUESTIONS` questions' anchors, never less
        than the fixed defaults)."""
        question = self.anchor_bytes_per_question(architecture) or 0
        pool = (self.kvcomm.pool_byte_budget if "pool_byte_budget" in self.kvcomm.model_fields_set
                else max(KVCommConfig().pool_byte_budget, POOL_QUESTIONS * question))
        cache = (self.anchor_cache_bytes if "anchor_cache_bytes" in self.model_fields_set
                 else max(DEFAULT_ANCHOR_CACHE_BYTES, ANCHOR_CACHE_QUESTIONS * question))
        device = cache if self.anchor_device_cache_bytes is None else self.anchor_device_cache_bytes
        return {"pool_byte_budget": pool, "anchor_cache_bytes": cache, "anchor_device_cache_bytes": device,
                "anchor_bytes_per_question": question,
                # what the anchor cache takes of the worker device's memory (CPU: the one tier)
                "anchor_cache_on_device_bytes": cache if self.device == "cpu" else device}

    def kvcomm_config(self) -> KVCommConfig:
        """The algorithm's settings as every process gets them: `kvcomm`, with the pool budget of `budgets()` and
        the model's calibration filling the per-model knobs it leaves unset (`kvcomm.calibration.resolve`)."""
        config = self.kvcomm.to_kvcomm().with_(pool_byte_budget=self.budgets()["pool_byte_budget"])
        return resolve_calibration(config, self.model)[0]

    @property
    def worker_threads(self) -> int:
        return self.threads_per_worker or max(1, int(-(-self.cpus_per_worker // 1)))

    def bundle(self) -> dict[str, float]:
        """One worker's placement-group bundle: {"CPU": k} on CPU, {"GPU": g, "CPU": k} on GPU nodes."""
        bundle = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            bundle["GPU"] = float(self.gpus_per_worker)
        return bundle

    def model_tag(self) -> str:
        """Names what the pool's anchors are KV of: model, weights, dtype, device (a pool's and a snapshot's tag)."""
        return (f"model={self.model} random_weights={self.random_weights} dtype={self.dtype or 'default'} "
                f"device={self.device}")

    def pool_snapshot(self) -> PoolSnapshotSettings | None:
        """The pool actor's snapshot settings (None when `pool_snapshot_path` is unset). The tag names the
        model, weights, dtype and device: a snapshot saved by another deployment is rejected, not served."""
        if not self.pool_snapshot_path:
            return None
        return PoolSnapshotSettings(path=str(Path(self.pool_snapshot_path).expanduser().resolve()),
                                    every_commits=self.pool_snapshot_every_commits,
                                    every_s=self.pool_snapshot_every_s, tag=self.model_tag())

    def pool_spec(self, *, detached: bool | None = None) -> PoolSpec:
        """The one anchor pool of this deployment, as everyone creates or joins it (`actors.anchor_pool_actor`);
        `detached` overrides `pool_detached` (a Serve app's pool is always detached)."""
        return PoolSpec(name=self.pool_actor_name, ray_namespace=self.ray_namespace, model=self.model_tag(),
                        num_cpus=self.pool_cpus, nice=self.pool_nice,
                        kvcomm=self.kvcomm_config(), snapshot=self.pool_snapshot(),
                        detached=self.pool_detached if detached is None else detached)

    def worker_settings(self, *, pool_detached: bool | None = None) -> WorkerSettings:
        """What one `AgentWorker` needs (the actors layer never sees this pydantic model)."""
        return WorkerSettings(
            model=self.model, random_weights=self.random_weights, device=self.device, dtype=self.dtype,
            threads=self.worker_threads, max_batch_size=self.max_batch_size,
            max_queued_turns=self.max_queued_turns, prefill_step_tokens=self.prefill_step_tokens,
            anchor_cache_bytes=self.budgets()["anchor_cache_bytes"],
            anchor_device_cache_bytes=self.budgets()["anchor_device_cache_bytes"],
            content_cache_bytes=self.content_cache_bytes, pool=self.pool_spec(detached=pool_detached),
            pool_call_timeout_s=self.pool_call_timeout_s, pool_retry_after_s=self.pool_retry_after_s,
            kvcomm=self.kvcomm_config(), memory=self.memory.to_memory())


def _question_bytes(model: str, random_weights: bool, dtype: str | None, device: str, architecture: Any) -> int | None:
    from kvcomm.memory_plan import JobShape
    from kvcomm.model_loading import ModelLoadError, resolve_dtype
    try:
        spec = architecture or _model_spec(model, random_weights)
        itemsize = resolve_dtype(dtype, device).itemsize
    except (ModelLoadError, OSError, ValueError):
        return None
    return JobShape().anchor_tokens * spec.kv_bytes_per_token_per_dtype_byte * itemsize


@functools.lru_cache(maxsize=32)
def _model_spec(model: str, random_weights: bool) -> Any:
    from kvcomm.model_loading import model_spec_of
    return model_spec_of(model, random_weights=random_weights)


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}). Errors name `what` and the file: missing, not YAML, or not
    `expected` (a mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be {expected}, got {type(data).__name__}")
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: message`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
