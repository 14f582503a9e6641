"""The deployment examples are what they claim: the KubeRay `RayService` embeds a Serve config this project loads
and plans, and every node it describes can hold the anchor pool's objects.

No cluster is started: the files are parsed and validated with the project's own loaders (Serve's schema and our
models) and `kvcomm plan`, which is what a user would run before `kubectl apply`."""
from __future__ import annotations

from pathlib import Path

import yaml

from cluster.cli import main as cli_main
from cluster.serve.config import load_serve_config_file

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "configs" / "kuberay-rayservice.yaml"
H100 = ROOT / "configs" / "h100x8-llama3.1-8b.yaml"
DEFAULT_OBJECT_STORE_SHARE = 0.3      # Ray's default object store: 30% of the node's memory


def _gib(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    return next(float(quantity[:-2]) * f for u, f in units.items() if quantity.endswith(u))


def test_the_rayservice_embeds_a_serve_config_that_loads_plans_and_matches_the_h100_example(tmp_path) -> None:
    service = yaml.safe_load(KUBERAY.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = tmp_path / "serve.yaml"
    embedded.write_text(service["spec"]["serveConfigV2"])
    spec = load_serve_config_file(embedded)                 # Serve's schema + ServeAppConfig + deployments
    [app] = spec.applications
    assert spec.host == "0.0.0.0" and app.config.cluster.device == "cuda"
    # one home: the application is the 8 x H100 example's, only the bind address differs
    assert yaml.safe_load(embedded.read_text())["applications"] == yaml.safe_load(H100.read_text())["applications"]
    assert cli_main(["plan", "--config", str(embedded), "--architecture", "llama-3.1-8b"]) == 0
    # the GPUs the worker deployment may scale to are in the worker group
    scaling = app.deployments["AgentWorkerDeployment"]["autoscaling_config"]
    [group] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(group["rayStartParams"]["num-gpus"]) * group["maxReplicas"]
    assert scaling["max_replicas"] * app.config.cluster.gpus_per_worker <= gpus
    # snapshots on the volume every node mounts
    for path in (app.config.cluster.pool_snapshot_path, app.config.serve.job_store_snapshot_path):
        assert path.startswith("/shared/"), path


def test_every_node_of_the_rayservice_holds_the_anchor_pool_budget() -> None:
    """The pool actor asks for no CPU, so it may land on any node: each node's object store must hold it."""
    service = yaml.safe_load(KUBERAY.read_text())
    cluster_spec = service["spec"]["rayClusterConfig"]
    budget_gib = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["cluster"]["kvcomm"][
        "pool_byte_budget"] / 2 ** 30
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        store = group["rayStartParams"].get("object-store-memory")
        [container] = group["template"]["spec"]["containers"]
        memory_gib = _gib(container["resources"]["limits"]["memory"])
        store_gib = int(store) / 2 ** 30 if store else DEFAULT_OBJECT_STORE_SHARE * memory_gib
        assert budget_gib <= store_gib <= memory_gib, (container["name"], budget_gib, store_gib, memory_gib)


def _node_stores_gib() -> list[float]:
    """The object store of every node group of the RayService (set, or Ray's default share of its memory)."""
    cluster_spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterConfig"]
    stores = []
    for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        store = group["rayStartParams"].get("object-store-memory")
        [container] = group["template"]["spec"]["containers"]
        stores.append(int(store) / 2 ** 30 if store else
                      DEFAULT_OBJECT_STORE_SHARE * _gib(container["resources"]["limits"]["memory"]))
    return stores


def test_the_h100_example_s_budgets_hold_its_questions_and_fit_its_nodes() -> None:
    """Llama-3.1-8B's anchors of one Table-2 question take ~1.7 GiB (128 KiB of K+V per token): the example's
    pool holds several questions and fits every node's object store, each replica's anchor cache holds at least
    one question within its GPU memory plan; with both budgets unset, the defaults derived from the model do too."""
    from cluster.config import POOL_QUESTIONS, ClusterConfig
    from cluster.plan import cluster_configs, plan_of
    from kvcomm.model_spec import PRESETS
    llama = PRESETS["llama-3.1-8b"]
    [(_, config)] = cluster_configs(H100)
    set_in_file = config.budgets(llama)
    question = set_in_file["anchor_bytes_per_question"]
    assert 1.6 * 2 ** 30 < question < 1.8 * 2 ** 30, question
    fields = yaml.safe_load(H100.read_text())["applications"][0]["args"]["cluster"]
    unset = ClusterConfig.model_validate({**{k: v for k, v in fields.items() if k != "anchor_cache_bytes"},
                                          "kvcomm": {k: v for k, v in fields["kvcomm"].items()
                                                     if k != "pool_byte_budget"}})
    derived = unset.budgets(llama)
    assert derived["pool_byte_budget"] == POOL_QUESTIONS * question and derived["anchor_cache_bytes"] == question
    smallest_store = min(_node_stores_gib())
    for which, cfg, budgets in (("the file's", config, set_in_file), ("derived", unset, derived)):
        assert budgets["pool_byte_budget"] >= POOL_QUESTIONS * question, which
        assert budgets["pool_byte_budget"] / 2 ** 30 <= smallest_store, (which, budgets, smallest_store)
        plan = plan_of(cfg, "llama-3.1-8b")            # MemoryPlanError when weights + caches + KV do not fit
        assert plan.anchor_cache_bytes == budgets["anchor_cache_bytes"] >= question, which
    assert config.kvcomm_config().pool_byte_budget == set_in_file["pool_byte_budget"]   # what every process gets
