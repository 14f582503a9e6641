"""Sampling tokens from logits on the logits' own device, for a whole batch at once.

`GenerationParams` holds what a job or request asks of one response; `Sampling` adds the model's stop tokens.
`sample_tokens` turns a batch's fp32 logits [N, vocab]
into N token ids *on the same device* (greedy rows by argmax, sampled rows by the Gumbel-max trick, top-p by a
sorted cumulative mask, stop tokens masked until `min_new_tokens`), so a decode step reads back one small tensor
and nothing else.

Randomness is counter-based: the noise for token v of a sequence's n-th sampled token is a hash of (seed, n, v)
computed with integer tensor ops wherever the logits are. No `torch.Generator` exists, so there is no generator
on the wrong device, no per-sequence state to carry, and a seed gives the same tokens on every device.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


@dataclass(frozen=True)
class GenerationParams:
    """How one response is generated, as a job or a request asks for it (the one declaration of these six fields).

    Built freely (a job spec checks it with `problem` to name the offending field); `Sampling` adds the model's
    stop tokens and refuses invalid values at construction."""
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    seed: int | None = None      # None: a job turn derives one from its agent and round (`turn_seed`)
    stop: tuple[str, ...] = ()   # stop strings: the response ends before the first one (finish_reason "stop";
                                 # not before min_new_tokens)

    def __post_init__(self) -> None:
        # Job files give lists; keep a tuple so that equal params compare (and hash) equal however they were built.
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def problem(self, max_new_tokens_limit: int | None = None) -> tuple[str, str] | None:
        """The first thing wrong with these parameters, as (field path below this object, what is wrong), or None."""
        for name in ("max_new_tokens", "min_new_tokens", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                return name, f"expected an integer, got {type(value).__name__} {value!r}"
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return name, f"expected a finite number, got {type(value).__name__} {value!r}"
        if max_new_tokens_limit is not None and not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            return "max_new_tokens", f"must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}"
        if self.max_new_tokens < 1:
            return "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
        if self.min_new_tokens < 0:
            return "min_new_tokens", f"must be >= 0, got {self.min_new_tokens}"
        if self.min_new_tokens > self.max_new_tokens:
            return "min_new_tokens", (f"must not exceed max_new_tokens ({self.max_new_tokens}), "
                                      f"got {self.min_new_tokens}")
        if self.temperature < 0:
            return "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return "top_p", f"must be in (0, 1], got {self.top_p}"
        if not isinstance(self.stop, tuple):
            return "stop", f"expected a list of strings, got {type(self.stop).__name__}"
        for index, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                return f"stop[{index}]", f"expected a non-empty string, got {stop!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The six fields as a plain dict (``stop`` as a list), the form job files and the HTTP API use."""
        data = {f.name: getattr(self, f.name) for f in fields(GenerationParams)}
        data["stop"] = list(self.stop)
        return data


@dataclass(frozen=True)
class Sampling(GenerationParams):
    """What the decoder needs for one sequence: its `GenerationParams` plus the model's stop tokens; valid by
    construction (a `ValueError` names the offending field)."""
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is None:
            object.__setattr__(self, "seed", 0)
        problem = self.problem()
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")

    @classmethod
    def of(cls, params: GenerationParams, stop_token_ids: Sequence[int] = (), default_seed: int = 0) -> "Sampling":
        """`params` decoded with the model's `stop_token_ids`; `default_seed` where `params` set none."""
        values = {f.name: getattr(params, f.name) for f in fields(GenerationParams)}
        if values["seed"] is None:
            values["seed"] = default_seed
        return cls(**values, stop_token_ids=tuple(stop_token_ids))


def turn_seed(agent_id: str, round_index: int) -> int:
    """The seed of a job turn whose agent set none: a stable hash of (agent, round), so that agents sampling
    from the same prompt do not answer alike, while a rerun of the job, in any mode, draws the same noise."""
    digest = hashlib.blake2b(f"{agent_id}\x00{round_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1          # a non-negative 63-bit integer


@dataclass(frozen=True)
class RowSampling:
    """What one row of a batch needs: its parameters, which token it is (for the noise) and whether stops count."""
    sampling: Sampling
    index: int                 # how many tokens this sequence has sampled before this one
    allow_stop: bool = True


# ---- counter-based noise -----------------------------------------------------------------------------------
def _mix32_int(x: int) -> int:
    """The 32-bit integer hash below, on a Python int (for the per-row keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without overflowing int64 (16-bit halves)."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32") of int64 values in [0, 2**32), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed: int, index: int) -> int:
    """The 32-bit key of a sequence's `index`-th sampled token."""
    return _mix32_int(_mix32_int(seed ^ (seed >> 32)) ^ _mix32_int(index + 0x632BE5AB))


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) fp32 noise [n, V] for rows `keys` [n] (int64) at token ids `token_ids` [n, V] or [V]."""
    mixed = _mix32((keys[:, None] + token_ids * _GOLDEN32) & _MASK32)
    return ((mixed >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# ---- the sampler ---------------------------------------------------------------------------------------------
def _host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def sample_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Token ids [N] (int64, on `logits`' device) for fp32 logits [N, vocab], one `RowSampling` per row.

    Stop tokens are masked in rows that may not stop yet; greedy rows take the argmax; sampled rows take
    argmax(logits / T + Gumbel noise) over their top-p set (the smallest set of most likely tokens whose
    probability reaches top_p; the top token always stays). Reads nothing back to the host."""
    device = logits.device
    banned_rows, banned_cols = [], []
    for i, row in enumerate(rows):
        if not row.allow_stop and row.sampling.stop_token_ids:
            banned_rows += [i] * len(row.sampling.stop_token_ids)
            banned_cols += list(row.sampling.stop_token_ids)
    if banned_rows:
        where = _host_tensor([banned_rows, banned_cols], torch.int64, device)            # [2, banned]
        logits = logits.index_put((where[0], where[1]), torch.tensor(float("-inf"), device=device))
    tokens = logits.argmax(dim=-1)                                                       # [N]
    sampled = [i for i, row in enumerate(rows) if row.sampling.temperature > 0]
    if not sampled:
        return tokens
    params = _host_tensor([[rows[i].sampling.temperature, rows[i].sampling.top_p] for i in sampled],
                          torch.float32, device)                                        # [n, 2]
    keys = _host_tensor([row_key(rows[i].sampling.seed, rows[i].index) for i in sampled], torch.int64,
                        device)                                                          # [n]
    picked_rows = _host_tensor(sampled, torch.int64, device)                             # [n]
    scaled = logits[picked_rows] / params[:, :1]                                         # [n, V]
    if any(rows[i].sampling.top_p < 1.0 for i in sampled):
        ordered, order = torch.sort(scaled, dim=-1, descending=True)                     # [n, V] each
        probs = torch.softmax(ordered, dim=-1)
        top_p = params[:, 1:]
        outside = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (top_p < 1.0)          # the top token stays
        ordered = ordered.masked_fill(outside, float("-inf"))
        gumbel = -torch.log(-torch.log(uniform_noise(keys, order)))                      # noise of token order[j]
        choice = order.gather(1, (ordered + gumbel).argmax(dim=-1, keepdim=True))[:, 0]
    else:
        vocab = torch.arange(scaled.shape[-1], device=device)
        gumbel = -torch.log(-torch.log(uniform_noise(keys, vocab)))
        choice = (scaled + gumbel).argmax(dim=-1)
    return tokens.index_copy(0, picked_rows, choice)
