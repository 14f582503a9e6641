"""`kvcomm bench agents`' summary and table (`cluster.bench.agents`), on recorded conversations: each mode's TTFT
per agent position, kvcomm's speedup over no reuse and over prefix caching, reuse and fidelity of reused turns,
warm-up questions left out. (The frameworks' real runs against the server: tests/http/test_frameworks.py.)"""
from __future__ import annotations

import pytest

from cluster.bench.agents import MODES, markdown_table, summarize
from cluster.bench.frameworks import Conversation

TTFT_S = {"dense": (0.40, 0.50), "dense-prefix": (0.30, 0.45), "kvcomm": (0.20, 0.15)}   # agent 1, agent 2


def conversation(mode: str, warmup: bool, scale: float = 1.0) -> Conversation:
    turns = [{"ttft_s": TTFT_S[mode][k] * scale, "prompt_tokens": 100 + 50 * k, "reused": mode == "kvcomm" and k == 1,
              "cached_tokens": 80 if mode == "kvcomm" else 20, "reason": "reused" if k == 1 else "new_anchor",
              "agree": True, "kl": 0.004} for k in range(2)]
    return Conversation("autogen", mode, "question", turns, wall_s=1.0, warmup=warmup)


def test_the_summary_compares_kvcomm_with_no_reuse_and_with_prefix_caching_on_measured_questions() -> None:
    assert MODES == ("dense", "dense-prefix", "kvcomm")
    conversations = [conversation(mode, warmup=True, scale=10.0) for mode in MODES]          # not counted
    conversations += [conversation(mode, warmup=False) for mode in MODES for _ in range(3)]
    summary = summarize(conversations)["autogen"]
    first, second = summary["agents"]
    assert summary["questions"] == 3 and second["reuse_rate"] == 1.0 and first["reuse_rate"] == 0.0
    assert second["ttft_ms_dense"] == pytest.approx(500) and second["ttft_ms_dense-prefix"] == pytest.approx(450)
    assert second["speedup"] == pytest.approx(0.50 / 0.15)
    assert second["speedup_vs_prefix"] == pytest.approx(0.45 / 0.15)
    assert second["agreement"] == 1.0 and second["kl_mean"] == pytest.approx(0.004) and first["agreement"] is None
    table = markdown_table({"summary": {"autogen": summary}})
    assert "| TTFT reuse off (ms) | TTFT prefix cache (ms) | TTFT kvcomm (ms) | kvcomm vs off |" in table
    assert "| autogen | 2 | 150 | 500 | 450 | 150 | 3.33x | 3.00x | 100% |" in table
