"""README.md's HTTP API examples, run against the real server; and Ctrl-C on `kvcomm serve` shuts down cleanly.

`kvcomm serve` runs in a subprocess (its own local Ray cluster, as a user starts it) with a Serve config like
``configs/local.yaml`` but tiny-llama with random weights (fast) served under the README's model name. The
README's ``## HTTP API (Ray Serve)`` section marks its examples with HTML comments:

* ``<!-- api-example: file NAME -->`` before a fenced block: a file the commands read (``-d @NAME``);
* ``<!-- api-example: STATUS -->`` before a fenced ``bash`` block holding one ``curl`` command, followed by a
  fenced block with the response: JSON (``json``), or server-sent events (``text``).

Each command is parsed (method, URL, headers, body) and sent with httpx to the server (``127.0.0.1:8000``
replaced by its address; a ``job-<16 hex>`` id replaced by the id of the last job the examples created). Three
checks per example:

1. the status must be STATUS;
2. the body must have the shape shown, and the values shown where no model decides them: every key shown is there
   (responses may have more); lists shown with n items match item by item, the last shown item standing for the
   rest; under `VALUE_KEYS` (reuse and gate decisions, counts, in-flight figures) numbers and booleans must equal
   the shown ones; under `EXACT_KEYS` (ids, statuses, modes, roles, reasons, namespaces, error messages, ...)
   strings must equal the shown ones, except that ``…`` matches anything and an id's random part (hex digits, or
   a Serve replica's 8 letters and digits) any of the same length and alphabet; other values (the model's texts and
   tokens, timings) only need the shown JSON type. SSE responses must have the same event names in the same
   order, each data matching;
3. what a model decides is compared with the in-process oracle (`Oracle`): the examples' requests replayed in
   README order on an engine with the server's weights and kvcomm settings. Every turn a response carries (a job's
   result, an event) must have the oracle's tokens, text, gate reason, reuse and prompt size, a job the oracle's
   final answer and reuse rate, a chat completion the oracle's text, token counts and finish reason.

The last test interrupts the server as a terminal's Ctrl-C does (SIGINT to its process group) and checks it says
one line and exits 0, with no traceback.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.procfs import running_processes
from tests.support.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## HTTP API (Ray Serve)"
README_ADDRESS = "127.0.0.1:8000"
README_MODEL = "smollm2-135m-instruct"
EXACT_KEYS = {"id", "object", "status", "mode", "type", "param", "code", "message", "role", "model", "job_id",
              "agent_id", "events", "owned_by", "finish_reason", "reason", "namespace", "worker", "workers", "job",
              "replica"}
VALUE_KEYS = {"reused", "reuse_rate", "turns_done", "round", "index", "attempts", "jobs_in_flight", "max_in_flight"}
MARKER = re.compile(r"<!-- api-example: (?P<what>[^>]*?) -->\s*\n```(?P<lang>\w*)\n(?P<body>.*?)\n```"
                    r"(?:\s*\n```(?P<rlang>\w*)\n(?P<response>.*?)\n```)?", re.DOTALL)
JOB_ID = re.compile(r"job-[0-9a-f]{16}")


# ------------------------------------------------------------------------------------------------------------
# README examples
# ------------------------------------------------------------------------------------------------------------
def readme_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else len(text)]


def readme_examples() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(files, examples): files by name; examples in README order, each with status, command, response, lang."""
    files, examples = {}, []
    for match in MARKER.finditer(readme_section()):
        what = match["what"].strip()
        if what.startswith("file "):
            files[what[len("file "):].strip()] = match["body"]
        else:
            assert match["response"] is not None, f"example {match['body'][:60]!r}: no response block after it"
            examples.append({"status": int(what), "command": match["body"], "response": match["response"],
                             "lang": match["rlang"]})
    return files, examples


def parse_curl(command: str, files: dict[str, str]) -> dict[str, Any]:
    """One curl command line (continuations with backslash, a trailing # comment) as method, url, headers, body."""
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    assert words and words[0] == "curl", command
    method, url, headers, body = None, None, {}, None
    i = 1
    while i < len(words):
        word = words[i]
        if word in ("-H", "--header"):
            name, _, value = words[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif word in ("-d", "--data", "--data-raw", "--data-binary"):
            body = words[i + 1]
            if body.startswith("@"):
                body = files[body[1:]]
            i += 2
        elif word in ("-X", "--request"):
            method = words[i + 1]
            i += 2
        elif word.startswith("-"):
            assert set(word[1:]) <= set("sSNi"), f"unknown curl option {word} in {command!r}"
            i += 1
        else:
            url = word
            i += 1
    assert url is not None, command
    return {"method": method or ("POST" if body is not None else "GET"), "url": url, "headers": headers,
            "body": body}


def matches(shown: Any, actual: Any, path: str = "$", key: str | None = None) -> list[str]:
    """Where `actual` does not have the shape `shown` (see the module docstring); [] when it does."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r:.80}"]
        problems = []
        for name, value in shown.items():
            if name not in actual:
                problems.append(f"{path}.{name}: missing")
            else:
                problems += matches(value, actual[name], f"{path}.{name}", name)
        return problems
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return [f"{path}: expected a list, got {actual!r:.80}"]
        if not shown:
            return [] if not actual else [f"{path}: expected an empty list, got {len(actual)} items"]
        if len(actual) < len(shown):
            return [f"{path}: expected at least {len(shown)} items, got {len(actual)}"]
        problems = []
        for index, item in enumerate(actual):
            problems += matches(shown[min(index, len(shown) - 1)], item, f"{path}[{index}]", key)
        return problems
    if shown is None:
        return [] if actual is None else [f"{path}: expected null, got {actual!r:.80}"]
    if isinstance(shown, bool):
        if not isinstance(actual, bool):
            return [f"{path}: expected a boolean, got {actual!r:.80}"]
        return [] if key not in VALUE_KEYS or actual == shown else [f"{path}: expected {shown}, got {actual}"]
    if isinstance(shown, (int, float)):
        if not isinstance(actual, (int, float)) or isinstance(actual, bool):
            return [f"{path}: expected a number, got {actual!r:.80}"]
        return [] if key not in VALUE_KEYS or actual == shown else [f"{path}: expected {shown}, got {actual}"]
    if not isinstance(actual, str):
        return [f"{path}: expected a string, got {actual!r:.80}"]
    if key in EXACT_KEYS and not re.fullmatch(_pattern(shown), actual, re.DOTALL):
        return [f"{path}: expected {shown!r}, got {actual!r:.120}"]
    return []


ID_PART = re.compile(r"(?<=replica-|ingress-)(?P<replica>[0-9a-z]{8})\b|(?<=-)(?P<hex>[0-9a-f]{8,})\b")


def _pattern(shown: str) -> str:
    """A shown string as a regular expression: ``…`` matches anything, an id's random part after a ``-`` (8 or
    more hex digits: ``job-c55187e4ca2d42ad``; a Serve replica's 8 letters and digits: ``replica-5uzn9ed4``,
    ``ingress-a1w6ptd3``) any of the same length and alphabet."""
    def literal(piece: str) -> str:
        return ".*".join(re.escape(p) for p in piece.split("…"))
    out, at = [], 0
    for found in ID_PART.finditer(shown):
        alphabet = "0-9a-z" if found["replica"] else "0-9a-f"
        out += [literal(shown[at:found.start()]), f"[{alphabet}]{{{len(found[0])}}}"]
        at = found.end()
    return "".join(out + [literal(shown[at:])])


def parse_sse(text: str) -> list[tuple[str | None, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, []
        for line in block.strip().split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        if data:
            joined = "\n".join(data)
            events.append((name, joined if joined == "[DONE]" else json.loads(joined)))
    return events


def test_the_readme_examples_are_well_formed() -> None:
    files, examples = readme_examples()
    assert "job.json" in files and json.loads(files["job.json"])["agents"]
    routes = set()
    for example in examples:
        request = parse_curl(example["command"], files)
        assert README_ADDRESS in request["url"], request["url"]
        routes.add((request["method"], JOB_ID.sub("{id}", request["url"].split(README_ADDRESS)[1].split("?")[0])))
        if example["lang"] == "json":
            json.loads(example["response"])
        else:
            assert parse_sse(example["response"]), example["response"]
    assert {("GET", "/healthz"), ("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}"),
            ("GET", "/v1/jobs/{id}/events"), ("POST", "/v1/chat/completions")} <= routes, routes
    assert any(e["status"] >= 400 for e in examples) and any(e["status"] == 202 for e in examples)


# ------------------------------------------------------------------------------------------------------------
# the oracle: the examples' requests replayed in process
# ------------------------------------------------------------------------------------------------------------
TURN_FIELDS = ("role", "token_ids", "text", "reason", "reused", "prompt_tokens", "recomputed_tokens")


class Oracle:
    """The in-process engine with the server's weights and kvcomm settings, fed the examples' jobs and chats in README
    order (so its anchor pool and chat contents go through the server's states)."""

    def __init__(self, engine: Any, serve_settings: Any, chat_cache_bytes: int):
        from kvcomm.chat import ChatContents, ChatTurns
        self.engine, self.settings = engine, serve_settings
        self.chats = ChatTurns(engine, ChatContents(chat_cache_bytes))
        self.jobs: dict[str, Any] = {}           # the server's job id -> the oracle's `JobResult`

    def run_job(self, server_id: str, body: dict[str, Any], mode: str | None) -> None:
        from kvcomm.harness.jobs import JobSpec
        from kvcomm.job_runner import run_job
        self.jobs[server_id] = run_job(self.engine, JobSpec.from_dict({"id": server_id, **body}), mode=mode)

    def chat(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The completion's text, token counts and finish reason (`kvcomm.chat.ChatTurns` in process, the chat in
        the server's default namespace); None when sampled without a seed."""
        from cluster.serve.openai_api import ChatCompletionRequest
        if float(body.get("temperature", 1.0)) > 0 and body.get("seed") is None:
            return None
        params = ChatCompletionRequest.model_validate(body).params(
            default_mode=self.settings.chat_mode, namespace=body.get("kvcomm", {}).get("namespace", "default"),
            default_max_tokens=self.settings.default_max_tokens)
        result = self.chats.run(params.request)
        return {"content": result.text, "prompt_tokens": result.prompt_tokens,
                "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason}

    # ---- comparisons --------------------------------------------------------------------------------------------
    def turn_problems(self, turn: dict[str, Any], job_id: str, where: str) -> list[str]:
        want = {(t.agent_id, t.round): t for t in self.jobs[job_id].turns}.get((turn["agent_id"], turn.get("round", 0)))
        if want is None:
            return [f"{where}: the oracle has no turn {turn['agent_id']}/{turn.get('round', 0)}"]
        return [f"{where}.{name}: the oracle has {getattr(want, name)!r:.120}, the server {turn[name]!r:.120}"
                for name in TURN_FIELDS if name in turn and turn[name] != getattr(want, name)]

    def job_problems(self, job: dict[str, Any], where: str) -> list[str]:
        """A job as the API shows it (or a ``done`` event): its result against the oracle's run."""
        result = job.get("result")
        if result is None:
            return []
        want = self.jobs[job["id"]]
        problems = [f"{where}.result.{name}: the oracle has {expected!r:.120}, the server {result[name]!r:.120}"
                    for name, expected in (("final_answer", want.final_answer), ("reuse_rate", want.reuse_rate),
                                           ("mode", want.mode))
                    if name in result and result[name] != expected]
        turns = result.get("turns", [])
        if len(turns) != len(want.turns):
            problems.append(f"{where}.result.turns: {len(turns)} turns, the oracle ran {len(want.turns)}")
        for index, turn in enumerate(turns):
            problems += self.turn_problems(turn, job["id"], f"{where}.result.turns[{index}]")
        return problems

    def chat_problems(self, completion: dict[str, Any], body: dict[str, Any], where: str) -> list[str]:
        want = self.chat(body)
        if want is None:
            return []
        [choice] = completion["choices"]
        got = {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
               "prompt_tokens": completion["usage"]["prompt_tokens"],
               "completion_tokens": completion["usage"]["completion_tokens"]}
        problems = [f"{where}.{name}: the oracle has {want[name]!r:.120}, the server {got[name]!r:.120}"
                    for name in want if got[name] != want[name]]
        if completion["usage"]["total_tokens"] != want["prompt_tokens"] + want["completion_tokens"]:
            problems.append(f"{where}.usage.total_tokens: {completion['usage']['total_tokens']}")
        return problems

    def event_problems(self, events: list[tuple[str | None, Any]], body: dict[str, Any] | None,
                       where: str) -> list[str]:
        problems, chunks = [], []
        for index, (name, data) in enumerate(events):
            at = f"{where}[{index}]"
            if name == "turn":
                problems += (self.turn_problems(data, data["job"], at) if data.get("job") in self.jobs
                             else [f"{at}: a turn event of no job the examples created ({data.get('job')!r})"])
            elif name == "done":
                problems += self.job_problems(data, at)
            elif isinstance(data, dict) and data.get("object") == "chat.completion.chunk":
                chunks.append(data)
        if chunks and body is not None and (want := self.chat(body)) is not None:
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            if text != want["content"]:
                problems.append(f"{where}: the streamed text {text!r:.120}, the oracle's {want['content']!r:.120}")
        return problems


@pytest.fixture(scope="module")
def oracle(server) -> Oracle:
    from cluster.serve.config import ServeAppConfig
    from kvcomm.engine import build_engine
    config = ServeAppConfig.from_args(server.args)
    engine = build_engine(str(server.model_dir), random_weights=True, config=config.cluster.kvcomm.to_kvcomm())
    return Oracle(engine, config.serve, config.chat_cache_bytes)


# ------------------------------------------------------------------------------------------------------------
# `kvcomm serve` in a subprocess
# ------------------------------------------------------------------------------------------------------------

def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt handler
    even when this test runs in a background job (a non-interactive shell starts those with SIGINT ignored,
    and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

class Server:
    def __init__(self, process: subprocess.Popen, url: str, model_dir: Path, args: dict[str, Any]):
        self.process, self.url, self.lines = process, url, []
        self.model_dir, self.args = model_dir, args          # its model and its application's args
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kvcomm serve exited with {self.process.returncode}:\n{self.output[-3000:]}")
            if any("[serve] ready at" in line for line in self.lines):
                return
            time.sleep(0.2)
        raise AssertionError(f"kvcomm serve not ready after {timeout_s} s:\n{self.output[-3000:]}")

    def interrupt(self, timeout_s: float = 120.0) -> int:
        """SIGINT to the server's process group (what Ctrl-C in its terminal sends); its exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self._wait(timeout_s)

    def terminate(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to the server's process alone (what `docker stop` and Kubernetes send); its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("readme-api"))


def _serve(directory: Path):
    """`kvcomm serve` of configs/local.yaml on a tiny random model, in its own session; yields it once ready."""
    from kvcomm.model_loading import hf_config_from_spec
    from kvcomm.model_spec import PRESETS
    hf_config_from_spec(PRESETS["tiny-llama"].with_(vocab_size=49152)).save_pretrained(directory / "model")
    port = free_port()
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["cluster"].update(model=str(directory / "model"), random_weights=True, cpus_per_worker=0.5,
                           threads_per_worker=1, pool_actor_name=f"readme-pool-{uuid.uuid4().hex[:8]}")
    args["serve"]["served_model_name"] = README_MODEL
    path = directory / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("KVCOMM_API_KEY", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(path), "--num-cpus",
                                "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=_sigint_default)
    server = Server(process, f"http://127.0.0.1:{port}", directory / "model", args)
    try:
        server.wait_ready(240)
        yield server
    finally:
        if process.poll() is None:
            try:
                server.interrupt(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.slow            # the server's start: ~30 s on the 2-core CPU
def test_the_readme_examples_run_against_the_server(server: Server, oracle: Oracle) -> None:
    files, examples = readme_examples()
    address = server.url.removeprefix("http://")
    last_job = None
    with httpx.Client(timeout=300) as http:
        for example in examples:
            request = parse_curl(example["command"], files)
            url = request["url"].replace(README_ADDRESS, address)
            if not url.startswith("http"):
                url = "http://" + url
            if last_job is not None:
                url = JOB_ID.sub(last_job, url)
            body = request["body"].encode() if request["body"] is not None else None
            response = http.request(request["method"], url, headers=request["headers"], content=body)
            where = f"{request['method']} {url}"
            assert response.status_code == example["status"], (where, response.status_code, response.text[:500])
            sent = json.loads(body) if body is not None and response.status_code < 400 else None
            route = httpx.URL(url)
            if example["lang"] == "json":
                actual = response.json()
                problems = matches(json.loads(example["response"]), actual)
                if isinstance(actual, dict) and isinstance(actual.get("id"), str) and JOB_ID.fullmatch(actual["id"]):
                    last_job = actual["id"]
                    if request["method"] == "POST":          # a new job: the oracle runs it too, in this order
                        oracle.run_job(actual["id"], sent, route.params.get("mode"))
                    problems += oracle.job_problems(actual, "$")
                elif isinstance(actual, dict) and actual.get("object") == "chat.completion":
                    problems += oracle.chat_problems(actual, sent, "$")
            else:
                shown, actual = parse_sse(example["response"]), parse_sse(response.text)
                assert [name for name, _ in actual] == [name for name, _ in shown], (where, response.text[:1000])
                problems = [p for (_, want), (_, got) in zip(shown, actual) for p in matches(want, got)]
                intro = next((data for name, data in actual if name == "job"), None)
                if request["method"] == "POST" and intro is not None:     # ?stream=true: the job, then its events
                    last_job = intro["id"]
                    oracle.run_job(intro["id"], sent, route.params.get("mode"))
                problems += oracle.event_problems(actual, sent, "$events")
            assert not problems, (where, problems, response.text[:1500])
    assert oracle.jobs, "no example created a job"


@pytest.mark.slow
def test_ctrl_c_stops_kvcomm_serve_with_one_line_and_no_traceback(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    before = len(server.lines)
    code = server.interrupt()
    after = "".join(server.lines[before:])
    assert code == 0, after
    assert "Traceback" not in server.output and "KeyboardInterrupt" not in server.output, server.output[-3000:]
    assert "[serve] shutting down" in after, after


@pytest.mark.slow
def test_sigterm_stops_kvcomm_serve_like_ctrl_c_and_leaves_no_process(tmp_path) -> None:
    serving = _serve(tmp_path)
    server = next(serving)
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    code = server.terminate()
    assert code == 0, server.output[-3000:]
    assert "[serve] SIGTERM: shutting down" in server.output and "Traceback" not in server.output
    deadline = time.monotonic() + 30
    while True:                                  # the Ray processes it started go with it
        try:
            os.killpg(server.process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the server's session are still running"
        time.sleep(0.5)
    serving.close()


@pytest.mark.slow
def test_a_sigkilled_kvcomm_serve_takes_its_local_ray_cluster_with_it(tmp_path) -> None:
    """No cleanup code runs on SIGKILL (the OOM killer, `kill -9`): Ray's GCS and raylet die with the process,
    workers follow the raylet, and `cluster.reaper` kills the agents that would linger about a minute."""
    serving = _serve(tmp_path)
    server = next(serving)
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    server.process.kill()                        # the server's process alone, not its process group
    server.process.wait(timeout=30)
    deadline, left = time.monotonic() + 30, None
    while True:
        left = session_processes(server.process.pid)
        if not left:
            break
        assert time.monotonic() < deadline, f"still running 30 s after the SIGKILL: {left}"
        time.sleep(0.5)
    serving.close()


def session_processes(session: int) -> dict[int, str]:
    """Live (not zombie) processes of a session: pid -> command name."""
    return {pid: stat.name for pid, stat in running_processes().items() if stat.session == session}
