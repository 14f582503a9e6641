"""Job specs: the agents of one multi-agent job, who reads whom, in how many rounds, and how each one generates.

This module owns `AgentSpec`, `Turn`, `JobSpec` (its validation, its conversion to and from plain dicts, and
its turn order) and `JobSpecError`. It is not: the generation parameters (`kvcomm.sampling.GenerationParams`),
job files (`job_files`), prompts (`roles`) or running a job (`kvcomm.job_runner`).

Placeholders in an agent's user template (syntax: `kvcomm.templates.PLACEHOLDER_PATTERN`):

- ``{user_question}``: the job's `task`.
- ``{agent_<id>_current}``: agent <id>'s response in the reader's own round. <id> must be *upstream* of the
  reader: a path of edges leads from <id> to the reader. When a job gives no edges, they are derived from
  these placeholders (and from ``{condition_<id>_current}``): each one implies the edge <id> -> reader.
- ``{agent_<id>_history}``: agent <id>'s response in the previous round (<id> may be the reader itself).
  Round 0 has no previous round, so history placeholders need ``rounds > 1``, and an agent other than the
  decision agent that reads history must also have a `first_round_template` (its user template for round 0,
  without history placeholders). The decision agent runs once, in the last round, so it needs none.
- ``{condition_<id>_current}`` / ``{condition_<id>_history}``: the tool output tied to agent <id> (for
  ``condition="python"``: what the agent's code printed and the value of its `answer` variable); <id> must have
  a condition, and the same upstream / rounds rules as for responses apply.

Turn order (`JobSpec.turn_levels`): the agents other than the decision agent run once per round; inside a
round, an agent runs one level after the last of its upstream agents (agents of one level are independent and
can run in parallel); round r+1 starts after round r ends; the decision agent runs last, once, in round
``rounds - 1``, after every other turn.

Generation: `GenerationParams.stop` holds stop *strings*: decoding ends once the response's text contains one and
the text is cut before it (`kvcomm.generation.cut_at_stop_string`). Token-level stops (EOS) are the engine's
business, not the job's.

Every validation error is a `JobSpecError` whose message starts with the path of the offending field, for
example ``agents[2].role: must not be empty``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from ..names import MODES
from ..sampling import GenerationParams
from ..templates import PLACEHOLDER_PATTERN, AgentTemplate

CONDITIONS = ("python",)
MAX_NEW_TOKENS_LIMIT = 8192
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9]+")
# A brace-word that PLACEHOLDER_PATTERN does not accept (render_template rejects these at run time).
STRAY_PLACEHOLDER_PATTERN = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class JobSpecError(ValueError):
    """A job spec (or job file) is invalid. `field` is the path of the offending field, `problem` what is wrong
    with it, `source` where the job came from (file and line), when known."""

    def __init__(self, field_path: str, problem: str, source: str = ""):
        self.field = field_path
        self.problem = problem
        self.source = source
        location = f"{source}: " if source else ""
        super().__init__(f"{location}{field_path}: {problem}" if field_path else f"{location}{problem}")

    def located(self, source: str, prefix: str = "") -> "JobSpecError":
        """The same error, attributed to `source` and with `prefix` put before its field path."""
        path = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return JobSpecError(path, self.problem, source)


@dataclass(frozen=True)
class AgentSpec:
    id: str
    role: str
    system_prompt: str
    user_template: str
    assistant_prefix: str = ""
    generation: GenerationParams = GenerationParams()
    condition: str | None = None              # "python": the response's code runs in the sandbox; its output
                                              # becomes {condition_<id>_current}
    first_round_template: str | None = None   # round 0's user template when user_template reads history
    force_dense: bool = False                 # always a dense prefill, whatever the job's mode (a judge or
                                              # decision agent kept exact; its dense turns still teach the pool)

    def user_template_for_round(self, round_index: int) -> str:
        """The user template this agent uses in round `round_index`."""
        if round_index == 0 and self.first_round_template is not None:
            return self.first_round_template
        return self.user_template

    def template_for_round(self, round_index: int) -> AgentTemplate:
        """The engine's template for this agent in round `round_index`."""
        return AgentTemplate(self.id, self.system_prompt, self.user_template_for_round(round_index),
                             self.assistant_prefix)

    def placeholders(self) -> tuple[str, ...]:
        """Every placeholder this agent reads in any round, in order of first appearance."""
        names = PLACEHOLDER_PATTERN.findall(self.user_template)
        if self.first_round_template is not None:
            names += PLACEHOLDER_PATTERN.findall(self.first_round_template)
        return tuple(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "role": self.role, "system_prompt": self.system_prompt,
                                "user_template": self.user_template}
        if self.first_round_template is not None:
            data["first_round_template"] = self.first_round_template
        data["assistant_prefix"] = self.assistant_prefix
        if self.condition is not None:
            data["condition"] = self.condition
        if self.force_dense:
            data["force_dense"] = True
        data["generation"] = self.generation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, path: str = "agent",
                  default_generation: Mapping[str, Any] | None = None) -> "AgentSpec":
        """An agent from a dict; its `generation` fields override `default_generation` (the job's defaults)."""
        _require_mapping(data, path)
        _reject_unknown_keys(data, cls, path)
        for required in ("id", "role", "system_prompt", "user_template"):
            if required not in data:
                raise JobSpecError(f"{path}.{required}", "missing")
        generation = dict(default_generation or {})
        own_generation = data.get("generation", {})
        _require_mapping(own_generation, f"{path}.generation")
        generation.update(own_generation)
        values = {key: value for key, value in data.items() if key != "generation"}
        return cls(**values, generation=_generation_from_dict(generation, f"{path}.generation"))


@dataclass(frozen=True)
class Turn:
    agent_id: str
    round: int


@dataclass(frozen=True)
class JobSpec:
    id: str
    task: str                                            # the user question ({user_question})
    agents: tuple[AgentSpec, ...]
    edges: tuple[tuple[str, str], ...] | None = None     # (writer, reader); None: derived from the templates
    decision_agent: str | None = None
    rounds: int = 1
    mode: str = "kvcomm"
    namespace: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalize the containers so that equal jobs compare equal however they were built.
        if isinstance(self.agents, (list, tuple)):
            object.__setattr__(self, "agents", tuple(self.agents))
        if self.edges is None:
            if isinstance(self.agents, tuple) and all(isinstance(a, AgentSpec) and _templates_are_text(a)
                                                      for a in self.agents):
                object.__setattr__(self, "edges", derive_edges(self.agents))   # else `validate` names the field
        elif isinstance(self.edges, (list, tuple)):
            object.__setattr__(self, "edges", tuple(tuple(e) if isinstance(e, (list, tuple)) else e
                                                    for e in self.edges))
        if self.metadata is None:
            object.__setattr__(self, "metadata", {})
        self.validate()

    # ---- structure -------------------------------------------------------------------------------------

    def agent(self, agent_id: str) -> AgentSpec:
        for agent in self.agents:
            if agent.id == agent_id:
                return agent
        raise KeyError(f"job {self.id!r} has no agent {agent_id!r}")

    def placeholders_of(self, agent_id: str) -> tuple[str, ...]:
        """The placeholders agent `agent_id` reads, in any round, in order of first appearance."""
        return self.agent(agent_id).placeholders()

    def workers(self) -> tuple[str, ...]:
        """Ids of the agents that run every round (all but the decision agent), in job order."""
        return tuple(a.id for a in self.agents if a.id != self.decision_agent)

    def upstream_of(self, agent_id: str) -> set[str]:
        """Every agent with a path of edges to `agent_id`."""
        readers_of: dict[str, list[str]] = {}
        for writer, reader in self.edges:
            readers_of.setdefault(reader, []).append(writer)
        seen: set[str] = set()
        stack = list(readers_of.get(agent_id, ()))
        while stack:
            writer = stack.pop()
            if writer not in seen:
                seen.add(writer)
                stack.extend(readers_of.get(writer, ()))
        return seen

    def turn_levels(self) -> list[list[Turn]]:
        """The job's turns in levels: the turns of one level are independent; each level needs the ones before."""
        workers = self.workers()
        depth = {agent_id: 0 for agent_id in workers}
        for agent_id in _topological_order(workers, self.edges):
            for writer, reader in self.edges:
                if writer == agent_id and reader in depth:
                    depth[reader] = max(depth[reader], depth[agent_id] + 1)
        levels: list[list[Turn]] = []
        if workers:
            for round_index in range(self.rounds):
                for level in range(max(depth.values()) + 1):
                    levels.append([Turn(a, round_index) for a in workers if depth[a] == level])
        if self.decision_agent is not None:
            levels.append([Turn(self.decision_agent, self.rounds - 1)])
        return levels

    # ---- validation ------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `JobSpecError` (naming the field) unless this job can run as specified."""
        _require_str(self.id, "id", allow_empty=False)
        _require_str(self.task, "task")
        _require_str(self.namespace, "namespace", allow_empty=False)
        if self.mode not in MODES:
            raise JobSpecError("mode", f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        _require_int(self.rounds, "rounds")
        if self.rounds < 1:
            raise JobSpecError("rounds", f"must be >= 1, got {self.rounds}")
        if not isinstance(self.metadata, dict):
            raise JobSpecError("metadata", f"expected a mapping, got {type(self.metadata).__name__}")
        if not isinstance(self.agents, tuple) or not self.agents:
            raise JobSpecError("agents", "must list at least one agent")
        seen_ids: dict[str, int] = {}
        for index, agent in enumerate(self.agents):
            path = f"agents[{index}]"
            if not isinstance(agent, AgentSpec):
                raise JobSpecError(path, f"expected an AgentSpec, got {type(agent).__name__}")
            _validate_agent_fields(agent, path)
            if agent.id in seen_ids:
                raise JobSpecError(f"{path}.id", f"duplicate agent id {agent.id!r} (also agents[{seen_ids[agent.id]}])")
            seen_ids[agent.id] = index
        ids = tuple(seen_ids)
        for index, agent in enumerate(self.agents):
            for template_field in ("user_template", "first_round_template"):
                for name in PLACEHOLDER_PATTERN.findall(getattr(agent, template_field) or ""):
                    if name != "user_question" and name.split("_")[1] not in seen_ids:
                        raise JobSpecError(f"agents[{index}].{template_field}",
                                           f"{{{name}}} names unknown agent {name.split('_')[1]!r} "
                                           f"(agents: {', '.join(ids)})")
        if self.decision_agent is not None and not isinstance(self.decision_agent, str):
            raise JobSpecError("decision_agent", f"expected an agent id, got {type(self.decision_agent).__name__}")
        if self.decision_agent is not None and self.decision_agent not in seen_ids:
            raise JobSpecError("decision_agent", f"{self.decision_agent!r} is not one of the agents "
                                                 f"({', '.join(ids)})")
        self._validate_edges(ids)
        for index, agent in enumerate(self.agents):
            self._validate_placeholders(agent, f"agents[{index}]")

    def _validate_edges(self, ids: tuple[str, ...]) -> None:
        if not isinstance(self.edges, tuple):
            raise JobSpecError("edges", f"expected a list of [writer, reader] pairs, got {type(self.edges).__name__}")
        for index, edge in enumerate(self.edges):
            path = f"edges[{index}]"
            if not (isinstance(edge, tuple) and len(edge) == 2 and all(isinstance(x, str) for x in edge)):
                raise JobSpecError(path, f"expected a [writer, reader] pair of agent ids, got {edge!r}")
            for end in edge:
                if end not in ids:
                    raise JobSpecError(path, f"unknown agent {end!r} (agents: {', '.join(ids)})")
            if edge[0] == self.decision_agent:
                raise JobSpecError(path, f"the decision agent {edge[0]!r} runs last and cannot feed agent {edge[1]!r}")
        cycle = _find_cycle(ids, self.edges)
        if cycle:
            derived = " (edges derived from the templates' {agent_<id>_current} placeholders)" \
                if self.edges == derive_edges(self.agents) else ""
            raise JobSpecError("edges", f"cycle {' -> '.join(cycle)}{derived}")

    def _validate_placeholders(self, agent: AgentSpec, path: str) -> None:
        upstream = self.upstream_of(agent.id)
        templates = [("user_template", agent.user_template)]
        if agent.first_round_template is not None:
            templates.append(("first_round_template", agent.first_round_template))
        for template_field, template in templates:
            field_path = f"{path}.{template_field}"
            names = PLACEHOLDER_PATTERN.findall(template)
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise JobSpecError(field_path, "placeholder(s) used more than once: "
                                   + ", ".join("{" + n + "}" for n in duplicates))
            for name in names:
                self._validate_placeholder(agent, name, field_path, upstream, template_field)
        reads_history = any(n.endswith("_history") for n in PLACEHOLDER_PATTERN.findall(agent.user_template))
        if reads_history and self.rounds > 1 and agent.id != self.decision_agent \
                and agent.first_round_template is None:
            raise JobSpecError(f"{path}.first_round_template",
                               "required: user_template reads history placeholders, which have no content in "
                               "round 0; give a round-0 template without them")

    def _validate_placeholder(self, agent: AgentSpec, name: str, field_path: str, upstream: set[str],
                              template_field: str) -> None:
        if name == "user_question":
            if not self.task.strip():
                raise JobSpecError("task", f"must not be empty: {field_path} reads {{user_question}}")
            return
        kind, owner, when = name.split("_")
        if kind == "condition" and self.agent(owner).condition is None:
            raise JobSpecError(field_path, f"{{{name}}} needs agent {owner!r} to have a condition; it has none")
        if owner == self.decision_agent:
            raise JobSpecError(field_path, f"{{{name}}} reads the decision agent {owner!r}, which runs last")
        if when == "current":
            if owner not in upstream:
                raise JobSpecError(field_path, f"{{{name}}} reads agent {owner!r}, which is not upstream of agent "
                                               f"{agent.id!r} in the same round (no path of edges {owner} -> "
                                               f"{agent.id})")
            return
        if self.rounds < 2:
            raise JobSpecError(field_path, f"{{{name}}} reads the previous round, which needs rounds > 1 "
                                           f"(rounds is {self.rounds})")
        if template_field == "first_round_template":
            raise JobSpecError(field_path, f"{{{name}}} reads the previous round, which round 0 does not have")

    # ---- conversion ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "mode": self.mode, "namespace": self.namespace,
                "rounds": self.rounds, "decision_agent": self.decision_agent,
                "agents": [a.to_dict() for a in self.agents], "edges": [list(e) for e in self.edges],
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: Any) -> "JobSpec":
        """A validated job from a dict. ``edges`` absent or null: derived from the templates. A job-level
        ``generation`` mapping gives defaults that each agent's own ``generation`` overrides field by field."""
        _require_mapping(data, "job")
        allowed = {f.name for f in fields(cls)} | {"generation"}
        _reject_unknown_keys(data, cls, "job", allowed)
        for required in ("id", "agents"):
            if required not in data:
                raise JobSpecError(required, "missing")
        default_generation = data.get("generation", {})
        _require_mapping(default_generation, "generation")
        _generation_from_dict(default_generation, "generation")  # the defaults must be valid on their own
        agents = data["agents"]
        if not isinstance(agents, list) or not agents:
            raise JobSpecError("agents", "must be a non-empty list of agents")
        parsed_agents = tuple(AgentSpec.from_dict(a, f"agents[{i}]", default_generation) for i, a in enumerate(agents))
        edges = data.get("edges")
        if edges is not None:
            if not isinstance(edges, list):
                raise JobSpecError("edges", f"expected a list of [writer, reader] pairs, got {type(edges).__name__}")
            for index, edge in enumerate(edges):
                if not (isinstance(edge, (list, tuple)) and len(edge) == 2):
                    raise JobSpecError(f"edges[{index}]", f"expected a [writer, reader] pair, got {edge!r}")
            edges = tuple(tuple(e) for e in edges)
        values = {key: value for key, value in data.items() if key not in ("agents", "edges", "generation")}
        values.setdefault("task", "")
        return cls(agents=parsed_agents, edges=edges, **values)


# ---- edges ---------------------------------------------------------------------------------------------

def _templates_are_text(agent: AgentSpec) -> bool:
    """Whether the templates edges are read from are strings (`validate` names the field of one that is not)."""
    return isinstance(agent.user_template, str) and isinstance(agent.first_round_template, (str, type(None)))


def derive_edges(agents: Iterable[AgentSpec]) -> tuple[tuple[str, str], ...]:
    """One edge writer -> reader for each ``{agent_<writer>_current}`` / ``{condition_<writer>_current}`` that
    a reader's templates name, in agent order and then placeholder order, without duplicates."""
    edges: list[tuple[str, str]] = []
    for agent in agents:
        for name in agent.placeholders():
            if name.endswith("_current"):
                edge = (name.split("_")[1], agent.id)
                if edge not in edges:
                    edges.append(edge)
    return tuple(edges)


def _find_cycle(ids: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """A cycle as a list of ids whose first and last are the same agent, or [] when the graph is a DAG."""
    readers: dict[str, list[str]] = {}
    for writer, reader in edges:
        readers.setdefault(writer, []).append(reader)
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in readers.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in ids:
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def _topological_order(ids: tuple[str, ...], edges: Iterable[tuple[str, str]]) -> list[str]:
    """`ids` in an order where every writer comes before its readers (edges to other ids are ignored)."""
    members = set(ids)
    inner = [(w, r) for w, r in edges if w in members and r in members]
    indegree = {i: 0 for i in ids}
    for _, reader in inner:
        indegree[reader] += 1
    order: list[str] = []
    ready = [i for i in ids if indegree[i] == 0]
    while ready:
        node = ready.pop(0)
        order.append(node)
        for writer, reader in inner:
            if writer == node:
                indegree[reader] -= 1
                if indegree[reader] == 0:
                    ready.append(reader)
    return order


# ---- field checks --------------------------------------------------------------------------------------

def _validate_agent_fields(agent: AgentSpec, path: str) -> None:
    _require_str(agent.id, f"{path}.id", allow_empty=False)
    if not AGENT_ID_PATTERN.fullmatch(agent.id):
        raise JobSpecError(f"{path}.id", f"{agent.id!r} may contain only letters and digits ([A-Za-z0-9]+)")
    _require_str(agent.role, f"{path}.role")
    if not agent.role.strip():
        raise JobSpecError(f"{path}.role", "must not be empty")
    _require_str(agent.system_prompt, f"{path}.system_prompt")
    _require_str(agent.assistant_prefix, f"{path}.assistant_prefix")
    _require_str(agent.user_template, f"{path}.user_template")
    if not agent.user_template.strip():
        raise JobSpecError(f"{path}.user_template", "must not be empty")
    if agent.first_round_template is not None:
        _require_str(agent.first_round_template, f"{path}.first_round_template")
        if not agent.first_round_template.strip():
            raise JobSpecError(f"{path}.first_round_template", "must not be empty (omit it instead)")
    for text_field in ("system_prompt", "assistant_prefix"):
        found = PLACEHOLDER_PATTERN.findall(getattr(agent, text_field))
        if found:
            raise JobSpecError(f"{path}.{text_field}", f"placeholders belong in user_template, found {{{found[0]}}}")
    for template_field in ("user_template", "first_round_template"):
        template = getattr(agent, template_field)
        if template is None:
            continue
        stray = STRAY_PLACEHOLDER_PATTERN.findall(PLACEHOLDER_PATTERN.sub("", template))
        if stray:
            raise JobSpecError(f"{path}.{template_field}",
                               f"unknown placeholder(s) {', '.join(stray)}; known forms: {{user_question}}, "
                               "{agent_<id>_current}, {agent_<id>_history}, {condition_<id>_current}, "
                               "{condition_<id>_history} (ids: letters and digits)")
    if not isinstance(agent.force_dense, bool):
        raise JobSpecError(f"{path}.force_dense", f"expected true or false, got {type(agent.force_dense).__name__} "
                                                  f"{agent.force_dense!r}")
    if agent.condition is not None and agent.condition not in CONDITIONS:
        raise JobSpecError(f"{path}.condition", f"unknown condition {agent.condition!r}; valid: "
                                                f"{', '.join(CONDITIONS)} (or null)")
    if not isinstance(agent.generation, GenerationParams):
        raise JobSpecError(f"{path}.generation", f"expected GenerationParams, got {type(agent.generation).__name__}")
    _validate_generation(agent.generation, f"{path}.generation")


def _validate_generation(params: GenerationParams, path: str) -> None:
    problem = params.problem(MAX_NEW_TOKENS_LIMIT)
    if problem is not None:
        raise JobSpecError(f"{path}.{problem[0]}", problem[1])


def _generation_from_dict(data: Any, path: str) -> GenerationParams:
    _require_mapping(data, path)
    _reject_unknown_keys(data, GenerationParams, path)
    params = GenerationParams(**data)
    _validate_generation(params, path)
    return params


def _require_mapping(value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        raise JobSpecError(path, f"expected a mapping, got {type(value).__name__}")


def _reject_unknown_keys(data: Mapping[str, Any], cls: type, path: str, allowed: set[str] | None = None) -> None:
    allowed = allowed if allowed is not None else {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise JobSpecError(path, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _require_str(value: Any, path: str, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise JobSpecError(path, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise JobSpecError(path, "must not be empty")


def _require_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(path, f"expected an integer, got {type(value).__name__} {value!r}")
