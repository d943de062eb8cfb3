"""The OpenAI-compatible HTTP API and web chat page over one batched decode loop (README.md, docs/internals.md)."""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import hmac
import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..chat import CHAT_DEFAULTS, render
from ..engine import DecodeBatch, SamplingParams, stop_prefix_len
from ..errors import UserError
from .schemas import APIError, ChatCompletionRequest, CompletionRequest

STATIC = Path(__file__).parent / "static"
# line-splitting clients (str.splitlines, httpx) also break SSE lines at these: escape them in JSON
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class Cancelled(Exception):
    """The outcome of a job whose client went away."""


class Backend:
    """The served model + tokenizer. Every special token ends a reply and is never text."""

    def __init__(self, model, tokenizer, model_id: str):
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        self.device = next(model.parameters()).device
        self.context, self.vocab_size = model.config.block_size, model.config.vocab_size
        self.stop_ids = sorted(tokenizer.special_ids.values())


class Job:
    """One request, ``params.n`` rows per prompt: on_text gets each step's [(choice, piece)], on_done the result."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams):
        self.prompts, self.params, self.n = prompts, params, len(prompts) * params.n
        self.on_text, self.on_done = None, lambda result: None
        self.cancelled = self.admitted = self.ended = self.started = False
        self.rows, self.emitted = [], [0] * self.n
        self.submitted = time.perf_counter()


class Metrics:
    """What ``/metrics`` shows (Prometheus text format): counters kept by the decode thread."""

    TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
    WINDOW = 10.0  # seconds the tokens/s gauge averages over

    def __init__(self):
        self.tokens, self.requests = 0, collections.Counter()  # requests by outcome
        self.recent: collections.deque = collections.deque()  # (time, tokens) of each step in the window
        self.ttft, self.ttft_sum = [0] * len(self.TTFT_BUCKETS), 0.0

    def step(self, now: float, tokens: int) -> None:
        self.tokens += tokens
        self.recent.append((now, tokens))
        while self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()

    def first_token(self, seconds: float) -> None:
        self.ttft[bisect.bisect_left(self.TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def render(self, sched: Scheduler) -> str:
        now = time.perf_counter()
        cumulative = list(itertools.accumulate(self.ttft))
        buckets = [(f'_bucket{{le="{"+Inf" if b == float("inf") else f"{b:g}"}"}}', c)
                   for b, c in zip(self.TTFT_BUCKETS, cumulative)]
        lines = []
        for name, kind, help_, samples in [
            ("queue_depth", "gauge", "Requests waiting to join the running batch.", [("", len(sched.waiting))]),
            ("active_requests", "gauge", "Requests in the running batch.", [("", len(sched.active))]),
            ("active_sequences", "gauge", "Sequences (rows) in the running batch.", [("", len(sched.batch.rows))]),
            ("generated_tokens_total", "counter", "Tokens generated.", [("", self.tokens)]),
            ("tokens_per_second", "gauge", f"Tokens generated per second over the last {self.WINDOW:g} s.",
             [("", sum(n for t, n in list(self.recent) if t >= now - self.WINDOW) / self.WINDOW)]),
            ("requests_total", "counter", "Requests by outcome.",
             [(f'{{outcome="{k}"}}', self.requests[k]) for k in ("completed", "cancelled", "rejected", "failed")]),
            ("time_to_first_token_seconds", "histogram", "From arrival to the first generated token.",
             buckets + [("_sum", self.ttft_sum), ("_count", cumulative[-1])]),
        ]:
            lines += [f"# HELP pocketgpt_{name} {help_}", f"# TYPE pocketgpt_{name} {kind}"]
            lines += [f"pocketgpt_{name}{labels} {value:g}" for labels, value in samples]
        return "\n".join(lines) + "\n"


class Scheduler:
    """The one decode loop (continuous batching), a thread that owns the model (docs/internals.md, "Apps")."""

    def __init__(self, backend: Backend, max_rows: int, max_queue: int):
        self.backend, self.max_rows, self.max_queue = backend, max_rows, max_queue
        self.batch = DecodeBatch(backend.model, backend.tokenizer)
        self.lock = threading.Condition()
        self.waiting: collections.deque = collections.deque()  # guarded by lock
        self.calls: list = []  # (fn, future), guarded by lock
        self.rows_used = 0  # rows of admitted jobs, guarded by lock
        self.active: list[Job] = []  # the decode thread's
        self.closed, self.thread = False, None
        self.post: Callable = lambda fn, *args: fn(*args)
        self.metrics = Metrics()

    def start(self, post: Callable) -> None:
        self.post = post
        self.thread = threading.Thread(target=self._run, name="pocketgpt-decode", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            rows = self.rows_used + sum(j.n for j in self.waiting) + job.n
            if self.closed or (rows > self.max_rows and len(self.waiting) >= self.max_queue):
                self.metrics.requests["rejected"] += 1
                raise APIError(429, f"server is at capacity ({self.rows_used} sequences decoding, "
                                    f"{len(self.waiting)} requests queued); retry shortly", type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.lock.notify()

    def drop(self, job: Job) -> None:
        """The client went away: a waiting job ends now, an active one leaves before the next step."""
        job.cancelled = True
        out: list = []
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                self._end(job, Cancelled(), out)
        _deliver(out)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """``fn()`` run on the decode thread (the one that owns the model) before the next step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            self.calls.append((fn, future))
            self.lock.notify()
        return future

    def close(self) -> None:
        """Stop the loop (from any thread): every job still queued or running ends as ``Cancelled``."""
        with self.lock:
            self.closed = True
            self.lock.notify()

    def _run(self) -> None:
        def busy() -> bool:
            return bool(self.closed or self.waiting or self.calls or self.active)

        with torch.inference_mode():
            while True:
                with self.lock:
                    if not busy():  # idle: hand glibc's freed arenas back (else an idle server keeps its peak RSS)
                        with contextlib.suppress(OSError, AttributeError):  # not glibc
                            ctypes.CDLL(None).malloc_trim(0)
                    self.lock.wait_for(busy)
                    if self.closed:
                        break
                self.step()
        out: list = []
        with self.lock:  # closed: nothing more is queued
            for _, future in self.calls:
                future.cancel()
            for job in [*self.active, *self.waiting]:
                self._end(job, Cancelled(), out)
        self.post(_deliver, out)

    def step(self) -> None:
        """Calls, joins and departures, then one decode step; what it produced goes out in one ``post``."""
        out: list = []  # (callback, argument), run on the event loop in this order
        with self.lock:
            calls, self.calls = self.calls, []
            admit = []
            while self.waiting and (self.rows_used == 0 or self.rows_used + self.waiting[0].n <= self.max_rows):
                job = self.waiting.popleft()
                job.admitted = True
                self.rows_used += job.n
                admit.append(job)
            self.active += admit  # running from now on (their prefill comes next)
        for fn, future in calls:
            if future.set_running_or_notify_cancel():  # False: its request was cancelled
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller's error, answered to the caller
                    future.set_exception(e)
        try:
            joining = [job for job in admit if not job.cancelled]
            if joining:  # one prefill forward for all the requests that arrived during the last step
                prompts = [p for job in joining for p in job.prompts]
                rows = iter(self.batch.add(prompts, [job.params for job in joining for _ in job.prompts]))
                for job in joining:
                    job.rows = [next(rows) for _ in range(job.n)]
            gone = [job for job in self.active if job.cancelled and not job.ended]
            if gone:
                self.batch.drop([r for job in gone for r in job.rows])
                for job in gone:
                    self._end(job, Cancelled(), out)
            rows = len(self.batch.rows)
            self.batch.step()
            if rows:
                self.metrics.step(time.perf_counter(), rows)
            for job in self.active:
                if not job.ended:
                    self._emit(job, out)
        except Exception as e:  # a failed step fails the requests in it, not the server
            for job in self.active:
                self._end(job, e, out)
            self.batch = DecodeBatch(self.backend.model, self.backend.tokenizer)
        self.active = [job for job in self.active if not job.ended]
        if out:
            self.post(_deliver, out)

    def _emit(self, job: Job, out: list) -> None:
        """The job's new text (held back while it may be the start of a stop string), its answer once done."""
        pieces = []
        for k, r in enumerate(job.rows):
            end = len(r.text) if r.done else len(r.text) - stop_prefix_len(r.text, job.params.stop)
            if end > job.emitted[k]:
                pieces.append((k, r.text[job.emitted[k] : end]))
                job.emitted[k] = end
        if not job.started and any(r.tokens or r.done for r in job.rows):
            job.started = True
            self.metrics.first_token(time.perf_counter() - job.submitted)
        if pieces and job.on_text is not None:
            out.append((job.on_text, pieces))
        if all(r.done for r in job.rows):
            self._end(job, [{"tokens": list(r.tokens), "text": r.text,
                             "finish_reason": "stop" if r.reason == "stop" else "length"} for r in job.rows], out)

    def _end(self, job: Job, result: Any, out: list) -> None:
        if job.ended:
            return
        job.ended = True
        if job.admitted:
            with self.lock:
                self.rows_used -= job.n
        kind = "completed" if isinstance(result, list) else "cancelled" if isinstance(result, Cancelled) else "failed"
        self.metrics.requests[kind] += 1
        out.append((job.on_done, result))


def create_app(backend: Backend, *, api_key: Optional[str] = None, max_concurrency: int = 64,
               max_queue: int = 256) -> FastAPI:
    """``backend`` served: up to ``max_concurrency`` sequences decode in one batch, ``max_queue`` more requests wait."""
    sched = Scheduler(backend, max_concurrency, max_queue)
    card = {"id": backend.model_id, "object": "model", "created": int(time.time()), "owned_by": "pocketgpt",
            "context_length": backend.context}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start(asyncio.get_running_loop().call_soon_threadsafe)
        yield
        sched.close()  # shutting down: every queued or running request ends now
        await asyncio.to_thread(sched.thread.join, 5)

    app = FastAPI(title="pocketgpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = sched  # serve_forever closes it on a signal

    async def error(request: Request, e: Exception) -> JSONResponse:
        return _error_response(_api_error(request, e))

    for kind in (APIError, RequestValidationError, UserError, HTTPException, Exception):
        app.add_exception_handler(kind, error)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    app.mount("/static", StaticFiles(directory=STATIC))

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "running": len(sched.active), "queued": len(sched.waiting),
                "sequences": len(sched.batch.rows), "max_concurrency": sched.max_rows, "max_queue": sched.max_queue}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(sched.metrics.render(sched), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(backend, model_id)
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(backend, body.model)
        if not body.messages:
            raise APIError(400, "'messages' is empty: send at least one message", param="messages",
                           code="empty_messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt, _ = render(messages, backend.tokenizer, add_generation_prompt=True)
        max_tokens = _max_tokens(backend, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await generate(request, body, [prompt], max_tokens, chat=True, logprobs=top)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(backend, body.model)
        prompts = _completion_prompts(backend, body)
        for p in prompts:
            _max_tokens(backend, len(p), body.max_tokens, "prompt")
        if body.max_tokens == 0 and body.stream:
            raise APIError(400, "'max_tokens': 0 only scores the prompt; use it without 'stream'",
                           param="max_tokens", code="invalid_value")
        return await generate(request, body, prompts, body.max_tokens, chat=False, logprobs=body.logprobs,
                              echo=body.echo)

    async def generate(request: Request, body, prompts: list[list[int]], max_tokens: int, *, chat: bool,
                       logprobs: Optional[int], echo: bool = False):  # logprobs: alternatives per token, None: none
        sampling = {k: CHAT_DEFAULTS[k] if getattr(body, k) is None else getattr(body, k) for k in CHAT_DEFAULTS}
        as_given = body.model_dump(include={"presence_penalty", "frequency_penalty", "seed", "stop", "n"})
        job = Job(prompts, SamplingParams(**sampling, **as_given, max_new_tokens=max_tokens, stop_ids=backend.stop_ids))
        obj = ("chat.completion.chunk" if body.stream else "chat.completion") if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": obj,
                "created": int(time.time()), "model": backend.model_id, "system_fingerprint": None}
        echoed = [backend.tokenizer.decode(p, skip_special=True) if echo else "" for p in prompts]
        if body.stream:
            if body.stream_options and body.stream_options.include_usage:
                head["usage"] = None
            firsts = [_delta(chat, i, None if chat else echoed[i // body.n]) for i in range(job.n) if chat or echo]
            return stream(job, head, firsts, chat, prompts)

        outs = await answer(request, job)  # max_tokens 0 (scoring the prompt): rows that end at once
        choices = []
        for i, o in enumerate(outs):
            p = i // body.n  # the prompt it continues
            lp = None
            if logprobs is not None:
                fn = functools.partial(_logprobs, backend, prompts[p], o["tokens"], logprobs, chat, echo)
                lp = await asyncio.wrap_future(sched.call(fn))
            msg = {"message": {"role": "assistant", "content": o["text"]}} if chat else {"text": echoed[p] + o["text"]}
            choices.append({"index": i, **msg, "logprobs": lp, "finish_reason": o["finish_reason"]})
        return {**head, "choices": choices, "usage": _usage(prompts, outs)}

    async def answer(request: Request, job: Job) -> list[dict]:
        done = asyncio.get_running_loop().create_future()
        job.on_done = done.set_result  # called once
        sched.submit(job)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=0.25)
                if not done.done() and await request.is_disconnected():  # nobody will read the answer
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        finally:
            sched.drop(job)
        if isinstance(done.result(), BaseException):
            raise done.result()
        return done.result()

    def stream(job: Job, head: dict, firsts: list[dict], chat: bool, prompts: list) -> StreamingResponse:
        text: dict[int, str] = {}  # per choice, not sent yet: pieces that piled up while sending go out as one
        ended: list = []
        wake = asyncio.Event()

        def on_text(pieces: list) -> None:
            for i, piece in pieces:
                text[i] = text.get(i, "") + piece
            wake.set()

        def on_done(result: Any) -> None:
            ended.append(result)
            wake.set()

        job.on_text, job.on_done = on_text, on_done
        sched.submit(job)  # 429 now, before the response starts, if the queue is full

        def sse(obj: dict) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS).encode() + b"\n\n"

        async def events():
            for c in firsts:
                yield sse({**head, "choices": [c]})
            result = None
            while result is None:
                await wake.wait()
                wake.clear()
                pieces, result = dict(text), (ended[0] if ended else None)  # all that arrived, its end last
                text.clear()
                for i, piece in pieces.items():
                    yield sse({**head, "choices": [_delta(chat, i, piece)]})
            if isinstance(result, Cancelled):
                return
            if isinstance(result, BaseException):
                yield sse(_api_error(None, result).body())  # the stream has started: the error goes in-band
            else:
                for i, res in enumerate(result):
                    yield sse({**head, "choices": [_delta(chat, i, "", res["finish_reason"])]})
                if "usage" in head:
                    yield sse({**head, "choices": [], "usage": _usage(prompts, result)})
            yield b"data: [DONE]\n\n"

        return _SSEResponse(events(), on_close=lambda: sched.drop(job))

    return app


class _APIKeyMiddleware:
    """Every ``/v1/*`` request needs ``Authorization: Bearer KEY`` (plain ASGI: streams pass through untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not header else "incorrect API key"
                await _error_response(APIError(401, msg, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SSEResponse(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` however the response ends (done, disconnect, error)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _api_error(request: Optional[Request], e: Exception) -> APIError:
    """Any failure as an OpenAI-style error: validation errors are 400 (OpenAI never answers 422)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e))
    if isinstance(e, RequestValidationError):
        return _validation_error(e.errors())
    if isinstance(e, HTTPException) and e.status_code == 404:
        return APIError(404, f"unknown route {request.method} {request.url.path}", code="not_found")
    if isinstance(e, HTTPException) and e.status_code == 405:
        return APIError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    if isinstance(e, HTTPException):
        return APIError(e.status_code, str(e.detail))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _validation_error(errors: list[dict]) -> APIError:
    first, kind = errors[0], errors[0]["type"]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first["msg"]
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    # the field's path, without pydantic's union-member tags ("str", "list[int]"...)
    path = [str(x) for x in first["loc"][1:] if x not in ("str", "int", "float", "bool")
            and not str(x).startswith(("list[", "function-"))]
    if not path:  # the body itself
        msg = "the request needs a JSON object body" if kind == "missing" else "the request body must be a JSON object"
        return APIError(400, msg, code="invalid_json")
    param = ".".join(path)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {first['msg']}{more}", param=param,
                    code="invalid_type" if "type" in kind else "invalid_value")


def _check_model(backend: Backend, name: Optional[str]) -> None:
    if name is not None and name != backend.model_id:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")


def _max_tokens(backend: Backend, prompt_len: int, requested: Optional[int], prompt_param: str) -> int:
    room = backend.context - prompt_len
    if room < 0 or (room == 0 and requested != 0):
        raise APIError(400, f"the prompt is {prompt_len} tokens, beyond the model's context of {backend.context} "
                            "tokens", param=prompt_param, code="context_length_exceeded")
    if requested is not None and requested > room:
        raise APIError(400, f"max_tokens={requested} is beyond the context: the prompt takes {prompt_len} of "
                            f"{backend.context} tokens, leaving {room}", param="max_tokens",
                       code="context_length_exceeded")
    return room if requested is None else requested


def _completion_prompts(backend: Backend, body: CompletionRequest) -> list[list[int]]:
    if not body.prompt:
        raise APIError(400, "'prompt' is empty", param="prompt", code="empty_prompt")
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    prompts = [backend.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, f"prompt {i} has no tokens", param="prompt", code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < backend.vocab_size]
        if bad:
            raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {backend.vocab_size})",
                           param="prompt", code="invalid_token_id")
    return prompts


def _delta(chat: bool, i: int, text: Optional[str], finish: Optional[str] = None) -> dict:
    """Choice ``i`` of a stream chunk: a piece of text, or its finish (empty text); in chat, None is the role."""
    delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
    return {"index": i, **({"delta": delta} if chat else {"text": text}), "logprobs": None, "finish_reason": finish}


def _usage(prompts: list[list[int]], outs: list[dict]) -> dict:
    prompt, completion = sum(map(len, prompts)), sum(len(o["tokens"]) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(backend: Backend, prompt: list[int], tokens: list[int], top: int, chat: bool, echo: bool) -> dict:
    """One choice's ``logprobs`` (chat's or legacy shape): the raw model's (temperature 1), on the decode thread."""
    ids = prompt + tokens
    lps, tops = [None] * len(ids), [None] * len(ids)
    if len(ids) > 1:
        logits, _ = backend.model(torch.tensor([ids[:-1]], device=backend.device))
        logp = torch.log_softmax(logits[0].float(), -1).clamp(min=-9999.0)  # JSON has no -inf
        vals, idx = logp.topk(min(top, backend.vocab_size), -1)
        lps[1:] = logp.gather(-1, torch.tensor(ids[1:], device=backend.device)[:, None])[:, 0].tolist()
        tops[1:] = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]

    def token(i: int, special_names: bool = False) -> str:  # specials "" (named as alternatives); a partial char: \xNN
        named = special_names or i not in backend.stop_ids
        return backend.tokenizer.decode_bytes([i]).decode("utf-8", errors="backslashreplace") if named else ""

    start = 0 if echo else len(prompt)
    if chat:
        def entry(i: int, lp: float, special_names: bool = False) -> dict:
            return {"token": token(i, special_names), "logprob": lp, "bytes": list(backend.tokenizer.decode_bytes([i]))}

        return {"content": [{**entry(ids[t], lps[t]), "top_logprobs": [entry(i, v, True) for i, v in tops[t]]}
                            for t in range(start, len(ids))]}
    strs = [token(i) for i in ids[start:]]
    return {"tokens": strs, "token_logprobs": lps[start:],
            "top_logprobs": [None if t is None else {token(i, True): v for i, v in t} for t in tops[start:]],
            "text_offset": list(itertools.accumulate(map(len, strs), initial=0))[:-1]}


def _deliver(out: list) -> None:
    for fn, arg in out:
        fn(arg)
