"""The `kvcomm` command line, run for real on the embedded model."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.cli import main
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job


def test_run_prints_every_agent_and_writes_json(tmp_path, capsys):
    job = build_job("math", "Mia has 3 cats and 4 dogs. How many pets does she have?", num_agents=2,
                    generation=GenerationParams(max_new_tokens=4), job_id="pets")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job.to_dict()))
    out = tmp_path / "out.json"
    assert main(["run", str(path), "--mode", "dense,naive", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== job pets  mode dense" in printed and "== job pets  mode naive" in printed
    assert printed.count("-- agent ") == 4 and "TTFT" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["dense", "naive"]
    assert all(len(r["turns"]) == 2 for r in results)
    assert results[1]["reuse_rate"] == 1.0 and results[0]["reuse_rate"] == 0.0


def test_bad_job_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"id": "x", "task": "q", "agents": [], "mode": "turbo"}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvcomm run: error:") and len(err.splitlines()) == 1
    assert "mode" in err or "agents" in err
    assert main(["run", str(tmp_path / "missing.jsonl")]) == 2


def test_every_command_dispatches_to_its_own_handler(capsys):
    from cluster.cli import build_parser
    from cluster.batch import submit
    from cluster.bench import reliability as bench_reliability
    from cluster.bench import serve as bench_serve
    from cluster.bench import throughput as bench_throughput
    from kvcomm.bench import anchors, calibrate, fidelity, pareto, quality, ttft
    parser = build_parser()
    expected = {("bench", "ttft"): ttft.cli_main, ("bench", "fidelity"): fidelity.cli_main,
                ("bench", "anchors"): anchors.cli_main, ("bench", "quality"): quality.cli_main,
                ("bench", "throughput"): bench_throughput.cli_main,
                ("bench", "reliability"): bench_reliability.cli_main, ("bench", "serve"): bench_serve.cli_main}
    for argv, handler in expected.items():
        assert parser.parse_args(list(argv)).func is handler, argv
    assert parser.parse_args(["submit", "jobs.jsonl", "--out", "r.jsonl"]).func is submit.cli_main
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listing = capsys.readouterr().out
    assert listing.startswith("usage: kvcomm bench")
    for name in ("runner", "ttft", "fidelity", "anchors", "quality", "throughput", "reliability", "serve"):
        assert f"    {name} " in listing, name


def test_bench_runner_reports_what_it_was_asked_and_that_both_implementations_agree(tmp_path, capsys):
    """A small `kvcomm bench runner` on the embedded model: one row per requested length and batch, the ratios are
    the two timings' own, and the runner computed what transformers computed (logits within 1e-3, the same top-1,
    every greedy token identical). A runner that drifted from transformers, or a row mislabelled, fails."""
    out = tmp_path / "runner.json"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "runner", "--prefill", "16,40", "--batches", "1,3", "--decode-tokens", "5",
                     "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)   # --threads sets the process's torch threads
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    prefill = [r for r in report["rows"] if r["kind"] == "prefill"]
    decode = [r for r in report["rows"] if r["kind"] == "decode"]
    assert [r["tokens"] for r in prefill] == [16, 40] and [r["batch"] for r in decode] == [1, 3]
    for r in prefill:
        assert r["speedup"] == pytest.approx(r["transformers_ms"] / r["ours_ms"])
        assert r["same_top1"] and r["max_abs_logit_diff"] < 1e-3, r
        assert f"| prefill {r['tokens']} tokens |" in printed
    for r in decode:
        assert r["speedup"] == pytest.approx(r["ours_tok_s"] / r["transformers_tok_s"])
        assert r["tokens"] == 5 * r["batch"] and r["same_tokens"] == r["tokens"], r
        assert f"| {r['same_tokens']}/{r['tokens']} greedy tokens |" in printed
