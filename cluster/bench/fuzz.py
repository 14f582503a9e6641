"""The fuzz corpus of `kvcomm bench reliability`: malformed and adversarial requests for the HTTP service.

`fuzz_corpus` is a seeded (`random.Random`) corpus of the kinds tests/reliability/test_fuzz_http.py generates with
Hypothesis (which shares this module's value lists): ``job`` / ``chat`` (a valid job or chat with 1-3 mutations: a
field deleted, replaced by any JSON value, wrapped in a list, or an unknown one added), ``raw`` (bodies that are not
what the route expects: random bytes, truncated JSON, NaN, 5000-digit integers, surrogates, deep nesting, UTF-16,
bodies above the size limit with a length or chunked), ``auth`` (``Authorization`` / ``X-KVCOMM-Namespace``
headers of every shape) and ``route`` (wrong methods and paths). The same seed gives the same requests. Sending
and judging them is `cluster.bench.http`'s.
"""
from __future__ import annotations

import copy
import json
import random
from typing import Any
from urllib.parse import quote

from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

NAMESPACE_HEADER = "X-KVCOMM-Namespace"     # as cluster.serve.http (not imported: it pulls in Serve)
KINDS = ("auth", "chat", "job", "raw", "route")

# ------------------------------------------------------------------------------------------------------------
# Shared values (tests/reliability/test_fuzz_http.py draws from these same lists)
# ------------------------------------------------------------------------------------------------------------
SPECIAL_STRINGS = ["", " ", "\x00", "null", "dense", "kvcomm", "turbo", "{user_question}", "{agent_1_current}",
                   "{agent_9_history}", "{bogus}", "💥" * 20, "é" * 300, "\u202e\u200b", "a" * 5000, "1", "-1",
                   "system", "user", "assistant", "python", "../../etc/passwd", "<script>"]
SPECIAL_INTS = [0, -1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]
SPECIAL_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, 2.5]
WAIT_VALUES = ["true", "1", "", "false", "maybe", "TRUE", "yes"]
MODE_VALUES = ["dense", "kvcomm", "turbo", "", "DENSE", "dense\x00"]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", ""]
NAMESPACE_VALUES = ["a" * 64, "a" * 65, "-x", "ok.name:1", "team a", "tëam", "x/y"]
ROUTE_PATHS = ["/", "/v1", "/v1/", "/v1/jobs", "/v1/jobs/", "/v1/chat/completions", "/v1/models",
               "/v1/models/", "/healthz", "/metrics", "/v1/completions", "/v1/embeddings", "/docs",
               "/openapi.json", "//v1//jobs", "/v1/jobs/%2e%2e/%2e%2e/metrics", "/V1/JOBS",
               "/v1/chat/completions/", "/v1/jobs/x/events/extra", "/-/routes", "/-/healthz"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
UNKNOWN_JOB_ID = "job-0123456789abcdef"
HEADER_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA0, 0x100)] + [" ", "\t"]


def special_strings(model: str) -> list[str]:
    return SPECIAL_STRINGS[:17] + [model] + SPECIAL_STRINGS[17:]


def base_job(job_id: str = "fuzz", new_tokens: int = 2) -> dict[str, Any]:
    """The valid job the corpus mutates: two math agents, `new_tokens` tokens each."""
    return build_job("math", "Tom has 3 apples and buys 5 more. How many apples?", num_agents=2, mode="dense",
                     job_id=job_id, generation=GenerationParams(max_new_tokens=new_tokens,
                                                                min_new_tokens=new_tokens)).to_dict()


def base_chat(model: str, content: str = "Say hi", max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def dumps(document: Any, ascii_only: bool) -> bytes:
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def raw_bodies(job: dict[str, Any], chat: dict[str, Any]) -> list[bytes]:
    """Bodies that are not what a route expects (JSON that is malformed, out of range, too deep, not UTF-8...)."""
    return [b"", b" ", b"{", b"[", b"}", b"null", b"true", b"0", b'"a job"', b"[]", b"{}", b'{"agents": [',
            b"NaN", b"Infinity", b'{"rounds": -Infinity}', b'{"temperature": NaN}', b"[1e999]", b"-1e400",
            b"9" * 5000, b'{"max_tokens": ' + b"9" * 4400 + b"}", b'{"a": "\\ud800"}', b'"\\udfff"',
            b"[" * 5000 + b"]" * 5000, b"[" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70,
            '{"task": "é"}'.encode("utf-16"), b"\xff\xfe\x00", b"\xc3\x28", b"\x00" * 64,
            json.dumps(job)[:-7].encode(), json.dumps(chat)[:20].encode(),
            json.dumps([job, job]).encode(), json.dumps({"job": job}).encode()]


def oversized_bodies(limit: int, job: dict[str, Any]) -> list[bytes]:
    """Two bodies above `limit` bytes (serve.max_body_bytes): a long array, a job with a long task."""
    inner = b"1," * (limit // 2 + 64)
    return [b"[" + inner + b"1]", json.dumps({**job, "task": "x" * (limit + 10)}).encode()]


def auth_shapes(key: str, other_key: str) -> list[str]:
    """``Authorization`` values: the right key in wrong shapes, the other key, truncated and huge ones."""
    return [f"Bearer {key}", f"bearer {key}", f"BEARER   {key}", f"Basic {key}", key, f"Bearer{key}",
            f"Bearer {key} {key}", f"Bearer {key[:-1]}", f"Bearer {other_key}", "Bearer", "Bearer ", "",
            "Bearer " + "k" * 8000, f"Token {other_key}"]


def auth_targets(model: str, job: dict[str, Any], chat: dict[str, Any]) -> list[tuple[str, str, bytes | None]]:
    """(method, path, body) of every route, for the auth requests."""
    return [("GET", "/v1/models", None), ("GET", f"/v1/models/{model}", None), ("GET", "/metrics", None),
            ("GET", f"/v1/jobs/{UNKNOWN_JOB_ID}", None), ("GET", f"/v1/jobs/{UNKNOWN_JOB_ID}/events", None),
            ("POST", "/v1/jobs", dumps(job, True)), ("POST", "/v1/chat/completions", dumps(chat, True)),
            ("GET", "/healthz", None)]


# ------------------------------------------------------------------------------------------------------------
# The seeded corpus
# ------------------------------------------------------------------------------------------------------------
_TEXT_RANGES = [(0x20, 0x7E), (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x370, 0x3FF), (0x4E00, 0x4E80),
                (0x1F300, 0x1F64F), (0x200B, 0x202E), (0xFFF0, 0xFFFF)]


def _text(rng: random.Random, max_size: int, min_size: int = 0) -> str:
    chars = []
    for _ in range(rng.randint(min_size, max_size)):
        low, high = rng.choice(_TEXT_RANGES)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _scalar(rng: random.Random, strings: list[str]) -> Any:
    pick = rng.randrange(11)
    return [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-10, 10),
            lambda: rng.randint(-2 ** 64, 2 ** 64), lambda: rng.randint(2 ** 60, 2 ** 80),
            lambda: rng.choice(SPECIAL_INTS), lambda: rng.uniform(-1e9, 1e9), lambda: rng.choice(SPECIAL_FLOATS),
            lambda: _text(rng, 30), lambda: rng.choice(strings), lambda: rng.choice(strings)][pick]()


def _json_value(rng: random.Random, strings: list[str], depth: int = 0) -> Any:
    if depth >= 3 or rng.random() < 0.7:
        return _scalar(rng, strings)
    if rng.random() < 0.5:
        return [_json_value(rng, strings, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _json_value(rng, strings, depth + 1) for _ in range(rng.randint(0, 4))}


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


def mutate(rng: random.Random, document: Any, strings: list[str]) -> Any:
    """`document` (a copy) with 1-3 mutations: a field deleted, replaced by any JSON value, wrapped in a list, or
    a new field (or element) added; the root itself may be replaced or wrapped."""
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        path, key = rng.choice(_slots(document))
        operation = rng.choice(["delete", "replace", "replace", "add", "wrap"])
        if key is None:
            if operation in ("replace", "wrap"):
                document = _json_value(rng, strings) if operation == "replace" else [document]
            continue
        container = document
        for part in path:
            container = container[part]
        if not isinstance(container, (dict, list)):
            continue
        if operation == "delete":
            del container[key]
        elif operation == "replace":
            container[key] = _json_value(rng, strings)
        elif operation == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[_text(rng, 12, min_size=1)] = _json_value(rng, strings)
        else:
            container.append(_json_value(rng, strings))
    return document


def _request(method: str, path: str, kind: str, content: bytes | None = None, params: dict | None = None,
             headers: dict | None = None, chunked: bool = False) -> dict[str, Any]:
    return {"method": method, "path": path, "params": params or {}, "headers": headers or {}, "content": content,
            "kind": kind, "chunked": chunked}


def fuzz_corpus(count: int, *, seed: int = 0, key: str = "", other_key: str = "", model: str = "model",
                max_body_bytes: int = 1 << 20, job: dict[str, Any] | None = None,
                chat: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`count` malformed or adversarial requests (dicts: method, path, params, headers, content, kind, chunked),
    the five kinds drawn uniformly; the same arguments give the same corpus."""
    rng = random.Random(seed)
    job = job if job is not None else base_job()
    chat = chat if chat is not None else base_chat(model)
    strings = special_strings(model)
    raws, oversized = raw_bodies(job, chat), oversized_bodies(max_body_bytes, job)
    shapes, targets = auth_shapes(key, other_key), auth_targets(model, job, chat)
    corpus = []
    for _ in range(count):
        kind = rng.choice(KINDS)
        if kind == "job":
            params = {}
            if rng.random() < 0.5:
                params["wait"] = rng.choice(WAIT_VALUES)
            if rng.randrange(5) == 0:
                params["mode"] = rng.choice(MODE_VALUES)
            body = dumps(mutate(rng, job, strings), rng.random() < 0.5)
            corpus.append(_request("POST", "/v1/jobs", kind, body, params=params))
        elif kind == "chat":
            corpus.append(_request("POST", "/v1/chat/completions", kind,
                                   dumps(mutate(rng, chat, strings), rng.random() < 0.5)))
        elif kind == "raw":
            path = rng.choice(["/v1/jobs", "/v1/chat/completions"])
            choice, chunked = rng.randrange(6), False
            if choice == 0:
                body = rng.randbytes(rng.randint(0, 300))
            elif choice == 1:
                body, chunked = rng.choice(oversized), rng.random() < 0.5
            else:
                body = rng.choice(raws)
            corpus.append(_request("POST", path, kind, body, headers={"content-type": rng.choice(CONTENT_TYPES)},
                                   chunked=chunked))
        elif kind == "auth":
            headers: dict[str, str | None] = {}
            shape = rng.randrange(4)
            if shape == 0:
                headers["Authorization"] = rng.choice(shapes)
            elif shape == 1:
                noise = "".join(rng.choice(HEADER_ALPHABET) for _ in range(rng.randint(0, 60))).strip(" \t")
                headers["Authorization"] = rng.choice(["Bearer ", "Basic ", ""]) + noise
            elif shape == 2:
                headers["Authorization"] = f"Bearer {key}"
                headers[NAMESPACE_HEADER] = (rng.choice(NAMESPACE_VALUES) if rng.random() < 0.5 else "".join(
                    rng.choice(HEADER_ALPHABET) for _ in range(rng.randint(0, 60))).strip(" \t"))
            else:
                headers["Authorization"] = None                 # no Authorization header at all
            method, path, body = rng.choice(targets)
            corpus.append(_request(method, path, kind, body, headers=headers))
        else:
            method = rng.choice(METHODS)
            choice = rng.randrange(5)
            text = quote(_text(rng, 40), safe="")
            path = [rng.choice(ROUTE_PATHS), f"/v1/jobs/{text}", f"/v1/jobs/{text}/events", f"/v1/models/{text}",
                    f"/{text}"][choice]
            body = rng.choice([None, b"{}", dumps(chat, True)]) if method not in ("GET", "HEAD") else None
            corpus.append(_request(method, path, kind, body))
    return corpus
