"""Agent roles and their prompts: our own prompt sets for math (GSM8K), code (HumanEval) and knowledge QA.

This module owns the role texts (a system prompt of 60-120 tokens and a closing instruction line per role),
the layout of a user template, and `fully_connected_math_agents`, the 3-agent GSM8K setting of the fidelity
benchmark. Which agent reads whom is decided elsewhere (`topologies`); this module only writes the text.

A user template is: a short task line, the question placeholder, then for every agent the reader hears from a
header line and that agent's placeholder (plus its tool output when it has a condition), then the reader's
instruction line. Every placeholder is therefore followed by a fixed text segment, which is where KVCOMM applies
the offset of the placeholder before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..templates import AgentTemplate

TASK_KINDS = ("math", "code", "qa")


@dataclass(frozen=True)
class Role:
    name: str
    system_prompt: str
    instruction: str             # the user template's closing line
    condition: str | None = None  # "python": the role's code is executed and its output shared


@dataclass(frozen=True)
class PromptSet:
    kind: str                    # one of TASK_KINDS
    task_line: str               # the user template's first line, before the question
    roles: tuple[Role, ...]      # worker roles; agent i (0-based) plays roles[i % len(roles)]
    decision: Role               # the final decision agent


@dataclass(frozen=True)
class Source:
    """One agent whose output a template shows: its id, its role and whether it is the reader itself."""
    agent_id: str
    role: Role
    is_reader: bool = False


MATH_ANSWER_LINE = "Your last line must be: The answer is <number>, with the number alone, without units."
QA_ANSWER_LINE = "Your last line must be: The answer is <answer>."

MATH = PromptSet(
    kind="math",
    task_line="Solve this math word problem.",
    roles=(
        Role("Math Solver",
             "You are a math solver on a team of agents working on grade-school math word problems. Read the "
             "problem carefully, identify what is asked, and solve it step by step, writing every calculation "
             "with its result. Other agents' answers may appear in your input; they can be wrong, so verify them "
             "instead of copying them. Keep your reasoning short and exact. " + MATH_ANSWER_LINE,
             "Solve the problem step by step, checking any answers above instead of copying them. End with: "
             "The answer is <number>."),
        Role("Mathematical Analyst",
             "You are a mathematical analyst on a team of agents solving math word problems. Before computing "
             "anything, restate the problem as mathematics: give each unknown quantity a name, write down the "
             "equations that link the quantities, and note any unit conversions. Then solve the equations step "
             "by step. If other agents have answered, compare your result with theirs and explain any "
             "difference. " + MATH_ANSWER_LINE,
             "Name the quantities, write the equations between them, then compute. End with: The answer is "
             "<number>."),
        Role("Programming Expert",
             "You are a programming expert on a team of agents solving math word problems. You answer with "
             "Python code only: one ```python block that computes the result from the numbers in the problem, "
             "with a short comment for each step, and stores the final number in a variable named answer. Use "
             "only the standard library, do not read input and do not print anything. Your code will be run "
             "and its result shown to the other agents.",
             "Write one ```python block that computes the result and stores it in a variable named answer.",
             condition="python"),
        Role("Inspector",
             "You are an inspector on a team of agents solving math word problems. You review the other agents' "
             "solutions: check that each one reads the problem correctly, that its reasoning is sound and that "
             "every calculation is right, and name the first wrong step of each flawed solution. Then give your "
             "own corrected solution, step by step. If no solution is given, solve the problem yourself. "
             + MATH_ANSWER_LINE,
             "Check each solution above step by step, name any error, then solve it correctly. End with: The "
             "answer is <number>."),
    ),
    decision=Role(
        "Final Decision",
        "You make the final decision for a team of agents that solved a math word problem. You receive their "
        "answers and, possibly, the result of a program one of them wrote. Decide which final number is "
        "correct: recheck the calculations where the agents disagree, prefer answers whose reasoning holds up, "
        "and do not simply count votes. Explain your choice in two or three sentences. " + MATH_ANSWER_LINE,
        "Decide which result above is correct and explain why briefly. End with: The answer is <number>."),
)

CODE = PromptSet(
    kind="code",
    task_line="Implement this Python function so that it does what its docstring says.",
    roles=(
        Role("Algorithm Designer",
             "You are an algorithm designer on a team of agents writing Python functions. Given a function "
             "signature with its docstring, you work out how to solve the task before anyone writes code: "
             "restate the input and the output, choose a simple and correct algorithm, and list the edge cases "
             "the implementation must handle, such as empty inputs, duplicates, negative numbers or ties. "
             "Present the plan as short numbered steps rather than full code.",
             "Describe the algorithm in a few numbered steps and list the edge cases. Do not write the full "
             "code."),
        Role("Programmer",
             "You are a Python programmer on a team of agents. Given a function signature with its docstring, "
             "and possibly a plan or feedback from other agents, you write a correct and readable "
             "implementation. Follow the docstring exactly, including its examples, and handle the edge cases. "
             "Keep the given function name and parameters and include the imports the code needs. Answer with "
             "the complete function in a single ```python code block.",
             "Write the complete function, with its signature and imports, in one ```python block."),
        Role("Test Analyst",
             "You are a test analyst on a team of agents writing Python functions. Read the docstring and derive "
             "test cases from it: the examples it gives, plus edge cases such as empty inputs, single elements "
             "and boundary values, each with its expected output. When other agents have written code, trace it "
             "on your test cases by hand and report every case where it returns a wrong result, explaining why.",
             "List test inputs with their expected outputs and say which of them the code above gets wrong."),
        Role("Bug Fixer",
             "You are a bug fixer on a team of agents writing Python functions. You receive a function's "
             "signature and docstring with other agents' code and test reports. Find the bugs, such as wrong "
             "conditions, off-by-one errors, unhandled edge cases or wrong return types, and explain each one in "
             "a sentence. Then write the corrected complete function, keeping its name and parameters, in a "
             "single ```python code block.",
             "Name the bugs in the code above, if any, then write the corrected complete function in one "
             "```python block."),
    ),
    decision=Role(
        "Final Decision",
        "You make the final decision for a team of agents that wrote a Python function. You receive their "
        "plans, implementations and test reports. Pick the implementation that best satisfies the docstring "
        "and its examples, and fix any remaining bug that the reports reveal. Keep the given function name and "
        "parameters and include the imports the code needs. Answer with the complete final function in a "
        "single ```python code block.",
        "Write the final complete function, with its signature and imports, in one ```python block."),
)

QA = PromptSet(
    kind="qa",
    task_line="Answer this question.",
    roles=(
        Role("Knowledgeable Expert",
             "You are a knowledgeable expert on a team of agents answering questions about science, history, "
             "culture and everyday facts. Answer from what you know: state the key facts that decide the "
             "question, reason from them to an answer, and say how certain you are. If the question offers "
             "options, consider each one before you choose. Be concise and precise. " + QA_ANSWER_LINE,
             "Give the key facts and your reasoning in a few sentences. End with: The answer is <answer>."),
        Role("Critic",
             "You are a critic on a team of agents answering knowledge questions. You read the other agents' "
             "answers and look for weaknesses: wrong facts, unsupported leaps, answers that do not fit the "
             "question, or options dismissed without reason. Explain each problem you find in one or two "
             "sentences, then give the answer you believe is best supported. If no answers are given, answer "
             "the question yourself. " + QA_ANSWER_LINE,
             "Point out what is wrong or missing in the answers above, then answer. End with: The answer is "
             "<answer>."),
        Role("Fact Checker",
             "You are a fact checker on a team of agents answering knowledge questions. Go through the factual "
             "claims in the other agents' answers one by one and mark each as correct, wrong or uncertain, with "
             "a short reason drawn from well-established knowledge such as definitions, dates, names and "
             "quantities. Then state which answer the correct facts support. If no answers are given, answer "
             "the question yourself. " + QA_ANSWER_LINE,
             "Mark each factual claim above as correct, wrong or uncertain, then answer. End with: The answer "
             "is <answer>."),
    ),
    decision=Role(
        "Final Decision",
        "You make the final decision for a team of agents that answered a knowledge question. You receive "
        "their answers, critiques and fact checks. Weigh the evidence rather than counting votes: prefer "
        "answers whose facts were confirmed and whose reasoning survived criticism, and discard claims that "
        "were shown to be wrong. Explain your choice in two or three sentences. " + QA_ANSWER_LINE,
        "Decide which answer above is best supported and explain why briefly. End with: The answer is "
        "<answer>."),
)


def prompt_set(kind: str) -> PromptSet:
    """The prompt set for a task kind: "math" (GSM8K), "code" (HumanEval) or "qa" (knowledge questions)."""
    for prompts in (MATH, CODE, QA):
        if prompts.kind == kind:
            return prompts
    raise ValueError(f"task kind {kind!r} is unknown; valid kinds: {', '.join(TASK_KINDS)}")


def worker_role(kind: str, index: int) -> Role:
    """The role of worker agent `index` (0-based): the kind's roles in turn."""
    roles = prompt_set(kind).roles
    return roles[index % len(roles)]


def user_template(prompts: PromptSet, role: Role, *, upstream: Sequence[Source] = (),
                  history: Sequence[Source] = ()) -> str:
    """The user template of an agent playing `role` that reads the question, the current-round output of every
    agent in `upstream` and the previous-round output of every agent in `history`, in that order."""
    parts = [f"{prompts.task_line}\n\n{{user_question}}\n\n"]
    for source in upstream:
        parts.append(f"Agent {source.agent_id} ({source.role.name}) answered:\n{{agent_{source.agent_id}_current}}"
                     "\n\n")
        if source.role.condition is not None:
            parts.append(f"Running agent {source.agent_id}'s code gave:\n{{condition_{source.agent_id}_current}}\n\n")
    for source in history:
        who = "you" if source.is_reader else f"Agent {source.agent_id} ({source.role.name})"
        parts.append(f"In the previous round, {who} answered:\n{{agent_{source.agent_id}_history}}\n\n")
        if source.role.condition is not None:
            owner = "your" if source.is_reader else f"agent {source.agent_id}'s"
            parts.append(f"Running {owner} code gave:\n{{condition_{source.agent_id}_history}}\n\n")
    parts.append(role.instruction)
    return "".join(parts)


def fully_connected_math_agents(num_agents: int) -> list[AgentTemplate]:
    """GSM8K agents "1".."N", fully connected: agent k reads the question and the answer of every agent j < k.
    Roles cycle through Math Solver, Mathematical Analyst and Inspector (no Programming Expert: an
    `AgentTemplate` carries no condition, so nothing would run its code)."""
    if num_agents < 1:
        raise ValueError(f"num_agents must be >= 1, got {num_agents}")
    roles = tuple(r for r in MATH.roles if r.condition is None)
    agents: list[AgentTemplate] = []
    sources: list[Source] = []
    for index in range(num_agents):
        agent_id, role = str(index + 1), roles[index % len(roles)]
        agents.append(AgentTemplate(agent_id, role.system_prompt, user_template(MATH, role, upstream=sources)))
        sources.append(Source(agent_id, role))
    return agents
