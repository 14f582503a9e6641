"""Topologies (who reads whom) and `build_job`, which turns one task into a complete, validated `JobSpec`.

This module owns the edge sets and the wiring of roles into agents; the texts come from `roles`. Workers are
agents "1".."N" (agent i plays the kind's roles in turn); the decision agent, when there is one, is
``DECISION_AGENT_ID`` and reads every worker's final answer.

- ``fully_connected``: agent k reads every agent j < k (the paper's DAG: FullConnected with the edges that would
  close a cycle skipped), so the agents run one after another.
- ``chain``: agent k reads agent k-1 only.
- ``star``: the workers read only the question (one parallel level) and the decision agent, the hub, reads them
  all; a star therefore needs ``decision=True``.
- ``debate``: in round 0 every agent answers the question alone; in every later round each agent reads every
  agent's previous-round answer, its own included (history placeholders).

With ``rounds > 1`` on the other topologies, each agent also reads its own previous-round answer, so that later
rounds refine rather than repeat. Agents that read history get a round-0 template without it.
"""
from __future__ import annotations

from typing import Any, Sequence

from .jobs import AgentSpec, GenerationParams, JobSpec
from .roles import Role, Source, prompt_set, user_template, worker_role

TOPOLOGIES = ("fully_connected", "chain", "star", "debate")
DECISION_AGENT_ID = "decision"

Edges = tuple[tuple[str, str], ...]


def fully_connected(ids: Sequence[str]) -> Edges:
    """Agent k reads every agent j < k."""
    return tuple((ids[j], ids[k]) for k in range(len(ids)) for j in range(k))


def chain(ids: Sequence[str]) -> Edges:
    """Agent k reads agent k-1."""
    return tuple((ids[k - 1], ids[k]) for k in range(1, len(ids)))


def star(worker_ids: Sequence[str], hub_id: str) -> Edges:
    """Every worker feeds the hub; workers read nothing but the question."""
    return tuple((w, hub_id) for w in worker_ids)


def debate(ids: Sequence[str]) -> Edges:
    """No edges inside a round: debaters hear each other only through previous-round (history) answers."""
    return ()


def build_job(task_kind: str, task: str, *, num_agents: int, topology: str = "fully_connected",
              mode: str = "kvcomm", decision: bool = False, rounds: int = 1,
              generation: GenerationParams = GenerationParams(), job_id: str = "job", namespace: str = "default",
              metadata: dict[str, Any] | None = None) -> JobSpec:
    """A validated job: `num_agents` workers of `task_kind` ("math", "code" or "qa") on `task`, wired by
    `topology`, plus a final decision agent when `decision` (always with ``star``). Every agent gets `generation`."""
    prompts = prompt_set(task_kind)
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology {topology!r} is unknown; valid topologies: {', '.join(TOPOLOGIES)}")
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents must be an integer >= 1, got {num_agents!r}")
    if topology == "star" and not decision:
        raise ValueError("topology 'star' has the decision agent at its hub: pass decision=True")
    ids = [str(i + 1) for i in range(num_agents)]
    roles = {agent_id: worker_role(task_kind, i) for i, agent_id in enumerate(ids)}
    if topology == "fully_connected":
        edges = fully_connected(ids)
    elif topology == "chain":
        edges = chain(ids)
    elif topology == "debate":
        edges = debate(ids)
    else:
        edges = ()   # the star's edges all lead to the decision agent, added below
    agents = []
    for agent_id in ids:
        role = roles[agent_id]
        upstream = [Source(w, roles[w]) for w, r in edges if r == agent_id]
        if rounds > 1:
            heard = ids if topology == "debate" else [agent_id]
            history = [Source(h, roles[h], is_reader=h == agent_id) for h in heard]
            agents.append(_agent(agent_id, role, generation,
                                 user_template(prompts, role, upstream=upstream, history=history),
                                 first_round=user_template(prompts, role, upstream=upstream)))
        else:
            agents.append(_agent(agent_id, role, generation, user_template(prompts, role, upstream=upstream)))
    decision_id = None
    if decision:
        decision_id = DECISION_AGENT_ID
        edges = edges + star(ids, decision_id)
        sources = [Source(w, roles[w]) for w in ids]
        agents.append(_agent(decision_id, prompts.decision, generation,
                             user_template(prompts, prompts.decision, upstream=sources)))
    return JobSpec(id=job_id, task=task, agents=tuple(agents), edges=edges, decision_agent=decision_id,
                   rounds=rounds, mode=mode, namespace=namespace,
                   metadata={"task_kind": task_kind, "topology": topology, **(metadata or {})})


def _agent(agent_id: str, role: Role, generation: GenerationParams, template: str,
           first_round: str | None = None) -> AgentSpec:
    return AgentSpec(id=agent_id, role=role.name, system_prompt=role.system_prompt, user_template=template,
                     generation=generation, condition=role.condition, first_round_template=first_round)
