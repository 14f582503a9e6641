"""The `kvcomm` command line, run for real on the embedded model."""
from __future__ import annotations

import json

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
