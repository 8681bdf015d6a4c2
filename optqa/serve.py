"""``--mode serve``: several verified deltas on one backbone behind an OpenAI-style API and a page.

The shape is OpenAI's completions and chat completions API as vLLM exposes LoRA adapters: each delta is a "model"
named on the command line, so the official ``openai`` client, curl and existing tools work unchanged.

- ``GET /v1/models`` (and ``/v1/models/{name}``): one entry per delta, with its type, template, SHA-256,
  size, backbone and the dev/test scores its manifest recorded;
- ``POST /v1/completions``: ``model``, ``prompt`` (a question or a list), ``max_tokens``, ``temperature``,
  ``stop``, ``stream``; each question goes through that delta's own template, as in the question loop;
- ``POST /v1/chat/completions``: the same with ``messages``, whose last message is the user's question (a delta
  is trained on single questions: it answers that message on its own; a system prompt and earlier turns, which
  chat clients send on every turn, are not part of its prompt), and
  ``max_completion_tokens`` (or ``max_tokens``); both endpoints share every check, the batching and the errors;
- ``GET /health``; ``GET /``: the page (``optqa/static/index.html``: no CDN, no build step).

Every field of a request is checked before any work is queued (4xx in OpenAI's error shape, never exception
text); each request's questions are encoded on their own before they join a batch, and a batch that still
fails is answered again request by request, so only the request at fault fails. Only the hosts the server
serves are accepted (DNS rebinding) and only JSON bodies on POST (cross-site form posts); a body must arrive
within ``BODY_TIMEOUT_S``; a request whose client went away before its batch started is dropped.

One worker thread owns the models. Requests only queue questions; the collector (an asyncio task) waits a
short window after the first question, then answers everything queued for the same delta (and the same
``max_tokens``) as one batch through ``PromptForGeneration.answer``, and hands each request its own slice.

Only greedy decoding exists (the question loop's): ``temperature`` above 0 is refused with a 400 rather than
silently answered greedily. Answers are produced whole by a batch, so ``stream: true`` sends each answer as
one server-sent text event (chat: after a ``role`` event), then its ``finish_reason`` event, then
``data: [DONE]``, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hmac
import json
import logging
import os
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
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
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
# a request body (at most MAX_BODY_BYTES) must arrive within this many seconds (408 otherwise): a client sending
# one byte a second holds a connection and a task, not the server
BODY_TIMEOUT_S = 30.0
# uvicorn: an idle kept-alive connection is closed after this many seconds (its default, said here)
KEEP_ALIVE_S = 5
# uvicorn: connections plus running requests beyond this are answered 503 at once instead of piling up
MAX_CONCURRENCY = 512
# a request's line and headers must arrive within this many seconds of the connection opening (or of the
# previous response on it); the connection is closed otherwise
HEADER_TIMEOUT_S = 30.0
# h11: largest request line plus headers (its default, said here); larger is refused by uvicorn with a 400
MAX_HEADER_BYTES = 16 * 1024
# the names a server bound to a loopback address answers to (the Host header a local client sends)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# OpenAI parameters that would change the answer in ways greedy answering cannot honour: refused when given
# with anything but their neutral value (both endpoints; each adds its own in its Endpoint)
# name -> (JSON types accepted, what the message calls them, the neutral values)
NUMBER = ((int, float), "a number")
COMMON_NEUTRAL = {"n": ((int,), "an integer", (1,)), "presence_penalty": (*NUMBER, (0,)),
                  "frequency_penalty": (*NUMBER, (0,)), "logit_bias": ((dict,), "an object", ({},))}
# the fields OpenAI defines for both endpoints; a field its Endpoint does not take is refused, as OpenAI refuses it
COMMON_FIELDS = {"model", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "user"}


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
    # the most characters one token of the tokenizer stands for (its longest vocabulary entry; for byte-level
    # BPE, OPT's, an entry's length is its byte count, at least its character count); 0: unknown
    token_chars: int = 0

    @property
    def max_prompt_chars(self) -> int | None:
        """The longest question (characters) that could fit the context: a longer one holds more than
        ``context_length`` tokens whatever its text, and is refused before it is tokenised. None: no bound known."""
        return self.context_length * self.token_chars or None

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
        # the backbone loaded (and verified against this manifest), by name: the card is public, server paths are not
        served_on = shown_name(self.config.plm_path)
        return {
            "id": self.name, "object": "model", "created": created, "owned_by": "optqa",
            "root": served_on, "parent": served_on,
            "delta_type": manifest["delta"]["delta_type"], "delta": manifest["delta"],
            "template": manifest["template"], "sha256": weights["sha256"], "bytes": weights["bytes"],
            "trainable_parameters": manifest.get("trainable_parameters"),
            "backbone": {"name_or_path": served_on, "trained_on": shown_name(backbone["name_or_path"]),
                         "architecture": backbone.get("architecture"), "fingerprint": backbone.get("fingerprint")},
            "scores": scores, "max_tokens": self.model.max_new_tokens, "context_length": self.context_length,
        }


def shown_name(name_or_path: Any) -> Any:
    """A backbone's name as the public ``/v1/models`` shows it: a Hub repo id (``owner/name``) as it is, a local
    folder (absolute, relative, existing here or only on the machine a manifest was written on) by its last
    component, so no server path is shown."""
    if not isinstance(name_or_path, str):
        return name_or_path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = (os.path.isabs(name_or_path) or "\\" in name_or_path or name_or_path.startswith((".", "~"))
             or os.path.exists(name_or_path))
    if not local:
        try:
            validate_repo_id(name_or_path)
            return name_or_path
        except HFValidationError:
            pass
    return re.split(r"[\\/]", name_or_path.rstrip("\\/"))[-1]


def load_served(deltas: dict[str, str], plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                overrides: dict | None = None, precision: str | None = None,
                quantize: str | None = None) -> dict[str, Served]:
    """Load and verify every delta on one backbone (``build.load_shared``) and set one compute precision.

    The frozen weights are shared, and PromptForGeneration keeps them in its autocast dtype, so every delta
    must compute in the same precision: ``precision`` (a typed ``--precision``) or, if None, the one every
    checkpoint recorded. ``quantize`` is ``--quantize`` (None: auto, int8 where the CPU lacks native bf16), applied
    once to the shared backbone (``answering.prepare_shared_for_answering``).

    Raises:
        OptqaError: a delta is refused (its one-line reason), or the checkpoints recorded different
            precisions and none was given.
    """
    from optqa.answering import prepare_shared_for_answering
    from optqa.build import load_shared

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
        token_chars = max(map(len, model.tokenizer.get_vocab()), default=0)
        served[name] = Served(name, model, manifest, config, context, token_chars)
    return served


@dataclass
class Job:
    """One request's questions, waiting for the worker (``encoded`` once the worker has rendered them)."""

    name: str
    questions: list[str]
    max_tokens: int | None
    future: asyncio.Future
    # the request's fields its refusals name: where its questions are, and its max_tokens
    params: tuple[str, str] = ("prompt", "max_tokens")
    queued: float = field(default_factory=time.perf_counter)
    encoded: list = field(default_factory=list)  # optqa.data.Encoded, one per question


@dataclass
class Answered:
    text: str
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int


def internal_error() -> RequestError:
    """The 500 a request gets when answering it failed for a reason that is not its own: the server logged the
    traceback; the client gets no exception text."""
    return RequestError(500, "internal error while answering this request (the server logged the details)",
                        kind="server_error")


class Batcher:
    """Collects questions per delta and answers them in batches on one worker thread that owns the models.

    ``answer()`` is called from request handlers on the event loop; the collector task drains the queue a
    short ``window_s`` after the first question arrives (and whenever the worker finishes a batch, since
    everything that arrived meanwhile is queued), encodes each request's questions on its own (a request whose
    questions cannot be encoded, or do not fit the context with its ``max_tokens``, is refused alone), groups
    the rest by delta and ``max_tokens``, and runs each group as one ``answer_encoded`` call in the worker
    thread. A group whose generation fails is answered again request by request, so only the failing request
    gets the error. A request whose client went away (its future cancelled) before its batch started is
    dropped, not generated.
    """

    def __init__(self, served: dict[str, Served], window_s: float = WINDOW_S, batch_size: int = 32):
        self.served = served
        self.window_s = window_s
        self.batch_size = batch_size
        # /health reports these; the tests check that batching happened and that abandoned requests were dropped
        self.batches = 0  # successful generation calls
        self.questions = 0  # questions generated
        self.dropped = 0  # requests whose client went away before their answer
        self.waiting = 0  # requests waiting for their answer now
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

    async def answer(self, name: str, questions: list[str], max_tokens: int | None,
                     params: tuple[str, str] = ("prompt", "max_tokens")) -> list[Answered]:
        """This request's answers, in the order of ``questions``; cancelling the call drops the request.

        ``params`` are the request's fields that hold its questions and its max_tokens (named in its refusals).

        Raises:
            RequestError: this request's questions cannot be encoded, ``max_tokens`` does not fit the model's
                context with some question, or answering failed (500, without internal text).
        """
        future = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self._queue.put(Job(name, questions, max_tokens, future, params))
            return await future
        finally:
            self.waiting -= 1

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(self.window_s)
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                await self._answer(loop, jobs)
            except Exception:  # the collector must outlive any one batch
                log.exception("answering a batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(internal_error())

    async def _answer(self, loop, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # clients that went away while queued
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
            await self._run(loop, name, group, max_tokens)

    async def _run(self, loop, name: str, group: list[tuple[Job, list[int]]], max_tokens: int) -> None:
        """Answer ``group`` as one batch and hand each job its answers; if that fails, answer each job alone, so
        only a job that fails on its own gets the error (its RequestError, else a 500 without internal text)."""
        group = [(job, lengths) for job, lengths in group if not job.future.done()]  # clients that went away
        if not group:
            return
        try:
            answers = await loop.run_in_executor(self._executor, self._generate, name, group, max_tokens)
        except Exception as exc:  # one request must not fail its neighbours, and the server lives on
            if len(group) > 1:
                log.exception("answering %d requests with %s together failed; answering each alone", len(group), name)
                for member in group:
                    await self._run(loop, name, [member], max_tokens)
                return
            log.exception("answering a request with %s failed", name)
            group[0][0].future.set_exception(exc if isinstance(exc, RequestError) else internal_error())
            return
        for (job, _), mine in zip(group, answers):
            if not job.future.done():
                job.future.set_result(mine)

    # --- in the worker thread: the only code that touches the models and their tokenizer ---

    def _prepare(self, jobs: list[Job]) -> list[tuple[int, list[int]] | RequestError | None]:
        """Encode each job's questions on its own (into ``job.encoded``); returns its max_tokens and prompt
        lengths in tokens, or the error that refuses it alone (None: its client went away)."""
        from optqa.data import InputExample

        results: list[tuple[int, list[int]] | RequestError | None] = []
        for job in jobs:
            if job.future.done():
                results.append(None)
                continue
            served = self.served[job.name]
            wrapper = served.model.wrapper
            try:
                job.encoded = [wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(job.questions)]
            except Exception:  # the tokenizer refused this request's text: it alone fails
                log.exception("encoding a request's prompt for %s failed", job.name)
                results.append(RequestError(400, "the prompt could not be encoded by this model's tokenizer",
                                            job.params[0]))
                continue
            lengths = [len(e.prompt_ids) for e in job.encoded]
            max_tokens = job.max_tokens or served.model.max_new_tokens
            longest = max(lengths)
            if served.context_length and longest + max_tokens > served.context_length:
                results.append(RequestError(
                    400, f"This model's maximum context length is {served.context_length} tokens, however you "
                         f"requested {longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the "
                         f"completion). Please reduce {job.params[1]} to at most {served.context_length - longest}.",
                    job.params[1], "context_length_exceeded"))
                continue
            results.append((max_tokens, lengths))
        return results

    def _generate(self, name: str, group: list[tuple[Job, list[int]]], max_tokens: int) -> list[list[Answered]]:
        """One generation for every question of ``group``'s jobs; each job's answers, in order."""
        model = self.served[name].model
        encoded = [dataclasses.replace(e, index=i) for i, e in enumerate(e for job, _ in group for e in job.encoded)]
        texts, ids = model.answer_encoded(encoded, batch_size=self.batch_size, max_new_tokens=max_tokens,
                                          return_ids=True)
        self.batches += 1
        self.questions += len(encoded)
        eos = model.tokenizer.eos_token_id
        # completion tokens: the generated ids without the eos that ended the answer (OpenAI counts no stop token)
        answered = iter([Answered(text, 0, len(row) - (1 if row and row[-1] == eos else 0), max_tokens)
                         for text, row in zip(texts, ids)])
        return [[dataclasses.replace(next(answered), prompt_tokens=p) for p in lengths] for _, lengths in group]


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
    """ASGI middleware in front of every route: the Host header (400), the API key (401), JSON bodies only on
    POST (415), the body-size limit (413) and the body's deadline (408).

    Own code rather than starlette's TrustedHostMiddleware: that one answers in plain text, and clients of this
    API read OpenAI's error shape. Only a Host in ``allowed_hosts`` (None: any) is served, so a page whose
    name was rebound to 127.0.0.1 cannot talk to a local server. A POST must say ``Content-Type:
    application/json``: a browser sends that cross-site only after a CORS preflight, which this server never
    grants, so no other site's page can post to it. The body is read here, at most ``limit`` bytes of it
    within ``body_timeout_s`` seconds, and replayed to the app; a declared Content-Length above the limit is
    refused before anything is read. With a key, every path but the page itself (static HTML holding no data;
    it asks for the key and sends it on its API calls) needs ``Authorization: Bearer <key>``, compared in
    constant time as bytes (the key is ASCII, see ``api_key_from``).
    """

    def __init__(self, app, api_key: str | None, limit: int = MAX_BODY_BYTES,
                 allowed_hosts: list[str] | None = None, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.body_timeout_s = app, limit, body_timeout_s
        self.api_key = api_key.encode("ascii") if api_key else None
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else {
            _host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return await _send_error(send, 400, error_body(
                    "this server does not serve the host named in the Host header (start it with --allowed_hosts "
                    "to add a name)", code="invalid_host"))
        if self.api_key and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_error(send, 401, error_body(
                    "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key the "
                    "server was started with (--api_key or OPTQA_API_KEY)", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"})
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return await _send_error(send, 415, error_body(
                    "the request body must be JSON, sent with 'Content-Type: application/json'",
                    code="unsupported_media_type"))
            encoding = headers.get(b"content-encoding", b"identity").strip().lower()
            if encoding != b"identity":  # a compressed body would reach the JSON parser undecoded
                return await _send_error(send, 415, error_body(
                    "the request body must be sent uncompressed (no Content-Encoding)", code="unsupported_media_type"))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, self._too_large())
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > self.limit:
                        return await _send_error(send, 413, self._too_large())
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await _send_error(send, 408, error_body(
                f"the request body did not arrive within {self.body_timeout_s:g} seconds", code="request_timeout"),
                {"connection": "close"})
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


def _host_name(host: str) -> str:
    """A Host header's (or an address's) name without its port, lowercased: ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def allowed_hosts_for(host: str, extra: list[str] | None) -> list[str] | None:
    """The Host names a server bound to ``host`` answers to: ``host`` itself, the loopback names when it is a
    loopback address, and ``extra`` (``--allowed_hosts``). A wildcard bind (0.0.0.0, ::) without ``extra``
    answers to any name (None): its clients may use any of the machine's names and addresses."""
    if host in WILDCARD_HOSTS:
        return [*LOOPBACK_HOSTS, *extra] if extra else None
    names = [host, *(LOOPBACK_HOSTS if _host_name(host) in LOOPBACK_HOSTS else ()), *(extra or ())]
    return list(dict.fromkeys(names))


async def _send_error(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: a message that names what the client sent (a model name, a
    field) may hold a lone surrogate, which UTF-8 cannot carry but a ``\\udXXX`` escape can."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` if it is one of ``kinds`` (a bool is no number), None if absent or null.

    Raises:
        RequestError: 422, the value has another type.
    """
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(422, f"'{name}' must be {what}", name, "invalid_type")
    return value


def _text_list(value: Any, name: str, what: str) -> list[str]:
    """A string or a list of strings as a list, each encodable as UTF-8.

    Raises:
        RequestError: 422, another type; 400, text holding a lone surrogate (valid JSON, not UTF-8 text).
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
        raise RequestError(422, f"'{name}' must be {what}", name, "invalid_type")
    for index, item in enumerate(items):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(400, f"'{name}' item {index} is not text: it holds a lone surrogate "
                                    f"(\\u{ord(item[exc.start]):04x}) at character {exc.start}, which UTF-8 cannot "
                                    "encode", name, "invalid_encoding") from None
    return items


@dataclass
class Checked:
    """A request that passed every check: what the worker answers and how the response is shaped."""

    delta: Served
    questions: list[str]
    max_tokens: int | None
    stops: list[str]
    stream: bool
    include_usage: bool
    # the fields its refusals name: where its questions are, and the max_tokens field it gave (or would give)
    params: tuple[str, str]


class Endpoint:
    """What ``/v1/completions`` and ``/v1/chat/completions`` do differently (the fields they take, where the
    questions are, the shape of a choice); everything else (the checks, batching, usage, streaming, errors) is
    shared by ``_check_request`` and ``_respond``."""

    questions_param = "prompt"  # the field holding the questions, named in its refusals
    max_tokens_names: tuple[str, ...] = ("max_tokens",)  # the fields that may give max_tokens
    fields: frozenset[str] = frozenset()
    neutral: dict = {}
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def questions(self, body: dict) -> list[str]:
        """The request's questions, stripped and non-empty (``body`` holds ``questions_param``).

        Raises:
            RequestError: 422 for a wrong type, 400 for a value not answered.
        """
        raise NotImplementedError

    def choice(self, index: int, text: str, reason: str) -> dict:
        """One entry of a response's ``choices``."""
        raise NotImplementedError

    def chunks(self, index: int, text: str, reason: str) -> list[dict]:
        """The ``choices`` entries a stream sends for one answer, one event each, the last with its reason."""
        raise NotImplementedError


class Completions(Endpoint):
    """``POST /v1/completions``: ``prompt`` is a question or a list of them; one choice per question."""

    neutral = {**COMMON_NEUTRAL, "best_of": ((int,), "an integer", (1,)), "echo": ((bool,), "a boolean", (False,)),
               "logprobs": ((int,), "an integer", ()), "suffix": ((str,), "a string", ("",))}
    fields = frozenset({*COMMON_FIELDS, "prompt", "max_tokens", *neutral})

    def questions(self, body: dict) -> list[str]:
        questions = _text_list(body["prompt"], "prompt", "a string or a list of strings (token ids are not accepted)")
        if not questions or len(questions) > MAX_PROMPTS:
            raise RequestError(400, f"'prompt' must hold 1 to {MAX_PROMPTS} questions, got {len(questions)}",
                               "prompt")
        questions = [q.strip() for q in questions]
        if not all(questions):
            raise RequestError(400, "every prompt must be a non-empty question", "prompt")
        return questions

    def choice(self, index: int, text: str, reason: str) -> dict:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}

    def chunks(self, index: int, text: str, reason: str) -> list[dict]:
        return [{**self.choice(index, text, reason), "finish_reason": None}, self.choice(index, "", reason)]


# the roles of OpenAI's chat messages ("developer" is the newer name of "system")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatCompletions(Endpoint):
    """``POST /v1/chat/completions``: the question is the conversation's last message, the user's.

    A chat client sends the whole conversation on every turn; a delta was trained on single questions through its
    template, so it answers the last user message on its own: a system prompt and earlier turns (checked for a
    known role) are not part of its prompt, as docs/serving.md says.
    """

    questions_param = "messages"
    # max_tokens is OpenAI's older name of max_completion_tokens, still sent by many clients
    max_tokens_names = ("max_completion_tokens", "max_tokens")
    neutral = {**COMMON_NEUTRAL, "logprobs": ((bool,), "a boolean", (False,)),
               "top_logprobs": ((int,), "an integer", (0,))}
    fields = frozenset({*COMMON_FIELDS, "messages", *max_tokens_names, *neutral})
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def questions(self, body: dict) -> list[str]:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError(422, "'messages' must be an array of message objects", "messages", "invalid_type")
        if not messages:
            raise RequestError(400, "'messages' must hold the user's question", "messages")
        where = f"messages.[{len(messages) - 1}]"
        last = messages[-1]
        role = last.get("role")
        if role != "user":
            raise RequestError(400, f"the last message must be the user's question (role 'user'), got role "
                                    f"{_shown(role)}", f"{where}.role")
        for i, earlier in enumerate(messages[:-1]):
            if earlier.get("role") not in CHAT_ROLES:
                raise RequestError(400, f"messages.[{i}].role must be one of {', '.join(CHAT_ROLES)}, got "
                                        f"{_shown(earlier.get('role'))}", f"messages.[{i}].role")
        unknown = sorted(set(last) - {"role", "content", "name"})
        if unknown:
            raise RequestError(400, f"Unrecognized message argument supplied: {unknown[0]}", f"{where}.{unknown[0]}",
                               "unknown_parameter")
        _typed(last, "name", (str,), "a string")
        question = "\n".join(_text_list(_message_text(last.get("content"), f"{where}.content"), f"{where}.content",
                                        "text")).strip()
        if not question:
            raise RequestError(400, "the user's message must be a non-empty question", f"{where}.content")
        return [question]

    def choice(self, index: int, text: str, reason: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}

    def chunks(self, index: int, text: str, reason: str) -> list[dict]:
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                for delta in ({"role": "assistant", "content": ""}, {"content": text})] + [
            {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]


def _message_text(content: Any, param: str) -> list[str]:
    """A message's ``content``, a string or OpenAI's list of content parts, as its texts (the parts' texts joined
    by newlines make the question, as vLLM joins them).

    Raises:
        RequestError: 422, content of another type; 400, a part that is not text (this model reads text only).
    """
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise RequestError(422, f"'{param}' must be a string or an array of content parts", param, "invalid_type")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise RequestError(400, f"content part {index} has type {_shown(kind)}: this model reads text only "
                                    "(type 'text')", f"{param}.[{index}].type", "unsupported_value")
        if not isinstance(part.get("text"), str):
            raise RequestError(422, f"content part {index} must have 'text', a string", f"{param}.[{index}].text",
                               "invalid_type")
        texts.append(part["text"])
    return texts


def _shown(value: Any) -> str:
    """A value a client sent, as a refusal quotes it (a string quoted, anything else as JSON, cut short)."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


COMPLETIONS, CHAT = Completions(), ChatCompletions()


def _check_request(body: Any, served: dict[str, Served], endpoint: Endpoint) -> Checked:
    """Validate every field of a request to ``endpoint`` before any work.

    Raises:
        RequestError: 404 for an unknown model, 422 for a missing field or a wrong type, 400 for a value
            outside what is supported (an unknown field, a prompt that cannot fit the context, ...).
    """
    if not isinstance(body, dict):
        raise RequestError(422, "the request body must be a JSON object")
    for name in ("model", endpoint.questions_param):
        if name not in body:
            raise RequestError(422, f"'{name}' is a required property", name, "missing_required_parameter")
    unknown = [name for name in body if name not in endpoint.fields]
    if unknown:
        raise RequestError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0],
                           "unknown_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise RequestError(422, "'model' must be a string", "model", "invalid_type")
    if model not in served:
        raise RequestError(404, f"The model '{model}' does not exist; this server has: {', '.join(served)}",
                           "model", "model_not_found")
    delta = served[model]
    questions = endpoint.questions(body)
    cap = delta.max_prompt_chars
    longest = max(map(len, questions))
    if cap and longest > cap:  # refused before tokenising: its tokens cannot fit the context
        raise RequestError(400, f"This model's maximum context length is {delta.context_length} tokens, however "
                                f"your prompt has {longest} characters: more than {delta.context_length} tokens of "
                                f"at most {delta.token_chars} characters each. Please shorten it.",
                           endpoint.questions_param, "context_length_exceeded")
    max_tokens, max_tokens_name = _max_tokens(body, delta, endpoint.max_tokens_names)
    stops, stream, include_usage = _check_decoding(body, endpoint)
    return Checked(delta, questions, max_tokens, stops, stream, include_usage,
                   (endpoint.questions_param, max_tokens_name))


def _check_decoding(body: dict, endpoint: Endpoint) -> tuple[list[str], bool, bool]:
    """The decoding fields of a request: greedy only, ``stop``, ``stream`` and its options, and the fields taken
    only at their neutral values.

    Returns:
        ``(stops, stream, include_usage)``.
    Raises:
        RequestError: 400 for a value that would ask for other decoding than greedy, 422 for a wrong type.
    """
    temperature = _typed(body, "temperature", *NUMBER)
    if temperature is not None and temperature != 0:
        raise RequestError(400, f"temperature {temperature}: this server answers greedily only (temperature 0, the "
                                "question loop's decoding); sampling is not supported", "temperature",
                           "unsupported_value")
    top_p = _typed(body, "top_p", *NUMBER)  # any nucleus holds the greedy token: no value changes the answer
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(400, "'top_p' must be above 0 and at most 1", "top_p")
    _typed(body, "seed", (int,), "an integer")  # greedy answers are the same for every seed
    _typed(body, "user", (str,), "a string")
    stop = body.get("stop")
    stops = [] if stop is None else _text_list(stop, "stop", "a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    options = _typed(body, "stream_options", (dict,), "an object")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
        if set(options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' takes only 'include_usage'", "stream_options",
                               "unknown_parameter")
        include_usage = bool(_typed(options, "include_usage", (bool,), "a boolean"))
    for name, (kinds, what, neutral) in endpoint.neutral.items():
        value = _typed(body, name, kinds, what)
        if value is not None and value not in neutral:
            raise RequestError(400, f"'{name}' is not supported by this server (greedy answers, one per prompt)",
                               name, "unsupported_parameter")
    return stops, stream, include_usage


def _max_tokens(body: dict, delta: Served, names: tuple[str, ...]) -> tuple[int | None, str]:
    """The answer's token budget from the one of ``names`` given (None: the delta's own), and that name (the
    first of ``names`` when none is given).

    Raises:
        RequestError: 400, two of ``names`` given, a value below 1 or not below the context; 422, not an integer.
    """
    given = [name for name in names if body.get(name) is not None]
    if len(given) > 1:
        raise RequestError(400, f"give '{given[0]}' or '{given[1]}', not both", given[1])
    if not given:
        return None, names[0]
    name = given[0]
    max_tokens = _typed(body, name, (int,), "an integer")
    if max_tokens < 1:
        raise RequestError(400, f"'{name}' must be at least 1", name)
    if delta.context_length and max_tokens >= delta.context_length:  # the prompt takes at least one token
        raise RequestError(400, f"This model's maximum context length is {delta.context_length} tokens; "
                                f"'{name}' must be below it", name, "context_length_exceeded")
    return max_tokens, name


def create_app(served: dict[str, Served], api_key: str | None = None, window_s: float = WINDOW_S,
               batch_size: int = 32, allowed_hosts: list[str] | None = None, body_timeout_s: float = BODY_TIMEOUT_S):
    """The ASGI app: FastAPI routes behind the ``Guard`` middleware.

    Args:
        served: name -> delta, from ``load_served``.
        api_key: when set, every endpoint but the page needs ``Authorization: Bearer <api_key>`` (ASCII).
        window_s: how long the collector waits for more questions before answering a batch (seconds).
        batch_size: most questions in one generation batch.
        allowed_hosts: the Host header names served (``allowed_hosts_for``); None: any.
        body_timeout_s: how long a request body may take to arrive (seconds; 408 after).
    Returns:
        The app (the Guard); ``app.app.state.batcher`` is its Batcher.
    """
    batcher = Batcher(served, window_s=window_s, batch_size=batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="optqa", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=AsciiJSONResponse)
    app.state.batcher = batcher
    _add_error_handlers(app)
    _add_routes(app, served, batcher)
    return Guard(app, api_key, allowed_hosts=allowed_hosts, body_timeout_s=body_timeout_s)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error a client gets is OpenAI's error object, in ASCII JSON; a crash's traceback stays in the log."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return AsciiJSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return AsciiJSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}"),
                                 status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return AsciiJSONResponse(error_body(f"{request.method} {request.url.path}: the request does not match this "
                                            "endpoint"), status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        # the traceback goes to the server's log; the client learns nothing of the server's internals
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return AsciiJSONResponse(error_body("internal error (the server logged the details)", "server_error"),
                                 status_code=500)


def _add_routes(app: FastAPI, served: dict[str, Served], batcher: "Batcher") -> None:
    """The page, ``/health``, ``/v1/models`` and the two answering endpoints."""

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served), "batches": batcher.batches,
                "questions": batcher.questions, "waiting": batcher.waiting, "dropped": batcher.dropped}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [s.card() for s in served.values()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name not in served:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return served[name].card()

    async def respond(request: Request, endpoint: Endpoint):
        checked = _check_request(await _json_body(request), served, endpoint)
        answers = await _unless_client_leaves(request, batcher.answer(
            checked.delta.name, checked.questions, checked.max_tokens, checked.params))
        if answers is None:  # nobody is left to read an answer
            batcher.dropped += 1
            return Response(status_code=499)
        return _response(endpoint, checked, answers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, CHAT)


async def _json_body(request: Request) -> Any:
    """The request's body parsed as JSON.

    Raises:
        RequestError: 400 (``invalid_json``), the body is not JSON this server can parse.
    """
    raw = await request.body()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not valid JSON (not UTF-8 text)", None,
                           "invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the request body is not valid JSON for this server (nested too deeply)", None,
                           "invalid_json") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise RequestError(400, "the request body is not valid JSON for this server (a number with too many "
                                "digits)", None, "invalid_json") from None


def _response(endpoint: Endpoint, checked: Checked, answers: list[Answered]) -> dict | StreamingResponse:
    """The response to a checked request: ``endpoint``'s choices with ``usage``, or its server-sent events
    (each answer's chunks, the usage event when asked for, then ``data: [DONE]``)."""
    finished = [finish(answered, checked.stops) for answered in answers]
    prompt_tokens = sum(a.prompt_tokens for a in answers)
    completion_tokens = sum(a.completion_tokens for a in answers)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    head = {"id": f"{endpoint.id_prefix}-{uuid.uuid4().hex}", "object": endpoint.object, "created": int(time.time()),
            "model": checked.delta.name}
    if not checked.stream:
        return {**head, "choices": [endpoint.choice(index, *done) for index, done in enumerate(finished)],
                "usage": usage}
    head["object"] = endpoint.chunk_object

    def events():
        for index, done in enumerate(finished):
            for choice in endpoint.chunks(index, *done):
                yield _event({**head, "choices": [choice]})
        if checked.include_usage:
            yield _event({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _unless_client_leaves(request: Request, work) -> Any:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (a queued request is
    dropped before its batch) and the result is None."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


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


def header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on a request's line and headers: a connection that has not sent a
    whole request head within ``seconds`` of opening (or of its previous response) is closed.

    Own code: uvicorn's ``timeout_keep_alive`` only covers an idle connection, and any byte restarts nothing, so a
    client sending its headers one byte a second would hold the connection forever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _expire(self) -> None:
            if self._waiting_for_head():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and not self._waiting_for_head():
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


def server_config(app, log_level: str = "warning", header_timeout_s: float = HEADER_TIMEOUT_S):
    """uvicorn's settings for serving ``app``: its limits said here, and the request-head deadline (seconds)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                          http=header_deadline_protocol(header_timeout_s), timeout_keep_alive=KEEP_ALIVE_S,
                          limit_concurrency=MAX_CONCURRENCY, h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def run_server(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn (``server_config``) until Ctrl-C (or SIGTERM)."""
    import uvicorn

    uvicorn.Server(server_config(app, log_level)).run(sockets=[sock])


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def api_key_from(config_key: str | None, environ: dict) -> str | None:
    """--api_key, else the OPTQA_API_KEY environment variable; an empty value means no key.

    Raises:
        OptqaError: the key holds a character an ``Authorization`` header cannot carry as it is (anything but
            printable ASCII without spaces): no client could ever send it, so every request would be refused.
    """
    key = config_key if config_key is not None else environ.get(ENV_API_KEY)
    if key and not all("!" <= c <= "~" for c in key):
        where = "--api_key" if config_key is not None else ENV_API_KEY
        raise OptqaError(f"{where} must be printable ASCII without spaces (HTTP headers carry ASCII; no client could "
                         "send this key)")
    return key or None


def describe(served: dict[str, Served]) -> list[str]:
    """One line per served delta for the start-up log."""
    lines = []
    for s in served.values():
        card = s.card()
        lines.append(f"  {s.name}: {card['delta_type']} ({card['bytes'] / 1e6:.2f} MB, sha256 "
                     f"{card['sha256'][:12]}) on {s.config.plm_path}")
    return lines

