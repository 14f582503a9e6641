"""GPU memory, planned: what one model replica's device memory holds and how many KV tokens are left for decoding.

A replica's memory is its weights, the anchor cache, the content cache, the agent-template cache, scratch (the
largest forward pass's activations) and the prompt being prepared, and what remains is the decode KV budget.
This module owns that arithmetic and its knobs:

* `MemoryConfig`: the knobs (device memory figure, utilization, longest prompt, agent-cache bytes), one default
  each; `cluster.config.ClusterConfig.memory` is derived from it.
* `plan_memory` / `plan_for_runner`: a `MemoryPlan` from a model spec and those figures (device memory measured
  with `torch.cuda.mem_get_info` on CUDA, the configured figure on the CPU); a config that cannot fit raises a
  `MemoryPlanError` naming the knob to change.
* `KVBudget`: the ledger the decode buffers charge (`kvcomm.kv_buffers.BatchKV`), so admission is by KV bytes.
* `JobShape`: a stated multi-agent job shape, to say how many such jobs one replica decodes at once.

No model, no Ray: plain arithmetic on `ModelSpec` and a torch dtype.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .model_spec import ModelSpec

GIB = 1 << 30
CPU_DEVICE_MEMORY_BYTES = 8 * GIB   # MemoryConfig.device_memory_bytes=None on the CPU: plan for this much
SCRATCH_MARGIN = 1.25               # activations: allocator rounding and fragmentation on top of the tensor sum
PREPARE_KV_COPIES = 4               # around a prompt being prepared: its turn buffer (alignment writes the
                                    # cache into it; the output reserve is the KV budget's), a dense turn's
                                    # recorded deltas (real and base copies of its placeholders), an input's base
                                    # being computed (with a shared start: that start's copy as its context), and
                                    # a finished sequence's KV being handed back


class MemoryPlanError(ValueError):
    """The replica's memory cannot hold what the config asks for; the message names the knob to change."""


class KVBudgetError(RuntimeError):
    """A request's KV can never fit the replica's KV budget (or the budget is momentarily full). `too_long`:
    "prompt" when the prompt alone is over the replica's limit, "output" when the prompt fits and its output
    budget does not, None otherwise."""

    def __init__(self, message: str, too_long: str | None = None):
        super().__init__(message)
        self.too_long = too_long


@dataclass(frozen=True)
class MemoryConfig:
    device_memory_bytes: int | None = None  # the accelerator's memory; None: measured on CUDA
                                            # (torch.cuda.mem_get_info), CPU_DEVICE_MEMORY_BYTES on the CPU
    memory_utilization: float = 0.90        # share of it the replica plans for (the rest: CUDA context, slack)
    max_prompt_tokens: int = 8192           # longest prompt admitted; its prefill activations size the scratch
    agent_cache_bytes: int = 256 << 20      # agent templates' fixed-segment KV kept per replica (LRU by bytes)

    def __post_init__(self) -> None:
        problems = []
        if self.device_memory_bytes is not None and self.device_memory_bytes <= 0:
            problems.append(f"device_memory_bytes must be > 0 (or None), got {self.device_memory_bytes}")
        if not 0.0 < self.memory_utilization <= 1.0:
            problems.append(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.max_prompt_tokens < 1:
            problems.append(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.agent_cache_bytes < 0:
            problems.append(f"agent_cache_bytes must be >= 0, got {self.agent_cache_bytes}")
        if problems:
            raise ValueError("invalid MemoryConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------------------
def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def model_weight_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of the runner's weights for `spec` (embedding, untied lm_head, every layer, final norm)."""
    h, q, kv, inter = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, \
        spec.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + 2 * inter * h + inter * h + 2 * h
    if spec.attention_bias:
        per_layer += q + 2 * kv
    embeddings = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return (embeddings + spec.num_layers * per_layer + h) * dtype_bytes(dtype)


def forward_scratch_bytes(spec: ModelSpec, dtype: torch.dtype, tokens: int, context: int = 0) -> int:
    """Peak activation bytes of one forward of `tokens` new tokens after `context` cached ones (one sequence).

    The residual stream and its fp32 norm are live throughout; on top of them either the attention phase
    (q/k/v, RoPE temporaries, KV heads expanded for a masked call, the mask; SDPA's fused kernels, on CUDA and
    on the CPU alike, never materialize the score matrix) or the MLP phase (gate/up, the gated product),
    whichever is larger; then the last token's fp32 logits.
    """
    s, n, total = dtype_bytes(dtype), tokens, context + tokens
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    stream = n * h * (3 * s + 2 * 4)
    attention = (n * (q + 2 * kv) * s + 3 * n * (q + kv) * s + 2 * n * q * s
                 + 2 * spec.num_heads * total * spec.head_dim * s + n * total)
    mlp = n * (2 * spec.intermediate_size * s + 2 * spec.intermediate_size * s + h * s)
    logits = 2 * spec.vocab_size * 4
    return int((stream + max(attention, mlp) + logits) * SCRATCH_MARGIN)


def decode_scratch_bytes(spec: ModelSpec, dtype: torch.dtype, batch: int) -> int:
    """Peak activation bytes of one decode step of `batch` sequences, sampling included.

    Dominated by the [batch, vocab] fp32 logits and the sampler's per-token temporaries (about ten 4-8 byte
    values per logit: scaled logits, sort, cumulative sum, the counter-based noise)."""
    s = dtype_bytes(dtype)
    per_token = spec.hidden_size * (3 * s + 8) + 2 * spec.intermediate_size * s * 2 \
        + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * s * 3
    return int((batch * per_token + batch * spec.vocab_size * 48) * SCRATCH_MARGIN)


def capacity_class(need: int) -> int:
    """The decode-slot capacity for a sequence needing `need` tokens: 64, 96, 128, 192, 256, 384, ... (<= 1/3
    spare). Sequences of one class share a decode buffer (`kvcomm.kv_buffers.BatchKV`)."""
    cap = 64
    while cap < need:
        cap *= 2
    return max(64, cap * 3 // 4) if need <= cap * 3 // 4 else cap


def slot_tokens(prompt_tokens: int, output_tokens: int) -> int:
    """Tokens one decoding sequence reserves: the capacity class of prompt + output (the first token is sampled
    from the prefill's logits and the last one's KV is written by a final flush step)."""
    return capacity_class(prompt_tokens + output_tokens)


# ------------------------------------------------------------------------------------------------------------
# the ledger
# ------------------------------------------------------------------------------------------------------------
class KVBudget:
    """Bytes of decode KV one replica may hold; every decode buffer charges its bytes here while it lives.

    ``capacity=None`` is unlimited (a single-process engine without a plan). Thread-safe: buffers are refunded
    by their finalizers, whichever thread drops them."""

    def __init__(self, capacity: int | None = None, *, what: str = "the replica's KV budget"):
        if capacity is not None and capacity < 0:
            raise ValueError(f"a KV budget must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self.what = what
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    @property
    def available(self) -> float:
        return math.inf if self.capacity is None else self.capacity - self.used

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.available

    def charge(self, nbytes: int, what: str = "a decode buffer") -> None:
        """Take `nbytes`; a `KVBudgetError` naming the budget when they are not available."""
        with self._lock:
            if self.capacity is not None and self.used + nbytes > self.capacity:
                raise KVBudgetError(f"{what} needs {nbytes / GIB:.3f} GiB of KV; {self.what} has "
                                    f"{(self.capacity - self.used) / GIB:.3f} of {self.capacity / GIB:.3f} GiB free")
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def refund(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def stats(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity, "used_bytes": self.used, "peak_bytes": self.peak}


# ------------------------------------------------------------------------------------------------------------
# job shapes
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobShape:
    """A fully connected multi-agent job (the paper's Table 2 setting by default): agent k reads the input and
    agents 1..k-1's responses, so its turns run one after another and one turn of a job decodes at a time."""
    agents: int = 5
    prefix: int = 512          # system-prompt tokens per agent
    input: int = 1024          # user-input tokens
    output: int = 512          # response tokens per agent
    glue: int = 32             # template tokens around each placeholder

    def __post_init__(self) -> None:
        if min(self.agents, self.prefix, self.input, self.output) < 1 or self.glue < 0:
            raise ValueError(f"a job shape needs agents, prefix, input, output >= 1 and glue >= 0: {self}")

    def prompt_tokens(self, agent: int) -> int:
        """Agent `agent` (1-based)'s prompt: prefix, input and every upstream response, with their glue."""
        return self.prefix + self.glue + self.input + (agent - 1) * (self.output + self.glue)

    @property
    def longest_turn_tokens(self) -> int:
        return self.prompt_tokens(self.agents) + self.output

    @property
    def content_tokens(self) -> int:
        """Shared contents' base KV a job keeps: its input and every response but the last agent's."""
        return self.input + (self.agents - 1) * self.output

    @property
    def anchor_tokens(self) -> int:
        """KV tokens the anchors of one question hold when each of its placeholders becomes an anchor: each
        content's base, plus per consumer its delta and the delta of the fixed segment after it."""
        total = self.input + self.agents * (self.input + self.glue)
        for producer in range(1, self.agents):
            consumers = self.agents - producer
            total += self.output + consumers * (self.output + self.glue)
        return total


# ------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    model: str
    dtype: str
    device_bytes: int
    usable_bytes: int            # device_bytes x memory_utilization (less, on CUDA, when others hold memory)
    weights_bytes: int
    anchor_cache_bytes: int
    content_cache_bytes: int
    agent_cache_bytes: int
    scratch_bytes: int           # activations of the largest forward (a max_prompt_tokens prefill or a decode step)
    prepare_bytes: int           # KV copies around the prompt being prepared (PREPARE_KV_COPIES x max_prompt_tokens)
    kv_bytes: int                # the decode KV budget: what is left
    kv_bytes_per_token: int
    max_prompt_tokens: int
    max_batch_size: int

    @property
    def kv_tokens(self) -> int:
        return self.kv_bytes // self.kv_bytes_per_token

    def turn_bytes(self, prompt_tokens: int, output_tokens: int) -> int:
        return slot_tokens(prompt_tokens, output_tokens) * self.kv_bytes_per_token

    def check_request(self, prompt_tokens: int, output_tokens: int) -> None:
        """`KVBudgetError` naming the limit when a request of this size can never be served by this replica."""
        if prompt_tokens > self.max_prompt_tokens:
            raise KVBudgetError(f"the prompt is {prompt_tokens} tokens; this replica admits prompts of at most "
                                f"memory.max_prompt_tokens = {self.max_prompt_tokens}", too_long="prompt")
        need = slot_tokens(prompt_tokens, output_tokens)
        if need > self.kv_tokens:
            too_long = "prompt" if slot_tokens(prompt_tokens, 1) > self.kv_tokens else "output"
            raise KVBudgetError(f"{prompt_tokens} prompt + {output_tokens} new tokens need a {need}-token KV slot; "
                                f"this replica's KV budget is {self.kv_tokens} tokens "
                                f"({self.kv_bytes / GIB:.2f} GiB, see `kvcomm plan`)", too_long=too_long)

    def jobs(self, shape: JobShape) -> dict[str, Any]:
        """How many jobs of `shape` one replica serves at once: bound by KV (one decoding turn per job, its slot
        sized for the longest turn) and by max_batch_size; how many jobs' contents the content cache holds."""
        turn = self.turn_bytes(shape.longest_turn_tokens - shape.output, shape.output)
        content = shape.content_tokens * self.kv_bytes_per_token
        by_kv = self.kv_bytes // turn
        return {"turn_bytes": turn, "jobs_by_kv": by_kv, "jobs_decoding": min(by_kv, self.max_batch_size),
                "content_bytes_per_job": content,
                "jobs_in_content_cache": self.content_cache_bytes // content if content else None,
                "anchor_bytes_per_question": shape.anchor_tokens * self.kv_bytes_per_token}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_tokens"] = self.kv_tokens
        return out

    def lines(self, shape: JobShape | None = None) -> list[str]:
        """The plan as a small markdown table (and the job shape's concurrency when given)."""
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB"
        rows = [("device memory", gib(self.device_bytes)),
                ("planned for (x memory_utilization)", gib(self.usable_bytes)),
                (f"weights ({self.model}, {self.dtype})", gib(self.weights_bytes)),
                ("anchor cache (anchor_cache_bytes)", gib(self.anchor_cache_bytes)),
                ("content cache (content_cache_bytes)", gib(self.content_cache_bytes)),
                ("agent cache (memory.agent_cache_bytes)", gib(self.agent_cache_bytes)),
                (f"scratch (a {self.max_prompt_tokens}-token prefill or a batch-{self.max_batch_size} step)",
                 gib(self.scratch_bytes)),
                ("prompt being prepared", gib(self.prepare_bytes)),
                ("decode KV budget", gib(self.kv_bytes)),
                ("KV tokens that fit", f"{self.kv_tokens:,} ({self.kv_bytes_per_token // 1024} KiB per token)")]
        if shape is not None:
            jobs = self.jobs(shape)
            cached = jobs["jobs_in_content_cache"]
            rows += [(f"jobs of {shape.agents} agents (prefix {shape.prefix}, input {shape.input}, output "
                      f"{shape.output}) decoding at once",
                      f"{jobs['jobs_decoding']} (KV: {jobs['jobs_by_kv']}, max_batch_size: {self.max_batch_size}; "
                      f"{gib(jobs['turn_bytes'])} per longest turn)"),
                     ("their contents in the content cache", f"{cached} job(s), {gib(jobs['content_bytes_per_job'])}"
                                                             " each"),
                     ("anchor bytes per question (every placeholder an anchor)",
                      gib(jobs["anchor_bytes_per_question"]))]
        width = max(len(name) for name, _ in rows)
        return ["| item | per replica |", "|---|---|"] + [f"| {name.ljust(width)} | {value} |" for name, value in rows]


def _name_knob(plan_items: dict[str, int]) -> str:
    """The largest configurable item, to name in an error."""
    name, size = max(plan_items.items(), key=lambda kv: kv[1])
    return f"{name} ({size / GIB:.2f} GiB)"


def plan_memory(spec: ModelSpec, dtype: torch.dtype, config: MemoryConfig, *, device_type: str,
                device_bytes: int | None = None, free_bytes: int | None = None, weights_bytes: int | None = None,
                anchor_cache_bytes: int = 0, content_cache_bytes: int = 0, max_batch_size: int = 1,
                model: str = "") -> MemoryPlan:
    """The memory plan of one replica; `MemoryPlanError` naming the knob when it cannot fit.

    `device_bytes`: the device's memory (default: `config.device_memory_bytes`, else `CPU_DEVICE_MEMORY_BYTES` on
    the CPU); `free_bytes`: on CUDA, what is free right now with the weights already loaded (caps the plan when
    other processes hold memory); `weights_bytes`: measured (default: computed from the spec)."""
    if device_bytes is None:
        device_bytes = config.device_memory_bytes
    if device_bytes is None:
        if device_type != "cpu":
            raise MemoryPlanError("no device memory figure: set memory.device_memory_bytes (no CUDA device here "
                                  "to measure)")
        device_bytes = CPU_DEVICE_MEMORY_BYTES
    weights = model_weight_bytes(spec, dtype) if weights_bytes is None else weights_bytes
    usable = int(device_bytes * config.memory_utilization)
    if free_bytes is not None:   # what others hold is not ours to plan: weights are already out of free_bytes
        usable = min(usable, free_bytes + weights - int(device_bytes * (1 - config.memory_utilization)))
    per_token = spec.kv_bytes_per_token_per_dtype_byte * dtype_bytes(dtype)
    scratch = max(forward_scratch_bytes(spec, dtype, config.max_prompt_tokens),
                  decode_scratch_bytes(spec, dtype, max_batch_size))
    prepare = PREPARE_KV_COPIES * config.max_prompt_tokens * per_token
    where = (f"device memory {device_bytes / GIB:.2f} GiB x memory.memory_utilization {config.memory_utilization}"
             f" = {usable / GIB:.2f} GiB")
    if weights >= usable:
        raise MemoryPlanError(f"the weights ({weights / GIB:.2f} GiB, {model or spec.architecture} in "
                              f"{str(dtype).removeprefix('torch.')}) do not fit the {where}: raise "
                              "memory.device_memory_bytes / memory.memory_utilization, or use a smaller dtype")
    caches = {"anchor_cache_bytes": anchor_cache_bytes, "content_cache_bytes": content_cache_bytes,
              "memory.agent_cache_bytes": config.agent_cache_bytes}
    working = {"memory.max_prompt_tokens": scratch + prepare}
    kv = usable - weights - sum(caches.values()) - scratch - prepare
    plan = MemoryPlan(model=model or spec.architecture, dtype=str(dtype).removeprefix("torch."),
                      device_bytes=int(device_bytes), usable_bytes=usable, weights_bytes=weights,
                      anchor_cache_bytes=anchor_cache_bytes, content_cache_bytes=content_cache_bytes,
                      agent_cache_bytes=config.agent_cache_bytes, scratch_bytes=scratch, prepare_bytes=prepare,
                      kv_bytes=max(kv, 0), kv_bytes_per_token=per_token, max_prompt_tokens=config.max_prompt_tokens,
                      max_batch_size=max_batch_size)
    one_prompt = plan.turn_bytes(config.max_prompt_tokens, 1)
    if kv < one_prompt:
        raise MemoryPlanError(
            f"after the weights ({weights / GIB:.2f} GiB), the caches, scratch and the prompt being prepared, "
            f"{max(kv, 0) / GIB:.2f} GiB of the {where} are left for decode KV; one "
            f"memory.max_prompt_tokens = {config.max_prompt_tokens} prompt needs {one_prompt / GIB:.2f} GiB. "
            f"Shrink {_name_knob({**caches, **working})}, or raise memory.device_memory_bytes")
    return plan


def measured_device_memory(device: torch.device) -> tuple[int, int] | None:
    """(total, free) bytes of a CUDA device from `torch.cuda.mem_get_info`; None on other devices."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total), int(free)


def plan_for_runner(runner: Any, config: MemoryConfig, *, anchor_cache_bytes: int = 0, content_cache_bytes: int = 0,
                    max_batch_size: int = 1, model: str = "") -> MemoryPlan:
    """The plan of a loaded `ModelRunner`: its measured weights; on CUDA the device's measured memory (capped by
    `config.device_memory_bytes` when set) and what is free now; on the CPU the configured figure."""
    measured = measured_device_memory(runner.device)
    device_bytes, free = config.device_memory_bytes, None
    if measured is not None:
        total, free = measured
        device_bytes = total if device_bytes is None else min(device_bytes, total)
    return plan_memory(runner.spec, runner.dtype, config, device_type=runner.device.type, device_bytes=device_bytes,
                       free_bytes=free, weights_bytes=runner.weight_bytes, anchor_cache_bytes=anchor_cache_bytes,
                       content_cache_bytes=content_cache_bytes, max_batch_size=max_batch_size, model=model)
