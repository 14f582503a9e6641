"""The model runner: a compact Llama-family forward pass with explicit positions and explicit KV.

It takes token ids, their absolute positions and a per-sequence KV buffer (filled from any `KVSegment`s the
caller assembled) and returns logits plus the new tokens' KV. One forward call serves a *ragged batch*:
several sequences, each adding any number of tokens (a prefill, a one-token decode step, or a recompute of
a few tokens inside a reused cache), with all projections and MLPs batched over the flattened tokens and
attention computed per sequence (torch SDPA on CPU; flash-attn on CUDA when installed).

Decoding has its own path, `decode_step`: the sequences of a decode batch sit in the slots of a persistent
`BatchKV` (one [layers, slots, kv_heads, capacity, head_dim] buffer per capacity class), so one token for
every sequence costs one SDPA call per layer and buffer, not one per sequence and layer.

Supported: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral without sliding window, Qwen2 (q/k/v bias).
transformers' own model is the oracle this is tested against, never the thing that runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .kv import KVSegment
from .model_spec import ModelSpec
from .rope import Rope


def _flash_attn_func():
    """flash-attn's function when it is installed and usable (CUDA only), else None. Imported lazily."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another CUDA/torch
        return None
    return flash_attn_func


class SequenceKV:
    """A growable, contiguous KV buffer for one sequence: K and V of shape [layers, kv_heads, capacity, head_dim].

    Tokens ``0 .. length-1`` are valid; token i sits at absolute position ``start + i`` (positions inside one
    buffer are contiguous). The runner appends to it in place during a forward pass; everything else reads it.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, device: torch.device | str, capacity: int = 256,
                 start: int = 0):
        shape = (spec.num_layers, spec.num_kv_heads, max(capacity, 1), spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.start = start

    @classmethod
    def from_segment(cls, spec: ModelSpec, segment: KVSegment | None, *, extra_capacity: int, dtype: torch.dtype,
                     device: torch.device | str, start: int = 0) -> "SequenceKV":
        """A buffer holding `segment` (copied once) with room for `extra_capacity` more tokens."""
        n = 0 if segment is None else segment.num_tokens
        buf = cls(spec, dtype=dtype, device=device, capacity=n + extra_capacity,
                  start=start if segment is None else segment.start)
        if n:
            buf.keys[:, :, :n] = segment.keys
            buf.values[:, :, :n] = segment.values
            buf.length = n
        return buf

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def next_position(self) -> int:
        return self.start + self.length

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens (grows geometrically)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, int(self.capacity * 1.5) + 16)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[:2] + (new_cap,) + old.shape[3:], dtype=old.dtype, device=old.device)
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def segment(self, begin: int = 0, end: int | None = None) -> KVSegment:
        """Tokens [begin, end) as a KVSegment (a view: copy it if it must outlive later writes)."""
        end = self.length if end is None else end
        if not 0 <= begin <= end <= self.length:
            raise IndexError(f"[{begin}, {end}) is outside the {self.length} valid tokens")
        return KVSegment(self.keys[:, :, begin:end], self.values[:, :, begin:end], self.start + begin)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise IndexError(f"cannot truncate a buffer of {self.length} tokens to {length}")
        self.length = length


class BatchKV:
    """The KV of a decode batch: K and V of shape [layers, slots, kv_heads, capacity, head_dim], one sequence a slot.

    Used slots are ``0 .. size-1`` (kept dense: releasing a slot moves the last used one into it). Slot i holds
    ``lengths[i]`` valid tokens, token j at absolute position ``starts[i] + j``. A sequence's KV is copied in
    once (`admit`), `ModelRunner.decode_step` appends one token to every used slot in place and attends over all
    of them with one attention call per layer, and `release` copies the tokens added here back out.
    """

    def __init__(self, spec: ModelSpec, *, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 slots: int = 1):
        # zeros, not empty: padding past a slot's length is masked out of attention, and a masked score is
        # (q . k) + (-inf), which is NaN if the padding holds NaN or inf
        shape = (spec.num_layers, max(slots, 1), spec.num_kv_heads, capacity, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths: list[int] = []
        self.starts: list[int] = []

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()   # the sequence's KV may be an inference tensor (prefilled under inference mode)
    def admit(self, kv: SequenceKV) -> int:
        """Copy `kv`'s valid tokens into the next free slot (growing the slots when full); return the slot."""
        n = kv.length
        if n >= self.capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a decode buffer of capacity {self.capacity}")
        slot = self.size
        if slot == self.slots:
            grown = 2 * self.slots
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = torch.zeros(old.shape[:1] + (grown,) + old.shape[2:], dtype=old.dtype, device=old.device)
                new[:, :slot] = old
                setattr(self, name, new)
        self.keys[:, slot, :, :n] = kv.keys[:, :, :n]
        self.values[:, slot, :, :n] = kv.values[:, :, :n]
        self.lengths.append(n)
        self.starts.append(kv.start)
        return slot

    @torch.inference_mode()   # writes into the sequence's own (inference-mode) KV buffer
    def release(self, slot: int, into: SequenceKV) -> None:
        """Copy the tokens `slot` holds beyond ``into.length`` back into `into` and free the slot.

        The last used slot (if another) moves into the freed one: what sat at index ``size - 1`` is at `slot` now.
        """
        n = self.lengths[slot]
        have = into.length
        if n > have:
            into.reserve(n - have)
            into.keys[:, :, have:n] = self.keys[:, slot, :, have:n]
            into.values[:, :, have:n] = self.values[:, slot, :, have:n]
            into.length = n
        last = self.size - 1
        if slot != last:
            m = self.lengths[last]
            self.keys[:, slot, :, :m] = self.keys[:, last, :, :m]
            self.values[:, slot, :, :m] = self.values[:, last, :, :m]
            self.lengths[slot], self.starts[slot] = m, self.starts[last]
        self.lengths.pop()
        self.starts.pop()


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

    def __init__(self, spec: ModelSpec, state_dict: dict[str, torch.Tensor], *, attention: str = "auto"):
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
        if attention not in ("auto", "sdpa", "flash"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'flash', got {attention!r}")
        flash = _flash_attn_func() if self.device.type == "cuda" and attention in ("auto", "flash") else None
        if attention == "flash" and flash is None:
            raise RuntimeError("attention='flash' needs flash-attn installed and a CUDA device")
        self._flash = flash
        self.attention_backend = "flash-attn" if flash is not None else "sdpa"
        self._scale = 1.0 / math.sqrt(spec.head_dim)

    # ---- buffers ------------------------------------------------------------------------------------------
    def new_kv(self, context: KVSegment | None = None, *, extra_capacity: int = 256, start: int = 0) -> SequenceKV:
        """A KV buffer holding `context` (copied) with room for `extra_capacity` more tokens."""
        if context is not None:
            context = context.to(self.device, self.dtype)
        return SequenceKV.from_segment(self.spec, context, extra_capacity=extra_capacity, dtype=self.dtype,
                                       device=self.device, start=start)

    # ---- forward ------------------------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return weight * x32.to(x.dtype)

    @torch.inference_mode()
    def forward(self, requests: Sequence[ForwardRequest]) -> list[torch.Tensor]:
        """Append each request's tokens to its KV buffer; return fp32 logits per request.

        Each result is [t, vocab] when `all_logits`, else [1, vocab] (the last token).
        """
        spec = self.spec
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        lengths = [int(r.token_ids.numel()) for r in requests]
        if any(n == 0 for n in lengths):
            raise ValueError("every forward request needs at least one token")
        ids = torch.cat([r.token_ids.reshape(-1) for r in requests]).to(self.device)       # [N]
        pos_parts = []
        for r, n in zip(requests, lengths):
            if r.positions is None:
                pos_parts.append(torch.arange(r.kv.next_position, r.kv.next_position + n))
            else:
                pos_parts.append(r.positions.reshape(-1).to(torch.int64))
            r.kv.reserve(n)
        positions = torch.cat(pos_parts).to(self.device)                                   # [N]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cos, sin = self.rope.cos_sin(positions, self.dtype)                                # [N, head_dim]
        cos, sin = cos[:, None, :], sin[:, None, :]                                         # [N, 1, head_dim]
        masks = [self._causal_mask(r.kv.length, n) for r, n in zip(requests, lengths)]

        hidden = self.embed[ids]                                                           # [N, hidden]
        q_width, kv_width = n_heads * hd, n_kv * hd
        for layer_idx, w in enumerate(self.layers):
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)                                           # [N, (H+2Hkv)*D]
            q = qkv[:, :q_width].view(-1, n_heads, hd)                                     # [N, H, D]
            k = qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd)                       # [N, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                              # [N, Hkv, D]
            q = self.rope.apply(q, cos, sin)
            k = self.rope.apply(k, cos, sin)
            attn_out = torch.empty(q.shape[0], q_width, dtype=self.dtype, device=self.device)  # [N, H*D]
            for i, r in enumerate(requests):
                a, b = bounds[i], bounds[i + 1]
                kv = r.kv
                end = kv.length + (b - a)
                kv.keys[layer_idx, :, kv.length:end] = k[a:b].transpose(0, 1)              # [Hkv, t, D]
                kv.values[layer_idx, :, kv.length:end] = v[a:b].transpose(0, 1)
                attn_out[a:b] = self._attend(q[a:b], kv.keys[layer_idx, :, :end], kv.values[layer_idx, :, :end],
                                             masks[i])
            hidden = hidden + F.linear(attn_out, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)                             # [N, I] each
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        for r, n in zip(requests, lengths):
            r.kv.length += n

        # logits only where asked: the lm_head over a 50-150K vocabulary is a large share of a short prefill
        rows = []
        for i, r in enumerate(requests):
            a, b = bounds[i], bounds[i + 1]
            rows.append(torch.arange(a, b) if r.all_logits else torch.tensor([b - 1]))
        index = torch.cat(rows).to(self.device)
        normed = self._rms_norm(hidden[index], self.final_norm)
        logits = F.linear(normed, self.lm_head).float()                                    # [rows, vocab]
        out, cursor = [], 0
        for r, n in zip(requests, lengths):
            take = n if r.all_logits else 1
            out.append(logits[cursor:cursor + take])
            cursor += take
        return out

    @torch.inference_mode()
    def decode_step(self, groups: Sequence[BatchKV], token_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: append one token to every used slot of every group; return fp32 logits [N, vocab].

        `token_ids` [N] lists the tokens group by group, slot by slot (N = total used slots). Projections and
        MLPs run once over all N tokens; attention is one call per group and layer over its padded slots, with
        a lengths mask when their lengths differ.
        """
        spec = self.spec
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        sizes = [g.size for g in groups]
        total = sum(sizes)
        if total == 0 or int(token_ids.numel()) != total:
            raise ValueError(f"decode_step needs one token per used slot ({total}), got {int(token_ids.numel())}")
        ids = token_ids.reshape(-1).to(self.device)
        positions = torch.tensor([s + n for g in groups for s, n in zip(g.starts, g.lengths)], dtype=torch.int64)
        cos, sin = self.rope.cos_sin(positions.to(self.device), self.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]                                         # [N, 1, D]
        plans = []   # per group: (rows a:b, where the new K/V go, attended length, mask)
        a = 0
        for g, n in zip(groups, sizes):
            span = max(g.lengths) + 1
            mask, where = None, (slice(0, n), slice(None), span - 1)   # equal lengths: one strided write
            if min(g.lengths) != span - 1:   # ragged: slot i sees its own lengths[i] + 1 tokens
                lengths = torch.tensor(g.lengths, dtype=torch.int64, device=self.device)
                mask = (torch.arange(span, device=self.device)[None, :] <= lengths[:, None])[:, None, None, :]
                where = (torch.arange(n, device=self.device), slice(None), lengths)
            plans.append((a, a + n, where, span, mask))
            a += n

        hidden = self.embed[ids]                                                           # [N, hidden]
        q_width, kv_width, group = n_heads * hd, n_kv * hd, n_heads // n_kv
        for layer_idx, w in enumerate(self.layers):
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q = self.rope.apply(qkv[:, :q_width].view(-1, n_heads, hd), cos, sin)                 # [N, H, D]
            k = self.rope.apply(qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd), cos, sin)  # [N, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                                    # [N, Hkv, D]
            parts = []
            for g, (a, b, where, span, mask) in zip(groups, plans):
                keys, values = g.keys[layer_idx], g.values[layer_idx]                # [slots, Hkv, cap, D]
                keys[where] = k[a:b]                                                # the new token of each slot
                values[where] = v[a:b]
                # the query heads sharing a KV head ride as that head's query rows: [n, Hkv, H/Hkv, D]
                # (faster than enable_gqa for one query token; same math)
                out = F.scaled_dot_product_attention(
                    q[a:b].view(b - a, n_kv, group, hd), keys[:b - a, :, :span], values[:b - a, :, :span],
                    attn_mask=mask, scale=self._scale)                                     # [n, Hkv, H/Hkv, D]
                parts.append(out.reshape(b - a, q_width))
            attn_out = parts[0] if len(parts) == 1 else torch.cat(parts)
            hidden = hidden + F.linear(attn_out, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        for g in groups:
            g.lengths = [n + 1 for n in g.lengths]
        return F.linear(self._rms_norm(hidden, self.final_norm), self.lm_head).float()

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
            # flash-attn aligns the causal mask bottom-right when t < S, which is exactly our convention.
            out = self._flash(q.unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
                              causal=t > 1, softmax_scale=self._scale)                    # [1, t, H, D]
            return out.reshape(t, -1)
        causal = mask is None and t > 1   # no context: top-left causal alignment is the right one
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                             attn_mask=mask, is_causal=causal, scale=self._scale,
                                             enable_gqa=True)  # [1, H, t, D]
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
        (logits,) = self.forward([ForwardRequest(kv, ids, all_logits=all_logits)])
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
        kv = self.new_kv(cached, extra_capacity=n_tail + extra_capacity)
        total = n_cached + n_tail
        ids = torch.cat([cached_ids.reshape(-1), tail_ids.reshape(-1)]).to(self.device)          # [total]
        positions = torch.arange(cached.start, cached.start + total, device=self.device)         # [total]
        cos_all, sin_all = self.rope.cos_sin(positions, self.dtype)                               # [total, D]
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_width, kv_width = n_heads * hd, n_kv * hd

        rows = torch.arange(total, device=self.device)           # which tokens `hidden` holds
        hidden = self.embed[ids]                                 # [rows, hidden]
        selected = torch.empty(0, dtype=torch.int64)
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
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), kv.keys[layer_idx, :, :total].unsqueeze(0),
                kv.values[layer_idx, :, :total].unsqueeze(0), attn_mask=mask, scale=self._scale,
                enable_gqa=True)[0].transpose(0, 1).reshape(rows.numel(), -1)                      # [rows, H*D]
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
    def recompute_prefill(self, cached: KVSegment, cached_ids: torch.Tensor, tail_ids: torch.Tensor,
                          recompute: torch.Tensor, *, extra_capacity: int = 0, keep_queries: bool = False
                          ) -> tuple[torch.Tensor, SequenceKV, torch.Tensor | None]:
        """Selective recompute with the tokens chosen up front: reuse `cached`, recompute the cached tokens at
        `recompute` ([r] int64 indices into `cached`) and compute the tail, at every layer.

        Each recomputed or tail token attends over the whole buffer up to itself (reused KV where nothing was
        recomputed, fresh KV where something was), so a recomputed token sees the corrected KV of the tokens
        recomputed before it. Returns (logits of the last tail token [1, vocab], the buffer with cached + tail
        tokens, and with `keep_queries` the last tail token's post-RoPE queries per layer [layers, heads,
        head_dim], else None). With no recompute indices this equals `prefill(tail_ids, context=cached)`.
        """
        spec = self.spec
        n_cached, n_tail = cached.num_tokens, int(tail_ids.numel())
        if n_tail == 0:
            raise ValueError("recompute_prefill needs at least one tail token")
        picked = torch.unique(recompute.reshape(-1).to(torch.int64))                              # sorted [r]
        if picked.numel() and (int(picked[0]) < 0 or int(picked[-1]) >= n_cached):
            raise IndexError(f"recompute indices must lie in [0, {n_cached}), got {picked.tolist()[:8]}...")
        kv = self.new_kv(cached, extra_capacity=n_tail + extra_capacity)
        total = n_cached + n_tail
        rows = torch.cat([picked, torch.arange(n_cached, total)]).to(self.device)                 # [R]
        ids = torch.cat([cached_ids.reshape(-1).to(torch.int64), tail_ids.reshape(-1).to(torch.int64)])
        cos, sin = self.rope.cos_sin(rows + cached.start, self.dtype)                             # [R, D]
        cos, sin = cos[:, None, :], sin[:, None, :]
        n_heads, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        group, count = n_heads // n_kv, int(rows.numel())
        q_width, kv_width = n_heads * hd, n_kv * hd
        # row i sees buffer indices <= rows[i]; the query heads of one KV head ride as its query rows (no GQA
        # expansion of the cache): mask [group * R, total], repeated per head of the group
        mask = (torch.arange(total, device=self.device)[None, :] <= rows[:, None]).repeat(group, 1)
        hidden = self.embed[ids.to(self.device)[rows]]                                            # [R, hidden]
        queries = []
        for layer_idx, w in enumerate(self.layers):
            x = self._rms_norm(hidden, w.input_norm)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q = self.rope.apply(qkv[:, :q_width].view(-1, n_heads, hd), cos, sin)                 # [R, H, D]
            k = self.rope.apply(qkv[:, q_width:q_width + kv_width].view(-1, n_kv, hd), cos, sin)  # [R, Hkv, D]
            v = qkv[:, q_width + kv_width:].view(-1, n_kv, hd)                                    # [R, Hkv, D]
            if keep_queries:
                queries.append(q[-1].float())
            kv.keys[layer_idx, :, rows] = k.transpose(0, 1)
            kv.values[layer_idx, :, rows] = v.transpose(0, 1)
            q_grouped = q.view(count, n_kv, group, hd).permute(1, 2, 0, 3).reshape(n_kv, group * count, hd)
            out = F.scaled_dot_product_attention(
                q_grouped.unsqueeze(0), kv.keys[layer_idx, :, :total].unsqueeze(0),
                kv.values[layer_idx, :, :total].unsqueeze(0), attn_mask=mask, scale=self._scale)  # [1, Hkv, G*R, D]
            attn = out[0].view(n_kv, group, count, hd).permute(2, 0, 1, 3).reshape(count, q_width)  # [R, H*D]
            hidden = hidden + F.linear(attn, w.o_proj)
            x = self._rms_norm(hidden, w.post_norm)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        kv.length = total
        logits = F.linear(self._rms_norm(hidden[-1:], self.final_norm), self.lm_head).float()
        return logits, kv, torch.stack(queries) if keep_queries else None
