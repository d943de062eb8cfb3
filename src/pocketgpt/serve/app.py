"""The OpenAI-compatible HTTP API (FastAPI) over the generation engine, and the web chat page.

Endpoints
    POST /v1/chat/completions   messages → reply (``stream: true`` = server-sent events ending in ``data: [DONE]``)
    POST /v1/completions        prompt text or token ids → continuation; ``logprobs`` (+ top alternatives), ``echo``;
                                ``max_tokens: 0`` + ``echo`` + ``logprobs`` scores the prompt (evaluation harnesses);
                                streamed completions carry text only (no ``logprobs``)
    GET  /v1/models             the one served model
    GET  /health                liveness + load (never needs the API key)
    GET  /                      the web chat page (``serve/static/``)

Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``:
    400  malformed JSON, wrong field types, missing fields, values out of range (``param`` names the field), empty
         ``messages``, prompt or ``max_tokens`` beyond the context, bad token ids (as OpenAI: never 422)
    401  missing or wrong ``Authorization: Bearer KEY`` (when the server has an API key)
    404  unknown model (code ``model_not_found``), unknown route
    503  the queue is full (code ``server_overloaded``, with ``Retry-After``)

Sampling fields a request leaves out take pocketgpt's chat defaults (``pocketgpt.chat.CHAT_DEFAULTS``, with a mild
repetition penalty against the loops of small models), not OpenAI's temperature 1; ``top_k`` and
``repetition_penalty`` (1 = off) are accepted as in vLLM (``extra_body=`` in the openai client).

Concurrency: the event loop never runs the model. Requests become jobs in a queue (at most ``max_queue`` waiting;
one more is answered 503 at once). Each of ``max_concurrency`` worker threads decodes one *batch* at a time: when a
thread is free it takes the oldest waiting job plus up to ``max_batch - 1`` more that share its sampling options
(temperature, top_p, penalties, stop strings; jobs with a ``seed`` or ``n > 1`` run alone so their output does not
depend on who else is served) and decodes them together through the engine, which is several times cheaper than one
after another. Every job gets its text after each token step and its answer as soon as its own rows are done. A
client that disconnects (mid-stream, or while waiting for a non-streamed answer) drops its job at once: it leaves
the queue, or stops receiving tokens at the next step; a batch whose jobs are all gone stops decoding and frees its
thread.

Special tokens are never text: every special token (``<|end|>``, ``<|user|>``, ``<|endoftext|>``...) ends a reply or
a completion (a model that writes one has finished its text), and an echoed prompt shows its text only (special
tokens are empty strings in ``logprobs.tokens``; ``top_logprobs`` keys keep their names so alternatives stay distinct).

Log-probs (``logprobs``, ``echo``) are those of the raw model distribution (temperature 1, no filters), from one
forward pass over prompt + completion (``engine.sequence_logprobs``), whatever sampling options chose the tokens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import stop_prefix_len
from ..errors import UserError
from .schemas import APIError, ChatCompletionRequest, CompletionRequest

STATIC = Path(__file__).parent / "static"


class Cancelled(Exception):
    """The outcome of a job whose client went away."""


# --------------------------------------------------------------------------------------------------------------------
# the model side: everything here runs in worker threads


class Backend:
    """The served model + tokenizer: chat rendering, generation through the engine, prompt scoring.

    Thread-safe: the weights are only read, every call builds its own KV cache inside the engine.
    """

    def __init__(self, model, tokenizer, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = next(model.parameters()).device
        self.context = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.stop_ids = sorted(tokenizer.special_ids.values())  # chat and completions alike: see the docstring

    # ---- prompts -------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        from ..chat import render

        ids, _ = render(messages, self.tokenizer, add_generation_prompt=True)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special=True)

    def token_str(self, i: int, special_names: bool = False) -> str:
        """A token in ``logprobs``: a special token is empty (never text) unless ``special_names``; the bytes of a
        partial character are escaped (``\\xe4``), never U+FFFD (``token_bytes`` has them exactly)."""
        if not special_names and i in self.stop_ids:
            return ""
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    def token_bytes(self, i: int) -> bytes:
        return self.tokenizer.decode_bytes([int(i)])

    def _context(self):
        return torch.inference_mode()  # per thread: every worker enters it itself

    # ---- generation ------------------------------------------------------------------------------------------------

    def run_batch(self, jobs: list["Job"], finish: Callable[["Job", Any], None]) -> None:
        """Decode ``jobs`` (same sampling options) as one batch through the engine; runs in a worker thread.

        After every token step each job gets its new text (``job.on_text``, streaming) and is finished as soon as
        its own rows are done: ``finish(job, [{"tokens", "text", "finish_reason"}, ...])`` (one per sample), or
        ``finish(job, Cancelled())`` once its client is gone. The batch stops when no job is left to serve.
        Uses the engine's per-step hook (``generate(..., on_step=)``).
        """
        from .. import engine

        lead = jobs[0]
        n, stops = lead.n, lead.params["stop"]

        def step(rows) -> None:
            live = False
            for j, job in enumerate(jobs):
                if job.finished:
                    continue
                if job.cancel.is_set():
                    job.finished = True
                    finish(job, Cancelled())
                    continue
                for k, r in enumerate(rows[j * n : (j + 1) * n]):
                    if job.results[k] is not None:
                        continue
                    done = r.done or len(r.tokens) >= job.max_tokens
                    text = r.text if r.text is not None else self.decode(r.tokens)
                    if job.on_text is not None:
                        end = len(text) if done else len(text) - stop_prefix_len(text, stops)
                        if end > job.emitted[k]:
                            job.on_text(k, text[job.emitted[k] : end])
                            job.emitted[k] = end
                    if done:
                        reason = "stop" if r.done and r.reason == "stop" else "length"
                        job.results[k] = {"tokens": [int(t) for t in r.tokens[: job.max_tokens]], "text": text,
                                          "finish_reason": reason}
                if all(res is not None for res in job.results):
                    job.finished = True
                    finish(job, job.results)
                else:
                    live = True
            if not live:
                raise _BatchOver()  # every job is answered or gone: stop decoding

        try:
            params = engine.SamplingParams(**lead.params, max_new_tokens=max(job.max_tokens for job in jobs), n=n,
                                           stop_ids=self.stop_ids)
            engine.generate(self.model, [job.prompt for job in jobs], params, tokenizer=self.tokenizer, on_step=step)
        except _BatchOver:
            pass
        except Exception as e:
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    finish(job, e)

    # ---- scoring ---------------------------------------------------------------------------------------------------

    def score(self, ids: list[int], top: int) -> tuple[list[Optional[float]], list[Optional[list[tuple[int, float]]]]]:
        """log p(token | the tokens before it) for every token (``None`` for the first: nothing predicts it), and
        the ``top`` most likely tokens at each position (``[(id, logprob)]``), from the raw model distribution."""
        from .. import engine

        if not ids:
            return [], []
        with self._context():
            (chosen,) = engine.sequence_logprobs(self.model, [ids])
        lps: list[Optional[float]] = [None, *chosen]
        tops: list[Optional[list[tuple[int, float]]]] = [None] + [[] for _ in chosen]
        if top > 0 and len(ids) > 1:
            with self._context():
                logits, _ = self.model(torch.tensor([ids[:-1]], dtype=torch.long, device=self.device))
                vals, idx = torch.log_softmax(logits[0].float(), dim=-1).topk(min(top, logits.shape[-1]), dim=-1)
            tops = [None] + [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return lps, tops


# --------------------------------------------------------------------------------------------------------------------
# jobs and the scheduler: bounded concurrency, a bounded queue, batching of simultaneous requests


class _BatchOver(Exception):
    """Raised from the engine's step callback to end a batch early (every job answered or gone)."""


class Job:
    """One prompt to continue (``n`` samples): the unit the scheduler queues and batches.

    ``on_text(sample, piece)`` (streaming only) is called from the worker thread; ``future`` resolves on the event
    loop with ``[{"tokens", "text", "finish_reason"}] * n`` or an exception (``Cancelled`` when the client left).
    """

    def __init__(self, prompt: list[int], max_tokens: int, params: dict, n: int = 1,
                 on_text: Optional[Callable[[int, str], None]] = None):
        self.prompt, self.max_tokens, self.params, self.n = prompt, max_tokens, params, n
        self.on_text = on_text
        self.cancel = threading.Event()
        self.emitted = [0] * n
        self.results: list[Optional[dict]] = [None] * n
        self.finished = False  # set by the worker thread
        self.future: Optional[asyncio.Future] = None

    def batch_key(self) -> Optional[tuple]:
        """Jobs with equal keys may share a batch; ``None`` = always alone (a seed, or several samples, must give
        the same output whoever else is being served)."""
        if self.n > 1 or self.params["seed"] is not None:
            return None
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(self.params.items()))


class Scheduler:
    """Runs jobs on ``slots`` worker threads, each decoding one batch of up to ``max_batch`` jobs that share their
    sampling options; at most ``max_queue`` jobs wait, beyond that ``submit`` answers 503 at once. A batch is formed
    when a slot frees up, from the jobs waiting then (the oldest first); a job that arrives later waits for the next
    free slot. Lives on the event loop: only ``Backend.run_batch`` runs in the threads."""

    def __init__(self, backend: Backend, slots: int, max_queue: int, max_batch: int):
        self.backend, self.slots, self.max_queue, self.max_batch = backend, slots, max_queue, max_batch
        self.free = slots
        self.waiting: list[Job] = []
        self.running: set[Job] = set()
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="pocketgpt-gen")

    def submit(self, jobs: list[Job]) -> None:
        if self.free == 0 and len(self.waiting) + len(jobs) > self.max_queue:
            raise APIError(503, f"server is at capacity ({len(self.running)} requests running, {len(self.waiting)} "
                                "queued); retry shortly", type="server_error", code="server_overloaded",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.future = loop.create_future()
            self.waiting.append(job)
        self._dispatch()

    def drop(self, job: Job) -> None:
        """The client went away: forget a waiting job now, stop a running one at its next decoding step."""
        job.cancel.set()
        if job in self.waiting:
            self.waiting.remove(job)
            self._resolve(job, Cancelled())

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.free > 0 and self.waiting:
            batch = [self.waiting.pop(0)]
            key = batch[0].batch_key()
            if key is not None:
                for job in list(self.waiting):
                    if len(batch) >= self.max_batch:
                        break
                    if job.batch_key() == key:
                        batch.append(job)
                        self.waiting.remove(job)
            self.free -= 1
            self.running.update(batch)

            def finish(job: Job, result: Any) -> None:  # from the worker thread
                loop.call_soon_threadsafe(self._resolve, job, result)

            done = loop.run_in_executor(self.pool, self.backend.run_batch, batch, finish)
            done.add_done_callback(lambda f, batch=batch: self._batch_done(batch, f))

    def _resolve(self, job: Job, result: Any) -> None:
        self.running.discard(job)
        if job.future is not None and not job.future.done():
            if isinstance(result, BaseException):
                job.future.set_exception(result)
                if isinstance(result, Cancelled):
                    job.future.exception()  # nobody is waiting for a dropped job: not an error to log
            else:
                job.future.set_result(result)

    def _batch_done(self, batch: list[Job], f: asyncio.Future) -> None:
        self.free += 1
        for job in batch:  # normally every job was resolved already
            err = f.exception() if not f.cancelled() else Cancelled()
            self._resolve(job, err or RuntimeError("generation ended without a result"))
        if not self.pool._shutdown:
            self._dispatch()


# --------------------------------------------------------------------------------------------------------------------
# the app


def create_app(backend: Backend, *, api_key: Optional[str] = None, max_concurrency: int = 2,
               max_queue: int = 256, max_batch: int = 16) -> FastAPI:
    """The FastAPI app serving ``backend``: ``max_concurrency`` batches decode at once (worker threads), each of up
    to ``max_batch`` requests; ``max_queue`` more may wait. ``api_key`` guards every ``/v1/*`` route."""
    sched = Scheduler(backend, max_concurrency, max_queue, max_batch)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for job in [*sched.waiting, *sched.running]:  # shutting down: stop every batch at its next step
            sched.drop(job)
        sched.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pocketgpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend, app.state.scheduler = backend, sched

    # ---- errors ------------------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(_validation_to_api_error(e.errors()))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError):
        return _error_response(APIError(400, str(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, f"unknown route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail))
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    # ---- plain routes ----------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "running": len(sched.running),
                "queued": len(sched.waiting), "busy_slots": sched.slots - sched.free, "max_concurrency": sched.slots,
                "max_batch": sched.max_batch, "max_queue": sched.max_queue}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(backend, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(backend, model_id)
        return _model_card(backend, created)

    # ---- generation --------------------------------------------------------------------------------------------

    async def answer(request: Request, jobs: list[Job]) -> list[list[dict]]:
        """Queue ``jobs`` and wait for all of them; if the client goes away meanwhile, drop them."""
        sched.submit(jobs)
        futures = [job.future for job in jobs]
        try:
            while True:
                done, pending = await asyncio.wait(futures, timeout=0.25)
                if not pending:
                    return [f.result() for f in futures]
                if await request.is_disconnected():  # nobody will read the answer
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        finally:
            for job in jobs:
                if not job.future.done():
                    sched.drop(job)

    def stream(jobs: list[Job], first: Callable[[int], list[dict]], piece: Callable[[int, str], dict],
               last: Callable[[int, dict], dict], usage: Callable[[int], Optional[dict]]) -> StreamingResponse:
        """Queue ``jobs`` and answer with server-sent events as they decode, ending in ``data: [DONE]``.

        ``first(index)`` (events before any text), ``piece(index, text)``, ``last(index, result)`` build the events
        of choice ``index`` (= job number * n + sample); ``usage(completion_tokens)`` the closing one, if any.
        """
        loop = asyncio.get_running_loop()
        inbox: collections.deque = collections.deque()  # (choice index, text) pieces, then each job's future
        wake = asyncio.Event()

        def put(item: Any) -> None:
            inbox.append(item)
            wake.set()

        for j, job in enumerate(jobs):  # text pieces come from the worker thread
            job.on_text = lambda k, text, base=j * job.n: loop.call_soon_threadsafe(put, (base + k, text))
        sched.submit(jobs)  # 503 now, before the response starts, if the queue is full
        for job in jobs:  # resolved after every piece of text it produced has been put in the inbox
            job.future.add_done_callback(put)

        async def events() -> AsyncIterator[bytes]:
            def sse(obj: dict) -> bytes:
                return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

            try:
                for j, job in enumerate(jobs):
                    for k in range(job.n):
                        for event in first(j * job.n + k):
                            yield sse(event)
                remaining, completion_tokens = len(jobs), 0
                while remaining:
                    while not inbox:
                        wake.clear()
                        await wake.wait()
                    item = inbox.popleft()
                    if not isinstance(item, asyncio.Future):
                        # pieces that piled up while we were sending go out as one event
                        index, text = item
                        while inbox and isinstance(inbox[0], tuple) and inbox[0][0] == index:
                            text += inbox.popleft()[1]
                        yield sse(piece(index, text))
                        continue
                    remaining -= 1
                    j = next(i for i, job in enumerate(jobs) if job.future is item)
                    if item.exception() is not None:
                        e = item.exception()
                        if isinstance(e, Cancelled):
                            return
                        err = e if isinstance(e, APIError) else APIError(
                            500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                        yield sse(err.body())  # the stream has started: the error goes in-band
                        break
                    for k, result in enumerate(item.result()):
                        completion_tokens += len(result["tokens"])
                        yield sse(last(j * jobs[j].n + k, result))
                else:
                    closing = usage(completion_tokens)
                    if closing is not None:
                        yield sse(closing)
                yield b"data: [DONE]\n\n"
            finally:
                for job in jobs:  # the client went away (or we are done): stop what still runs
                    if not job.future.done():
                        sched.drop(job)

        return _SSEResponse(events(), on_close=lambda: [sched.drop(job) for job in jobs if not job.future.done()])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(backend, body.model)
        if not body.messages:
            raise APIError(400, "'messages' is empty: send at least one message", param="messages",
                           code="empty_messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt = backend.chat_prompt(messages)
        max_tokens = _max_tokens(backend, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        job = Job(prompt, max_tokens, _params(body), n=body.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        top = (body.top_logprobs or 0) if body.logprobs else 0

        if body.stream:
            def chunk(choices: list, usage: Optional[dict] = None) -> dict:
                c = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id,
                     "system_fingerprint": None, "choices": choices}
                if include_usage:
                    c["usage"] = usage
                return c

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(
                [job],
                first=lambda i: [chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])],
                piece=lambda i, text: chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                              "finish_reason": None}]),
                last=lambda i, res: chunk([{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": res["finish_reason"]}]),
                usage=lambda n_tokens: chunk([], _usage(len(prompt), n_tokens)) if include_usage else None,
            )

        (outs,) = await answer(request, [job])
        choices = []
        for i, o in enumerate(outs):
            choice = {"index": i, "message": {"role": "assistant", "content": o["text"]}, "logprobs": None,
                      "finish_reason": o["finish_reason"]}
            if body.logprobs:
                content = await asyncio.to_thread(_chat_logprobs, backend, prompt, o["tokens"], top)
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": now, "model": backend.model_id,
                "system_fingerprint": None, "choices": choices,
                "usage": _usage(len(prompt), sum(len(o["tokens"]) for o in outs))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(backend, body.model)
        prompts = _completion_prompts(backend, body)
        for p in prompts:
            _max_tokens(backend, len(p), body.max_tokens, "prompt")
        if body.max_tokens == 0 and body.stream:
            raise APIError(400, "'max_tokens': 0 only scores the prompt; use it without 'stream'",
                           param="max_tokens", code="invalid_value")
        params = _params(body)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n_prompt = sum(map(len, prompts))

        if body.stream:
            def chunk(choices: list, usage: Optional[dict] = None) -> dict:
                c = {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id,
                     "choices": choices}
                if include_usage:
                    c["usage"] = usage
                return c

            def text_chunk(i: int, text: str, finish: Optional[str] = None) -> dict:
                return chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": finish}])

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            jobs = [Job(p, body.max_tokens, params, n=body.n) for p in prompts]
            return stream(
                jobs,
                first=lambda i: [text_chunk(i, backend.decode(prompts[i // body.n]))] if body.echo else [],
                piece=text_chunk,
                last=lambda i, res: text_chunk(i, "", res["finish_reason"]),
                usage=lambda n_tokens: chunk([], _usage(n_prompt, n_tokens)) if include_usage else None,
            )

        if body.max_tokens == 0:  # score the prompt only
            outs = [[{"tokens": [], "text": "", "finish_reason": "length"}] * body.n for _ in prompts]
        else:
            outs = await answer(request, [Job(p, body.max_tokens, params, n=body.n) for p in prompts])
        choices, completion_tokens = [], 0
        for pi, (prompt, samples) in enumerate(zip(prompts, outs)):
            for j, o in enumerate(samples):
                completion_tokens += len(o["tokens"])
                choice = {"index": pi * body.n + j, "text": (backend.decode(prompt) if body.echo else "") + o["text"],
                          "logprobs": None, "finish_reason": o["finish_reason"]}
                if body.logprobs is not None:
                    choice["logprobs"] = await asyncio.to_thread(_completion_logprobs, backend, prompt, o["tokens"],
                                                                 body.logprobs, body.echo)
                choices.append(choice)
        return {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id,
                "system_fingerprint": None, "choices": choices, "usage": _usage(n_prompt, completion_tokens)}

    return app


# --------------------------------------------------------------------------------------------------------------------
# helpers


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


def _validation_to_api_error(errors: list[dict]) -> APIError:
    """FastAPI/pydantic validation errors → one OpenAI-style 400 error (OpenAI never answers 422; clients branch
    on the status)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error") or first.get("msg", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") == "missing":
        return APIError(400, "the request needs a JSON object body", code="invalid_json")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # drop pydantic's union-member tags (e.g. "str", "list[int]") from the path
    param = ".".join(x for x in loc if not (x.startswith(("list[", "str", "int", "float", "bool", "function-"))
                                            or x in ("TextPart",)))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param or None, code="invalid_type"
                    if "type" in str(first.get("type", "")) else "invalid_value")


def _check_model(backend: Backend, name: Optional[str]) -> None:
    if name is not None and name != backend.model_id:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")


def _model_card(backend: Backend, created: int) -> dict:
    return {"id": backend.model_id, "object": "model", "created": created, "owned_by": "pocketgpt",
            "context_length": backend.context}


def _max_tokens(backend: Backend, prompt_len: int, requested: Optional[int], prompt_param: str) -> int:
    room = backend.context - prompt_len
    if room < 0 or (room == 0 and requested != 0):
        raise APIError(400, f"the prompt is {prompt_len} tokens, beyond the model's context of {backend.context} "
                            "tokens", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"max_tokens={requested} is beyond the context: the prompt takes {prompt_len} of "
                            f"{backend.context} tokens, leaving {room}", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def _params(body) -> dict:
    from ..chat import CHAT_DEFAULTS

    sampling = {k: CHAT_DEFAULTS[k] if getattr(body, k) is None else getattr(body, k) for k in CHAT_DEFAULTS}
    return {**sampling, "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "seed": body.seed, "stop": body.stop_list()}


def _completion_prompts(backend: Backend, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts = [backend.tokenizer.encode(p)]
    elif not p:
        raise APIError(400, "'prompt' is empty", param="prompt", code="empty_prompt")
    elif isinstance(p[0], str):
        prompts = [backend.tokenizer.encode(s) for s in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, f"prompt {i} has no tokens", param="prompt", code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < backend.vocab_size]
        if bad:
            raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {backend.vocab_size})",
                           param="prompt", code="invalid_token_id")
    return prompts


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(x: Optional[float]) -> Optional[float]:
    """JSON has no -inf: clamp impossible tokens to a very small log-probability."""
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def _completion_logprobs(backend: Backend, prompt: list[int], tokens: list[int], top: int, echo: bool) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset (prompt too with echo)."""
    ids = list(prompt) + list(tokens)
    lps, tops = backend.score(ids, top)
    start = 0 if echo else len(prompt)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for t in range(start, len(ids)):
        s = backend.token_str(ids[t])
        out["tokens"].append(s)
        out["token_logprobs"].append(_finite(lps[t]))
        out["top_logprobs"].append(None if tops[t] is None else
                                   {backend.token_str(i, True): _finite(v) for i, v in tops[t]})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_logprobs(backend: Backend, prompt: list[int], tokens: list[int], top: int) -> list[dict]:
    lps, tops = backend.score(list(prompt) + list(tokens), top)
    out = []
    for k, tok in enumerate(tokens):
        t = len(prompt) + k
        s = backend.token_str(tok)
        out.append({"token": s, "logprob": _finite(lps[t]), "bytes": list(backend.token_bytes(tok)),
                    "top_logprobs": [{"token": backend.token_str(i, True), "logprob": _finite(v),
                                      "bytes": list(backend.token_bytes(i))} for i, v in tops[t]]})
    return out
