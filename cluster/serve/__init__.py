"""The HTTP service on Ray Serve: a stateless ingress (jobs API, OpenAI chat), worker replicas routed by a request
router of ours, a job store and the anchor pool outside any replica.

  app.py       build_app / app_builder (the Serve application) and `kvcomm serve` (run_server)
  command.py   `kvcomm serve`'s command line
  config.py    ServeSettings, ServeAppConfig, reading a Serve config file
  ingress.py   KVCommIngress: the route table, authentication, errors, metrics
  jobs.py      the jobs API and the job drivers an ingress replica hosts (cluster.driver.DagJob)
  executor.py  ReplicaCalls: a driver's turns on the worker deployment, KV as ObjectRefs the ingress owns
  chat.py      the chat completions API;  openai_api.py: its request models and response shapes (kvcomm.chat:
               a chat as an engine turn, its contents reused across requests)
  worker.py    AgentWorkerDeployment: one model replica (turns, user inputs, chats, routing stats)
  router.py    KVCommRouter: load in tokens, then KV locality by node, then the namespace's home replica
  job_store.py JobStore: job records and events in a detached actor, snapshotted
  job_events.py the events a job emits (turn, retry, cancelled): frozen dataclasses, `to_dict()` their wire form
  http.py      the FastAPI app, API errors, JSON bodies, callers, in-flight limits, SSE
  metrics.py   the service's Prometheus metrics

The names below are imported on first use: `cluster.serve.app` pulls in Ray Serve, which the CLI loads only when
a command runs.
"""
from __future__ import annotations

from kvcomm.lazy_exports import exporter

_HOMES = {"build_app": "app", "run_server": "app", "ServeConfigFile": "config", "ServeSettings": "config",
          "load_serve_config_file": "config"}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
