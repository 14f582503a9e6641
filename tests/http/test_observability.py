"""Operating the service: the metric registry, its docs and Grafana dashboard, Ray's export of a worker replica's
engine metrics, and Serve's tracing with the service's job, turn and chat spans.

The registry tests need nothing running. The others share one Serve app (the session's local Ray cluster,
tiny-llama with random weights, one worker replica) started with Serve's tracing on (``tracing_config``, Serve's
default exporter, which writes each process's spans as JSON under the session's ``logs/serve/spans``) and read
the metrics back from the node's metrics export port, where a Prometheus server would scrape them.
"""
from __future__ import annotations

import collections
import json
import re
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from actors.metrics import BY_NAME, METRICS, RAY_PREFIX, REPLICA, exported_prometheus_names
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

from tests.support.serve_app import running_app, tiny_app_args

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "kvcomm.json"
EXPORT_WAIT_S = 45.0          # Ray's metrics agent exports every ~10 s


# ------------------------------------------------------------------------------------------------------------
# the registry, its docs, the dashboard (nothing running)
# ------------------------------------------------------------------------------------------------------------
def test_the_registry_names_follow_prometheus_and_ray_rules() -> None:
    assert len(BY_NAME) == len(METRICS)                                   # unique names
    for m in METRICS:
        assert re.fullmatch(r"kvcomm_[a-z0-9_]+", m.name), m.name          # no ':' (Ray deprecates it)
        assert m.kind in ("counter", "gauge", "histogram")
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name  # Ray's export adds _total otherwise
        assert bool(m.buckets) == (m.kind == "histogram"), m.name
        assert m.scope in ("ingress", "replica") and m.help
        if m.scope == "replica":
            assert m.labels[:2] == REPLICA, m.name
    assert "ray_kvcomm_time_to_first_token_seconds_bucket" in exported_prometheus_names()
    assert "ray_kvcomm_num_requests_running" in exported_prometheus_names()


def test_docs_list_every_metric_with_its_type_and_labels() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(kvcomm_[a-z0-9_]+)` \|.*$", text, re.MULTILINE)}
    assert set(rows) == set(BY_NAME), f"documented but unknown: {set(rows) - set(BY_NAME)}; " \
                                      f"undocumented: {set(BY_NAME) - set(rows)}"
    for name, row in rows.items():
        spec = BY_NAME[name]
        assert f"| {spec.kind} |" in row, row
        for label in spec.labels:
            assert f"`{label}`" in row, f"{name}: label {label} not documented"


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
PROMQL_FUNCTIONS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile",
                    "clamp_min", "clamp_max", "topk", "label_values", "abs", "delta", "deriv", "vector", "scalar"}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "le", "instance", "job"}


def promql_metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression (or a Grafana ``label_values(...)`` query) uses."""
    labels: set[str] = set()
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matcher))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?[A-Za-z_]+\}?", " ", expr)
    names = set()
    label_values = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_]+)\s*\)", expr)
    if label_values:
        return {label_values.group(1)}, {label_values.group(2)}
    for match in re.finditer(r"(?<![A-Za-z0-9_.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", expr):
        word, call = match.group(1), match.group(2)
        if call:
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        elif word not in PROMQL_WORDS:
            names.add(word)
    return names, labels


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return [p for p in panels if p.get("type") != "row"]


def test_every_dashboard_query_uses_a_metric_the_project_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_prometheus_names()
    by_series = {n: m for m in METRICS for n in m.prometheus_names()}
    panels = _panels(dashboard)
    assert len(panels) >= 12
    used = set()
    queries = [(f"variable {v['name']}", v["query"] if isinstance(v["query"], str) else v["query"]["query"])
               for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"
        queries += [(panel["title"], target["expr"]) for target in panel["targets"]]
    for where, expr in queries:
        names, labels = promql_metric_names(expr)
        assert names, f"{where}: {expr!r} names no metric"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the project (see actors.metrics)"
        known_labels = set().union(*(by_series[n].labels for n in names)) | RAY_LABELS
        assert labels <= known_labels, f"{where}: labels {sorted(labels - known_labels)} not on {sorted(names)}"
        used |= {by_series[n].name for n in names}
    # the screen an operator needs: the vLLM-like engine metrics and KVCOMM's own are all charted
    for name in ("kvcomm_num_requests_running", "kvcomm_num_requests_waiting", "kvcomm_kv_cache_usage_perc",
                 "kvcomm_time_to_first_token_seconds", "kvcomm_time_per_output_token_seconds",
                 "kvcomm_reuse_decisions_total", "kvcomm_engine_reused_prompt_tokens_total", "kvcomm_offset_seconds",
                 "kvcomm_pool_call_seconds", "kvcomm_anchor_cache_hits_total", "kvcomm_bytes_from_other_nodes_total"):
        assert name in used, f"the dashboard does not chart {name}"


def test_the_dashboard_check_fails_on_an_unknown_name() -> None:
    names, _ = promql_metric_names('sum by (replica) (rate(ray_kvcomm_no_such_metric_total{replica=~"$replica"}[5m]))')
    assert names == {"ray_kvcomm_no_such_metric_total"} and not names <= exported_prometheus_names()
    names, labels = promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))')
    assert names == {"vllm:time_to_first_token_seconds_bucket"} and labels == {"le"}


def test_tracing_is_off_by_default_and_a_serve_config_file_can_turn_it_on(tmp_path) -> None:
    """Without Serve's tracing no tracer provider is installed: the job span records nothing and the driver gets its
    executor itself (no wrapper, no span per order). A Serve config file's ``tracing_config`` (Serve's own schema)
    is what `kvcomm serve` hands to ``serve.start``."""
    import yaml
    from cluster.serve.config import load_serve_config_file
    from cluster.serve.tracing import end_job_span, start_job_span, traced
    span = start_job_span("job-x", "kvcomm", "default", 3)
    assert span is not None and not span.is_recording()
    executor = object()
    assert traced(executor, span) is executor
    end_job_span(span, "succeeded", {"turns": [], "workers": []})
    config = {"tracing_config": {"enabled": True, "sampling_ratio": 1.0},
              "applications": [{"name": "kvcomm", "import_path": "cluster.serve.app:app_builder", "args": {}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    assert load_serve_config_file(tmp_path / "serve.yaml").raw["tracing_config"]["sampling_ratio"] == 1.0
    config["tracing_config"]["sampling_ratio"] = 2.0
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="sampling_ratio"):
        load_serve_config_file(tmp_path / "serve.yaml")


# ------------------------------------------------------------------------------------------------------------
# a running app with Serve's tracing on
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traced_app(ray_cluster, tiny_model_dir):
    from ray import serve
    args = tiny_app_args(tiny_model_dir, "obs-test-pool", {"served_model_name": "tiny-test"})
    tracing = {"enabled": True, "sampling_ratio": 1.0}                     # Serve's default (file) exporter
    with running_app(args, "kvcomm-obs", tracing_config=tracing) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            jobs = []
            for index, task in enumerate([f"Mia has {a} shells and finds {b} more. How many shells does Mia have?"
                                          for a, b in [(3, 4), (5, 2), (6, 1)]]):   # the third one reuses
                job = build_job("math", task, num_agents=3, mode="kvcomm", job_id=f"obs-job-{index}",
                                generation=GenerationParams(max_new_tokens=6, min_new_tokens=6)).to_dict()
                answer = client.post("/v1/jobs", params={"wait": "1"}, json=job)
                assert answer.status_code == 200, answer.text
                jobs.append(answer.json())
            chat = client.post("/v1/chat/completions", json={
                "model": "tiny-test", "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi."}]})
            assert chat.status_code == 200, chat.text
            yield {"client": client, "jobs": jobs, "chat": chat.json(),
                   "workers": serve.get_deployment_handle("AgentWorkerDeployment", app_name="kvcomm-obs")}


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """(series name, frozenset of label pairs) -> value, for every sample line of a Prometheus text page."""
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def select(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and want <= set(pairs))


@pytest.mark.slow
def test_a_worker_replicas_engine_metrics_reach_rays_prometheus_export(traced_app, ray_cluster) -> None:
    import ray
    replica_text = traced_app["workers"].engine_metrics.remote().result()
    mine = parse_prometheus(replica_text)
    replica = next(dict(pairs)["replica"] for (name, pairs) in mine if name == "kvcomm_num_requests_running")
    # the replica counted what it ran: every job turn by the engine's decision, and the chat
    turns = [t for job in traced_app["jobs"] for t in job["result"]["turns"]]
    reasons = collections.Counter(t["reason"] for t in turns)
    assert reasons["reused"] >= 1                                           # the third job reused
    for reason, count in reasons.items():
        assert select(mine, "kvcomm_reuse_decisions_total", source="job", mode="kvcomm", reason=reason) == count
    assert select(mine, "kvcomm_reuse_decisions_total", source="job") == len(turns) == 9
    assert select(mine, "kvcomm_reuse_decisions_total", source="chat",
                  reason=traced_app["chat"]["kvcomm"]["reason"]) == 1
    assert select(mine, "kvcomm_time_to_first_token_seconds_count", source="job", mode="kvcomm") == len(turns)
    assert select(mine, "kvcomm_time_per_output_token_seconds_count", source="job") == len(turns)   # 6 tokens each
    assert select(mine, "kvcomm_offset_seconds_count", source="job") == reasons["reused"]   # only reuse aligns
    assert select(mine, "kvcomm_engine_generation_tokens_total", source="job") == 6 * len(turns)
    assert select(mine, "kvcomm_decode_steps_total") > 0 and select(mine, "kvcomm_decode_step_seconds_count") > 0
    assert select(mine, "kvcomm_pool_call_seconds_count") > 0
    assert select(mine, "kvcomm_kv_cache_budget_bytes") > 0 and select(mine, "kvcomm_num_requests_running") == 0
    ingress = parse_prometheus(traced_app["client"].get("/metrics").text)
    for source in ("job", "chat"):     # no retries or cancellations: the ingress saw exactly what the replica ran
        assert select(mine, "kvcomm_engine_reused_prompt_tokens_total", source=source) == \
            select(ingress, "kvcomm_reused_prompt_tokens_total", source=source)
        assert select(mine, "kvcomm_engine_prompt_tokens_total", source=source) == \
            select(ingress, "kvcomm_prompt_tokens_total", source=source)
    assert select(mine, "kvcomm_engine_reused_prompt_tokens_total", source="job") > 0

    # Ray's metrics agent exports the same numbers, as ray_<name>, labelled with the replica
    port = ray._private.worker._global_node.metrics_export_port
    checks = ["kvcomm_reuse_decisions_total", "kvcomm_engine_reused_prompt_tokens_total",
              "kvcomm_time_to_first_token_seconds_count", "kvcomm_kv_cache_budget_bytes",
              "kvcomm_num_requests_running"]
    deadline, exported = time.monotonic() + EXPORT_WAIT_S, {}
    while True:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        exported = parse_prometheus(page)
        got = {name: select(exported, RAY_PREFIX + name, replica=replica) for name in checks}
        want = {name: select(mine, name) for name in checks}
        if got == want and f'replica="{replica}"' in page:
            break
        assert time.monotonic() < deadline, f"Ray's export {got} never matched the replica's registry {want}"
        time.sleep(1.0)
    model = dict(next(pairs for (n, pairs) in mine if n == "kvcomm_kv_cache_budget_bytes"))["model_name"]
    assert select(exported, "ray_kvcomm_kv_cache_budget_bytes", replica=replica, model_name=model) > 0


def read_spans(session_logs: Path) -> list[dict]:
    """Every span Serve's default exporter wrote (each process's file holds JSON objects one after another)."""
    spans, decoder = [], json.JSONDecoder()
    for path in sorted((session_logs / "serve" / "spans").glob("*.json")):
        text, at = path.read_text(), 0
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            if at >= len(text):
                break
            span, at = decoder.raw_decode(text, at)
            spans.append(span)
    return spans


@pytest.mark.slow
def test_serve_tracing_has_a_span_per_job_and_per_turn_with_route_replica_and_gate_decision(traced_app) -> None:
    import ray
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 20
    while True:
        spans = read_spans(logs)
        jobs = [s for s in spans if s["name"] == "kvcomm.job"]
        if len(jobs) >= 2 and any(s["name"] == "kvcomm.chat" for s in spans):
            break
        assert time.monotonic() < deadline, f"no job spans among {sorted({s['name'] for s in spans})}"
        time.sleep(0.5)
    by_id = {s["context"]["span_id"]: s for s in spans}
    for answer in traced_app["jobs"]:
        job = next(s for s in jobs if s["attributes"]["kvcomm.job.id"] == answer["id"])
        assert job["attributes"]["kvcomm.job.status"] == "succeeded" and job["attributes"]["kvcomm.mode"] == "kvcomm"
        assert job["parent_id"] is not None                        # a child of Serve's request span
        turns = [s for s in spans if s["name"] == "kvcomm.turn" and s["parent_id"] == job["context"]["span_id"]]
        assert len(turns) == 3 and all(t["context"]["trace_id"] == job["context"]["trace_id"] for t in turns)
        expected = {(t["agent_id"], t["round"]): (t["reason"], t["reused"], t["worker"])
                    for t in answer["result"]["turns"]}
        got = {(t["attributes"]["kvcomm.agent"], t["attributes"]["kvcomm.round"]):
               (t["attributes"]["kvcomm.decision"], t["attributes"]["kvcomm.reused"], t["attributes"]["kvcomm.replica"])
               for t in turns}
        assert got == expected
        assert all(t["attributes"]["kvcomm.route.cost_tokens"] > 0 for t in turns)
        # Serve's routing of each turn, and the replica's handling of it, are children of the turn's span
        for turn in turns:
            children = [s for s in spans if s["parent_id"] == turn["context"]["span_id"]]
            assert any(s["name"].startswith("route_to_replica") for s in children), [s["name"] for s in children]
            routed = [s for s in spans if s["parent_id"] in {c["context"]["span_id"] for c in children}]
            assert any(s["name"].startswith("replica_handle_request AgentWorkerDeployment execute_turn")
                       for s in routed)
    second = next(s for s in jobs if s["attributes"]["kvcomm.job.id"] == traced_app["jobs"][1]["id"])
    gate = [r for s in spans if s["name"] == "kvcomm.turn" and s["parent_id"] == second["context"]["span_id"]
            for r in s["attributes"].get("kvcomm.gate.reasons", ())]
    assert gate, "the kvcomm job's turns carry the gate's reasons"
    chat = next(s for s in spans if s["name"] == "kvcomm.chat")
    assert chat["attributes"]["kvcomm.decision"] == traced_app["chat"]["kvcomm"]["reason"]
    assert chat["attributes"]["kvcomm.replica"].startswith("replica-") and chat["parent_id"] in by_id
