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
"""
from __future__ import annotations

import collections
import copy
import json
import string
import time
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MODEL_NAME, App, chat_request, math_job, report

pytestmark = [pytest.mark.ray, pytest.mark.reliability]

EXAMPLES = 560          # requests generated (each example sends one); the test asserts at least 500 went out

BASE_JOB = math_job("Tom has 3 apples and buys 5 more. How many apples?", agents=2, new_tokens=2, job_id="fuzz")
BASE_CHAT = chat_request("Say hi", max_tokens=2)

# ---- JSON values -------------------------------------------------------------------------------------------
SPECIAL_STRINGS = ["", " ", "\x00", "null", "dense", "kvcomm", "turbo", "{user_question}", "{agent_1_current}",
                   "{agent_9_history}", "{bogus}", "💥" * 20, "é" * 300, "\u202e\u200b", "a" * 5000, "1", "-1",
                   MODEL_NAME, "system", "user", "assistant", "python", "../../etc/passwd", "<script>"]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10, max_value=10), st.integers(), st.integers(min_value=2 ** 60, max_value=2 ** 80),
    st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 2.5]),
    st.text(max_size=30), st.sampled_from(SPECIAL_STRINGS))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _slots(document: Any, path: tuple = ()) -> list[tuple]:
    """Every (path to a container, key) in `document`, the root included as ((), None)."""
    found = [(path, None)] if not path else []
    if isinstance(document, dict):
        for key, value in document.items():
            found.append((path, key))
            found.extend(_slots(value, path + (key,)))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.append((path, index))
            found.extend(_slots(value, path + (index,)))
    return found


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


def _dumps(document: Any, ascii_only: bool) -> bytes:
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# ---- requests ----------------------------------------------------------------------------------------------
Request = dict   # method, path, params, headers, content, kind


@st.composite
def job_requests(draw) -> Request:
    params = {}
    if draw(st.booleans()):
        params["wait"] = draw(st.sampled_from(["true", "1", "", "false", "maybe", "TRUE", "yes"]))
    if draw(st.integers(0, 4)) == 0:
        params["mode"] = draw(st.sampled_from(["dense", "kvcomm", "turbo", "", "DENSE", "dense\x00"]))
    body = _dumps(draw(mutated(BASE_JOB)), draw(st.booleans()))
    return Request(method="POST", path="/v1/jobs", params=params, headers={}, content=body, kind="job")


@st.composite
def chat_requests(draw) -> Request:
    body = _dumps(draw(mutated(BASE_CHAT)), draw(st.booleans()))
    return Request(method="POST", path="/v1/chat/completions", params={}, headers={}, content=body, kind="chat")


def _oversized(limit: int) -> list[bytes]:
    inner = b"1," * (limit // 2 + 64)
    return [b"[" + inner + b"1]", json.dumps({**BASE_JOB, "task": "x" * (limit + 10)}).encode()]


RAW_BODIES = [b"", b" ", b"{", b"[", b"}", b"null", b"true", b"0", b'"a job"', b"[]", b"{}", b'{"agents": [',
              b"NaN", b"Infinity", b'{"rounds": -Infinity}', b'{"temperature": NaN}', b"[1e999]", b"-1e400",
              b"9" * 5000, b'{"max_tokens": ' + b"9" * 4400 + b"}", b'{"a": "\\ud800"}', b'"\\udfff"',
              b"[" * 5000 + b"]" * 5000, b"[" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70,
              '{"task": "é"}'.encode("utf-16"), b"\xff\xfe\x00", b"\xc3\x28", b"\x00" * 64,
              json.dumps(BASE_JOB)[:-7].encode(), json.dumps(BASE_CHAT)[:20].encode(),
              json.dumps([BASE_JOB, BASE_JOB]).encode(), json.dumps({"job": BASE_JOB}).encode()]


@st.composite
def raw_requests(draw, limit: int) -> Request:
    path = draw(st.sampled_from(["/v1/jobs", "/v1/chat/completions"]))
    choice = draw(st.integers(0, 5))
    chunked = False
    if choice == 0:
        body = draw(st.binary(max_size=300))
    elif choice == 1:
        body = draw(st.sampled_from(_oversized(limit)))
        chunked = draw(st.booleans())
    else:
        body = draw(st.sampled_from(RAW_BODIES))
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-"
                                                     "urlencoded", "multipart/form-data; boundary=x", ""]))}
    return Request(method="POST", path=path, params={}, headers=headers, content=body, kind="raw", chunked=chunked)


HEADER_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA0, 0x100)] + [" ", "\t"]
header_values = st.text(alphabet=HEADER_ALPHABET, max_size=60).map(lambda v: v.strip(" \t"))


@st.composite
def auth_requests(draw, key: str, other_key: str) -> Request:
    shapes = [f"Bearer {key}", f"bearer {key}", f"BEARER   {key}", f"Basic {key}", key, f"Bearer{key}",
              f"Bearer {key} {key}", f"Bearer {key[:-1]}", f"Bearer {other_key}", "Bearer", "Bearer ", "",
              "Bearer " + "k" * 8000, f"Token {other_key}"]
    headers = {}
    shape = draw(st.integers(0, 3))
    if shape == 0:
        headers["Authorization"] = draw(st.sampled_from(shapes))
    elif shape == 1:
        headers["Authorization"] = draw(st.sampled_from(["Bearer ", "Basic ", ""])) + draw(header_values)
    elif shape == 2:
        headers["Authorization"] = f"Bearer {key}"
        headers["X-KVCOMM-Namespace"] = draw(st.one_of(header_values, st.sampled_from(
            ["a" * 64, "a" * 65, "-x", "ok.name:1", "team a", "tëam", "x/y"])))
    else:
        headers["Authorization"] = None           # no Authorization header at all
    method, path, body = draw(st.sampled_from([
        ("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL_NAME}", None), ("GET", "/metrics", None),
        ("GET", "/v1/jobs/job-0123456789abcdef", None), ("GET", "/v1/jobs/job-0123456789abcdef/events", None),
        ("POST", "/v1/jobs", _dumps(BASE_JOB, True)), ("POST", "/v1/chat/completions", _dumps(BASE_CHAT, True)),
        ("GET", "/healthz", None)]))
    return Request(method=method, path=path, params={}, headers=headers, content=body, kind="auth")


path_text = st.text(max_size=40).map(lambda t: quote(t, safe=""))


@st.composite
def route_requests(draw) -> Request:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = draw(st.one_of(
        st.sampled_from(["/", "/v1", "/v1/", "/v1/jobs", "/v1/jobs/", "/v1/chat/completions", "/v1/models",
                         "/v1/models/", "/healthz", "/metrics", "/v1/completions", "/v1/embeddings", "/docs",
                         "/openapi.json", "//v1//jobs", "/v1/jobs/%2e%2e/%2e%2e/metrics", "/V1/JOBS",
                         "/v1/chat/completions/", "/v1/jobs/x/events/extra", "/-/routes", "/-/healthz"]),
        path_text.map(lambda t: f"/v1/jobs/{t}"), path_text.map(lambda t: f"/v1/jobs/{t}/events"),
        path_text.map(lambda t: f"/v1/models/{t}"), path_text.map(lambda t: f"/{t}")))
    body = draw(st.sampled_from([None, b"{}", _dumps(BASE_CHAT, True)])) if method not in ("GET", "HEAD") else None
    return Request(method=method, path=path, params={}, headers={}, content=body, kind="route")


def requests_strategy(app: App) -> st.SearchStrategy:
    """One of the five kinds (st.one_of would favour its first branches much more)."""
    kinds = {"job": job_requests(), "chat": chat_requests(), "raw": raw_requests(app.limits["max_body_bytes"]),
             "auth": auth_requests(app.key, app.other_key), "route": route_requests()}
    return st.sampled_from(sorted(kinds)).flatmap(kinds.__getitem__)


def _chunks(body: bytes):
    for start in range(0, len(body), 16384):
        yield body[start:start + 16384]


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
        def send(request: Request) -> None:
            headers = {"Authorization": http.headers["Authorization"]}
            headers.update(request["headers"])
            headers = {name: value.strip(" \t").encode("latin-1") for name, value in headers.items() if value is not None}
            content = request["content"]
            if request.get("chunked") and content is not None:
                content = _chunks(content)
            response = http.request(request["method"], request["path"], params=request["params"],
                                    headers=headers, content=content)
            histogram[response.status_code] += 1
            by_kind[request["kind"]][response.status_code] += 1
            assert response.status_code < 500, (request["method"], request["path"], response.status_code,
                                                 response.text[:500], repr(request["content"])[:300])
            if response.status_code >= 400 and request["method"] != "HEAD":
                error = response.json()["error"]             # the OpenAI error shape, always
                assert isinstance(error["message"], str) and error["message"] and "type" in error, error
            if response.status_code == 429:
                assert response.headers["retry-after"] == str(app.limits["retry_after_s"])
            if response.status_code == 202:                  # a job running in the background: checked below
                accepted.append((response.json()["id"], headers))

        send()

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

