"""--mode serve: the real server on a free port, driven by the official openai client, raw HTTP and a browser."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import httpx2 as httpx  # the HTTP client the openai package (3.x) itself is built on
except ImportError:  # pragma: no cover - openai releases built on httpx
    import httpx
import pytest
from conftest import MEMORY_SET, REPO, SAMPLE, run_cli

QUESTIONS = [q for q, _ in MEMORY_SET[:4]]
# fp32 and unmerged LoRA: the question loop then computes exactly what the server computes (the server never
# merges LoRA: its deltas share the backbone's weights, which a merge would write into)
EXACT = ("--precision", "fp32", "--no-merge_lora")
METRICS = {"adapter": {"dev": {"f1": 41.25, "em": 30.0}, "test": {"f1": 39.5, "em": 28.75}},
           "lora": {"dev": {"f1": 12.5, "em": 10.0}, "test": {"f1": 11.0, "em": 7.5}}}


def sample_questions(count: int) -> list[str]:
    rows = [json.loads(line) for split in ("train", "dev", "test")
            for line in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["question"] for row in rows][:count]


@pytest.fixture(scope="module")
def ckpts(tiny_opt, tmp_path_factory) -> dict[str, Path]:
    """Random-weight adapter and LoRA checkpoints on the tiny OPT (answers long and question-dependent)."""
    from optqa.tiny import build_random_checkpoint

    root = tmp_path_factory.mktemp("serve-deltas")
    return {
        "adapter": build_random_checkpoint(tiny_opt, root / "adapter", "adapter", seed=1, max_new_tokens=8,
                                           metrics=METRICS["adapter"]),
        "lora": build_random_checkpoint(tiny_opt, root / "lora", "lora", seed=2, max_new_tokens=8,
                                        modified_modules=["self_attn.q_proj", "self_attn.v_proj"],
                                        metrics=METRICS["lora"]),
    }


def start_cli_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m optqa --mode serve --port 0 ...`` as a user starts it; returns the process and its URL."""
    process = subprocess.Popen([sys.executable, "-m", "optqa", "--mode", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    line = process.stdout.readline()  # the one stdout line, printed once the port is bound and every delta loaded
    if not line.startswith("serving "):
        process.kill()
        raise AssertionError(f"server did not start: {line!r} {process.stderr.read()[-2000:]}")
    return process, line.split(" at ")[1].split("/ ")[0]


@pytest.fixture(scope="module")
def server(ckpts):
    process, url = start_cli_server("--deltas", f"adapter={ckpts['adapter']}", f"lora={ckpts['lora']}", *EXACT[:2],
                                    "--allowed_hosts", "box.lan")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]


def question_loop(checkpoint: Path, questions: list[str]) -> list[str]:
    result = run_cli("--mode", "interactive_inference", "--delta_save_path", str(checkpoint), *EXACT,
                     stdin="\n".join(questions) + "\nquit()\n")
    assert result.returncode == 0, result.stderr[-2000:]
    # split on "\n" only: random deltas' answers may hold control characters that splitlines() breaks at
    return [line[len("Answer: "):] for line in result.stdout.split("\n") if line.startswith("Answer:")]


def test_openai_client_gets_the_question_loops_answers(server, ckpts):
    """LoRA, the one delta the question loop would merge; test_deltas_share_the_backbone_and_answer_as_alone
    checks every served delta against load_trained, which the question loop runs."""
    import openai

    from optqa.checkpoints.format import MANIFEST_NAME

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(listed) == ["adapter", "lora"]
    for name, card in listed.items():
        manifest = json.loads((ckpts[name] / MANIFEST_NAME).read_text(encoding="utf-8"))
        # names, not the server's paths: the tiny backbone's folder by its last component
        backbone = Path(manifest["backbone"]["name_or_path"])
        assert backbone.is_absolute() and card["parent"] == card["root"] == backbone.name
        assert card["backbone"]["name_or_path"] == card["backbone"]["trained_on"] == backbone.name
        assert str(backbone.parent) not in json.dumps(card)
        assert card["delta_type"] == name and card["template"] == manifest["template"]
        assert card["sha256"] == manifest["files"]["delta_model.safetensors"]["sha256"]
        assert card["scores"] == METRICS[name]

    name = "lora"
    expected = question_loop(ckpts[name], QUESTIONS)
    assert len(expected) == 4 and all(expected) and len(set(expected)) > 1
    one = client.completions.create(model=name, prompt=QUESTIONS[0])
    assert one.choices[0].text == expected[0]
    assert one.choices[0].finish_reason in ("stop", "length") and one.object == "text_completion"
    usage = one.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    several = client.completions.create(model=name, prompt=QUESTIONS)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == expected
    streamed = list(client.completions.create(model=name, prompt=QUESTIONS[1], stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected[1]
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].finish_reason is None for chunk in streamed[:-1])


def test_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": "lora", "prompt": QUESTIONS[2],
                                                                 "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["text"]


def test_max_tokens_and_stop(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    full = client.completions.create(model="adapter", prompt=QUESTIONS[0]).choices[0].text
    cut = client.completions.create(model="adapter", prompt=QUESTIONS[0], max_tokens=2)
    short = cut.choices[0]
    # greedy: the first two tokens of the full answer, and the answer was cut by the budget
    assert short.finish_reason == "length" and full.startswith(short.text) and len(short.text) < len(full)
    assert cut.usage.completion_tokens == 2  # the generated ids, counted, not the text re-encoded
    stop = full[len(full) // 2:][:2]
    cut = client.completions.create(model="adapter", prompt=QUESTIONS[0], stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_each_get_their_own_answer(server):
    """64 requests over 2 deltas at once: answered in shared batches, each equal to its answer alone."""
    questions = sample_questions(32)
    jobs = [(name, q) for q in questions for name in ("adapter", "lora")]
    with httpx.Client(base_url=server, timeout=120) as client:
        def ask(name, question):
            response = client.post("/v1/completions", json={"model": name, "prompt": question})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        alone = [ask(name, q) for name, q in jobs]
        before = client.get("/health").json()

    async def together():
        async with httpx.AsyncClient(base_url=server, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            responses = await asyncio.gather(*[client.post("/v1/completions", json={"model": name, "prompt": q})
                                               for name, q in jobs])
        return [r.json()["choices"][0]["text"] for r in responses]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 32  # the answers differ, so a mix-up could not go unseen
    after = httpx.get(f"{server}/health").json()
    assert after["questions"] - before["questions"] == 64
    assert after["batches"] - before["batches"] < 32  # shared batches, not one generation per request


BAD_REQUESTS = [
    # (case, body bytes or JSON, status, param)
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("a path as the model", {"model": "/etc/passwd", "prompt": "hi"}, 404, "model"),
    ("malformed JSON", b'{"model": "lora", "prompt": ', 400, None),
    ("missing prompt", {"model": "lora"}, 422, "prompt"),
    ("prompt of token ids", {"model": "lora", "prompt": [1, 2, 3]}, 422, "prompt"),
    ("empty prompt", {"model": "lora", "prompt": "  "}, 400, "prompt"),
    ("max_tokens a string", {"model": "lora", "prompt": "hi", "max_tokens": "5"}, 422, "max_tokens"),
    ("max_tokens 0", {"model": "lora", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past the context", {"model": "lora", "prompt": "hi", "max_tokens": 250}, 400, "max_tokens"),
    ("sampling", {"model": "lora", "prompt": "hi", "temperature": 0.7}, 400, "temperature"),
    ("n > 1", {"model": "lora", "prompt": "hi", "n": 2}, 400, "n"),
    ("stop a number", {"model": "lora", "prompt": "hi", "stop": 3}, 422, "stop"),
    ("body not an object", [1, 2], 422, None),
    ("oversized body", {"model": "lora", "prompt": "x" * (1 << 20)}, 413, None),
    # issue 26: every field of every request, checked before any work, answered in OpenAI's shape
    ("lone surrogate in the prompt", b'{"model": "lora", "prompt": "bad \\ud800 q"}', 400, "prompt"),
    ("lone surrogate in a prompt list", b'{"model": "lora", "prompt": ["fine", "bad \\udfff"]}', 400, "prompt"),
    ("lone surrogate in a stop", b'{"model": "lora", "prompt": "hi", "stop": ["\\ud800"]}', 400, "stop"),
    ("lone surrogate as the model", b'{"model": "\\ud800", "prompt": "hi"}', 404, "model"),
    ("5000-digit max_tokens", b'{"model": "lora", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("max_tokens past the context alone", {"model": "lora", "prompt": "hi", "max_tokens": 10 ** 30}, 400,
     "max_tokens"),
    ("JSON nested 100k deep", b'{"model": "lora", "prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, None),
    ("stream_options a string", {"model": "lora", "prompt": "hi", "stream": True, "stream_options": "x"}, 422,
     "stream_options"),
    ("stream_options without stream", {"model": "lora", "prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("include_usage a string", {"model": "lora", "prompt": "hi", "stream": True,
                                "stream_options": {"include_usage": "yes"}}, 422, "include_usage"),
    ("stream a string", {"model": "lora", "prompt": "hi", "stream": "yes"}, 422, "stream"),
    ("an unknown field", {"model": "lora", "prompt": "hi", "top_k": 5}, 400, "top_k"),
    ("n true", {"model": "lora", "prompt": "hi", "n": True}, 422, "n"),
    ("echo a number", {"model": "lora", "prompt": "hi", "echo": 1}, 422, "echo"),
    ("suffix", {"model": "lora", "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("logit_bias", {"model": "lora", "prompt": "hi", "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ("top_p 2", {"model": "lora", "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("temperature NaN", b'{"model": "lora", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("seed a string", {"model": "lora", "prompt": "hi", "seed": "1"}, 422, "seed"),
    ("user a list", {"model": "lora", "prompt": "hi", "user": ["a"]}, 422, "user"),
    ("a prompt longer than the context can hold", {"model": "lora", "prompt": "a " * 450_000}, 400, "prompt"),
    ("body not UTF-8", b'{"model": "lora", "prompt": "\xff"}', 400, None),
]
CODES = {"lone surrogate in the prompt": "invalid_encoding", "5000-digit max_tokens": "invalid_json",
         "JSON nested 100k deep": "invalid_json", "max_tokens past the context alone": "context_length_exceeded",
         "a prompt longer than the context can hold": "context_length_exceeded", "an unknown field": "unknown_parameter",
         "stream_options a string": "invalid_type", "suffix": "unsupported_parameter"}


@pytest.mark.parametrize("case,body,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openais_error_shape(server, case, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and not re.search(r"[A-Za-z]+(Error|Exception)\b", error["message"])
    if case == "max_tokens past the context":  # the tiny OPT's context is 256 positions
        assert error["code"] == "context_length_exceeded" and "maximum context length is 256" in error["message"]
    if case in CODES:
        assert error["code"] == CODES[case], error
    if case == "lone surrogate in the prompt":
        assert error["message"] == ("'prompt' item 0 is not text: it holds a lone surrogate (\\ud800) at character 4, "
                                    "which UTF-8 cannot encode")
    if case == "a prompt longer than the context can hold":
        assert error["message"].startswith("This model's maximum context length is 256 tokens, however your prompt "
                                           "has 899999 characters")
    # the server keeps serving
    ok = httpx.post(f"{server}/v1/completions", json={"model": "lora", "prompt": QUESTIONS[0]}, timeout=60)
    assert ok.status_code == 200


def test_only_json_bodies_and_the_served_hosts_are_answered(server):
    """A cross-site form post (text/plain needs no CORS preflight) is 415; a Host this server does not serve (a
    page whose name was rebound to 127.0.0.1) is 400; the names of the loopback address it is bound to and the
    one --allowed_hosts adds work."""
    body = json.dumps({"model": "lora", "prompt": QUESTIONS[0]})
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {},
                    {"content-type": "application/jsonx"}):
        response = httpx.post(f"{server}/v1/completions", content=body, headers=headers, timeout=60)
        assert response.status_code == 415, (headers, response.text)
        assert response.json() == {"error": {
            "message": "the request body must be JSON, sent with 'Content-Type: application/json'",
            "type": "invalid_request_error", "param": None, "code": "unsupported_media_type"}}
    compressed = httpx.post(f"{server}/v1/completions", content=body, timeout=60,
                            headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert compressed.status_code == 415 and compressed.json()["error"]["code"] == "unsupported_media_type"
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", f"attacker.test:{port}"):
        response = httpx.get(f"{server}/v1/models", headers={"host": host}, timeout=60)
        assert response.status_code == 400, host
        assert response.json()["error"]["code"] == "invalid_host" and response.json()["error"]["param"] is None
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.", f"box.lan:{port}"):
        assert httpx.get(f"{server}/health", headers={"host": host}, timeout=60).status_code == 200, host
    ok = httpx.post(f"{server}/v1/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_allowed_hosts_follow_the_bound_address():
    from optqa.serve import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.1", None) == ["127.0.0.1", "localhost", "::1"]
    assert allowed_hosts_for("::1", ["box.lan"]) == ["::1", "127.0.0.1", "localhost", "box.lan"]
    assert allowed_hosts_for("192.168.1.5", None) == ["192.168.1.5"]
    assert allowed_hosts_for("0.0.0.0", None) is None  # any: clients may use any name or address of the machine
    assert allowed_hosts_for("0.0.0.0", ["box.lan"]) == ["127.0.0.1", "localhost", "::1", "box.lan"]


def test_openai_client_raises_its_own_errors(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="greedily"):
        client.completions.create(model="lora", prompt="hi", temperature=1.0)


# ---- POST /v1/chat/completions (issue 29): the same answers, checks, batching and errors as /v1/completions ----

def completion_texts(server: str, name: str, questions: list[str], **fields) -> list[str]:
    response = httpx.post(f"{server}/v1/completions", json={"model": name, "prompt": questions, **fields}, timeout=60)
    assert response.status_code == 200, response.text
    return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]


def test_openai_client_chat_gets_the_completions_answers(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    for name in ("adapter", "lora"):
        expected = completion_texts(server, name, QUESTIONS)
        assert len(set(expected)) > 1
        for question, answer in zip(QUESTIONS, expected):
            chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}])
            assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == name
            assert len(chat.choices) == 1 and chat.choices[0].index == 0
            assert (chat.choices[0].message.role, chat.choices[0].message.content) == ("assistant", answer)
            assert chat.choices[0].finish_reason in ("stop", "length")
            usage = chat.usage
            assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # OpenAI's content parts: the texts joined by newlines make the question
    parts = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": [
        {"type": "text", "text": QUESTIONS[0]}]}])
    assert parts.choices[0].message.content == completion_texts(server, "lora", QUESTIONS[:1])[0]
    split = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What gas do"}, {"type": "text", "text": "plants take in?"}]}])
    assert split.choices[0].message.content == completion_texts(server, "lora", ["What gas do\nplants take in?"])[0]


def test_openai_client_chat_streams_role_content_then_finish_reason(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    answer = completion_texts(server, "adapter", QUESTIONS[1:2])[0]
    chunks = list(client.chat.completions.create(model="adapter", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": QUESTIONS[1]}]))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    role, content, end, usage = chunks
    assert role.choices[0].delta.role == "assistant" and role.choices[0].delta.content == ""
    assert content.choices[0].delta.content == answer and content.choices[0].delta.role is None
    assert [c.choices[0].finish_reason for c in (role, content)] == [None, None]
    assert end.choices[0].delta.content is None and end.choices[0].finish_reason in ("stop", "length")
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "adapter", "stream": True, "messages": [{"role": "user", "content": QUESTIONS[1]}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": answer}, {}]
    assert events[-1] == "data: [DONE]"


def test_chat_max_completion_tokens_max_tokens_and_stop_are_the_completions(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    cut = completion_texts(server, "adapter", QUESTIONS[:1], max_tokens=2)[0]
    for budget in ({"max_completion_tokens": 2}, {"max_tokens": 2}):
        chat = client.chat.completions.create(model="adapter", messages=messages, **budget)
        assert chat.choices[0].message.content == cut and chat.choices[0].finish_reason == "length"
        assert chat.usage.completion_tokens == 2
    full = completion_texts(server, "adapter", QUESTIONS[:1])[0]
    stop = full[len(full) // 2:][:2]
    chat = client.chat.completions.create(model="adapter", messages=messages, stop=stop, user="u1", n=1,
                                          temperature=0)
    assert chat.choices[0].message.content == full[:full.index(stop)] and chat.choices[0].finish_reason == "stop"


def test_chat_answers_the_last_user_message_of_a_conversation_on_its_own(server):
    """A chat UI sends the whole conversation (and often a system prompt) every turn: the answer is the one the
    last question gets alone."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    alone = completion_texts(server, "adapter", QUESTIONS[1:2])[0]
    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "ice"},
                    {"role": "user", "content": QUESTIONS[1]}]
    chat = client.chat.completions.create(model="adapter", messages=conversation)
    assert chat.choices[0].message.content == alone
    single = client.chat.completions.create(model="adapter", messages=conversation[-1:])
    assert chat.usage.prompt_tokens == single.usage.prompt_tokens


USER = {"role": "user", "content": "What is frozen water called?"}
BAD_CHATS = [
    # (case, body or bytes, status, param, message)
    ("last message from the assistant", {"messages": [USER, {"role": "assistant", "content": "ice"}]}, 400,
     "messages.[1].role", "the last message must be the user's question (role 'user'), got role 'assistant'"),
    ("a message without a role", {"messages": [{"content": "hi"}]}, 400, "messages.[0].role",
     "the last message must be the user's question (role 'user'), got role null"),
    ("an earlier message with an unknown role", {"messages": [{"role": "narrator", "content": "Once."}, USER]}, 400,
     "messages.[0].role", "messages.[0].role must be one of system, developer, user, assistant, tool, got 'narrator'"),
    ("an image part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400,
     "messages.[0].content.[1].type", "content part 1 has type 'image_url': this model reads text only (type 'text')"),
    ("a text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 422,
     "messages.[0].content.[0].text", "content part 0 must have 'text', a string"),
    ("content null", {"messages": [{"role": "user", "content": None}]}, 422, "messages.[0].content",
     "'messages.[0].content' must be a string or an array of content parts"),
    ("empty content", {"messages": [{"role": "user", "content": " \n"}]}, 400, "messages.[0].content",
     "the user's message must be a non-empty question"),
    ("lone surrogate in the content", b'{"model": "lora", "messages": [{"role": "user", "content": "a \\ud800"}]}',
     400, "messages.[0].content", "'messages.[0].content' item 0 is not text: it holds a lone surrogate (\\ud800) at "
     "character 2, which UTF-8 cannot encode"),
    ("an unknown message field", {"messages": [{**USER, "tool_calls": []}]}, 400, "messages.[0].tool_calls",
     "Unrecognized message argument supplied: tool_calls"),
    ("no messages", {"messages": []}, 400, "messages", "'messages' must hold the user's question"),
    ("messages a string", {"messages": "hi"}, 422, "messages", "'messages' must be an array of message objects"),
    ("missing messages", {}, 422, "messages", "'messages' is a required property"),
    ("a prompt", {"prompt": "hi", "messages": [USER]}, 400, "prompt", "Unrecognized request argument supplied: prompt"),
    ("tools", {"messages": [USER], "tools": []}, 400, "tools", "Unrecognized request argument supplied: tools"),
    ("sampling", {"messages": [USER], "temperature": 0.7}, 400, "temperature",
     "temperature 0.7: this server answers greedily only (temperature 0, the question loop's decoding); sampling is "
     "not supported"),
    ("n 2", {"messages": [USER], "n": 2}, 400, "n",
     "'n' is not supported by this server (greedy answers, one per prompt)"),
    ("logprobs", {"messages": [USER], "logprobs": True}, 400, "logprobs",
     "'logprobs' is not supported by this server (greedy answers, one per prompt)"),
    ("both budgets", {"messages": [USER], "max_completion_tokens": 4, "max_tokens": 4}, 400, "max_tokens",
     "give 'max_completion_tokens' or 'max_tokens', not both"),
    ("max_completion_tokens 0", {"messages": [USER], "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "'max_completion_tokens' must be at least 1"),
    ("max_tokens a string", {"messages": [USER], "max_tokens": "5"}, 422, "max_tokens",
     "'max_tokens' must be an integer"),
    ("max_completion_tokens past the context", {"messages": [USER], "max_completion_tokens": 256}, 400,
     "max_completion_tokens", "This model's maximum context length is 256 tokens; 'max_completion_tokens' must be "
     "below it"),
    ("max_tokens past the context with the question", {"messages": [USER], "max_tokens": 255}, 400, "max_tokens",
     re.compile(r"This model's maximum context length is 256 tokens, however you requested (\d+) tokens \((\d+) in "
                r"your prompt; 255 for the completion\)\. Please reduce max_tokens to at most (\d+)\.")),
    ("unknown model", {"model": "gpt-4o", "messages": [USER]}, 404, "model",
     "The model 'gpt-4o' does not exist; this server has: adapter, lora"),
]


@pytest.mark.parametrize("case,body,status,param,message", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_requests_get_openais_error_shape(server, case, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps({"model": "lora", **body}).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if isinstance(message, re.Pattern):  # counted in the worker, from the question's tokens
        total, prompt, most = map(int, message.fullmatch(error["message"]).groups())
        assert total == prompt + 255 and most == 256 - prompt and prompt > 1
    else:
        assert error["message"] == message


def test_openai_client_chat_raises_its_own_errors(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[USER])
    with pytest.raises(openai.BadRequestError, match="greedily"):
        client.chat.completions.create(model="lora", messages=[USER], temperature=1.0)


@contextlib.contextmanager
def in_process_server(app, header_timeout_s: float = 30.0):
    """uvicorn in a thread with the CLI's settings, on a socket bound before it starts (so the port cannot be
    lost)."""
    import uvicorn

    from optqa.serve import bind, server_config, url_of

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, header_timeout_s=header_timeout_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_deltas_share_the_backbone_and_answer_as_alone(ckpts, one_torch_thread):
    from optqa.build import load_shared, load_trained

    shared = load_shared({"a": ckpts["adapter"], "l": ckpts["lora"]})
    from optqa.deltas import is_delta_parameter

    (a, _, _), (lora, _, _) = shared["a"], shared["l"]

    def weights(model):
        return {p.data_ptr() for n, p in model.plm.named_parameters() if not is_delta_parameter(n)}

    assert weights(a) == weights(lora)  # one copy of the backbone's weights
    assert len(weights(a)) == len(list(a.backbone.parameters())) - len(a.delta_state_dict())
    for model, path in ((a, ckpts["adapter"]), (lora, ckpts["lora"])):
        alone, _, _ = load_trained(path)
        assert [model.answer([q])[0] for q in QUESTIONS] == [alone.answer([q])[0] for q in QUESTIONS]


def test_soft_prompts_and_prefixes_are_served_without_peft_as_alone(lively_opt, tmp_path, one_torch_thread):
    from optqa.build import load_shared, load_trained
    from optqa.deltas import PromptTable
    from optqa.tiny import build_random_checkpoint

    paths = {delta: build_random_checkpoint(lively_opt, tmp_path / delta, delta, seed=3, max_new_tokens=8)
             for delta in ("soft_prompt", "prefix")}
    shared = load_shared(paths)
    for name, path in paths.items():
        model = shared[name][0]
        assert type(model.plm) is PromptTable  # serving only answers: no PEFT wrapper
        answers = [model.answer([q])[0] for q in QUESTIONS]
        alone = load_trained(path)[0]  # built through PEFT
        assert answers == [alone.answer([q])[0] for q in QUESTIONS] and len(set(answers)) == len(QUESTIONS)


def test_bf16_deltas_share_one_cast_of_the_tied_head(ckpts, one_torch_thread):
    """bf16 answering computes the tied output head from a bf16 copy of the input embedding: one for all deltas
    (77 MB on OPT-125m), not one per delta; and the frozen Linear weights are cast once, in place, for all."""
    import torch

    from optqa.serve import load_served

    served = load_served({"a": str(ckpts["adapter"]), "l": str(ckpts["lora"])}, precision="bf16")
    for s in served.values():
        s.model.answer(QUESTIONS[:1])
    heads = [s.model.backbone.get_output_embeddings() for s in served.values()]
    assert heads[0] is not heads[1]
    assert heads[0].cast_weight is heads[1].cast_weight  # CastLinear (optqa.wrappers) in each head's place
    assert heads[0].cast_weight.dtype == torch.bfloat16
    fc2 = [dict(s.model.plm.named_modules()) for s in served.values()]
    weight = fc2[0]["model.decoder.layers.0.fc2"].weight
    assert weight.dtype == torch.bfloat16 and weight.data_ptr() == fc2[1][
        "base_model.model.model.decoder.layers.0.fc2"].weight.data_ptr()


def test_api_key_is_required_on_every_endpoint(ckpts, one_torch_thread):
    import openai

    from optqa.serve import api_key_from, create_app, load_served

    key = api_key_from(None, {"OPTQA_API_KEY": "s3cret"})
    app = create_app(load_served({"lora": str(ckpts["lora"])}, precision="fp32"), api_key=key)
    with in_process_server(app) as url:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/lora"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nowhere")):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                response = httpx.request(method, url + path, headers=headers, json={"model": "lora", "prompt": "hi"})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
        # the page is static HTML with no data in it; it asks for the key and sends it on its API calls
        assert "<title>optqa" in httpx.get(url + "/").text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").completions.create(model="lora", prompt="hi")
        assert answer.choices[0].text


@pytest.fixture(scope="module")
def wide(ckpts):
    """An in-process server with a 2 s batch window (requests sent together surely share a batch), a 1 s body
    deadline and a 1 s request-head deadline; yields (url, served, batcher, each question's answer alone)."""
    from optqa.serve import create_app, load_served

    served = load_served({"lora": str(ckpts["lora"]), "adapter": str(ckpts["adapter"])}, precision="fp32")
    alone = {q: served["lora"].model.answer([q])[0] for q in QUESTIONS}  # before the worker thread owns the model
    app = create_app(served, window_s=2.0, body_timeout_s=1.0, allowed_hosts=["127.0.0.1"])
    with in_process_server(app, header_timeout_s=1.0) as url:
        yield url, served, app.app.state.batcher, alone


def _together(url: str, bodies: list) -> list:
    """POST every body at once; the responses in order."""
    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*[client.post("/v1/completions", content=body if isinstance(body, bytes)
                                                      else json.dumps(body).encode(),
                                                      headers={"content-type": "application/json"})
                                          for body in bodies])
    return asyncio.run(send())


def test_a_poison_request_fails_alone(wide):
    """A lone surrogate sent with ordinary requests in the same batch window: it gets its 400, they get their
    exact answers, answered as one batch."""
    url, _, _, alone = wide
    before = httpx.get(f"{url}/health").json()
    poison = b'{"model": "lora", "prompt": "bad \\ud800 q"}'
    responses = _together(url, [{"model": "lora", "prompt": QUESTIONS[0]}, poison,
                                {"model": "lora", "prompt": QUESTIONS[1:3]}, poison])
    assert [r.status_code for r in responses] == [200, 400, 200, 400]
    assert responses[1].json()["error"]["param"] == "prompt"
    assert responses[1].json()["error"]["code"] == "invalid_encoding"
    assert [c["text"] for c in responses[0].json()["choices"]] == [alone[QUESTIONS[0]]]
    assert [c["text"] for c in responses[2].json()["choices"]] == [alone[q] for q in QUESTIONS[1:3]]
    after = httpx.get(f"{url}/health").json()
    assert after["batches"] - before["batches"] == 1 and after["questions"] - before["questions"] == 3


def test_chat_and_completions_requests_share_a_batch(wide):
    """Chat and completions requests for the same delta, sent together, are answered in one batch with their exact
    answers; a bad chat request among them fails alone."""
    url, _, _, alone = wide
    before = httpx.get(f"{url}/health").json()

    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(
                client.post("/v1/chat/completions", json={"model": "lora", "messages": [
                    {"role": "user", "content": QUESTIONS[0]}]}),
                client.post("/v1/completions", json={"model": "lora", "prompt": QUESTIONS[1:3]}),
                client.post("/v1/chat/completions", json={"model": "lora", "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
                client.post("/v1/chat/completions", json={"model": "lora", "messages": [
                    {"role": "user", "content": [{"type": "text", "text": QUESTIONS[3]}]}]}))

    chat, completions, bad, parts = asyncio.run(send())
    assert [r.status_code for r in (chat, completions, bad, parts)] == [200, 200, 400, 200]
    assert bad.json()["error"]["param"] == "messages.[0].content.[0].type"
    assert chat.json()["choices"][0]["message"]["content"] == alone[QUESTIONS[0]]
    assert [c["text"] for c in completions.json()["choices"]] == [alone[q] for q in QUESTIONS[1:3]]
    assert parts.json()["choices"][0]["message"]["content"] == alone[QUESTIONS[3]]
    after = httpx.get(f"{url}/health").json()
    assert after["batches"] - before["batches"] == 1 and after["questions"] - before["questions"] == 4

def test_a_failing_batch_is_answered_request_by_request(wide, monkeypatch):
    """A request that passes every check but makes generation fail: the batch is answered again request by
    request; its neighbours get their exact answers, it alone gets a 500 without the exception's text."""
    url, served, _, alone = wide
    model = served["lora"].model
    real, calls = model.answer_encoded, []

    def answer_encoded(encoded, *args, **kwargs):
        calls.append(sorted(e.question for e in encoded))
        if any(e.question == "poison question" for e in encoded):
            raise RuntimeError("secret internals at /srv/optqa")
        return real(encoded, *args, **kwargs)

    monkeypatch.setattr(model, "answer_encoded", answer_encoded)
    before = httpx.get(f"{url}/health").json()
    responses = _together(url, [{"model": "lora", "prompt": QUESTIONS[0]}, {"model": "lora", "prompt": "poison question"},
                                {"model": "lora", "prompt": QUESTIONS[1]}])
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert responses[1].json() == {"error": {
        "message": "internal error while answering this request (the server logged the details)",
        "type": "server_error", "param": None, "code": None}}
    assert [r.json()["choices"][0]["text"] for r in (responses[0], responses[2])] == [alone[q] for q in QUESTIONS[:2]]
    # one shared batch first, then each request alone
    assert calls[0] == sorted([QUESTIONS[0], "poison question", QUESTIONS[1]])
    assert sorted(map(tuple, calls[1:])) == sorted([(QUESTIONS[0],), ("poison question",), (QUESTIONS[1],)])
    after = httpx.get(f"{url}/health").json()
    assert after["batches"] - before["batches"] == 2 and after["questions"] - before["questions"] == 2
    monkeypatch.undo()
    ok = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": QUESTIONS[3]}, timeout=60)
    assert ok.json()["choices"][0]["text"] == alone[QUESTIONS[3]]


def _health_until(url: str, ready) -> dict:
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{url}/health", timeout=60).json()
        if ready(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def test_a_request_whose_client_left_is_not_generated(wide):
    url, _, batcher, alone = wide
    release = threading.Event()
    batcher._executor.submit(release.wait)  # the worker is busy: the request waits in the queue
    before = httpx.get(f"{url}/health").json()
    body = json.dumps({"model": "lora", "prompt": "a question nobody waits for"}).encode()
    client = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _health_until(url, lambda h: h["waiting"] == 1)
    finally:
        client.close()
    _health_until(url, lambda h: h["dropped"] == before["dropped"] + 1 and h["waiting"] == 0)
    release.set()
    ok = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": QUESTIONS[2]}, timeout=60)
    assert ok.json()["choices"][0]["text"] == alone[QUESTIONS[2]]
    after = httpx.get(f"{url}/health").json()
    assert after["questions"] - before["questions"] == 1  # only the question someone waited for was generated


def _raw(url: str, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as client:
        client.sendall(data)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    return received


def test_slow_clients_are_cut_off(wide):
    """A body still arriving after the body deadline gets a 408; a request head still arriving after the head
    deadline loses its connection; the server answers on."""
    url = wide[0]
    answer = _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"model\"")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and json.loads(body)["error"] == {
        "message": "the request body did not arrive within 1 seconds", "type": "invalid_request_error",
        "param": None, "code": "request_timeout"}
    assert _raw(url, b"GET /health HTTP/1.1\r\nHo") == b""  # closed, nothing answered
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_prompt_past_the_context_is_refused_before_tokenising(wide, monkeypatch):
    url, served, _, _ = wide
    wrapper = served["lora"].model.wrapper
    calls = []
    real = wrapper.encode
    monkeypatch.setattr(wrapper, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    cap = served["lora"].max_prompt_chars
    assert cap == 256 * max(map(len, served["lora"].model.tokenizer.get_vocab()))
    refused = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "b" * (cap + 1)}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    cut = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "b" * cap}, timeout=60)
    assert cut.status_code == 200 and calls == [1]  # at the bound: tokenised once, cut to max_seq_l, answered


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_key_no_client_can_send_is_refused_at_start(ckpts, capsys, monkeypatch, how):
    from optqa.cli import main

    args = ["--mode", "serve", "--port", "0", "--deltas", f"x={ckpts['lora']}"]
    if how == "flag":
        args += ["--api_key", "clé"]
    else:
        monkeypatch.setenv("OPTQA_API_KEY", "two words")
    assert main(args) == 2
    where = "--api_key" if how == "flag" else "OPTQA_API_KEY"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {where} must be printable ASCII without spaces (HTTP headers carry ASCII; no client could send "
        "this key)")


def test_a_refused_delta_stops_the_start_in_one_line(ckpts, tmp_path, capsys):
    from optqa.checkpoints.format import WEIGHTS_NAME
    from optqa.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["lora"], bad)
    weights = bytearray((bad / WEIGHTS_NAME).read_bytes())
    weights[-1] ^= 1
    (bad / WEIGHTS_NAME).write_bytes(bytes(weights))
    # the command line's own entry point, in this process: what `python -m optqa` runs
    assert main(["--mode", "serve", "--port", "0", "--deltas", f"good={ckpts['adapter']}", f"bad={bad}"]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert err.strip().splitlines()[-1].startswith(
        f"error: delta 'bad' refused: integrity check failed: {bad / WEIGHTS_NAME} has SHA-256")
    for spec, message in (("noequals", "--deltas takes NAME=CHECKPOINT"), ("a b=x", "--deltas: name 'a b' must be")):
        assert main(["--mode", "serve", "--deltas", spec, f"other={ckpts['lora']}"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert main(["--mode", "serve", "--deltas", f"x={ckpts['lora']}", f"x={ckpts['adapter']}"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --deltas: the name 'x' is given twice")
    from optqa.serve import bind

    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        assert main(["--mode", "serve", "--port", str(port), "--deltas", f"x={ckpts['lora']}"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    finally:
        taken.close()


def test_deltas_that_recorded_different_precisions_need_one_chosen(ckpts, tiny_opt, tmp_path, capsys):
    from optqa.cli import main
    from optqa.tiny import build_random_checkpoint

    fp32 = build_random_checkpoint(tiny_opt, tmp_path / "fp32", "bitfit", precision="fp32")
    deltas = ["--deltas", f"auto={ckpts['adapter']}", f"fp32={fp32}"]
    assert main(["--mode", "serve", "--port", "0", *deltas]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the deltas recorded different precisions (auto: auto, fp32: fp32); they share one backbone, so "
        "pass --precision to serve them together")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary:
        options.binary_location = binary
    driver = shutil.which("chromedriver")
    return webdriver.Chrome(options=options, service=Service(driver) if driver else None)


HAS_CHROMIUM = bool(shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")))


@pytest.mark.skipif(not HAS_CHROMIUM,
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_the_page_answers_with_every_chosen_delta(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = {name: httpx.post(f"{server}/v1/completions", json={"model": name, "prompt": QUESTIONS[3]},
                                 timeout=60).json()["choices"][0]["text"] for name in ("adapter", "lora")}
    browser = _browser()
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".delta-choice")) == 2)
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[3])
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".answer[data-done='1']")) == 2)
        shown = {el.get_attribute("data-model"): el.get_attribute("textContent")
                 for el in browser.find_elements(By.CSS_SELECTOR, ".answer")}
        cards = {el.get_attribute("data-model"): el.text for el in browser.find_elements(By.CSS_SELECTOR, ".card")}
        assert shown == expected
        assert "dev F1 41.3 / EM 30.0" in cards["adapter"] and "test F1 11.0 / EM 7.5" in cards["lora"]
        assert "adapter" in cards["adapter"] and "parameters" in cards["lora"]

        # only the chosen deltas answer
        browser.find_element(By.CSS_SELECTOR, ".delta-choice[value='adapter']").click()
        browser.find_element(By.ID, "ask").click()
        def answered(b):
            return [el.get_attribute("data-model") for el in b.find_elements(By.CSS_SELECTOR, ".answer[data-done='1']")]

        wait.until(lambda b: answered(b) == ["lora"])

        # issue 29: a refused ask clears the previous answers, which would otherwise read as answers to it
        question = browser.find_element(By.ID, "question")
        question.clear()
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text == "type a question first")
        assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
        question.send_keys(QUESTIONS[3])
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: answered(b) == ["lora"])
        browser.find_element(By.CSS_SELECTOR, ".delta-choice[value='lora']").click()  # nothing chosen now
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text == "choose at least one delta")
        assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
    finally:
        browser.quit()


def test_an_answer_ended_by_a_line_break_counts_its_tokens_and_stops(lively_opt, monkeypatch, one_torch_thread):
    """In one batch, one answer ends at its line break on step 2 while the other runs to max_tokens: the first
    counts 2 completion tokens (" water" and the line break; not the padding after it) and finishes "stop", the
    other counts 5 and finishes "length"."""
    import torch

    from optqa import generate
    from optqa.build import build_model
    from optqa.config import RunConfig
    from optqa.data import InputExample
    from optqa.serve import Batcher, Job, Served, finish

    model, _ = build_model(RunConfig(plm_path=str(lively_opt), delta_type="lora", max_new_tokens=5))
    model.eval()
    tokenizer = model.tokenizer
    plans = [tokenizer.convert_tokens_to_ids([tokenizer.tokenize(p)[0] for p in plan])
             for plan in ([" water", "\n"], [" the", " sun", " is", " hot", " and"])]

    def forced(model, inputs, step, logits_processor=None):  # row r emits plans[r][step], then eos
        return torch.tensor([plan[step] if step < len(plan) else tokenizer.eos_token_id for plan in plans])

    monkeypatch.setattr(generate, "next_token", forced)
    batcher = Batcher({"m": Served("m", model, {}, None, 0)})
    job = Job("m", ["What gas?", "Why?"], 5, future=None)
    job.encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(job.questions)]
    try:
        [answers] = batcher._generate("m", [(job, [len(e.prompt_ids) for e in job.encoded])], 5)
    finally:
        batcher._executor.shutdown(wait=True)
    assert sorted((a.text, a.completion_tokens, finish(a, [])[1]) for a in answers) == [
        ("the sun is hot and", 5, "length"), ("water", 2, "stop")]
