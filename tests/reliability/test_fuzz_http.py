"""Fuzzing the HTTP API: hundreds of malformed or adversarial requests over real HTTP, never a 5xx.

Hypothesis (derandomized: the same requests on every run) generates requests of these kinds against the package's
Serve app (tests/reliability/conftest.py):

* ``job`` / ``chat``: a valid job spec or chat request with 1-3 mutations (a field deleted, replaced by any JSON
  value: wrong types, huge or negative numbers, unicode, deep nesting; an unknown field added), to ``POST /v1/jobs``
  (random ``wait`` and ``mode`` query values) or ``POST /v1/chat/completions``;
* ``raw``: bodies that are not what the route expects: random bytes, truncated JSON, NaN and Infinity, numbers out
  of range, 5000-digit integers, unpaired surrogates, nesting thousands deep, UTF-16, bodies above
  ``serve.max_body_bytes`` (with a length, or chunked);
* ``auth``: ``Authorization`` and ``X-KVCOMM-Namespace`` headers of every shape (the keys in the wrong scheme,
  random bytes, 8 KB values);
* ``route``: wrong methods and paths, random job ids and model names.

Every response must be a 2xx/4xx (429 counts: the in-flight limit is a client's business), every error body must
be the OpenAI error shape, and afterwards the server still answers a valid chat and a valid job and no in-flight
slot is leaked. The request count and the status-code histogram are printed (`report`).

The value lists (special strings and numbers, raw bodies, header shapes, paths), how a request is sent and how a
response is judged are `cluster.bench.http`'s, whose seeded corpus of the same kinds `kvcomm bench reliability`
sends (tests/reliability/test_bench_http.py); Hypothesis explores them further here. Derandomized, the requests
are the same on every run of the same code; Hypothesis also mixes in literals of the project's loaded modules, so
a code change anywhere can change the sample (and the histogram).
"""
from __future__ import annotations

import collections
import copy
import time
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.bench.fuzz import (CONTENT_TYPES, HEADER_ALPHABET, METHODS, MODE_VALUES, NAMESPACE_VALUES, ROUTE_PATHS,
                                SPECIAL_FLOATS, SPECIAL_INTS, WAIT_VALUES, _slots, auth_shapes, auth_targets,
                                oversized_bodies, raw_bodies, special_strings)
from cluster.bench.fuzz import dumps as _dumps
from cluster.bench.http import request_headers, response_problem, send

from .conftest import MODEL_NAME, App, chat_request, math_job, report


EXAMPLES = 560          # requests generated (each example sends one); the test asserts at least 500 went out

BASE_JOB = math_job("Tom has 3 apples and buys 5 more. How many apples?", agents=2, new_tokens=2, job_id="fuzz")
BASE_CHAT = chat_request("Say hi", max_tokens=2)

# ---- JSON values -------------------------------------------------------------------------------------------
SPECIAL_STRINGS = special_strings(MODEL_NAME)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10, max_value=10), st.integers(), st.integers(min_value=2 ** 60, max_value=2 ** 80),
    st.sampled_from(SPECIAL_INTS),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=30), st.sampled_from(SPECIAL_STRINGS))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _at(document: Any, path: tuple) -> Any:
    for key in path:
        document = document[key]
    return document


@st.composite
def mutated(draw, base: dict[str, Any]) -> Any:
    document = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path, key = draw(st.sampled_from(_slots(document)))
        operation = draw(st.sampled_from(["delete", "replace", "replace", "add", "wrap"]))
        if key is None:                                     # the root itself
            if operation in ("replace", "wrap"):
                document = draw(json_values) if operation == "replace" else [document]
            continue
        container = _at(document, path)
        if not isinstance(container, (dict, list)):
            continue
        if operation == "delete":
            del container[key]
        elif operation == "replace":
            container[key] = draw(json_values)
        elif operation == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
        else:
            container.append(draw(json_values))
    return document


# ---- requests ----------------------------------------------------------------------------------------------
Request = dict   # method, path, params, headers, content, kind


@st.composite
def job_requests(draw) -> Request:
    params = {}
    if draw(st.booleans()):
        params["wait"] = draw(st.sampled_from(WAIT_VALUES))
    if draw(st.integers(0, 4)) == 0:
        params["mode"] = draw(st.sampled_from(MODE_VALUES))
    body = _dumps(draw(mutated(BASE_JOB)), draw(st.booleans()))
    return Request(method="POST", path="/v1/jobs", params=params, headers={}, content=body, kind="job")


@st.composite
def chat_requests(draw) -> Request:
    body = _dumps(draw(mutated(BASE_CHAT)), draw(st.booleans()))
    return Request(method="POST", path="/v1/chat/completions", params={}, headers={}, content=body, kind="chat")


RAW_BODIES = raw_bodies(BASE_JOB, BASE_CHAT)


@st.composite
def raw_requests(draw, limit: int) -> Request:
    path = draw(st.sampled_from(["/v1/jobs", "/v1/chat/completions"]))
    choice = draw(st.integers(0, 5))
    chunked = False
    if choice == 0:
        body = draw(st.binary(max_size=300))
    elif choice == 1:
        body = draw(st.sampled_from(oversized_bodies(limit, BASE_JOB)))
        chunked = draw(st.booleans())
    else:
        body = draw(st.sampled_from(RAW_BODIES))
    headers = {"content-type": draw(st.sampled_from(CONTENT_TYPES))}
    return Request(method="POST", path=path, params={}, headers=headers, content=body, kind="raw", chunked=chunked)


header_values = st.text(alphabet=HEADER_ALPHABET, max_size=60).map(lambda v: v.strip(" \t"))


@st.composite
def auth_requests(draw, key: str, other_key: str) -> Request:
    shapes = auth_shapes(key, other_key)
    headers = {}
    shape = draw(st.integers(0, 3))
    if shape == 0:
        headers["Authorization"] = draw(st.sampled_from(shapes))
    elif shape == 1:
        headers["Authorization"] = draw(st.sampled_from(["Bearer ", "Basic ", ""])) + draw(header_values)
    elif shape == 2:
        headers["Authorization"] = f"Bearer {key}"
        headers["X-KVCOMM-Namespace"] = draw(st.one_of(header_values, st.sampled_from(NAMESPACE_VALUES)))
    else:
        headers["Authorization"] = None           # no Authorization header at all
    method, path, body = draw(st.sampled_from(auth_targets(MODEL_NAME, BASE_JOB, BASE_CHAT)))
    return Request(method=method, path=path, params={}, headers=headers, content=body, kind="auth")


path_text = st.text(max_size=40).map(lambda t: quote(t, safe=""))


@st.composite
def route_requests(draw) -> Request:
    method = draw(st.sampled_from(METHODS))
    path = draw(st.one_of(
        st.sampled_from(ROUTE_PATHS),
        path_text.map(lambda t: f"/v1/jobs/{t}"), path_text.map(lambda t: f"/v1/jobs/{t}/events"),
        path_text.map(lambda t: f"/v1/models/{t}"), path_text.map(lambda t: f"/{t}")))
    body = draw(st.sampled_from([None, b"{}", _dumps(BASE_CHAT, True)])) if method not in ("GET", "HEAD") else None
    return Request(method=method, path=path, params={}, headers={}, content=body, kind="route")


def requests_strategy(app: App) -> st.SearchStrategy:
    """One of the five kinds (st.one_of would favour its first branches much more)."""
    kinds = {"job": job_requests(), "chat": chat_requests(), "raw": raw_requests(app.limits["max_body_bytes"]),
             "auth": auth_requests(app.key, app.other_key), "route": route_requests()}
    return st.sampled_from(sorted(kinds)).flatmap(kinds.__getitem__)


def test_fuzzed_requests_never_get_a_5xx_and_the_server_keeps_serving(app: App) -> None:
    app.wait_idle()
    histogram: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    accepted: list[tuple[str, dict]] = []
    started = time.perf_counter()

    with app.client() as http:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(request=requests_strategy(app))
        def send_one(request: Request) -> None:
            response = send(http, request, app.key)
            histogram[response.status_code] += 1
            by_kind[request["kind"]][response.status_code] += 1
            # never a 5xx; errors in the OpenAI error shape, always; a 429 with the configured Retry-After
            problem = response_problem(response, request["method"], app.limits["retry_after_s"])
            assert problem is None, (request["method"], request["path"], problem, repr(request["content"])[:300])
            if response.status_code == 202:                  # a job running in the background: checked below
                accepted.append((response.json()["id"], request_headers(request, app.key)))

        send_one()

        seconds = time.perf_counter() - started
        total = sum(histogram.values())
        report("fuzz_http", {"requests": total, "seconds": round(seconds, 1),
                             "status_codes": {str(code): n for code, n in sorted(histogram.items())},
                             "by_kind": {kind: {str(c): n for c, n in sorted(counts.items())}
                                         for kind, counts in sorted(by_kind.items())}})
        assert total >= 500, histogram
        assert histogram[400] > 100 and histogram[401] > 0 and histogram[404] > 0 and histogram[413] > 0

        # every job the fuzzing started has released its in-flight slot, and none ended in a server error
        app.wait_idle()
        for job_id, headers in accepted:
            status = http.get(f"/v1/jobs/{job_id}", headers=headers).json()
            assert status["status"] in ("succeeded", "failed"), status
            assert status.get("error", {}).get("type") != "server_error", status
        # the server still serves
        chat = http.post("/v1/chat/completions", json=chat_request("Still there?", max_tokens=3))
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1, chat.text
        job = http.post("/v1/jobs", params={"wait": "true"}, json=BASE_JOB)
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text


def test_each_limit_refuses_naming_the_field_and_its_knob(app: App) -> None:
    limits = app.limits
    job = math_job("What is 2 + 2?", agents=2, new_tokens=2, job_id="limits")
    agent = job["agents"][0]
    seven = math_job("What is 2 + 2?", agents=limits["max_job_agents"] + 1, new_tokens=1)
    chat = chat_request("hi", max_tokens=2)
    cases = [
        ("/v1/jobs", seven, "agents", "max_job_agents"),
        ("/v1/jobs", {**job, "edges": [["1", "2"]] * (limits["max_job_agents"] ** 2 + 1)}, "edges", "max_job_agents"),
        ("/v1/jobs", {**job, "rounds": 7}, "rounds", "max_job_turns"),
        ("/v1/jobs", {**job, "rounds": 10 ** 18}, "rounds", "max_job_turns"),
        ("/v1/jobs", {**job, "task": "x" * (limits["max_prompt_chars"] + 1)}, "task", "max_prompt_chars"),
        ("/v1/jobs", {**job, "agents": [{**agent, "system_prompt": "s" * limits["max_prompt_chars"]},
                                        *job["agents"][1:]]}, "agents[0]", "max_prompt_chars"),
        ("/v1/jobs", {**job, "agents": [job["agents"][0], {**job["agents"][1], "generation": {
            "max_new_tokens": limits["max_output_tokens"] + 1}}]}, "agents[1].generation.max_new_tokens",
         "max_output_tokens"),
        ("/v1/jobs", {**job, "generation": {"max_new_tokens": limits["max_output_tokens"] + 1},   # the job's default
                      "agents": [{k: v for k, v in a.items() if k != "generation"} for a in job["agents"]]},
         "agents[0].generation.max_new_tokens", "max_output_tokens"),
        ("/v1/jobs", {**job, "agents": [{**agent, "generation": {**agent["generation"], "seed": 2 ** 64}}, *job["agents"][1:]]},
         "agents[0].generation.seed", None),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "m" * limits["max_prompt_chars"]}]},
         "messages", "max_prompt_chars"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user"}] * (limits["max_prompt_chars"] // 4 + 1)},
         "messages", "max_prompt_chars"),
        ("/v1/chat/completions", {**chat, "max_tokens": limits["max_output_tokens"] + 1}, "max_tokens",
         "max_output_tokens"),
        ("/v1/chat/completions", {**chat, "max_tokens": None, "max_completion_tokens": 10 ** 30},
         "max_completion_tokens", "max_output_tokens"),
        ("/v1/chat/completions", {**chat, "seed": 2 ** 64}, "seed", None),
    ]
    with app.client() as http:
        for path, body, field, knob in cases:
            response = http.post(path, json=body)
            assert response.status_code == 400, (field, response.status_code, response.text)
            error = response.json()["error"]
            assert error["param"] == field and error["message"].startswith(f"{field}: "), (field, error)
            if knob is not None:
                assert f"(serve.{knob}" in error["message"] and error["code"] == "limit_exceeded", (field, error)
        within = http.post("/v1/jobs", params={"wait": "true"}, json={**job, "rounds": 1})
        assert within.status_code == 200 and within.json()["status"] == "succeeded", within.text

