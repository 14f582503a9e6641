"""The hooks a model thread sets on its `kvcomm.runner.ModelRunner`: a decode step riding in the runner's forwards
of new tokens (`DecodeInputs`, `DecodeRide`) and chunked prefill's budget (`PrefillBudget`, which holds both).
`actors.scheduler.TurnScheduler` is the one user; the runner works without them (one forward per call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .kv_buffers import BatchKV

__all__ = ["DecodeInputs", "DecodeRide", "PrefillBudget"]


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step's inputs: the batch's buffers and one token per used slot, group by group, slot by slot."""
    groups: Sequence[BatchKV]
    token_ids: Sequence[int] | torch.Tensor     # [N] host ints, N = the used slots of all groups


@dataclass(frozen=True)
class DecodeRide:
    """A decode step offered to ride in the runner's next forward: its inputs, and where its logits go."""
    inputs: DecodeInputs
    deliver: Callable[[torch.Tensor], None]     # called with the step's logits [N, vocab] fp32


def _no_ride() -> DecodeRide | None:
    return None


@dataclass(frozen=True)
class PrefillBudget:
    """The model thread's hooks into the runner (`actors.scheduler.TurnScheduler` sets them on its runner).

    * `ride_decode()`: a decode step of the sequences decoding meanwhile, or None; every forward of new tokens on
      the model thread (`forward`: a prefill or one of its chunks, an input, a base cache; `recompute_prefill`: a
      reused turn's tail) carries that step in the same pass over the weights.
    * Chunked prefill: `prefill` computes a long prompt in chunks of at most `chunk_tokens()` tokens (0: whole;
      the scheduler says 0 while nothing decodes), each appended to the same buffer, attending over the chunks
      before it and carrying a step. `blend_prefill`, and `recompute_prefill` when no step rides, call
      `before_forward(tokens)` first: the scheduler runs a step of its own there once the prefill tokens since its
      last step would pass its budget."""
    chunk_tokens: Callable[[], int]
    before_forward: Callable[[int], None]
    ride_decode: Callable[[], DecodeRide | None] = _no_ride
