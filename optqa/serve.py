"""``--mode serve``: several verified deltas on one backbone behind an OpenAI-style completions API and a page.

The shape is OpenAI's completions API as vLLM exposes LoRA adapters: each delta is a "model" named on the
command line, so the official ``openai`` client, curl and existing tools work unchanged.

- ``GET /v1/models`` (and ``/v1/models/{name}``): one entry per delta, with its type, template, SHA-256,
  size, backbone and the dev/test scores its manifest recorded;
- ``POST /v1/completions``: ``model``, ``prompt`` (a question or a list), ``max_tokens``, ``temperature``,
  ``stop``, ``stream``; each question goes through that delta's own template, as in the question loop;
- ``GET /health``; ``GET /``: the page (``optqa/static/index.html``: no CDN, no build step).

One worker thread owns the models. Requests only queue questions; the collector (an asyncio task) waits a
short window after the first question, then answers everything queued for the same delta (and the same
``max_tokens``) as one batch through ``PromptForGeneration.answer``, and hands each request its own slice.

Only greedy decoding exists (the question loop's): ``temperature`` above 0 is refused with a 400 rather than
silently answered greedily. Answers are produced whole by a batch, so ``stream: true`` sends each answer as
one server-sent text event, then its ``finish_reason`` event, then ``data: [DONE]``, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from optqa.errors import OptqaError

log = logging.getLogger(__name__)

ENV_API_KEY = "OPTQA_API_KEY"
# a completions body is a few questions; anything larger is refused before it is parsed
MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 256  # questions in one request
MAX_STOP = 4  # OpenAI's limit on stop sequences
# how long the collector waits after the first queued question for others to join its batch
WINDOW_S = 0.01
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# OpenAI parameters that would change the answer in ways greedy answering cannot honour: refused when given
# with anything but their neutral value
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "presence_penalty": 0,
           "frequency_penalty": 0, "logit_bias": None}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's ``{"error": {...}}`` fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_delta_specs(specs: list[str] | None, default_path: str) -> dict[str, str]:
    """``--deltas NAME=CHECKPOINT ...`` as ``{name: path}``; without it, ``--delta_save_path`` as ``default``.

    Raises:
        OptqaError: a spec without ``=``, an empty or unusable name, or a name given twice.
    """
    if not specs:
        return {"default": default_path}
    deltas: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise OptqaError(f"--deltas takes NAME=CHECKPOINT (a folder or a .optqa bundle), got {spec!r}")
        if not NAME_PATTERN.fullmatch(name):
            raise OptqaError(f"--deltas: name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit); clients send it as the model name")
        if name in deltas:
            raise OptqaError(f"--deltas: the name {name!r} is given twice")
        deltas[name] = path
    return deltas


@dataclass
class Served:
    """One delta as served: its model, the manifest it was verified against and its settings."""

    name: str
    model: Any  # PromptForGeneration
    manifest: dict
    config: Any  # RunConfig
    context_length: int

    def card(self) -> dict:
        """The ``/v1/models`` entry: OpenAI's fields plus what the manifest says about the delta."""
        from optqa.checkpoints.format import WEIGHTS_NAME

        manifest = self.manifest
        weights = manifest["files"][WEIGHTS_NAME]
        backbone = manifest["backbone"]
        metrics = manifest.get("metrics") or {}
        scores = {split: {k: metrics[split][k] for k in ("f1", "em") if k in metrics[split]}
                  for split in ("dev", "test") if isinstance(metrics.get(split), dict)}
        try:
            created = int(datetime.datetime.fromisoformat(manifest["created"]).timestamp())
        except (KeyError, TypeError, ValueError):
            created = 0
        served_on = self.config.plm_path  # the backbone loaded (and verified against this manifest)
        return {
            "id": self.name, "object": "model", "created": created, "owned_by": "optqa",
            "root": served_on, "parent": served_on,
            "delta_type": manifest["delta"]["delta_type"], "delta": manifest["delta"],
            "template": manifest["template"], "sha256": weights["sha256"], "bytes": weights["bytes"],
            "trainable_parameters": manifest.get("trainable_parameters"),
            "backbone": {"name_or_path": served_on, "trained_on": backbone["name_or_path"],
                         "architecture": backbone.get("architecture"), "fingerprint": backbone.get("fingerprint")},
            "scores": scores, "max_tokens": self.model.max_new_tokens, "context_length": self.context_length,
        }


def load_served(deltas: dict[str, str], plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                overrides: dict | None = None, precision: str | None = None,
                quantize: str | None = None) -> dict[str, Served]:
    """Load and verify every delta on one backbone (``build.load_shared``) and set one compute precision.

    The frozen weights are shared, and PromptForGeneration keeps them in its autocast dtype, so every delta
    must compute in the same precision: ``precision`` (a typed ``--precision``) or, if None, the one every
    checkpoint recorded. ``quantize`` is ``--quantize`` (None: auto, int8 where the CPU lacks native bf16), applied
    once to the shared backbone (``quantize.prepare_shared_for_answering``).

    Raises:
        OptqaError: a delta is refused (its one-line reason), or the checkpoints recorded different
            precisions and none was given.
    """
    from optqa.checkpoints.assemble import load_shared
    from optqa.quantize import prepare_shared_for_answering

    loaded = load_shared(deltas, plm_path=plm_path, ignore_backbone_mismatch=ignore_backbone_mismatch,
                         overrides=overrides)
    recorded = {name: config.precision for name, (_, _, config) in loaded.items()}
    if precision is None and len(set(recorded.values())) > 1:
        raise OptqaError("the deltas recorded different precisions (" + ", ".join(
            f"{name}: {value}" for name, value in recorded.items()) + "); they share one backbone, so pass "
            "--precision to serve them together")
    chosen = precision or next(iter(recorded.values()))
    prepare_shared_for_answering([model for model, _, _ in loaded.values()], quantize, chosen)
    served = {}
    for name, (model, manifest, config) in loaded.items():
        context = int(getattr(model.backbone.config, "max_position_embeddings", 0) or 0)
        served[name] = Served(name, model, manifest, config, context)
    return served


@dataclass
class Job:
    """One request's questions, waiting for the worker."""

    name: str
    questions: list[str]
    max_tokens: int | None
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class Answered:
    text: str
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int


class Batcher:
    """Collects questions per delta and answers them in batches on one worker thread that owns the models.

    ``answer()`` is called from request handlers on the event loop; the collector task drains the queue a
    short ``window_s`` after the first question arrives (and whenever the worker finishes a batch, since
    everything that arrived meanwhile is queued), groups the jobs by delta and ``max_tokens``, and runs each
    group as one ``PromptForGeneration.answer`` call in the worker thread.
    """

    def __init__(self, served: dict[str, Served], window_s: float = WINDOW_S, batch_size: int = 32):
        self.served = served
        self.window_s = window_s
        self.batch_size = batch_size
        self.batches = 0  # answer() calls made; /health reports it, the tests check that batching happened
        self.questions = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optqa-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def answer(self, name: str, questions: list[str], max_tokens: int | None) -> list[Answered]:
        """This request's answers, in the order of ``questions``.

        Raises:
            RequestError: ``max_tokens`` does not fit the model's context with some question.
        """
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(Job(name, questions, max_tokens, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(self.window_s)
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                await self._answer(loop, jobs)
            except Exception as exc:  # noqa: BLE001 - the collector must outlive any one batch
                log.exception("answering a batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _answer(self, loop, jobs: list[Job]) -> None:
        prepared = await loop.run_in_executor(self._executor, self._prepare, jobs)
        groups: dict[tuple[str, int], list[tuple[Job, list[int]]]] = {}
        for job, result in zip(jobs, prepared):
            if job.future.done():  # the client went away
                continue
            if isinstance(result, RequestError):
                job.future.set_exception(result)
                continue
            max_tokens, prompt_lengths = result
            groups.setdefault((job.name, max_tokens), []).append((job, prompt_lengths))
        for (name, max_tokens), group in groups.items():
            questions = [q for job, _ in group for q in job.questions]
            try:
                answers = await loop.run_in_executor(self._executor, self._generate, name, questions, max_tokens)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the server lives on
                log.exception("answering %d questions with %s failed", len(questions), name)
                for job, _ in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job, prompt_lengths in group:
                mine = answers[start:start + len(job.questions)]
                start += len(job.questions)
                if not job.future.done():
                    job.future.set_result([Answered(text, p, c, max_tokens)
                                           for (text, c), p in zip(mine, prompt_lengths)])

    # --- in the worker thread: the only code that touches the models and their tokenizer ---

    def _prepare(self, jobs: list[Job]) -> list[tuple[int, list[int]] | RequestError]:
        """Each job's max_tokens and prompt lengths in tokens, or the error that refuses it."""
        from optqa.data import InputExample

        results: list[tuple[int, list[int]] | RequestError] = []
        for job in jobs:
            served = self.served[job.name]
            wrapper = served.model.wrapper
            lengths = [len(wrapper.encode(InputExample(guid=i, text_a=q), i).prompt_ids)
                       for i, q in enumerate(job.questions)]
            max_tokens = job.max_tokens or served.model.max_new_tokens
            longest = max(lengths)
            if served.context_length and longest + max_tokens > served.context_length:
                results.append(RequestError(
                    400, f"This model's maximum context length is {served.context_length} tokens, however you "
                         f"requested {longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the "
                         f"completion). Please reduce max_tokens to at most {served.context_length - longest}.",
                    "max_tokens", "context_length_exceeded"))
                continue
            results.append((max_tokens, lengths))
        return results

    def _generate(self, name: str, questions: list[str], max_tokens: int) -> list[tuple[str, int]]:
        model = self.served[name].model
        texts, ids = model.answer(questions, batch_size=self.batch_size, max_new_tokens=max_tokens, return_ids=True)
        self.batches += 1
        self.questions += len(questions)
        eos = model.tokenizer.eos_token_id
        # completion tokens: the generated ids without the eos that ended the answer (OpenAI counts no stop token)
        return [(text, len(row) - (1 if row and row[-1] == eos else 0)) for text, row in zip(texts, ids)]


def finish(answered: Answered, stop: list[str]) -> tuple[str, str]:
    """The text a client gets and OpenAI's finish_reason: cut at the first stop sequence ("stop"); an answer
    that used up max_tokens without reaching eos is "length"."""
    text = answered.text
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "length" if answered.completion_tokens >= answered.max_tokens else "stop"


def _page() -> str:
    return resources.files("optqa").joinpath("static/index.html").read_text(encoding="utf-8")


class Guard:
    """ASGI middleware in front of every route: the body-size limit (413) and the API key (401).

    The body is read here, at most ``limit`` bytes of it, and replayed to the app; a declared
    Content-Length above the limit is refused before anything is read. With a key, every path but the
    page itself (static HTML holding no data; it asks for the key and sends it on its API calls) needs
    ``Authorization: Bearer <key>``, compared in constant time.
    """

    def __init__(self, app, api_key: str | None, limit: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.limit = app, api_key, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await _send_error(send, 401, error_body(
                    "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key the "
                    "server was started with (--api_key or OPTQA_API_KEY)", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"})
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, self._too_large())
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _send_error(send, 413, self._too_large())
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later reads wait for the client to disconnect, as the real one does

        return await self.app(scope, replay, send)

    def _too_large(self) -> dict:
        return error_body(f"request body larger than {self.limit} bytes", code="request_too_large")


async def _send_error(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _check_completion(body: Any, served: dict[str, Served]) -> tuple[Served, list[str], int | None, list[str], bool]:
    """Validate a completions body; returns (delta, questions, max_tokens, stop sequences, stream).

    Raises:
        RequestError: 404 for an unknown model, 422 for a missing field or a wrong type, 400 for a value
            outside what is supported.
    """
    if not isinstance(body, dict):
        raise RequestError(422, "the request body must be a JSON object")
    for name in ("model", "prompt"):
        if name not in body:
            raise RequestError(422, f"'{name}' is a required property", name, "missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise RequestError(422, "'model' must be a string", "model", "invalid_type")
    if model not in served:
        raise RequestError(404, f"The model '{model}' does not exist; this server has: {', '.join(served)}",
                           "model", "model_not_found")
    prompt = body["prompt"]
    questions = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise RequestError(422, "'prompt' must be a string or a list of strings (token ids are not accepted)",
                           "prompt", "invalid_type")
    if not questions or len(questions) > MAX_PROMPTS:
        raise RequestError(400, f"'prompt' must hold 1 to {MAX_PROMPTS} questions, got {len(questions)}", "prompt")
    questions = [q.strip() for q in questions]
    if not all(questions):
        raise RequestError(400, "every prompt must be a non-empty question", "prompt")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise RequestError(422, "'max_tokens' must be an integer", "max_tokens", "invalid_type")
        if max_tokens < 1:
            raise RequestError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise RequestError(422, "'temperature' must be a number", "temperature", "invalid_type")
        if temperature != 0:
            raise RequestError(400, f"temperature {temperature}: this server answers greedily only (temperature 0, "
                                    "the question loop's decoding); sampling is not supported", "temperature",
                               "unsupported_value")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(422, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(422, "'stream' must be a boolean", "stream", "invalid_type")
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] != neutral:
            raise RequestError(400, f"'{name}' is not supported by this server (greedy answers, one per prompt)",
                               name, "unsupported_parameter")
    return served[model], questions, max_tokens, stops, bool(stream)


def create_app(served: dict[str, Served], api_key: str | None = None, window_s: float = WINDOW_S,
               batch_size: int = 32):
    """The ASGI app: FastAPI routes behind the ``Guard`` middleware.

    Args:
        served: name -> delta, from ``load_served``.
        api_key: when set, every endpoint but the page needs ``Authorization: Bearer <api_key>``.
        window_s: how long the collector waits for more questions before answering a batch (seconds).
        batch_size: most questions in one generation batch.
    Returns:
        The app; ``app.state.batcher`` is its Batcher once the app has started.
    """
    batcher = Batcher(served, window_s=window_s, batch_size=batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="optqa", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc)), status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served), "batches": batcher.batches,
                "questions": batcher.questions}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [s.card() for s in served.values()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name not in served:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return served[name].card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from exc
        delta, questions, max_tokens, stops, stream = _check_completion(body, served)
        answers = await batcher.answer(delta.name, questions, max_tokens)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = []
        for index, answered in enumerate(answers):
            text, reason = finish(answered, stops)
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason})
        prompt_tokens = sum(a.prompt_tokens for a in answers)
        completion_tokens = sum(a.completion_tokens for a in answers)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        head = {"id": ident, "object": "text_completion", "created": created, "model": delta.name}
        if not stream:
            return {**head, "choices": choices, "usage": usage}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events():
            for choice in choices:
                yield _event({**head, "choices": [{**choice, "finish_reason": None}]})
                yield _event({**head, "choices": [{**choice, "text": "", "finish_reason": choice["finish_reason"]}]})
            if include_usage:
                yield _event({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return Guard(app, api_key)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound before the server starts, so the port
    printed is the port served and no other process can take it in between.

    Raises:
        OptqaError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: no other process may bind the same port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OptqaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def run_server(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn until Ctrl-C (or SIGTERM)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False))
    server.run(sockets=[sock])


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def api_key_from(config_key: str | None, environ: dict) -> str | None:
    """--api_key, else the OPTQA_API_KEY environment variable; an empty value means no key."""
    key = config_key if config_key is not None else environ.get(ENV_API_KEY)
    return key or None


def describe(served: dict[str, Served]) -> list[str]:
    """One line per served delta for the start-up log."""
    lines = []
    for s in served.values():
        card = s.card()
        lines.append(f"  {s.name}: {card['delta_type']} ({card['bytes'] / 1e6:.2f} MB, sha256 "
                     f"{card['sha256'][:12]}) on {card['parent']}")
    return lines

