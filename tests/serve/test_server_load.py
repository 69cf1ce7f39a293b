"""absorber serve under load: 16 clients at once, no cross-talk between sessions; a full queue
answered 429 and a slow request 504, and the server serving on."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from absorber_engine.serve.app import ServeConfig  # noqa: E402
from absorber_engine.serve.launch import BackgroundServer  # noqa: E402
from test_server import DOC, FILLER, NAME, small_engine  # noqa: E402

CLIENTS, TURNS = 16, 4


def conversation(client, session: str, i: int) -> list[str]:
    """One client's chat: its own document, then TURNS questions, the history resent each time.
    Even clients decode greedily, odd ones sample with their own seed."""
    messages = [{"role": "system", "content": f"Client {i}: " + DOC.replace("71432", str(10000 + 37 * i))}]
    sampling = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.95, seed=i)
    answers = []
    for t in range(TURNS):
        messages.append({"role": "user", "content": f"Question {t}. {FILLER}What is the pass key?"})
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                           extra_headers={"X-Absorber-Session": session}, **sampling)
        answers.append(r.choices[0].message.content)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_sixteen_concurrent_clients_get_what_each_would_get_alone():
    with BackgroundServer(small_engine(), ServeConfig(NAME, max_queue=64, timeout_s=300)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        start = threading.Barrier(CLIENTS)

        def together(i):
            start.wait()
            return conversation(client, f"c{i}", i)

        with ThreadPoolExecutor(CLIENTS) as pool:
            concurrent = list(pool.map(together, range(CLIENTS)))
        infos = [httpx.get(f"{url}/v1/sessions/c{i}").json() for i in range(CLIENTS)]
        batched = httpx.get(f"{url}/health").json()["largest_batch"]
    assert batched > 1                                          # sessions shared the model's passes
    assert all(len(a) == TURNS for a in concurrent)
    assert all(info["rounds"] >= 2 for info in infos)          # every session absorbed past its window
    # Alone: a fresh server, one session at a time, the same conversations and seeds.
    with BackgroundServer(small_engine(), ServeConfig(NAME)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for i in range(CLIENTS):
            assert conversation(client, f"c{i}", i) == concurrent[i], f"client {i}"
            assert httpx.get(f"{url}/v1/sessions/c{i}").json() == infos[i]


def test_batches_stay_within_max_resident():
    # max_batch 16 over max_resident 2: three sessions queued together made one generate_batch the
    # engine refused (400 to valid requests), after their histories were fed
    with BackgroundServer(small_engine(max_resident=2), ServeConfig(NAME, timeout_s=300)) as url:
        def busy():
            return httpx.post(f"{url}/v1/sessions/busy/absorb", json={"text": DOC * 30}, timeout=300).status_code

        def ask(i):
            return httpx.post(url + "/v1/completions", headers={"X-Absorber-Session": f"s{i}"}, timeout=300,
                              json={"model": NAME, "prompt": DOC + f" question {i}", "max_tokens": 2,
                                    "temperature": 0}).status_code

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(busy)
            time.sleep(0.3)                       # the three requests queue while the worker absorbs
            asked = [pool.submit(ask, i) for i in range(3)]
            assert first.result() == 200 and [a.result() for a in asked] == [200] * 3
        assert httpx.get(f"{url}/health").json()["largest_batch"] <= 2


def test_full_queue_is_429_slow_request_is_504_and_the_server_serves_on():
    cfg = ServeConfig(NAME, max_queue=1, timeout_s=1.0)
    eng = small_engine()
    with BackgroundServer(eng, cfg) as url:
        # A long document keeps the worker busy for several seconds.
        busy = {}
        slow = threading.Thread(target=lambda: busy.update(
            r=httpx.post(f"{url}/v1/sessions/busy/absorb", json={"text": (DOC + FILLER) * 30}, timeout=60)))
        slow.start()
        time.sleep(0.4)
        queued = {}
        waiting = threading.Thread(target=lambda: queued.update(
            r=httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}, timeout=60)))
        waiting.start()
        time.sleep(0.2)
        full = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
        slow.join()
        waiting.join()
        assert busy["r"].status_code == 504 and busy["r"].json()["error"]["code"] == "timeout"
        # The queued request is answered if the document stopped in time for it, else it times out too.
        assert queued["r"].status_code == 200 or queued["r"].json()["error"]["code"] == "timeout"
        # The document stopped at its deadline (it went on absorbing all of it, so a retry after the
        # 504 took it in twice), keeping the rounds it had done; the server answers again.
        info = httpx.get(f"{url}/v1/sessions/busy").json()
        whole = len(eng.to_ids((DOC + FILLER) * 30))
        assert 0 < info["absorbed_tokens"] + info["held_tokens"] < whole
        ok = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_a_client_that_leaves_a_whole_answer_frees_the_worker():
    # A non-streamed answer was decoded to its end for a client gone: every request behind it waited.
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "stop": ["\u2603\u2603"]}
    with BackgroundServer(small_engine(), ServeConfig(NAME, timeout_s=120)) as url:
        start = time.monotonic()
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
        whole = time.monotonic() - start
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        start = time.monotonic()
        short = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 1}, timeout=120)
        waited = time.monotonic() - start
        assert short.status_code == 200
        assert waited < whole / 2, (waited, whole)        # the left answer stopped, not decoded to its end
