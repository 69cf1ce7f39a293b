"""absorber serve, through the real `openai` client and raw HTTP: completions, chat, streaming,
sessions that grow far past the window, and every kind of bad request (the README's table)."""

import json
import re
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from absorber_engine import AbsorberConfig, AbsorberEngine  # noqa: E402
from absorber_engine.model_store import recommended_config  # noqa: E402
from absorber_engine.serve.app import ServeConfig  # noqa: E402
from absorber_engine.serve.launch import BackgroundServer  # noqa: E402
from absorber_engine.serve.prompts import COMPLETION_HOLD  # noqa: E402

MODEL = str(Path(__file__).resolve().parents[2] / "model" / "absorber-tiny")
NAME = "absorber-tiny"
# Small rounds, so a conversation passes the window many times in a few seconds on one core.
SMALL = dict(chunk_tokens=32, sync_tokens=16, rank=4, max_steps=2, lr=5e-4, futures=0, future_tokens=None,
             future_prompt="", probes=0)
WINDOW = SMALL["chunk_tokens"] + SMALL["sync_tokens"]
DOC = ("The pass key is 71432. Remember it. Anna lives in Oslo and keeps 3 cats. The red door opens at 9. "
       "Bruno's number is 5570. The river is called Tessa. ")
FILLER = "The grass is green. The sky is blue. Here we go again. "


def small_config(**changes) -> AbsorberConfig:
    return AbsorberConfig.from_dict({**recommended_config(MODEL).to_dict(), **SMALL, **changes})


def small_engine(**changes) -> AbsorberEngine:
    return AbsorberEngine.from_pretrained(MODEL, config=small_config(**changes))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServeConfig(NAME, state_dir=str(tmp_path_factory.mktemp("state")), max_body_bytes=64 * 1024,
                      timeout_s=120)
    with BackgroundServer(small_engine(), cfg) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_and_plain_requests(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt="The pass key is 71432. The pass key is", max_tokens=6,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.choices[0].text
    again = client.completions.create(model=NAME, prompt="The pass key is 71432. The pass key is", max_tokens=6,
                                      temperature=0)
    assert again.choices[0].text == r.choices[0].text
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": DOC},
                                                                {"role": "user", "content": "What is the pass key?"}],
                                          max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 5 and isinstance(chat.choices[0].message.content, str)
    # Without a session a prompt longer than the window is read through the window, statelessly.
    raw = httpx.post(server + "/v1/completions", json={"model": NAME, "prompt": FILLER * 20, "max_tokens": 3,
                                                       "temperature": 0})
    assert raw.status_code == 200 and "x-absorber-session" not in raw.headers


def test_stop_sequences_and_seeded_sampling(client):
    greedy = client.completions.create(model=NAME, prompt=DOC + "The pass key is", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert len(text) > 2
    stop = text[2:4]
    cut = client.completions.create(model=NAME, prompt=DOC + "The pass key is", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # usage counts the tokens up to the stop sequence, as the streamed answer does (it counted all 12)
    streamed = list(client.completions.create(model=NAME, prompt=DOC + "The pass key is", max_tokens=12,
                                              temperature=0, stop=[stop], stream=True,
                                              stream_options={"include_usage": True}))
    assert cut.usage.completion_tokens == streamed[-1].usage.completion_tokens < 12
    kw = dict(model=NAME, prompt=DOC + "Anna lives in", max_tokens=12, temperature=1.0, top_p=0.9)
    a = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 1, 2, 3)]
    assert a[0] == a[1] and len(set(a)) > 1


def test_streaming_equals_the_whole_answer(client):
    for kw in (dict(temperature=0), dict(temperature=0, stop=[" 7"]), dict(temperature=1.0, top_p=0.9, seed=5)):
        whole = client.completions.create(model=NAME, prompt=DOC + "The pass key is", max_tokens=20, **kw)
        parts = list(client.completions.create(model=NAME, prompt=DOC + "The pass key is", max_tokens=20,
                                               stream=True, **kw))
        assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
        assert len([p for p in parts if p.choices[0].text]) > 3         # token by token, not in one piece
        assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "system", "content": DOC}, {"role": "user", "content": "Where does Anna live?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_session_grows_past_the_window_in_flat_memory_and_answers_as_the_engine_does(client, server):
    """A conversation of ~15x the window through one session: held memory stays bounded by the
    window, and the final answer about its first sentence equals the engine's own, given the same
    tokens to absorb and the same generation prompt."""
    hdr = {"X-Absorber-Session": "long"}
    prompt, infos = DOC, []
    for turn in range(12):
        raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                                          extra_headers=hdr)
        assert raw.headers["x-absorber-session-reset"] == "false"
        prompt += raw.parse().choices[0].text + " " + FILLER * 3
        infos.append(httpx.get(f"{server}/v1/sessions/long").json())
    question = prompt + "The pass key is"
    final = client.completions.create(model=NAME, prompt=question, max_tokens=8, temperature=0, extra_headers=hdr)
    info = httpx.get(f"{server}/v1/sessions/long").json()

    cfg = json.loads((Path(MODEL) / "config.json").read_text())
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    bound = infos[0]["held_bytes"]["delta"] + (WINDOW + 1) * kv_per_token + 8 * WINDOW
    assert info["absorbed_tokens"] >= 12 * WINDOW and info["rounds"] >= 18
    for i in infos + [info]:
        assert i["held_tokens"] <= WINDOW
        assert i["held_bytes"]["delta"] == infos[0]["held_bytes"]["delta"]
        assert i["held_bytes"]["total"] <= bound
    assert bound < 0.2 * info["conversation_tokens"] * kv_per_token      # what a full KV cache would hold

    eng = small_engine()
    ids = list(eng.tokenizer.encode(question, add_special_tokens=False))
    sess = eng.session("direct")
    sess.absorb(ids[:-COMPLETION_HOLD])
    assert sess.absorbed_tokens == info["absorbed_tokens"] and sess.held_tokens == info["held_tokens"]
    direct = sess.generate(ids[-COMPLETION_HOLD:], max_new_tokens=8, stop=[eng.tokenizer.eos_token_id])
    assert final.choices[0].text == eng.tokenizer.decode(direct, skip_special_tokens=True)


def test_chat_session_feeds_only_what_is_new_and_restarts_on_an_edited_history(client, server):
    hdr = {"X-Absorber-Session": "chat"}
    messages = [{"role": "system", "content": DOC}]
    fed = []
    for q in ("What is the pass key?", "Where does Anna live?", "What is the river called?"):
        messages.append({"role": "user", "content": q})
        raw = client.chat.completions.with_raw_response.create(model=NAME, messages=messages, max_tokens=6,
                                                               temperature=0, extra_headers=hdr)
        assert raw.headers["x-absorber-session-reset"] == "false"
        fed.append(int(raw.headers["x-absorber-fed-tokens"]))
        messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
    before = httpx.get(f"{server}/v1/sessions/chat").json()
    # Later turns feed only their own new tokens: far fewer than the whole history.
    assert fed[1] < fed[0] and fed[2] < fed[0] and before["conversation_tokens"] == sum(fed)

    edited = [{"role": "system", "content": DOC.replace("71432", "11111")}] + messages[1:]
    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=edited, max_tokens=6, temperature=0,
                                                           extra_headers=hdr)
    assert raw.headers["x-absorber-session-reset"] == "true"
    after = httpx.get(f"{server}/v1/sessions/chat").json()
    assert after["conversation_tokens"] == int(raw.headers["x-absorber-fed-tokens"])
    # Started over: the whole edited history was fed again, on a fresh memory.
    assert after["conversation_tokens"] > before["conversation_tokens"]
    assert after["absorbed_tokens"] + after["held_tokens"] == after["conversation_tokens"]


def test_a_round_that_fails_answers_422_and_the_session_goes_on(server, monkeypatch):
    from absorber_engine.round import ROUNDS
    from absorber_engine.train import RoundResult

    url, headers = f"{server}/v1/completions", {"X-Absorber-Session": "failing"}
    body = {"model": NAME, "max_tokens": 2, "temperature": 0}
    assert httpx.post(url, json={**body, "prompt": DOC}, headers=headers).status_code == 200
    before = httpx.get(f"{server}/v1/sessions/failing").json()
    # Every round now fails as a NaN loss would: the engine rolls it back and keeps its tokens.
    monkeypatch.setitem(ROUNDS, "absorber", lambda runner, batch, cfg: [
        RoundResult(error="the sync loss became nan at step 0") for _ in batch.deltas])
    r = httpx.post(url, json={**body, "prompt": DOC + FILLER * 4}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "round_rolled_back", r.text
    assert "memory is kept" in r.json()["error"]["message"]
    after = httpx.get(f"{server}/v1/sessions/failing").json()
    assert after["absorbed_tokens"] == before["absorbed_tokens"] and after["rounds"] == before["rounds"]
    monkeypatch.undo()
    # The failed round's raw tokens were dropped, so the conversation goes on from there.
    r = httpx.post(url, json={**body, "prompt": DOC + FILLER * 4 + "And then"}, headers=headers)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/v1/sessions/failing").json()["absorbed_tokens"] >= before["absorbed_tokens"]


def test_a_flush_whose_round_fails_answers_422_and_the_session_goes_on(server, monkeypatch):
    from absorber_engine.round import ROUNDS
    from absorber_engine.train import RoundResult

    url = f"{server}/v1/sessions/flushfail/absorb"
    monkeypatch.setitem(ROUNDS, "absorber", lambda runner, batch, cfg: [
        RoundResult(error="the sync loss became nan at step 0") for _ in batch.deltas])
    r = httpx.post(url, json={"tokens": list(range(5, 25)), "flush": True})
    assert r.status_code == 422 and r.json()["error"]["code"] == "round_rolled_back", r.text
    info = httpx.get(f"{server}/v1/sessions/flushfail").json()
    assert info["absorbed_tokens"] == 0 and info["held_tokens"] == 0     # memory as it was; the round's tokens dropped
    monkeypatch.undo()
    assert httpx.post(url, json={"tokens": list(range(5, 25)), "flush": True}).status_code == 200


def test_a_save_that_fails_is_logged_and_the_server_serves_on(tmp_path, monkeypatch):
    """A state disk over its quota (an error save_memory reports as InputError) neither ends the
    engine's worker nor loses the session: the next save, the disk fine again, writes it."""
    import errno

    from absorber_engine import memory_file

    real = memory_file.save

    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    cfg = ServeConfig(NAME, state_dir=str(tmp_path), timeout_s=60, idle_save_s=0.0)
    with BackgroundServer(small_engine(), cfg) as url:
        body, headers = {"model": NAME, "max_tokens": 2, "temperature": 0}, {"X-Absorber-Session": "q"}
        monkeypatch.setattr(memory_file, "save", quota)
        r = httpx.post(url + C, json={**body, "prompt": DOC * 2}, headers=headers)
        assert r.status_code == 200, r.text          # the memory is in the engine; the save is retried
        monkeypatch.setattr(memory_file, "save", real)
        r = httpx.post(url + C, json={**body, "prompt": "another"}, timeout=30)
        assert r.status_code == 200, r.text
        info = httpx.get(url + "/v1/sessions/q").json()
        assert info["absorbed_tokens"] + info["held_tokens"] > 0
        deadline = time.monotonic() + 10
        while not any(tmp_path.glob("*.absorber")) and time.monotonic() < deadline:
            time.sleep(0.05)                             # the worker's idle save, now that the disk takes it
        assert any(tmp_path.glob("*.absorber"))


def test_a_shutdown_ends_a_long_absorb_after_its_round_with_a_503_and_keeps_what_it_took(tmp_path):
    """The stop came only after uvicorn's graceful wait, so a long document held the shutdown until
    its last round (232 s for 22k tokens) and its client got a plain-text 500 at the wait's end."""
    cfg = ServeConfig(NAME, state_dir=str(tmp_path), timeout_s=120)
    background = BackgroundServer(small_engine(), cfg)
    worker = background.app.state.worker
    real = worker.engine.run

    def run_then_stop(*args, **kwargs):
        reports = real(*args, **kwargs)
        if any(r.rounds for r in reports.values()):
            worker.stopping()                        # what the server's signal handler now does
        return reports
    worker.engine.run = run_then_stop
    with background as url:
        r = httpx.post(url + "/v1/sessions/doc/absorb", json={"text": FILLER * 200}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    taken, total = map(int, re.search(r"(\d+) of the (\d+) new tokens", r.json()["error"]["message"]).groups())
    assert 0 < taken < total
    (record,) = tmp_path.glob("*.json")                # saved at shutdown: what it took is kept
    again = AbsorberEngine.from_pretrained(MODEL, config=small_config())
    again.load_memory(tmp_path / json.loads(record.read_text())["memory"])
    assert again.absorbed_tokens + again.default.held_tokens == taken


def test_session_endpoints_absorb_info_delete(client, server):
    r = httpx.post(f"{server}/v1/sessions/docs/absorb", json={"text": DOC * 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rounds"] >= 2 and body["absorbed_tokens"] == 32 * body["rounds"]
    info = httpx.get(f"{server}/v1/sessions/docs").json()
    assert info["absorbed_tokens"] == body["absorbed_tokens"] and info["conversation_tokens"] == 0
    flushed = httpx.post(f"{server}/v1/sessions/docs/absorb", json={"tokens": [5, 6, 7], "flush": True}).json()
    assert flushed["held_tokens"] == 0 and flushed["final_loss"] is not None
    # The user field names a session too; the document absorbed above stays under the conversation.
    r = client.completions.create(model=NAME, prompt="The pass key is", max_tokens=3, temperature=0, user="docs")
    assert r.choices[0].text is not None
    assert httpx.get(f"{server}/v1/sessions/docs").json()["absorbed_tokens"] == flushed["absorbed_tokens"]
    gone = httpx.delete(f"{server}/v1/sessions/docs")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert httpx.get(f"{server}/v1/sessions/docs").status_code == 404


def test_a_session_id_beyond_latin1_is_answered_and_its_header_percent_encoded(server):
    # HTTP headers carry latin-1 at most: echoing "用户" in X-Absorber-Session failed the answer (500)
    # after its history was fed
    r = httpx.post(server + C, json={"model": NAME, "prompt": DOC, "max_tokens": 2, "temperature": 0, "user": "用户"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Absorber-Session"] == "%E7%94%A8%E6%88%B7"
    assert httpx.get(f"{server}/v1/sessions/用户").json()["conversation_tokens"] > 0


def test_a_session_header_is_read_as_it_is_echoed_and_any_id_is_addressable(server):
    # The echoed "%E7%94%A8..." sent back was read as itself (a second session fed the whole history
    # again), raw UTF-8 bytes as latin-1 (a third); and an id holding "/" could be made but never
    # inspected, fed or deleted (its %2F is decoded before routing)
    body = {"model": NAME, "prompt": DOC, "max_tokens": 2, "temperature": 0}
    first = httpx.post(server + C, json=dict(body, user="表/50%"))
    echoed = first.headers["X-Absorber-Session"]
    assert first.status_code == 200 and echoed == "%E8%A1%A8/50%25"
    for header in (echoed, "表/50%25".encode()):
        again = httpx.post(server + C, json=body, headers={"X-Absorber-Session": header})
        assert again.status_code == 200 and again.headers["X-Absorber-Fed-Tokens"] == "0", again.text
        assert again.headers["X-Absorber-Session"] == echoed
    bad = httpx.post(server + C, json=body, headers={"X-Absorber-Session": b"\xff"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_session"
    path = f"{server}/v1/sessions/{quote('表/50%', safe='')}"
    assert httpx.get(path).json()["id"] == "表/50%"
    assert httpx.post(path + "/absorb", json={"text": "More."}).json()["id"] == "表/50%"
    assert httpx.delete(path).status_code == 200 and httpx.get(path).status_code == 404


# ---------------------------------------------------------------------- bad input (README table)

C, CH = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": NAME, "prompt": "hello", "max_tokens": 2, "temperature": 0}
OK_CH = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
BAD = {
    "malformed JSON": ("POST", C, b'{"model": ', 400, "invalid_json", None),
    "body not an object": ("POST", C, b"[1, 2]", 400, "invalid_json", None),
    "missing model": ("POST", C, {"prompt": "hi"}, 400, "missing_required_parameter", "model"),
    "missing prompt": ("POST", C, {"model": NAME}, 400, "missing_required_parameter", "prompt"),
    "missing messages": ("POST", CH, {"model": NAME}, 400, "missing_required_parameter", "messages"),
    "max_tokens as a string": ("POST", C, {**OK_C, "max_tokens": "5"}, 400, "invalid_value", "max_tokens"),
    "max_tokens as a float": ("POST", C, {**OK_C, "max_tokens": 2.5}, 400, "invalid_value", "max_tokens"),
    "temperature as a string": ("POST", C, {**OK_C, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    "stream not a boolean": ("POST", C, {**OK_C, "stream": "yes"}, 400, "invalid_value", "stream"),
    "prompt of wrong type": ("POST", C, {**OK_C, "prompt": 42}, 400, "invalid_value", "prompt"),
    "empty prompt": ("POST", C, {**OK_C, "prompt": ""}, 400, "invalid_value", "prompt"),
    "several prompts": ("POST", C, {**OK_C, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    "unknown model": ("POST", C, {**OK_C, "model": "gpt-4"}, 404, "model_not_found", "model"),
    "unknown model (chat)": ("POST", CH, {**OK_CH, "model": "gpt-4"}, 404, "model_not_found", "model"),
    "temperature < 0": ("POST", C, {**OK_C, "temperature": -0.5}, 400, "invalid_value", "temperature"),
    "temperature > 2": ("POST", C, {**OK_C, "temperature": 3}, 400, "invalid_value", "temperature"),
    "top_p = 0": ("POST", C, {**OK_C, "top_p": 0}, 400, "invalid_value", "top_p"),
    "top_p > 1": ("POST", C, {**OK_C, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    "max_tokens = 0": ("POST", C, {**OK_C, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "n > 1": ("POST", C, {**OK_C, "n": 2}, 400, "invalid_value", "n"),
    "more than 4 stop sequences": ("POST", C, {**OK_C, "stop": list("abcde")}, 400, "invalid_value", "stop"),
    "seed not an integer": ("POST", C, {**OK_C, "seed": "x"}, 400, "invalid_value", "seed"),
    "seed < 0": ("POST", C, {**OK_C, "seed": -1}, 400, "invalid_value", "seed"),
    "seed past int64": ("POST", CH, {**OK_CH, "seed": 2**63}, 400, "invalid_value", "seed"),
    "recite not a boolean": ("POST", C, {**OK_C, "recite": "yes"}, 400, "invalid_value", "recite"),
    "recite without the recite probe": ("POST", C, {**OK_C, "recite": True}, 400, None, "recite"),
    "max_tokens past the context": ("POST", C, {**OK_C, "max_tokens": 5000}, 400, "context_length_exceeded",
                                    "max_tokens"),
    "token id outside the vocabulary": ("POST", C, {**OK_C, "prompt": [5, 99999]}, 400, "invalid_token", "prompt"),
    "empty messages": ("POST", CH, {**OK_CH, "messages": []}, 400, "invalid_value", "messages"),
    "unknown role": ("POST", CH, {**OK_CH, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value",
                     "messages[0].role"),
    "content of wrong type": ("POST", CH, {**OK_CH, "messages": [{"role": "user", "content": 7}]}, 400,
                              "invalid_value", "messages[0].content"),
    "session id too long": ("POST", C, {**OK_C, "user": "x" * 300}, 400, "invalid_session", "user"),
    # "\ud800" is valid JSON for a lone surrogate: a 500 from the tokenizer, and a 500 for every
    # request batched with such a session id
    "lone surrogate in a prompt": ("POST", C, {**OK_C, "prompt": "a\ud800"}, 400, "invalid_json", None),
    "lone surrogate in a session id": ("POST", C, {**OK_C, "user": "\udc00x"}, 400, "invalid_json", None),
    "lone surrogate in a message": ("POST", CH, {**OK_CH, "messages": [{"role": "user", "content": "\ud83d"}]},
                                    400, "invalid_json", None),
    "lone surrogate in absorbed text": ("POST", "/v1/sessions/keep/absorb", {"text": "a\ud800"}, 400,
                                        "invalid_json", None),
    "a body nested 5,000 deep": ("POST", C, b'{"model": ' + b"[" * 5000, 400, "invalid_json", None),
    "unknown session (info)": ("GET", "/v1/sessions/nobody", None, 404, "session_not_found", "session"),
    "unknown session (delete)": ("DELETE", "/v1/sessions/nobody", None, 404, "session_not_found", "session"),
    "absorb without text or tokens": ("POST", "/v1/sessions/keep/absorb", {"flush": True}, 400, None, "text"),
    "absorb with bad token ids": ("POST", "/v1/sessions/keep/absorb", {"tokens": [1, -3]}, 400, "invalid_token",
                                  "tokens"),
    "body over the size limit": ("POST", C, {**OK_C, "prompt": "x" * 70_000}, 413, "request_too_large", None),
    "unknown route": ("GET", "/v1/nothing", None, 404, "not_found", None),
    "wrong method": ("GET", C, None, 405, "method_not_allowed", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, case):
    method, path, body, status, code, param = BAD[case]
    keep = {"X-Absorber-Session": "keep"}
    first = httpx.post(server + C, json={**OK_C, "prompt": DOC * 2}, headers=keep)
    assert first.status_code == 200
    before = httpx.get(f"{server}/v1/sessions/keep").json()
    content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    # Each bad request names the session "keep" (unless it is about the session id), with a history
    # that would start it over if the request got that far.
    named = {} if isinstance(body, dict) and "user" in body else keep
    r = httpx.request(method, server + path, content=content, headers={**named, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert err["code"] == code and err["param"] == param
    # The server keeps serving, and the session the bad request named is exactly as it was.
    assert httpx.get(f"{server}/v1/sessions/keep").json() == before
    assert httpx.post(server + C, json=OK_C).status_code == 200
