"""`absorber serve`'s requests: bodies of every JSON shape and bytes that are not JSON, headers,
paths, methods, and streaming clients that go away after the first event.

Contract: a 2xx, or a 4xx (429 and 504 included) with an OpenAI-style error body
{"error": {"message": str, ...}}; never a 5xx; the memory of the session a refused request names
unchanged; the server still answering afterwards.
"""

from __future__ import annotations

import atexit
import functools
import json
from urllib.parse import quote, unquote

from hypothesis import strategies as st

from .contract import EDGE_FLOATS, EDGE_INTS, Reader, snapshot, violate
from .fixtures import SHIPPED, SMALL

NAME = "server_requests"
MODEL = "absorber-tiny"
ROUTES = (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/sessions/{sid}"), ("DELETE", "/v1/sessions/{sid}"), ("POST", "/v1/sessions/{sid}/absorb"),
          ("PUT", "/v1/completions"), ("GET", "/v1/nothing"))
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "user", "n",
          "text", "tokens", "flush", "stream_options", "logprobs", "recite")
SESSIONS = ("keep", "other", "", "a" * 300, "x\ny", "../etc", "%00", "ünï")
MESSAGES = ([], [{"role": "user", "content": "Hi"}], [{"role": "system", "content": "The key is 7."},
                                                     {"role": "user", "content": "Key?"}],
            [{"role": "wizard", "content": "x"}], [{"content": "x"}], [{"role": "user", "content": 7}], ["x"], [None])
# "\ud800" (a lone surrogate) and "用户" (an id no HTTP header carries) each once made a 500.
VALUES = (None, True, False, 0, 1, 2, 3, -1, 0.5, 1.5, "", "x", MODEL, "The key is", "\ud800", "用户", [], [1, 2],
          [5, 6, 7], [49999999], ["a", "b"], ["a"] * 9, {}, {"a": 1}, {"include_usage": True}, *MESSAGES,
          *EDGE_INTS, *EDGE_FLOATS)
HEADERS = ({}, {"X-Absorber-Session": "keep"}, {"X-Absorber-Session": "other"}, {"X-Absorber-Session": ""},
           {"X-Absorber-Session": "a" * 300}, {"Content-Type": "text/plain"}, {"Content-Type": "application/json"})
MAX_BODY = 16 * 1024
# A valid body of either endpoint (each ignores the other's field), which examples then mutate, so
# the requests that reach the engine are fuzzed too, not only the ones refused at the door.
VALID = {"model": MODEL, "max_tokens": 2, "prompt": "The key is", "messages": MESSAGES[2]}


@functools.lru_cache(maxsize=None)
def server():
    """One in-process server over the shipped model (small rounds), and a session "keep" with memory."""
    from fastapi.testclient import TestClient

    from absorber_engine import AbsorberConfig, AbsorberEngine
    from absorber_engine.serve.app import ServeConfig, create_app

    engine = AbsorberEngine.from_pretrained(SHIPPED, config=AbsorberConfig(**SMALL))
    app = create_app(engine, ServeConfig(MODEL, max_body_bytes=MAX_BODY, timeout_s=60))
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()                     # starts the engine's worker
    atexit.register(_close, client)
    r = client.post("/v1/sessions/keep/absorb", json={"text": "The pass key is 71432. Anna lives in Oslo. " * 3})
    assert r.status_code == 200, r.text
    return client, engine


def _close(client) -> None:
    try:
        client.__exit__(None, None, None)
    except RuntimeError:                   # the interpreter is already shutting its threads down
        pass


def _path(template: str, sid: str) -> str:
    # Clients percent-encode what they put in a path; the server must cope with whatever that decodes to.
    return template.replace("{sid}", quote(sid, safe=""))


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    method, path = r.choice(ROUTES)
    kind = r.int_in(0, 3)
    if kind == 0:
        body = {"raw": r.rest()[:MAX_BODY + 64]}
    else:
        fields = dict(VALID) if r.bool() else {}
        for _ in range(r.int_in(0, 3)):
            fields[r.choice(FIELDS)] = r.choice(VALUES)
        body = {"json": fields if kind != 3 else r.choice(VALUES)}
    return {"method": method, "path": _path(path, r.choice(SESSIONS)), "headers": r.choice(HEADERS),
            "stream_away": r.bool(), **body}


def strategy():
    json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
    json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                     st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3)), max_leaves=8)
    values = st.one_of(st.sampled_from(VALUES), json_values)
    fields = st.builds(lambda base, extra: {**(VALID if base else {}), **extra},
                       st.booleans(), st.dictionaries(st.sampled_from(FIELDS), values, max_size=2))
    route = st.sampled_from(ROUTES)
    sid = st.one_of(st.sampled_from(SESSIONS), st.text(max_size=12))
    as_json = fields.map(lambda f: {"json": f})
    body = st.one_of(as_json, as_json, as_json, json_values.map(lambda v: {"json": v}),
                     st.binary(max_size=64).map(lambda b: {"raw": b}),
                     st.just({"raw": b"{" * (MAX_BODY + 1)}),
                     st.just({"raw": b'{"model": ' + b"[" * 5000}))          # nested past json's recursion
    return st.builds(lambda r, s, b, h, away: {"method": r[0], "path": _path(r[1], s), "headers": h,
                                               "stream_away": away, **b},
                     route, sid, body, st.sampled_from(HEADERS), st.booleans())


def _session_named(inp: dict) -> str | None:
    """"keep" when the request acts on it: the path names the session for /v1/sessions/..., the
    header (or the body's `user`) for the completions."""
    if inp["path"].startswith("/v1/sessions/"):
        sid = unquote(inp["path"].split("/")[3])
    else:
        sid = inp["headers"].get("X-Absorber-Session")
        if sid is None and isinstance(inp.get("json"), dict):
            sid = inp["json"].get("user")
    return "keep" if sid == "keep" else None


def check(inp: dict) -> None:
    client, engine = server()
    named = _session_named(inp)
    before = snapshot(engine.sessions["u:keep"]) if named else None
    content = inp["raw"] if "raw" in inp else json.dumps(inp["json"], default=repr).encode()
    headers = {"Content-Type": "application/json", **inp["headers"]}
    what = f"{inp['method']} {inp['path']!r:.60} {content[:160]!r}"
    streaming = isinstance(inp.get("json"), dict) and inp["json"].get("stream") is True and inp["stream_away"]
    if streaming:
        # A client that reads the first event and goes away: the server must serve on.
        with client.stream(inp["method"], inp["path"], content=content, headers=headers) as r:
            status = r.status_code
            for _ in r.iter_lines():
                break
            body = None
    else:
        r = client.request(inp["method"], inp["path"], content=content, headers=headers)
        status, body = r.status_code, r.content
    if status >= 500:
        violate(f"{what}: answered {status}: {body!r:.300}")
    if status >= 400 and body is not None:
        try:
            err = json.loads(body)["error"]
            assert isinstance(err["message"], str) and err["message"]
        except Exception:
            violate(f"{what}: a {status} without an OpenAI-style error body: {body!r:.300}")
        if named and inp["method"] != "DELETE" and snapshot(engine.sessions["u:keep"]) != before:
            violate(f"{what}: refused with {status}, but the session's memory changed")
    if named and inp["method"] == "DELETE" and status < 300:
        r = client.post("/v1/sessions/keep/absorb", json={"text": "The pass key is 71432. " * 3})
        if r.status_code != 200:
            violate(f"{what}: the session could not be opened again ({r.status_code})")
    if client.get("/v1/models").status_code != 200:
        violate(f"{what}: the server stopped answering")
