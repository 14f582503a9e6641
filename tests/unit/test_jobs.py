"""Job specs, topologies and role prompts: validation names the field, turn order follows the topology, job files
load and round-trip, and every built template renders with the real tokenizer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kvcomm.names import MODES as ENGINE_MODES
from kvcomm.harness.job_files import load_jobs
from kvcomm.harness.jobs import MODES, AgentSpec, GenerationParams, JobSpec, JobSpecError, Turn, derive_edges
from kvcomm.harness.roles import (CODE, MATH, QA, TASK_KINDS, fully_connected_math_agents, prompt_set,
                                  worker_role)
from kvcomm.harness.topologies import (DECISION_AGENT_ID, TOPOLOGIES, build_job, chain, debate, fully_connected,
                                       star)
from kvcomm.templates import PLACEHOLDER_PATTERN, AgentTemplate, render_template

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def three_agent_dict() -> dict:
    """A small valid job: agent k reads the question and every agent j < k (edges derived)."""
    return {
        "id": "j1", "task": "What is 2 + 3?", "mode": "dense",
        "agents": [
            {"id": "1", "role": "Solver", "system_prompt": "Solve.", "user_template": "Q: {user_question}\nSolve."},
            {"id": "2", "role": "Analyst", "system_prompt": "Analyse.",
             "user_template": "Q: {user_question}\nAgent 1: {agent_1_current}\nAnalyse."},
            {"id": "3", "role": "Inspector", "system_prompt": "Check.",
             "user_template": "Q: {user_question}\nA1: {agent_1_current}\nA2: {agent_2_current}\nCheck."},
        ],
    }


def error_for(data: dict) -> JobSpecError:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(data)
    return info.value


def mutated(change) -> dict:
    data = three_agent_dict()
    change(data)
    return data


# (field path the message must start with, a phrase it must contain, the change that breaks the job)
VALIDATION_CASES = [
    ("agents[1].id", "must not be empty", lambda d: d["agents"][1].update(id="")),
    ("agents[2].id", "duplicate agent id '1'", lambda d: d["agents"][2].update(id="1")),
    ("agents[0].id", "letters and digits", lambda d: d["agents"][0].update(id="a_b")),
    ("agents[2].role", "must not be empty", lambda d: d["agents"][2].update(role="  ")),
    ("agents[0].user_template", "must not be empty", lambda d: d["agents"][0].update(user_template="")),
    ("mode", "valid modes: dense, dense-prefix, naive, cacheblend, kvcomm, hybrid", lambda d: d.update(mode="fast")),
    ("edges[0]", "unknown agent '9'", lambda d: d.update(edges=[["9", "2"]])),
    ("edges[1]", "[writer, reader] pair", lambda d: d.update(edges=[["1", "2"], ["1"]])),
    ("agents[2].user_template", "{agent_2_current} reads agent '2', which is not upstream of agent '3'",
     lambda d: d.update(edges=[["1", "2"], ["1", "3"]])),
    ("agents[1].user_template", "names unknown agent '7'",
     lambda d: d["agents"][1].update(user_template="{agent_7_current} go")),
    ("agents[1].user_template", "needs rounds > 1",
     lambda d: d["agents"][1].update(user_template="Q: {user_question}\nBefore: {agent_1_history}\nGo.")),
    ("agents[1].user_template", "needs agent '1' to have a condition",
     lambda d: d["agents"][1].update(user_template="Q: {user_question}\n{condition_1_current}\nGo.")),
    ("agents[1].user_template", "used more than once",
     lambda d: d["agents"][1].update(user_template="{agent_1_current} and again {agent_1_current}.")),
    ("agents[0].user_template", "unknown placeholder(s) {question}",
     lambda d: d["agents"][0].update(user_template="Q: {question}\nSolve.")),
    ("agents[0].system_prompt", "placeholders belong in user_template",
     lambda d: d["agents"][0].update(system_prompt="You see {user_question}.")),
    ("task", "must not be empty: agents[0].user_template reads {user_question}", lambda d: d.update(task=" ")),
    ("decision_agent", "'9' is not one of the agents (1, 2, 3)", lambda d: d.update(decision_agent="9")),
    ("decision_agent", "expected an agent id, got list", lambda d: d.update(decision_agent=["3"])),
    ("agents[1].user_template", "expected a string, got int", lambda d: d["agents"][1].update(user_template=7)),
    ("agents[0].first_round_template", "expected a string, got list",
     lambda d: d["agents"][0].update(first_round_template=["{user_question}"])),
    ("rounds", "must be >= 1, got 0", lambda d: d.update(rounds=0)),
    ("rounds", "expected an integer", lambda d: d.update(rounds="2")),
    ("agents[0].generation.max_new_tokens", "must be in [1, 8192], got 0",
     lambda d: d["agents"][0].update(generation={"max_new_tokens": 0})),
    ("agents[1].generation.max_new_tokens", "got 8193",
     lambda d: d["agents"][1].update(generation={"max_new_tokens": 8193})),
    ("agents[0].generation.min_new_tokens", "must not exceed max_new_tokens (4)",
     lambda d: d["agents"][0].update(generation={"max_new_tokens": 4, "min_new_tokens": 5})),
    ("agents[0].generation.temperature", "must be >= 0",
     lambda d: d["agents"][0].update(generation={"temperature": -0.1})),
    ("agents[0].generation.top_p", "must be in (0, 1], got 0",
     lambda d: d["agents"][0].update(generation={"top_p": 0})),
    ("agents[0].generation.top_p", "must be in (0, 1], got 1.5",
     lambda d: d["agents"][0].update(generation={"top_p": 1.5})),
    ("agents[0].generation", "unknown key(s) beams", lambda d: d["agents"][0].update(generation={"beams": 4})),
    ("agents[1]", "unknown key(s) colour", lambda d: d["agents"][1].update(colour="red")),
    ("job", "unknown key(s) priority, tenant", lambda d: d.update(priority=1, tenant="x")),
    ("agents[0].condition", "unknown condition 'bash'", lambda d: d["agents"][0].update(condition="bash")),
    ("agents[1].system_prompt", "missing", lambda d: d["agents"][1].pop("system_prompt")),
    ("agents", "non-empty list", lambda d: d.update(agents=[])),
    ("agents[0]", "expected a mapping, got list", lambda d: d.update(agents=[["1"]])),
    ("generation.seed", "expected an integer", lambda d: d.update(generation={"seed": 1.5})),
    ("agents[0].generation.stop", "expected a list of strings, got str",
     lambda d: d["agents"][0].update(generation={"stop": "\n\n"})),
    ("agents[0].generation.stop[1]", "expected a non-empty string, got ''",
     lambda d: d["agents"][0].update(generation={"stop": ["END", ""]})),
]


@pytest.mark.parametrize("field_path, phrase, change", VALIDATION_CASES,
                         ids=[f"{c[0]}:{c[1][:24]}" for c in VALIDATION_CASES])
def test_each_validation_error_names_its_field(field_path, phrase, change):
    error = error_for(mutated(change))
    assert error.field == field_path
    assert str(error).startswith(f"{field_path}: ")
    assert phrase in str(error)


def test_valid_job_passes_and_non_dict_input_is_refused():
    job = JobSpec.from_dict(three_agent_dict())
    assert [a.id for a in job.agents] == ["1", "2", "3"]
    with pytest.raises(JobSpecError, match=r"^job: expected a mapping, got list"):
        JobSpec.from_dict([three_agent_dict()])


def test_cycle_is_named():
    error = error_for(mutated(lambda d: d.update(edges=[["1", "2"], ["2", "3"], ["3", "1"]])))
    assert error.field == "edges"
    assert "cycle 1 -> 2 -> 3 -> 1" in str(error)
    self_loop = error_for(mutated(lambda d: d["agents"][0].update(user_template="{agent_1_current} again.")))
    assert "cycle 1 -> 1" in str(self_loop) and "derived from the templates" in str(self_loop)


def test_edges_are_derived_from_current_placeholders_only():
    job = JobSpec.from_dict(three_agent_dict())
    assert job.edges == (("1", "2"), ("1", "3"), ("2", "3"))
    explicit = JobSpec.from_dict(mutated(lambda d: d.update(edges=[["1", "2"], ["2", "3"]])))
    assert explicit.edges == (("1", "2"), ("2", "3"))      # 1 reaches 3 through 2: still upstream
    agents = (AgentSpec("a", "R", "", "{user_question} go", condition="python"),
              AgentSpec("b", "R", "", "{condition_a_current} {agent_b_history} go"))
    assert derive_edges(agents) == (("a", "b"),)


def test_history_placeholders_need_a_first_round_template_except_for_the_decision_agent():
    base = mutated(lambda d: d.update(rounds=2))
    base["agents"][1]["user_template"] = "Q: {user_question}\nBefore: {agent_2_history}\nGo."
    error = error_for(copy.deepcopy(base))
    assert error.field == "agents[1].first_round_template" and "round 0" in str(error)
    base["agents"][1]["first_round_template"] = "Q: {user_question}\nGo."
    job = JobSpec.from_dict(copy.deepcopy(base))
    agent = job.agent("2")
    assert agent.user_template_for_round(0) == "Q: {user_question}\nGo."
    assert agent.template_for_round(1).user_template.endswith("{agent_2_history}\nGo.")
    base["agents"][1]["first_round_template"] = "Q: {agent_2_history}\nGo."
    assert "round 0 does not have" in str(error_for(base))
    decision = mutated(lambda d: d.update(rounds=2, decision_agent="3"))
    decision["agents"][2]["user_template"] = "{agent_1_current} {agent_2_current} {agent_1_history} decide."
    assert JobSpec.from_dict(decision).turn_levels()[-1] == [Turn("3", 1)]


def test_decision_agent_cannot_feed_others():
    data = mutated(lambda d: d.update(decision_agent="1"))
    error = error_for(data)
    assert error.field.startswith("edges[") and "runs last" in str(error)


def test_fully_connected_levels_run_one_agent_at_a_time():
    job = build_job("math", "What is 1 + 1?", num_agents=3)
    assert job.edges == fully_connected(["1", "2", "3"]) == (("1", "2"), ("1", "3"), ("2", "3"))
    assert [[t.agent_id for t in level] for level in job.turn_levels()] == [["1"], ["2"], ["3"]]
    assert job.placeholders_of("3") == ("user_question", "agent_1_current", "agent_2_current")
    assert job.placeholders_of("1") == ("user_question",)


def test_star_runs_all_workers_then_the_decision_agent():
    job = build_job("qa", "Which planet is largest?", num_agents=4, topology="star", decision=True)
    levels = [[t.agent_id for t in level] for level in job.turn_levels()]
    assert levels == [["1", "2", "3", "4"], [DECISION_AGENT_ID]]
    assert set(job.edges) == set(star(["1", "2", "3", "4"], DECISION_AGENT_ID))
    for worker in ("1", "2", "3", "4"):
        assert job.placeholders_of(worker) == ("user_question",)
    with pytest.raises(ValueError, match="decision=True"):
        build_job("qa", "Q?", num_agents=2, topology="star")


def test_chain_levels():
    job = build_job("code", "def f(x):\n    '''Return x.'''\n", num_agents=3, topology="chain")
    assert job.edges == chain(["1", "2", "3"]) == (("1", "2"), ("2", "3"))
    assert [[t.agent_id for t in level] for level in job.turn_levels()] == [["1"], ["2"], ["3"]]
    assert job.placeholders_of("3") == ("user_question", "agent_2_current")


def test_debate_rounds_read_every_previous_answer_then_decide():
    job = build_job("math", "What is 6 * 7?", num_agents=2, topology="debate", decision=True, rounds=3)
    assert debate(["1", "2"]) == ()
    assert job.turn_levels() == [[Turn("1", 0), Turn("2", 0)], [Turn("1", 1), Turn("2", 1)],
                                 [Turn("1", 2), Turn("2", 2)], [Turn(DECISION_AGENT_ID, 2)]]
    for agent_id in ("1", "2"):
        agent = job.agent(agent_id)
        names = PLACEHOLDER_PATTERN.findall(agent.user_template)
        assert names == ["user_question", "agent_1_history", "agent_2_history"]
        assert PLACEHOLDER_PATTERN.findall(agent.first_round_template) == ["user_question"]
    assert "you answered" in job.agent("1").user_template
    assert job.placeholders_of(DECISION_AGENT_ID) == ("user_question", "agent_1_current", "agent_2_current")


def test_programming_expert_has_a_python_condition_that_readers_see():
    job = build_job("math", "What is 6 * 7?", num_agents=4)
    programmer = job.agent("3")
    assert programmer.role == "Programming Expert" and programmer.condition == "python"
    assert "condition_3_current" in job.placeholders_of("4")
    assert [a.role for a in job.agents] == ["Math Solver", "Mathematical Analyst", "Programming Expert",
                                           "Inspector"]
    assert worker_role("math", 4).name == "Math Solver"   # role i mod len


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("kind", TASK_KINDS)
def test_built_jobs_round_trip_through_dicts_and_json(kind, topology):
    job = build_job(kind, "Question text?", num_agents=3, topology=topology, decision=True,
                    rounds=2, mode="hybrid", generation=GenerationParams(max_new_tokens=32, seed=7),
                    job_id=f"{kind}-{topology}", namespace="tenant1", metadata={"answer": 5})
    assert JobSpec.from_dict(job.to_dict()) == job
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    assert job.metadata == {"task_kind": kind, "topology": topology, "answer": 5}
    assert all(a.generation == GenerationParams(max_new_tokens=32, seed=7) for a in job.agents)


def test_build_job_refuses_unknown_kind_and_topology():
    with pytest.raises(ValueError, match="valid kinds: math, code, qa"):
        build_job("poetry", "Q?", num_agents=2)
    with pytest.raises(ValueError, match="valid topologies: fully_connected, chain, star, debate"):
        build_job("math", "Q?", num_agents=2, topology="ring")
    with pytest.raises(ValueError, match="num_agents"):
        build_job("math", "Q?", num_agents=0)
    with pytest.raises(JobSpecError, match="^mode: unknown mode"):
        build_job("math", "Q?", num_agents=2, mode="turbo")


def test_job_level_generation_defaults_are_overridden_per_agent():
    data = three_agent_dict()
    data["generation"] = {"max_new_tokens": 40, "temperature": 0.5}
    data["agents"][2]["generation"] = {"max_new_tokens": 10}
    job = JobSpec.from_dict(data)
    assert job.agent("1").generation == GenerationParams(max_new_tokens=40, temperature=0.5)
    assert job.agent("3").generation == GenerationParams(max_new_tokens=10, temperature=0.5)


def test_stop_strings_load_from_lists():
    data = three_agent_dict()
    data["generation"] = {"stop": ["\nQ:", "END"]}
    job = JobSpec.from_dict(data)
    params = job.agent("2").generation
    assert params.stop == ("\nQ:", "END") and params == GenerationParams(stop=("\nQ:", "END"))
    assert params.to_dict()["stop"] == ["\nQ:", "END"]
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job


def test_load_jobs_reads_the_examples():
    jobs = load_jobs(EXAMPLES / "gsm8k_3agents.jsonl")
    assert len(jobs) == 4 and len({j.id for j in jobs}) == 4
    for job in jobs:
        assert job.mode == "kvcomm" and len(job.agents) == 3 and isinstance(job.metadata["answer"], (int, float))
        assert job.edges == fully_connected(["1", "2", "3"])
        assert all(a.generation.max_new_tokens == 64 for a in job.agents)
    (debate_job,) = load_jobs(EXAMPLES / "job_debate.yaml")
    assert debate_job.rounds == 2 and debate_job.decision_agent is not None
    assert len(debate_job.workers()) == 2
    assert debate_job.turn_levels()[-1] == [Turn(debate_job.decision_agent, 1)]


def test_load_jobs_names_the_bad_line(tmp_path):
    good = json.dumps(three_agent_dict())
    bad = three_agent_dict()
    bad["id"] = "j2"
    bad["agents"][1]["role"] = ""
    path = tmp_path / "jobs.jsonl"
    path.write_text(good + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(JobSpecError) as info:
        load_jobs(path)
    assert f"{path} line 3: agents[1].role: must not be empty" == str(info.value)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(JobSpecError, match=r"line 2: invalid JSON"):
        load_jobs(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(JobSpecError, match=r"line 2: id: duplicate job id 'j1' \(first at .* line 1\)"):
        load_jobs(path)


def test_load_jobs_json_list_yaml_and_bad_suffix(tmp_path):
    first, second = three_agent_dict(), three_agent_dict()
    second["id"] = "j2"
    second["agents"][0]["generation"] = {"top_p": 2}
    listed = tmp_path / "jobs.json"
    listed.write_text(json.dumps([first, second]))
    with pytest.raises(JobSpecError, match=r"job \[1\]: agents\[0\]\.generation\.top_p"):
        load_jobs(listed)
    single = tmp_path / "job.yml"
    single.write_text("id: y\ntask: Hi?\nagents:\n- {id: a, role: R, system_prompt: '', "
                      "user_template: '{user_question} go'}\n")
    assert load_jobs(single)[0].agents[0].id == "a"
    with pytest.raises(JobSpecError, match="unknown job file type '.txt'"):
        (tmp_path / "job.txt").write_text("{}")
        load_jobs(tmp_path / "job.txt")
    with pytest.raises(FileNotFoundError):
        load_jobs(tmp_path / "missing.jsonl")


def test_modes_are_the_engine_modes():
    """A job spec accepts exactly the modes the engine serves, in the same order (the error message lists them):
    a mode added to, or renamed in, one of the two tuples fails here."""
    assert MODES == ENGINE_MODES


def test_fully_connected_math_agents_match_the_fidelity_setting():
    agents = fully_connected_math_agents(3)
    assert [a.agent_id for a in agents] == ["1", "2", "3"]
    assert all(isinstance(a, AgentTemplate) for a in agents)
    for k, agent in enumerate(agents, start=1):
        assert agent.placeholders() == ("user_question",) + tuple(f"agent_{j}_current" for j in range(1, k))
    roles = [r for r in MATH.roles if r.name in ("Math Solver", "Mathematical Analyst", "Inspector")]
    assert [a.system_prompt for a in agents] == [r.system_prompt for r in roles]
    assert len(fully_connected_math_agents(5)) == 5


def test_every_placeholder_is_followed_by_fixed_text():
    for kind in TASK_KINDS:
        job = build_job(kind, "Q?", num_agents=4, decision=True, rounds=2)
        for agent in job.agents:
            for template in (agent.user_template, agent.first_round_template):
                if template is None:
                    continue
                pieces = PLACEHOLDER_PATTERN.split(template)
                fixed_after = pieces[2::2]
                assert all(piece.strip() for piece in fixed_after), (kind, agent.id)


def test_prompts_render_and_system_prompts_are_60_to_120_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    for prompts in (MATH, CODE, QA):
        assert prompt_set(prompts.kind) is prompts
        for role in prompts.roles + (prompts.decision,):
            count = len(tokenizer.encode(role.system_prompt, add_special_tokens=False))
            assert 60 <= count <= 120, (prompts.kind, role.name, count)
        job = build_job(prompts.kind, "Q?", num_agents=4, topology="debate", decision=True, rounds=2)
        for agent in job.agents:
            for round_index in (0, 1):
                rendered = render_template(agent.template_for_round(round_index), tokenizer)
                assert list(rendered.placeholders) == PLACEHOLDER_PATTERN.findall(agent.user_template_for_round(round_index))
