"""`kvcomm bench runner`: our model runner against transformers' own model, side by side in one run.

Prefill latency at several prompt lengths and decode throughput at several batch sizes, on identical weights
and identical token ids, alternating the two implementations so drift on a shared machine hits both alike.
Each row also says whether the two computed the same thing: the prefill's last-token logits (largest absolute
difference, same top-1) and the greedy decode's tokens (how many of the batch's tokens are identical).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..generation import DecodeBatch, Sampling
from ..names import EMBEDDED_MODEL
from ..model_loading import build_hf_model, load_model
from ..runner import ModelRunner


def _paired_median_times(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall time of each, measured alternately so machine drift hits both alike."""
    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_theirs)


def run(model: str = EMBEDDED_MODEL, *, prefill_lengths=(256, 512, 1024, 2048), batch_sizes=(1, 4, 16),
        decode_tokens: int = 32, repeats: int = 3, device: str = "cpu", dtype: str | None = None,
        random_weights: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    loaded = load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    hf = build_hf_model(loaded)
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.spec.vocab_size
    rows: list[dict[str, Any]] = []

    for n in prefill_lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).to(loaded.device)

        def ours() -> None:
            runner.prefill(ids)

        def theirs() -> None:
            with torch.inference_mode():
                hf(ids[None], logits_to_keep=1)

        t_ours, t_hf = _paired_median_times(ours, theirs, repeats)
        ours_logits = runner.prefill(ids)[0][-1].float()                                  # [vocab]
        with torch.inference_mode():
            hf_logits = hf(ids[None], logits_to_keep=1).logits[0, -1].float()             # [vocab]
        rows.append({"kind": "prefill", "tokens": n, "ours_ms": t_ours * 1e3, "transformers_ms": t_hf * 1e3,
                     "speedup": t_hf / t_ours,
                     "max_abs_logit_diff": float((ours_logits - hf_logits).abs().max()),
                     "same_top1": int(ours_logits.argmax()) == int(hf_logits.argmax())})
        progress(f"prefill {n:5d} tokens: ours {t_ours*1e3:8.1f} ms   transformers {t_hf*1e3:8.1f} ms")

    prompt_len = 128
    for b in batch_sizes:
        prompts = torch.randint(0, vocab, (b, prompt_len), generator=gen).to(loaded.device)
        sampling = Sampling(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens)

        def ours_decode() -> tuple[float, list[list[int]]]:
            batch = DecodeBatch(runner)
            states = []
            for row in prompts:
                logits, kv = runner.prefill(row, extra_capacity=decode_tokens + 1)
                states.append(batch.add(kv, logits[-1], sampling))
            t = time.perf_counter()
            batch.run_until_done()
            return time.perf_counter() - t, [s.tokens for s in states]

        def theirs_decode() -> tuple[float, list[list[int]]]:
            with torch.inference_mode():
                out = hf(prompts, use_cache=True, logits_to_keep=1)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens = [token]
                t = time.perf_counter()
                for _ in range(decode_tokens):
                    out = hf(token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(token)
                elapsed = time.perf_counter() - t
            # the first token comes from the prefill, as ours: compare the first `decode_tokens` of each row
            return elapsed, torch.cat(tokens, dim=1)[:, :decode_tokens].tolist()

        (_, ours_tokens), (_, hf_tokens) = ours_decode(), theirs_decode()  # warm-up, and the tokens compared
        pairs = [(ours_decode()[0], theirs_decode()[0]) for _ in range(repeats)]
        t_ours = statistics.median(p[0] for p in pairs)
        t_hf = statistics.median(p[1] for p in pairs)
        tok_ours, tok_hf = b * decode_tokens / t_ours, b * decode_tokens / t_hf
        same = sum(a == h for ours_row, hf_row in zip(ours_tokens, hf_tokens) for a, h in zip(ours_row, hf_row))
        rows.append({"kind": "decode", "batch": b, "ours_tok_s": tok_ours, "transformers_tok_s": tok_hf,
                     "speedup": tok_ours / tok_hf, "tokens": b * decode_tokens, "same_tokens": same})
        progress(f"decode batch {b:3d}: ours {tok_ours:8.1f} tok/s   transformers {tok_hf:8.1f} tok/s")
    return {"benchmark": "runner", "model": loaded.source, "device": str(loaded.device), "dtype": str(loaded.dtype),
            "threads": torch.get_num_threads(), "attention": runner.attention_backend, "rows": rows}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| measurement | ours | transformers | ours vs transformers | same output |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["kind"] == "prefill":
            same = f"top-1 {'same' if r['same_top1'] else 'DIFFERS'}, logits within {r['max_abs_logit_diff']:.1e}"
            lines.append(f"| prefill {r['tokens']} tokens | {r['ours_ms']:.0f} ms | {r['transformers_ms']:.0f} ms "
                         f"| {r['speedup']:.2f}x | {same} |")
        else:
            lines.append(f"| decode batch {r['batch']} | {r['ours_tok_s']:.1f} tok/s | "
                         f"{r['transformers_tok_s']:.1f} tok/s | {r['speedup']:.2f}x | "
                         f"{r['same_tokens']}/{r['tokens']} greedy tokens |")
    return "\n".join(lines)
