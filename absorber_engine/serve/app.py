"""The HTTP side: OpenAI-compatible routes over the engine worker.

Routes parse and check a request completely (JSON, types, ranges, model, session id, token ids,
the span it needs) before it reaches the worker, so a bad request is refused with a 4xx and an
OpenAI-style error body and never touches a session. Everything else that goes wrong is answered
with the same body, never a traceback, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from urllib.parse import quote, unquote
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import recital
from ..errors import InputError
from .errors import APIError, bad_request, not_found, server_error, timed_out
from .jobs import Job, Sampling
from .prompts import PromptBuilder
from .schemas import AbsorbRequest, ChatRequest, CompletionRequest, parse
from .sessions import SessionTable
from .sse import DONE, StreamSink, event
from .state import StateDir
from .worker import Worker

log = logging.getLogger("absorber.serve")

SESSION_HEADER = "X-Absorber-Session"
RESET_HEADER = "X-Absorber-Session-Reset"
FED_HEADER = "X-Absorber-Fed-Tokens"
MAX_SESSION_ID = 256
DISCONNECT_POLL_S = 0.25      # how often a waiting request looks whether its client is still there


@dataclass
class ServeConfig:
    model_id: str                      # the name clients pass as `model`
    state_dir: str | None = None       # None: sessions live in memory only
    max_queue: int = 64                # requests waiting for the engine; one more is answered 429
    max_batch: int = 16                # generation requests decoded together
    timeout_s: float = 300.0           # per request, queueing included
    max_body_bytes: int = 8 * 2**20
    idle_save_s: float = 2.0           # a changed session is saved once idle this long (and at shutdown)
    completion_max_tokens: int = 16    # OpenAI's default for /v1/completions
    chat_max_tokens: int = 128


def create_app(engine, cfg: ServeConfig, state: StateDir | None = None) -> FastAPI:
    """The server for `engine`, which it owns from now on (one worker thread makes every call);
    `state`: cfg.state_dir, taken already (launch.serve takes it before the model loads)."""
    prompts = PromptBuilder(engine.tokenizer, engine.runner.vocab_size, engine.runner.model, engine.runner.prefix)
    state = state if state is not None else StateDir(cfg.state_dir) if cfg.state_dir else None
    table = SessionTable(engine, state, cfg.idle_save_s)
    worker = Worker(engine, table, prompts, engine.runner.max_positions, cfg.max_queue, cfg.max_batch)

    @asynccontextmanager
    async def lifespan(app):
        loaded = table.load()
        if loaded:
            log.info("loaded %d sessions from %s", loaded, cfg.state_dir)
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            if state is not None:
                state.close()

    app = FastAPI(title="Absorber Engine", lifespan=lifespan)
    app.state.worker, app.state.table, app.state.config = worker, table, cfg

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse(bad_request(f"invalid request: {exc.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = server_error(f"internal error: {type(exc).__name__}")
        return JSONResponse(err.body(), status_code=err.status)

    # ------------------------------------------------------------------ helpers

    async def body_of(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        length = request.headers.get("content-length")
        too_big = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def check_model(model: str) -> None:
        if model != cfg.model_id:
            raise not_found(f"the model {model!r} does not exist; this server serves {cfg.model_id!r}",
                            param="model", code="model_not_found")

    def session_of(request: Request, user: str | None) -> str | None:
        sid = request.headers.get(SESSION_HEADER)
        param = "header " + SESSION_HEADER
        if sid is not None:
            sid = header_session(sid, param)
        else:
            sid, param = user, "user"
        if sid is None:
            return None
        check_session_id(sid, param)
        return sid

    async def wait(job: Job, fut, request: Request | None = None):
        """The job's answer; a 504 past its deadline. With `request`, a client that leaves cancels
        the job, which the worker then stops feeding and decoding (a whole answer was decoded to its
        end for nobody, and every request queued behind it waited)."""
        answer = asyncio.ensure_future(asyncio.wrap_future(fut))
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                answer.cancel()                 # cancels `fut` too: the worker sees it done
                raise timed_out(job.timeout)
            done, _ = await asyncio.wait({answer}, timeout=min(left, DISCONNECT_POLL_S if request else left))
            if done:
                return answer.result()
            if request is not None and await request.is_disconnected():
                answer.cancel()
                raise APIError(499, "the client closed the request", type="invalid_request_error",
                               code="client_closed")

    def sampling_of(req, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stops=req.stop_strings(),
                        recite=req.recite)

    def headers_of(meta: dict) -> dict:
        if meta.get("session") is None:
            return {}
        return {SESSION_HEADER: header_value(meta["session"]), RESET_HEADER: "true" if meta["reset"] else "false",
                FED_HEADER: str(meta["fed"])}

    async def generate(request: Request, req, prompt, max_tokens: int, chat: bool):
        sid = session_of(request, req.user)
        worker.check_span(prompt, max_tokens, stateless=sid is None)
        if req.recite:                 # refused before the session takes the request in
            try:
                recital.check_frame(engine.frame)
            except InputError as exc:
                raise bad_request(str(exc), param="recite") from None
        sink = StreamSink(asyncio.get_running_loop()) if req.stream else None
        job = Job("generate", sid, prompt, sampling_of(req, max_tokens), sink=sink, timeout=cfg.timeout_s)
        fut = worker.submit(job)
        meta = await wait(job, fut, request if sink is None else None)     # a stream sees its own client go
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if sink is not None:
            return StreamingResponse(stream(job, sink, rid, created, chat, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers_of(meta)})
        usage = {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                 "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": meta["text"]},
                      "logprobs": None, "finish_reason": meta["finish_reason"]}
        else:
            choice = {"index": 0, "text": meta["text"], "logprobs": None, "finish_reason": meta["finish_reason"]}
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": cfg.model_id, "choices": [choice], "usage": usage}
        return JSONResponse(body, headers=headers_of(meta))

    async def stream(job: Job, sink: StreamSink, rid: str, created: int, chat: bool, req):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return event({"id": rid, "object": obj, "created": created, "model": cfg.model_id, "choices": [choice]})

        try:
            if chat:
                yield chunk(role=True)
            while True:
                left = max(job.deadline - time.monotonic(), 0.0)
                try:
                    kind, value = await asyncio.wait_for(sink.events.get(), timeout=left)
                except asyncio.TimeoutError:
                    yield event(timed_out(job.timeout).body())
                    return
                if kind == "text":
                    if value:
                        yield chunk(text=value)
                elif kind == "error":
                    yield event(value.body())
                    return
                elif kind == "end":
                    yield chunk(finish=value["finish_reason"])
                    if req.stream_options is not None and req.stream_options.include_usage:
                        total = value["prompt_tokens"] + value["completion_tokens"]
                        yield event({"id": rid, "object": obj, "created": created, "model": cfg.model_id,
                                     "choices": [], "usage": {"prompt_tokens": value["prompt_tokens"],
                                                              "completion_tokens": value["completion_tokens"],
                                                              "total_tokens": total}})
                    yield DONE
                    return
        finally:
            sink.closed = True

    # ------------------------------------------------------------------ routes

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": 0,
                                            "owned_by": "absorber-engine"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": worker.queue.qsize(), "largest_batch": worker.largest_batch}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        prompt = prompts.completion(req.prompt)
        return await generate(request, req, prompt, req.max_tokens or cfg.completion_max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        prompt = prompts.chat([{"role": m.role, "content": m.text()} for m in req.messages])
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.chat_max_tokens
        return await generate(request, req, prompt, max_tokens, chat=True)

    @app.get("/v1/sessions/{session_id:path}")
    async def session_info(session_id: str):
        check_session_id(session_id, "session")
        job = Job("info", session_id, timeout=cfg.timeout_s)
        return await wait(job, worker.submit(job))

    @app.delete("/v1/sessions/{session_id:path}")
    async def session_delete(session_id: str):
        check_session_id(session_id, "session")
        job = Job("delete", session_id, timeout=cfg.timeout_s)
        return await wait(job, worker.submit(job))

    @app.post("/v1/sessions/{session_id:path}/absorb")     # :path: an id may hold "/"
    async def session_absorb(session_id: str, request: Request):
        check_session_id(session_id, "session")
        req = parse(AbsorbRequest, await body_of(request))
        data = req.payload()
        if isinstance(data, str):
            ids = prompts.encode(data)
            prompts.check_ids(ids, "text")
        else:
            ids = list(data)
            prompts.check_ids(ids, "tokens")
        job = Job("absorb", session_id, document=ids, flush=req.flush, timeout=cfg.timeout_s)
        return await wait(job, worker.submit(job), request)

    return app


def check_session_id(sid: str, param: str) -> None:
    if (not sid or len(sid) > MAX_SESSION_ID or any(ord(c) < 32 or ord(c) == 127 for c in sid)
            or not _is_text(sid)):
        raise bad_request(f"a session id is 1 to {MAX_SESSION_ID} printable characters", param=param,
                          code="invalid_session")


def _is_text(s: str) -> bool:
    """False for a string holding a lone UTF-16 surrogate (JSON's "\\ud800" decodes to one): no text."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# In the session header an id is percent-encoded UTF-8 (printable ASCII but "%" stands as it is), both
# ways: headers carry latin-1 at most ("用户" failed the answer after its work was done), and an id
# read otherwise than it was echoed became another session.
_HEADER_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


def header_value(sid: str) -> str:
    return quote(sid, safe=_HEADER_SAFE)


def header_session(value: str, param: str) -> str:
    """The session id a header value names: percent-decoded UTF-8 (raw UTF-8 bytes, which the server
    reads as latin-1, are taken too)."""
    try:
        return unquote(value.encode("latin-1").decode("utf-8"), errors="strict")
    except UnicodeError:
        raise bad_request("a session header holds UTF-8, percent-encoded (as the answers' header echoes it)",
                          param=param, code="invalid_session") from None
