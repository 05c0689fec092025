"""The OpenAI-compatible server on the demo model, through the official `openai` client: the text
equals `phi4_jax.generate`'s greedy output, streamed or not, alone or among concurrent requests;
bad requests get OpenAI's error JSON and the server keeps serving. The API tests share one server
in this process (uvicorn in a thread); `phi4-jax serve` itself runs once, as a user starts it, and
SIGTERM stops it cleanly."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

import phi4_jax
from conftest import PHI4_JAX, serving, user_environment
from phi4_jax import SamplingParams
from phi4_jax.checkpoints.hub import resolve

QUESTIONS = ["What is 482+37?", "What is 904-317?", "What is 5+5?", "What is 71-9?", "What is 300+45?",
             "What is 12-3?", "What is 999-1?", "What is 64+64?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a POST of raw bytes."""
    call = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def demo():
    return phi4_jax.load("demo", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(demo):
    """(this process's id, the URL) of the demo model served as `phi4-jax serve --max-batch 4` serves
    it (the command's defaults otherwise), in this process."""
    with serving(*demo, max_batch=4, max_queue=256) as (port, _):
        yield os.getpid(), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=120)


def lone(demo, prompt, max_tokens):
    model, tokenizer = demo
    return phi4_jax.generate(model, tokenizer, prompt, SamplingParams(max_tokens=max_tokens))


def test_chat_equals_generate_streamed_or_not_with_usage(server, client, demo):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
    want = lone(demo, messages, 8)
    assert whole.choices[0].message.content == want and whole.choices[0].finish_reason == "stop"
    prompt_tokens = len(demo[1].apply_chat_template(messages))
    generated = len(demo[1].encode(want)) + 1  # and <|end|>
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, generated)
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == prompt_tokens + generated


def test_completions_equal_generate_and_stop_strings_cut(client, demo):
    prompt = "<|user|>What is 64+64?<|end|><|assistant|>"
    whole = client.completions.create(model="demo", prompt=prompt, max_tokens=6)
    assert whole.choices[0].text == lone(demo, prompt, 6)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt=prompt, max_tokens=6, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    cut = client.completions.create(model="demo", prompt=prompt, max_tokens=6, stop=[whole.choices[0].text[1:]])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (whole.choices[0].text[:1], "stop")


def test_concurrent_requests_each_get_their_lone_answer(client, demo):
    asks = [([{"role": "user", "content": q}], 3 + i % 4) for i, q in enumerate(QUESTIONS)]

    def ask(case):
        messages, max_tokens = case
        r = client.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == [lone(demo, messages, max_tokens) for messages, max_tokens in asks]


def test_32_concurrent_mixed_requests_each_get_their_lone_output(client, demo):
    """Different prompts, lengths, limits, stop strings, greedy and seeded sampling, all at once
    on 4 slots: rows join and leave the running batch; each equals its lone `generate`."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(32):
        a, b = rng.integers(1, 999, 2)
        question = f"What is {a}{'+-'[i % 2]}{b}?" + " Please." * int(rng.integers(0, 4))
        sampling = dict(max_tokens=int(rng.integers(2, 14)), stop=["5"] if i % 5 == 0 else [])
        if i % 2:
            sampling.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        cases.append(([{"role": "user", "content": question}], sampling))

    def ask(case):
        messages, sampling = case
        r = client.chat.completions.create(model="demo", messages=messages, **sampling)
        return r.id, r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    model, tokenizer = demo
    want = [phi4_jax.generate(model, tokenizer, messages, SamplingParams(**sampling)) for messages, sampling in cases]
    assert [text for _, text in answers] == want
    assert len({id_ for id_, _ in answers}) == len(cases)  # none lost or answered twice


def test_hostile_requests_leave_the_answers_and_the_memory_as_they_were(server, client, demo):
    """A few hundred fuzzed bodies (random bytes, JSON of wrong types, huge numbers, deep nesting):
    each gets a 4xx error JSON (or, where the fuzz made a valid request, an answer), never a 5xx;
    then a valid request gets the right answer and the server's resident memory has not grown."""
    pid, url = server
    rng = np.random.default_rng(1)
    valid = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    mutations = [
        lambda: rng.bytes(int(rng.integers(1, 300))),
        lambda: json.dumps({**valid, str(rng.choice(["max_tokens", "temperature", "n", "top_p", "seed", "stop",
                                                     "messages", "top_k", "logprobs"])):
                            [10**400, -1e308, "x" * 5000, None, {"a": []}, [[[]]], True][int(rng.integers(7))]}
                           ).encode("utf-8", "surrogatepass"),
        lambda: b'{"model": "demo", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        lambda: json.dumps({**valid, "messages": [{"role": "user", "content": chr(int(rng.integers(0xD800, 0xDFFF)))}]},
                           ensure_ascii=False).encode("utf-8", "surrogatepass"),
        lambda: json.dumps({**valid, "n": 10**6, "max_tokens": 10**12}).encode(),
    ]

    def rss_kib():
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    def hostile(count):
        for _ in range(count):
            code, answer = request(f"{url}/v1/chat/completions", mutations[int(rng.integers(len(mutations)))]())
            assert (400 <= code < 500 and answer["error"]["message"]) or (code == 200 and answer["choices"]), answer

    hostile(80)  # the first ones may still allocate the server's caches (parsers, error paths)
    settled = rss_kib()
    hostile(220)
    assert rss_kib() - settled < 20 * 1024  # KiB: no growth beyond noise
    messages = [{"role": "user", "content": QUESTIONS[4]}]
    assert client.chat.completions.create(model="demo", messages=messages, max_tokens=6).choices[0].message.content \
        == lone(demo, messages, 6)


def test_logprobs_are_transformers_log_softmax_streamed_or_not(client, demo):
    """Chat `logprobs` with `top_logprobs`, and text completions' `logprobs`: each generated
    token's log-probability and the most likely ones, equal to transformers' log-softmax of the
    demo model's logits (float32, eager), the same streamed and not."""
    import torch
    from transformers import Phi3ForCausalLM

    messages = [{"role": "user", "content": QUESTIONS[2]}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, logprobs=True,
                                           top_logprobs=3)
    entries = whole.choices[0].logprobs.content
    model, tokenizer = demo
    prompt = tokenizer.apply_chat_template(messages)
    hf = Phi3ForCausalLM.from_pretrained(resolve("demo").folder, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    generated = tokenizer.encode(whole.choices[0].message.content) + [tokenizer.token_to_id("<|end|>")]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]
    want = torch.log_softmax(logits.float(), -1).numpy()
    assert len(entries) == len(generated)
    np.testing.assert_allclose([e.logprob for e in entries], want[np.arange(len(generated)), generated],
                               rtol=0, atol=1e-4)
    for e, row in zip(entries, want):
        best = np.argsort(-row)[:3]
        assert [t.token for t in e.top_logprobs] == [tokenizer.decode([int(i)]) for i in best]
        np.testing.assert_allclose([t.logprob for t in e.top_logprobs], row[best], rtol=0, atol=1e-4)
        assert e.logprob == e.top_logprobs[0].logprob  # greedy: the chosen token is the likeliest
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=6, logprobs=True,
                                                 top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    text = client.completions.create(model="demo", prompt=prompt, max_tokens=6, logprobs=2)
    assert text.choices[0].logprobs.token_logprobs == [e.logprob for e in entries]
    assert text.choices[0].logprobs.tokens == [e.token for e in entries]
    assert text.choices[0].logprobs.text_offset == list(np.cumsum([0] + [len(e.token) for e in entries[:-1]]))


def test_echo_scores_the_prompt_as_transformers_does_for_lm_eval(server, client, demo):
    """Text completions with `echo` and `logprobs`, as lm-evaluation-harness's `local-completions`
    sends them for log-likelihoods (token-id prompts in one request, `max_tokens` 1, `logprobs` 1)
    and with `max_tokens` 0 (the prompt scored only): the prompt's tokens come first, the first
    without a log-probability, each the log-softmax transformers gives (float32, eager), the
    likeliest and the chosen one in `top_logprobs`; vLLM's `prompt_logprobs` agree."""
    import torch
    from transformers import Phi3ForCausalLM

    model, tokenizer = demo
    hf = Phi3ForCausalLM.from_pretrained(resolve("demo").folder, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    prompts = [tokenizer.encode(q + " It is") for q in QUESTIONS[:3]]
    scored = client.completions.create(model="demo", prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                       temperature=0, seed=1234)
    assert len(scored.choices) == 3
    for choice, prompt in zip(sorted(scored.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        with torch.no_grad():
            want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1).numpy()
        assert lp.tokens[:len(prompt)] == [tokenizer.decode([i]) for i in prompt] and len(lp.tokens) == len(prompt) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:len(prompt)], want[np.arange(len(prompt) - 1), prompt[1:]],
                                   rtol=0, atol=1e-4)
        for top, row, token in zip(lp.top_logprobs[1:len(prompt)], want, prompt[1:]):
            best = int(np.argmax(row))
            assert set(top) == {tokenizer.decode([best]), tokenizer.decode([token])}
            assert top[tokenizer.decode([best])] == pytest.approx(row[best], abs=1e-4)
        assert choice.text.startswith(tokenizer.decode(prompt))
        # The generated token: the greedy one after the prompt.
        assert lp.token_logprobs[-1] == pytest.approx(want[-1].max(), abs=1e-4)
    text = QUESTIONS[5]
    only = client.completions.create(model="demo", prompt=text, max_tokens=0, echo=True, logprobs=0,
                                     extra_body={"prompt_logprobs": 2})
    choice, prompt = only.choices[0], tokenizer.encode(text)
    assert (choice.text, choice.finish_reason, only.usage.completion_tokens) == (text, "length", 0)
    assert len(choice.logprobs.tokens) == len(prompt)
    vllm = choice.model_extra["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(prompt)
    for entry, token, logprob in zip(vllm[1:], prompt[1:], choice.logprobs.token_logprobs[1:]):
        assert entry[str(token)]["logprob"] == logprob and len(entry) in (2, 3)  # (the two likeliest, and it)
        assert {1, 2} <= {e["rank"] for e in entry.values()} and entry[str(token)]["rank"] >= 1
    code, error = post_json(f"{server[1]}/v1/completions", {"prompt": text, "max_tokens": 0})
    assert (code, error["error"]["param"]) == (400, "max_tokens")
    code, error = post_json(f"{server[1]}/v1/completions", {"prompt": text, "prompt_logprobs": 1, "stream": True})
    assert (code, error["error"]["param"]) == (400, "prompt_logprobs")


def post_json(url: str, body: dict) -> tuple[int, dict]:
    return request(url, json.dumps(body).encode())


def test_tokenizer_endpoints_answer_in_vllms_shapes_as_transformers_tokenizes(server, demo):
    """/tokenize (a text with special tokens added or not, or a chat rendered by its template, with
    the vocabulary's token strings), /detokenize and /tokenizer_info, as lm-eval's remote tokenizer
    reads them: transformers' tokenizer of the demo folder gives the same ids, strings and text."""
    from transformers import AutoTokenizer

    url = server[1]
    hf = AutoTokenizer.from_pretrained(resolve("demo").folder)
    text = "What is 482+37?<|end|> héllo  wörld"
    for add in (True, False):
        status, body = post_json(f"{url}/tokenize", {"prompt": text, "add_special_tokens": add,
                                                     "return_token_strs": True})
        ids = hf.encode(text, add_special_tokens=add)
        assert (status, body["tokens"], body["count"]) == (200, ids, len(ids))
        assert body["token_strs"] == hf.convert_ids_to_tokens(ids)
        assert body["max_model_len"] == demo[0].config.max_position_embeddings
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": QUESTIONS[4]}]
    status, chat = post_json(f"{url}/tokenize", {"model": "demo", "messages": messages})
    assert status == 200 and chat["token_strs"] is None
    assert chat["tokens"] == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert post_json(f"{url}/detokenize", {"tokens": chat["tokens"]}) == (200, {"prompt": hf.decode(chat["tokens"])})
    status, info = request(f"{url}/tokenizer_info")
    assert status == 200 and (info["eos_token"], info["chat_template"]) == (hf.eos_token, hf.chat_template)
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/detokenize", {"tokens": [1, len(hf)]}, "tokens"),
                              ("/detokenize", {"tokens": [1], "model": "gpt-4"}, "model")]:
        status, answer = post_json(f"{url}{path}", body)
        assert status in (400, 404) and answer["error"]["param"] == param, (path, body)


BAD = [  # (body, status, the field the error names)
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b'{"model": "demo", "messages": []}', 400, "messages"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "temperature"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}', 400, "max_tokens"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400, "top_logprobs"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}',
     400, "top_logprobs"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"9+" * 300 + b'"}]}', 400, "messages"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, demo):
    url = server[1]
    for body, status, param in BAD:
        code, answer = request(f"{url}/v1/chat/completions", body)
        error = answer["error"]
        assert (code, error["param"]) == (status, param), body[:60]
        assert error["message"] and error["type"]
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    assert client.chat.completions.create(model="demo", messages=messages, max_tokens=6).choices[0].message.content \
        == lone(demo, messages, 6)
    assert client.models.list().data[0].id == "demo"


@pytest.mark.slow  # a fresh process with its own warm-up
def test_the_command_serves_until_sigterm_and_exits_0(demo):
    """`phi4-jax serve` as a user starts it (the console script, a fresh process; speculating):
    healthy once its warm-up compiled, answers a request with the lone `generate` text, and on SIGTERM (as a service
    manager stops it) finishes and exits 0."""
    port = free_port()
    # (Its warm-up compiles every program: at -O0, as this process compiles; `phi4-jax generate` in a
    # fresh process runs at XLA's default level, test_generate.py.)
    process = subprocess.Popen([PHI4_JAX, "serve", "--port", str(port), "--max-batch", "1", "--max-context", "64",
                                "--speculative", "ngram", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=user_environment(XLA_FLAGS="--xla_backend_optimization_level=0"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if request(f"{url}/health") == (200, {"status": "ok"}):
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)  # (503 while it compiles)
        else:
            pytest.fail(f"the server did not come up:\n{process.communicate(timeout=60)[0]}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTIONS[3]}]
        answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=6)
        assert answer.choices[0].message.content == lone(demo, messages, 6)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.communicate()[0][-3000:]
    finally:
        if process.poll() is None:
            process.kill()
