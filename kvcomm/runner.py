"""The model runner: a compact Llama-family forward pass with explicit positions and explicit KV.

It takes token ids, their absolute positions and a per-sequence KV buffer (filled from any `KVSegment`s the
caller assembled) and returns logits plus the new tokens' KV. One forward call serves a *ragged batch*:
several sequences, each adding any number of tokens (a prefill, a one-token decode step, or a recompute of
a few tokens inside a reused cache), with all projections and MLPs batched over the flattened tokens and
attention computed per sequence (flash-attn where `kvcomm.attention` says it is right, else torch SDPA).

Decoding has its own attention path: the sequences of a decode batch sit in the slots of persistent `BatchKV`
buffers (`kvcomm.kv_buffers`), so one token for every sequence costs one SDPA call per layer and buffer, not one
per sequence and layer. `decode_step` runs a step alone; on a worker's model thread a step rides in the next
forward of new tokens instead (`PrefillBudget.ride_decode`): prefill rows and decode rows share one pass over
the weights, one layer loop (`_run`).

Device discipline (the runner is meant for a GPU and tested on the CPU): host data (token ids, positions,
lengths) crosses to the device in one non-blocking copy per call (`_to_device`); nothing here reads a device
tensor back to the host. `kv_budget` is the ledger every decode buffer on this runner charges (unlimited until
a `kvcomm.memory_plan.MemoryPlan` sets it).

Supported: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral without sliding window, Qwen2 (q/k/v bias).
transformers' own model is the oracle this is tested against, never the thing that runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .attention import FlashKernel, choose_kernel, installed_flash_kernel, sdpa
from .kv import KVSegment
from .kv_buffers import BatchKV, SequenceKV
from .memory_plan import KVBudget
from .model_spec import ModelSpec
from .rope import Rope
from .runner_hooks import DecodeInputs, DecodeRide, PrefillBudget

__all__ = ["BatchKV", "DecodeInputs", "DecodeRide", "ForwardRequest", "ModelRunner", "PrefillBudget",
           "SequenceKV"]   # the buffers live in kv_buffers


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor    # [hidden]
    qkv: torch.Tensor           # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor        # [hidden, heads * head_dim]
    post_norm: torch.Tensor     # [hidden]
    gate_up: torch.Tensor       # [2 * intermediate, hidden]
    down: torch.Tensor          # [hidden, intermediate]


@dataclass
class ForwardRequest:
    """One sequence's part of a ragged forward pass: `token_ids` appended to `kv` at `positions`."""
    kv: SequenceKV
    token_ids: torch.Tensor             # [t] int64
    positions: torch.Tensor | None = None  # [t] int64; default: kv.next_position + arange(t)
    all_logits: bool = False            # logits for every new token, else only the last


class ModelRunner:
    """Holds one model's weights on one device and runs ragged-batch forward passes."""

    prefill_budget: PrefillBudget | None = None   # the model thread's hooks (see `PrefillBudget`); None: none

    def __init__(self, spec: ModelSpec, state_dict: dict[str, torch.Tensor], *, attention: str = "auto",
                 flash_kernel: FlashKernel | None = None, kv_budget: KVBudget | None = None):
        """`attention`: "auto" (flash-attn where it is right, else SDPA), "sdpa" or "flash" (an error naming why
        when it cannot be used). `flash_kernel`: the flash-attn function to consider (default: the installed
        one). `kv_budget`: the decode-KV ledger (default: unlimited)."""
        self.spec = spec
        embed = state_dict["model.embed_tokens.weight"]
        self.dtype = embed.dtype
        self.device = embed.device
        self.rope = Rope(spec, self.device)
        self.embed = embed                                              # [vocab, hidden]
        self.final_norm = state_dict["model.norm.weight"]
        self.lm_head = state_dict.get("lm_head.weight", embed)          # [vocab, hidden]
        self.layers: list[_LayerWeights] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([state_dict[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
            bias = None
            if spec.attention_bias:
                bias = torch.cat([state_dict[p + f"self_attn.{n}_proj.bias"] for n in "qkv"], dim=0)
            gate_up = torch.cat([state_dict[p + "mlp.gate_proj.weight"], state_dict[p + "mlp.up_proj.weight"]], 0)
            self.layers.append(_LayerWeights(
                input_norm=state_dict[p + "input_layernorm.weight"], qkv=qkv, qkv_bias=bias,
                o_proj=state_dict[p + "self_attn.o_proj.weight"],
                post_norm=state_dict[p + "post_attention_layernorm.weight"], gate_up=gate_up,
                down=state_dict[p + "mlp.down_proj.weight"]))
        if flash_kernel is None and attention != "sdpa" and self.device.type == "cuda":
            flash_kernel = installed_flash_kernel()
        self._flash, self.attention_reason = choose_kernel(attention, self.device, self.dtype, flash_kernel)
        self.attention_backend = "flash-attn" if self._flash is not None else "sdpa"
        self._scale = 1.0 / math.sqrt(spec.head_dim)
        self.kv_budget = kv_budget if kv_budget is not None else KVBudget(None)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in every layer, in this runner's dtype."""
        return self.spec.kv_bytes_per_token_per_dtype_byte * self.embed.element_size()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this runner holds (each storage once: a tied lm_head is the embedding)."""
        tensors = [self.embed, self.final_norm, self.lm_head]
        for w in self.layers:
            tensors += [w.input_norm, w.qkv, w.o_proj, w.post_norm, w.gate_up, w.down]
            if w.qkv_bias is not None:
                tensors.append(w.qkv_bias)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device: on CUDA through pinned memory without blocking the host."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    # ---- buffers ------------------------------------------------------------------------------------------
    def new_kv(self, context: KVSegment | None = None, *, extra_capacity: int = 256, start: int = 0) -> SequenceKV:
        """A KV buffer holding `context` (copied) with room for `extra_capacity` more tokens."""
        if context is not None:
            context = context.to(self.device, self.dtype)
        return SequenceKV.from_segment(self.spec, context, extra_capacity=extra_capacity, dtype=self.dtype,
                                       device=self.device, start=start)

    def new_batch_kv(self, capacity: int, slots: int) -> BatchKV:
        """A decode buffer of `slots` slots of `capacity` tokens, charged to `kv_budget` while it lives."""
        return BatchKV(self.spec, capacity=capacity, dtype=self.dtype, device=self.device, slots=slots,
                       budget=self.kv_budget)

    # ---- forward ------------------------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return weight * x32.to(x.dtype)

    def forward(self, requests: Sequence[ForwardRequest]) -> list[torch.Tensor]:
        """Append each request's tokens to its KV buffer; return fp32 logits per request.

        Each result is [t, vocab] when `all_logits`, else [1, vocab] (the last token). When the scheduler's hooks
        offer a decode step (`PrefillBudget.ride_decode`), its tokens ride in this same forward (one pass over
        the weights for both, as vLLM mixes prefill chunks and decodes in one batch) and its logits go back to it.
        """
        ride = self.prefill_budget.ride_decode() if self.prefill_budget is not None else None
        if ride is None:
            return self._run(requests, None)[0]
        outputs, decode_logits = self._run(requests, ride.inputs)
        ride.deliver(decode_logits)
        return outputs

    def decode_step(self, groups: Sequence[BatchKV], token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One decode step: append one token to every used slot of every group; return fp32 logits [N, vocab].

        `token_ids` (N host ints, or a host tensor [N]) lists the tokens group by group, slot by slot (N = total
        used slots). Projections and MLPs run once over all N tokens; attention is one call per group and layer
        over its padded slots, with a lengths mask when their lengths differ.
        """
        return self._run((), DecodeInputs(groups, token_ids))[1]

    @torch.inference_mode()
    def _run(self, requests: Sequence[ForwardRequest], decode: DecodeInputs | None
             ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One forward over the requests' new tokens (rows 0..P) and a decode step's tokens (rows P..P+D).

        Projections, RoPE and MLPs run once over all rows; attention runs per request (its causal mask over its
        own buffer) and per decode group (its padded slots). Host data reaches the device in one copy.
        Returns (each request's logits, the decode rows' logits [D, vocab] or None)."""
        spec = self.spec
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        lengths = [int(r.token_ids.numel()) for r in requests]
        if any(n == 0 for n in lengths):
            raise ValueError("every forward request needs at least one token")
        groups = list(decode.groups) if decode is not None else []
        decode_host, ragged = self._decode_host(decode)
        n_decode = sum(g.size for g in groups)
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        n_prefill = bounds[-1]
        total = n_prefill + n_decode
        # host rows, one copy to the device: ids [total] | positions [total] | logit rows | ragged decode lengths
        pos_parts = []
        for r, n in zip(requests, lengths):
            if r.positions is None:
                pos_parts.append(torch.arange(r.kv.next_position, r.kv.next_position + n))
            else:
                pos_parts.append(r.positions.reshape(-1).to(torch.int64).cpu())
            r.kv.reserve(n)
        # logits only where asked: the lm_head over a 50-150K vocabulary is a large share of a short prefill
        rows = [torch.arange(a, b) if r.all_logits else torch.tensor([b - 1])
                for r, a, b in zip(requests, bounds, bounds[1:])]
        rows.append(torch.arange(n_prefill, total))                                        # every decode row
        host = torch.cat([t.reshape(-1).to(torch.int64) for t in (
            *[r.token_ids.cpu() for r in requests], decode_host[:n_decode],
            *pos_parts, decode_host[n_decode:2 * n_decode], *rows, decode_host[2 * n_decode:])])
        on_device = self._to_device(host)
        ids, positions = on_device[:total], on_device[total:2 * total]                     # [total], [total]
        n_rows = sum(int(t.numel()) for t in rows)
        index = on_device[2 * total:2 * total + n_rows]                                    # logit rows
        ragged_lengths = on_device[2 * total + n_rows:]
        cos, sin = self.rope.cos_sin(positions, self.dtype)                                # [total, head_dim]
        cos, sin = cos[:, None, :], sin[:, None, :]                                         # [total, 1, head_dim]
        masks = [self._causal_mask(r.kv.length, n) for r, n in zip(requests, lengths)]
        plans = self._decode_plans(groups, ragged, ragged_lengths, n_prefill)

        hidden = self.embed[ids]                                                           # [total, hidden]
        q_width, kv_width = n_heads * hd, n_kv * hd
        for layer_idx, w in enumerate(self.layers):
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)                                           # [total, (H+2Hkv)*D]
            q = self.rope.apply(qkv[:, :q_width].view(-1, n_heads, hd), cos, sin)                 # [total, H, D]
            k = self.rope.apply(qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd), cos, sin)  # [total, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                                    # [total, Hkv, D]
            attn_out = torch.empty(total, q_width, dtype=self.dtype, device=self.device)       # [total, H*D]
            for i, r in enumerate(requests):
                a, b = bounds[i], bounds[i + 1]
                kv = r.kv
                end = kv.length + (b - a)
                kv.keys[layer_idx, :, kv.length:end] = k[a:b].transpose(0, 1)              # [Hkv, t, D]
                kv.values[layer_idx, :, kv.length:end] = v[a:b].transpose(0, 1)
                attn_out[a:b] = self._attend(q[a:b], kv.keys[layer_idx, :, :end], kv.values[layer_idx, :, :end],
                                             masks[i])
            self._attend_decode(layer_idx, q, k, v, groups, plans, attn_out)
            hidden = hidden + F.linear(attn_out, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)                             # [total, I] each
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        for r, n in zip(requests, lengths):
            r.kv.length += n
        for g in groups:
            g.lengths = [n + 1 for n in g.lengths]

        picked = hidden if not requests else hidden[index]                                 # [rows, hidden]
        logits = F.linear(self._rms_norm(picked, self.final_norm), self.lm_head).float()  # [rows, vocab]
        out, cursor = [], 0
        for r, n in zip(requests, lengths):
            take = n if r.all_logits else 1
            out.append(logits[cursor:cursor + take])
            cursor += take
        return out, (logits[cursor:] if decode is not None else None)

    def _decode_host(self, decode: DecodeInputs | None) -> tuple[torch.Tensor, list[bool]]:
        """A decode step's host rows: ids [D] | positions [D] | the lengths of ragged groups' slots (int64), and
        which groups are ragged (their slots' lengths differ)."""
        if decode is None:
            return torch.empty(0, dtype=torch.int64), []
        groups = list(decode.groups)
        n_decode = sum(g.size for g in groups)
        ids = (decode.token_ids.reshape(-1).tolist() if isinstance(decode.token_ids, torch.Tensor)
               else list(decode.token_ids))
        if n_decode == 0 or len(ids) != n_decode:
            raise ValueError(f"decode_step needs one token per used slot ({n_decode}), got {len(ids)}")
        ragged = [min(g.lengths) != max(g.lengths) for g in groups]
        host = ids + [s + n for g in groups for s, n in zip(g.starts, g.lengths)]
        host += [n for g, r in zip(groups, ragged) if r for n in g.lengths]
        return torch.tensor(host, dtype=torch.int64), ragged

    def _decode_plans(self, groups: Sequence[BatchKV], ragged: Sequence[bool], ragged_lengths: torch.Tensor,
                      first_row: int) -> list[tuple]:
        """Per decode group: (its rows a:b of the forward, where its new K/V go, attended length, mask)."""
        plans, a, cursor = [], first_row, 0
        for g, is_ragged in zip(groups, ragged):
            n, span = g.size, max(g.lengths) + 1
            mask, where = None, (slice(0, n), slice(None), span - 1)   # equal lengths: one strided write
            if is_ragged:   # slot i sees its own lengths[i] + 1 tokens
                slot_lengths = ragged_lengths[cursor:cursor + n]                                # [n]
                cursor += n
                mask = (torch.arange(span, device=self.device)[None, :] <= slot_lengths[:, None])[:, None, None, :]
                where = (torch.arange(n, device=self.device), slice(None), slot_lengths)
            plans.append((a, a + n, where, span, mask))
            a += n
        return plans

    def _attend_decode(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       groups: Sequence[BatchKV], plans: list[tuple], attn_out: torch.Tensor) -> None:
        """The decode rows' attention at one layer: each group's new K/V written into its slots, its rows of
        `attn_out` [rows, H*D] filled (q [rows, H, D], k/v [rows, Hkv, D] hold every row of the forward)."""
        n_heads, n_kv, hd = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
        group = n_heads // n_kv
        for g, (a, b, where, span, mask) in zip(groups, plans):
            keys, values = g.keys[layer_idx], g.values[layer_idx]                    # [slots, Hkv, cap, D]
            keys[where] = k[a:b]                                                    # the new token of each slot
            values[where] = v[a:b]
            # the query heads sharing a KV head ride as that head's query rows: [n, Hkv, H/Hkv, D]
            # (no head grouping left for SDPA to do, so a mask keeps the fused kernels)
            out = sdpa(q[a:b].view(b - a, n_kv, group, hd), keys[:b - a, :, :span], values[:b - a, :, :span],
                       mask=mask, scale=self._scale)                                       # [n, Hkv, H/Hkv, D]
            attn_out[a:b] = out.reshape(b - a, n_heads * hd)

    def _causal_mask(self, context_len: int, new_len: int) -> torch.Tensor | None:
        """Bool mask [new, context + new]: new token i sees the whole context and new tokens <= i.

        None when no mask is needed (one new token) or when plain causal attention is exact (no context),
        which lets SDPA take its fused causal kernel."""
        if new_len == 1 or context_len == 0:
            return None
        cols = torch.arange(context_len + new_len, device=self.device)
        rows = torch.arange(new_len, device=self.device)[:, None] + context_len
        return cols[None, :] <= rows

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """q [t, H, D] against keys/values [Hkv, S, D] (the last t of S are the new tokens) -> [t, H*D]."""
        t = q.shape[0]
        if self._flash is not None:
            # flash-attn >= 2.1 aligns the causal mask bottom-right when t < S, which is exactly our convention
            out = self._flash.fn(q.unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                 values.transpose(0, 1).unsqueeze(0), causal=t > 1,
                                 softmax_scale=self._scale)                                # [1, t, H, D]
            return out.reshape(t, -1)
        causal = mask is None and t > 1   # no context: top-left causal alignment is the right one
        out = sdpa(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), mask=mask,
                   causal=causal, scale=self._scale)                                       # [1, H, t, D]
        return out[0].transpose(0, 1).reshape(t, -1)

    # ---- conveniences -------------------------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor | Sequence[int], *, context: KVSegment | None = None,
                start: int | None = None, all_logits: bool = False,
                extra_capacity: int = 0) -> tuple[torch.Tensor, SequenceKV]:
        """Prefill `token_ids` after `context` (or from position `start`); return (logits, the buffer).

        The new tokens sit at positions ``context.end ...`` (or ``start ...``); the buffer holds context + new.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if context is not None and start is not None and start != context.end:
            raise ValueError(f"start={start} but the context ends at position {context.end}")
        kv = self.new_kv(context, extra_capacity=ids.numel() + extra_capacity,
                         start=0 if start is None else start)
        budget, n, begin = self.prefill_budget, ids.numel(), 0
        while True:   # one forward, or chunks of the budget's size each appended to the buffer
            size = n - begin if budget is None or all_logits else (budget.chunk_tokens() or n - begin)
            size = max(1, min(size, n - begin))
            (logits,) = self.forward([ForwardRequest(kv, ids[begin:begin + size], all_logits=all_logits)])
            begin += size
            if begin >= n:
                break
        return logits, kv

    @torch.inference_mode()
    def blend_prefill(self, cached: KVSegment, cached_ids: torch.Tensor, tail_ids: torch.Tensor, *,
                      recompute_ratio: float, check_layer: int, protected_prefix: int = 0,
                      extra_capacity: int = 0) -> tuple[torch.Tensor, SequenceKV, torch.Tensor]:
        """CacheBlend-style selective recompute: reuse `cached` KV, recompute only the tokens it got most wrong.

        Layers ``0..check_layer`` are computed for every token (their fresh KV replaces the cached KV there).
        At `check_layer` each reused token is scored by its key deviation ``sum((K_fresh - K_cached)^2)``; the
        top `recompute_ratio` share of tokens after the exact `protected_prefix` are recomputed in every later
        layer, attending over the blended cache; the tail tokens are always computed. Returns (logits of the
        last tail token [1, vocab], the buffer with cached + tail tokens, the recomputed cached-token indices).
        """
        spec = self.spec
        if not 0 <= check_layer < spec.num_layers:
            raise ValueError(f"check_layer must be in [0, {spec.num_layers}), got {check_layer}")
        n_cached, n_tail = cached.num_tokens, int(tail_ids.numel())
        if n_tail == 0:
            raise ValueError("blend_prefill needs at least one tail token")
        if self.prefill_budget is not None:
            self.prefill_budget.before_forward(n_cached + n_tail)     # every token through check_layer
        kv = self.new_kv(cached, extra_capacity=n_tail + extra_capacity)
        total = n_cached + n_tail
        ids = self._to_device(torch.cat([cached_ids.reshape(-1).cpu(), tail_ids.reshape(-1).cpu()]))  # [total]
        positions = torch.arange(cached.start, cached.start + total, device=self.device)         # [total]
        cos_all, sin_all = self.rope.cos_sin(positions, self.dtype)                               # [total, D]
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_width, kv_width = n_heads * hd, n_kv * hd

        rows = torch.arange(total, device=self.device)           # which tokens `hidden` holds
        hidden = self.embed[ids]                                 # [rows, hidden]
        selected = torch.empty(0, dtype=torch.int64, device=self.device)   # cached-token indices recomputed
        for layer_idx, w in enumerate(self.layers):
            cos, sin = cos_all[rows][:, None, :], sin_all[rows][:, None, :]
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q = self.rope.apply(qkv[:, :q_width].view(-1, n_heads, hd), cos, sin)                 # [rows, H, D]
            k = self.rope.apply(qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd), cos, sin)  # [rows, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                                    # [rows, Hkv, D]
            if layer_idx == check_layer and n_cached > protected_prefix:
                old_k = kv.keys[layer_idx, :, protected_prefix:n_cached]                          # [Hkv, R', D]
                new_k = k[protected_prefix:n_cached].transpose(0, 1)                              # [Hkv, R', D]
                deviation = (new_k.float() - old_k.float()).pow(2).sum(dim=(0, 2))               # [R']
                n_pick = int(math.ceil(recompute_ratio * deviation.numel()))
                picked = torch.topk(deviation, n_pick).indices + protected_prefix if n_pick else deviation.new_empty(
                    0, dtype=torch.int64)
                selected = torch.sort(picked).values.to(torch.int64)
            kv.keys[layer_idx, :, rows] = k.transpose(0, 1)
            kv.values[layer_idx, :, rows] = v.transpose(0, 1)
            # attention of the computed rows over the (blended) cache: row at index i sees indices <= i
            mask = torch.arange(total, device=self.device)[None, :] <= rows[:, None]                 # [rows, total]
            attn = sdpa(q.transpose(0, 1).unsqueeze(0), kv.keys[layer_idx, :, :total].unsqueeze(0),
                        kv.values[layer_idx, :, :total].unsqueeze(0), mask=mask,
                        scale=self._scale)[0].transpose(0, 1).reshape(rows.numel(), -1)              # [rows, H*D]
            hidden = hidden + F.linear(attn, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
            if layer_idx == check_layer:
                keep = torch.cat([selected, torch.arange(n_cached, total, device=self.device)])     # into `rows`
                hidden, rows = hidden[keep], rows[keep]
        kv.length = total
        logits = F.linear(self._rms_norm(hidden[-1:], self.final_norm), self.lm_head).float()
        return logits, kv, selected

    @torch.inference_mode()
    def recompute_prefill(self, cached: KVSegment | SequenceKV, cached_ids: torch.Tensor, tail_ids: torch.Tensor,
                          recompute: torch.Tensor, *, extra_capacity: int = 0, keep_queries: bool = False
                          ) -> tuple[torch.Tensor, SequenceKV, torch.Tensor | None]:
        """Selective recompute with the tokens chosen up front: reuse `cached`, recompute the cached tokens at
        `recompute` ([r] int64 indices into `cached`) and compute the tail, at every layer. A `SequenceKV` as
        `cached` is extended in place (no copy): its valid tokens are the cache, and it is the buffer returned.

        Each recomputed or tail token attends over the whole buffer up to itself (reused KV where nothing was
        recomputed, fresh KV where something was), so a recomputed token sees the corrected KV of the tokens
        recomputed before it. Returns (logits of the last tail token [1, vocab], the buffer with cached + tail
        tokens, and with `keep_queries` the last tail token's post-RoPE queries per layer [layers, heads,
        head_dim], else None). With no recompute indices this equals `prefill(tail_ids, context=cached)`.
        """
        spec = self.spec
        in_place = isinstance(cached, SequenceKV)
        n_cached, n_tail = cached.length if in_place else cached.num_tokens, int(tail_ids.numel())
        if n_tail == 0:
            raise ValueError("recompute_prefill needs at least one tail token")
        picked = torch.unique(recompute.reshape(-1).to(torch.int64))                              # sorted [r]
        if picked.numel() and (int(picked[0]) < 0 or int(picked[-1]) >= n_cached):
            raise IndexError(f"recompute indices must lie in [0, {n_cached}), got {picked.tolist()[:8]}...")
        ride = self.prefill_budget.ride_decode() if self.prefill_budget is not None else None
        if ride is None and self.prefill_budget is not None:
            self.prefill_budget.before_forward(int(picked.numel()) + n_tail)
        if in_place:
            kv = cached
            kv.reserve(n_tail + extra_capacity)
        else:
            kv = self.new_kv(cached, extra_capacity=n_tail + extra_capacity)
        total = n_cached + n_tail
        rows = torch.cat([picked, torch.arange(n_cached, total)]).to(self.device)                 # [R]
        ids = torch.cat([cached_ids.reshape(-1).to(torch.int64), tail_ids.reshape(-1).to(torch.int64)])
        groups = list(ride.inputs.groups) if ride is not None else []
        decode_host, ragged = self._decode_host(ride.inputs if ride is not None else None)
        n_decode = sum(g.size for g in groups)
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        group, count = n_heads // n_kv, int(rows.numel())
        q_width, kv_width = n_heads * hd, n_kv * hd
        positions, row_ids = rows + cached.start, ids.to(self.device)[rows]                       # [R], [R]
        if n_decode:   # the riding step's rows follow the turn's: ids [D] | positions [D] | ragged lengths
            decode_rows = self._to_device(decode_host)
            positions = torch.cat([positions, decode_rows[n_decode:2 * n_decode]])               # [R + D]
            row_ids = torch.cat([row_ids, decode_rows[:n_decode]])                                # [R + D]
            plans = self._decode_plans(groups, ragged, decode_rows[2 * n_decode:], count)
            attn_out = torch.empty(count + n_decode, q_width, dtype=self.dtype, device=self.device)  # [R + D, H*D]
        cos, sin = self.rope.cos_sin(positions, self.dtype)                                       # [R + D, D]
        cos, sin = cos[:, None, :], sin[:, None, :]
        # row i sees buffer indices <= rows[i]; the query heads of one KV head ride as its query rows (no GQA
        # expansion of the cache): mask [group * R, total], repeated per head of the group
        mask = (torch.arange(total, device=self.device)[None, :] <= rows[:, None]).repeat(group, 1)
        hidden = self.embed[row_ids]                                                              # [R + D, hidden]
        queries = []
        for layer_idx, w in enumerate(self.layers):
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q = self.rope.apply(qkv[:, :q_width].view(-1, n_heads, hd), cos, sin)             # [R + D, H, D]
            k = self.rope.apply(qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd), cos, sin)  # [R + D, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                                # [R + D, Hkv, D]
            if keep_queries:
                queries.append(q[count - 1].float())
            kv.keys[layer_idx, :, rows] = k[:count].transpose(0, 1)
            kv.values[layer_idx, :, rows] = v[:count].transpose(0, 1)
            q_grouped = q[:count].view(count, n_kv, group, hd).permute(1, 2, 0, 3).reshape(n_kv, group * count, hd)
            out = F.scaled_dot_product_attention(
                q_grouped.unsqueeze(0), kv.keys[layer_idx, :, :total].unsqueeze(0),
                kv.values[layer_idx, :, :total].unsqueeze(0), attn_mask=mask, scale=self._scale)  # [1, Hkv, G*R, D]
            attn = out[0].view(n_kv, group, count, hd).permute(2, 0, 1, 3).reshape(count, q_width)  # [R, H*D]
            if n_decode:
                attn_out[:count] = attn
                self._attend_decode(layer_idx, q, k, v, groups, plans, attn_out)                 # rows R..R+D
                attn = attn_out
            hidden = hidden + F.linear(attn, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        kv.length = total
        for g in groups:
            g.lengths = [n + 1 for n in g.lengths]
        logits = F.linear(self._rms_norm(hidden[count - 1:], self.final_norm), self.lm_head).float()  # [1 + D, V]
        if ride is not None:
            ride.deliver(logits[1:])
        return logits[:1], kv, torch.stack(queries) if keep_queries else None
