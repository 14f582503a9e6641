"""The deployment examples are what they claim: the KubeRay `RayService` embeds a Serve config this project loads
and plans, and every node it describes can hold the anchor pool's objects.

No cluster is started: the files are parsed and validated with the project's own loaders (Serve's schema and our
models) and `kvcomm plan`, which is what a user would run before `kubectl apply`."""
from __future__ import annotations

from pathlib import Path

import yaml

from cluster.cli import main as cli_main
from cluster.serve.config import load_serve_config_file

ROOT = Path(__file__).resolve().parents[1]
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
