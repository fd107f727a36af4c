"""The HTTP server, exercised with the official `openai` client against a real uvicorn server on a
free loopback port, serving a tiny bundle (experts math and code, a lexical router)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import CORPUS

from meswitch.cli import main
from meswitch.runtime import Switch
from meswitch.server import create_app
from meswitch.server.cli import load_router

KEY = "test-key"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LiveServer:
    def __init__(self, switch, **kw):
        import uvicorn

        self.port = free_port()
        self.app = create_app(switch, **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)


@pytest.fixture(scope="module")
def served(served_bundle):
    d = served_bundle.parent
    sw = Switch.load(served_bundle, dtype="float32", max_queue=64)
    with LiveServer(sw, router=load_router(sw), api_key=KEY) as srv:
        srv.dir = d
        srv.switch = sw
        yield srv
    sw.close()


def admin(srv, method, path, body=None, key=KEY):
    req = urllib.request.Request(srv.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def alone(srv, model, messages=None, prompt=None, **kw):
    """The same request served alone through the Python API (greedy reference)."""
    expert = None if model == "base" else model
    return srv.switch.generate(messages if messages is not None else prompt, expert=expert, temperature=0, **kw).text


def test_models_lists_auto_base_and_experts(served):
    models = served.client().models.list().data
    assert [m.id for m in models] == ["auto", "base", "code", "math"]
    math = next(m for m in models if m.id == "math")
    assert math.model_extra["description"] == "grade-school arithmetic"
    assert math.model_extra["parent"].endswith("base")


@pytest.mark.parametrize("model", ["math", "code", "base"])
def test_chat_and_completion_per_expert(served, model):
    c = served.client()
    msgs = [{"role": "user", "content": "What is 7 times 8?"}]
    raw = c.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    r = raw.parse()
    assert raw.headers["x-meswitch-expert"] == model and r.model == model
    assert r.choices[0].message.content == alone(served, model, messages=msgs, max_tokens=8)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8 and r.choices[0].finish_reason == "length"
    cr = c.completions.create(model=model, prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert cr.choices[0].text == alone(served, model, prompt="def add(a, b):", max_tokens=6)
    assert cr.model == model and cr.usage.completion_tokens == 6


def test_streaming_matches_the_plain_answer(served):
    c = served.client()
    msgs = [{"role": "user", "content": "Write a Python function that reverses a list."}]
    pieces, finish = [], None
    stream = c.chat.completions.create(model="code", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
        usage = ch.usage or usage
    assert "".join(pieces) == alone(served, "code", messages=msgs, max_tokens=12)
    assert finish == "length" and usage.completion_tokens == 12
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="math", prompt="Tom has", max_tokens=5,
                                                                      temperature=0, stream=True))
    assert text == alone(served, "math", prompt="Tom has", max_tokens=5)


def test_auto_routes_by_domain_and_says_which_expert_answered(served):
    c = served.client()
    for q, want in (("What is 6 times 9 apples?", "math"), ("Write a Python function to sort a list.", "code")):
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": q}],
                                                          max_tokens=4, temperature=0)
        assert raw.headers["x-meswitch-expert"] == want and raw.parse().model == want
        assert float(raw.headers["x-meswitch-route-confidence"]) > 0.3
    # a follow-up of that conversation stays with the expert that answered it
    msgs = [{"role": "user", "content": "Write a Python function to sort a list."}]
    first = c.chat.completions.create(model="auto", messages=msgs, max_tokens=4, temperature=0)
    follow = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "please continue"}]
    assert c.chat.completions.create(model="auto", messages=follow, max_tokens=2).model == "code"
    cr = c.completions.create(model="auto", prompt="What is 12 minus 5?", max_tokens=2)
    assert cr.model == "math"


@pytest.mark.parametrize("kwargs,status,text", [
    (dict(model="nope"), 404, "not found"),
    (dict(model="math", temperature=3), 400, "temperature"),
    (dict(model="math", top_p=0), 400, "top_p"),
    (dict(model="math", max_tokens=0), 400, "max_tokens"),
    (dict(model="math", n=2), 400, "n=1"),
    (dict(model="math", logprobs=True), 400, "logprobs"),
    (dict(model="math", messages=[{"role": "user", "content": "apples " * 400}]), 400, "context length"),
    (dict(model="math", messages=[]), 400, "messages"),
])
def test_errors_have_the_openai_shape(served, kwargs, status, text):
    kwargs.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIStatusError) as e:
        served.client().chat.completions.create(**kwargs)
    assert e.value.status_code == status
    err = e.value.body
    assert set(err) >= {"message", "type"} and text in err["message"] and "Traceback" not in err["message"]


def test_auth_and_body_size(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    req = urllib.request.Request(served.url + "/v1/completions", data=b"{" + b" " * (2 << 20) + b"}",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["message"].startswith("request body")
    req = urllib.request.Request(served.url + "/v1/completions", data=b"not json",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "Traceback" not in e.value.read().decode()
    # health and metrics are open
    assert json.loads(urllib.request.urlopen(served.url + "/health").read())["status"] == "ok"


def test_metrics_count_requests_tokens_routes_and_loads(served):
    served.client().chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 2 plus 2?"}],
                                            max_tokens=3)
    text = urllib.request.urlopen(served.url + "/metrics").read().decode()
    for needle in ('meswitch_requests_total{endpoint="chat",expert="math",status="200"}',
                   'meswitch_tokens_total{expert="math",kind="completion"}',
                   'meswitch_routing_decisions_total{expert="math",fallback="false"}',
                   "meswitch_request_latency_seconds_bucket", "meswitch_store_hits_total", "meswitch_store_disk_loads_total",
                   'meswitch_expert_resident{expert="math",tier="hot"} 1.0', "meswitch_expert_memory_bytes"):
        assert needle in text, needle


def test_many_parallel_clients_get_what_they_get_alone(served):
    c = served.client(timeout=120)
    jobs = [("math" if i % 3 == 0 else "code" if i % 3 == 1 else "base", f"{CORPUS[i % len(CORPUS)][:30]} {i}")
            for i in range(36)]

    def ask(job):
        model, q = job
        return c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=6,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=36) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, q), got in zip(jobs, answers):
        assert got == alone(served, model, messages=[{"role": "user", "content": q}], max_tokens=6)


def test_a_full_queue_answers_429_with_retry_after(tmp_path, served):
    sw = Switch.load(served.dir / "bundle", dtype="float32", max_queue=1, max_batch=1, start=False)
    try:
        with LiveServer(sw, api_key=KEY) as srv:
            c = srv.client(timeout=5)
            sw.submit("occupy", "math", max_tokens=1)  # the engine is not started: the queue stays full
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}])
            assert e.value.response.headers["retry-after"] == "1"
    finally:
        sw.close()


@pytest.fixture
def slow_engine(served):
    """Steps of 30 ms, so that a generation is still running when its client goes away."""
    engine = served.switch.engine
    step = engine.step

    def slow_step():
        time.sleep(0.03)
        step()

    engine.step = slow_step
    yield
    del engine.step


def test_a_disconnecting_client_cancels_its_generation(served, slow_engine):
    sw = served.switch
    before = sw.stats()["requests_cancelled"]
    c = served.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="math", messages=[{"role": "user", "content": "tell me everything"}],
                                  max_tokens=5000, temperature=0)
    deadline = time.time() + 10
    while sw.stats()["requests_cancelled"] == before and time.time() < deadline:
        time.sleep(0.1)
    assert sw.stats()["requests_cancelled"] > before and sw.stats()["running"] == 0
    # streaming: closing the stream early cancels too
    stream = served.client().chat.completions.create(model="code", messages=[{"role": "user", "content": "go on"}],
                                                    max_tokens=5000, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while sw.stats()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert sw.stats()["running"] == 0


def test_admin_adds_and_removes_experts_without_restart(served, tmp_path):
    import shutil

    other = tmp_path / "other"
    assert main(["compress", "--base", str(served.dir / "base"), "--expert", f"poet={served.dir / 'code'}",
                 "--out", str(other), "--bits", "3", "--description", "poet=poems"]) == 0
    live = tmp_path / "live"
    shutil.copytree(served.dir / "bundle", live)
    sw = Switch.load(live, dtype="float32")
    try:
        with LiveServer(sw, api_key=KEY) as srv:
            c = srv.client()
            status, r = admin(srv, "POST", "/admin/experts", {"name": "poet", "source": str(other)})
            assert status == 200 and r["experts"] == ["code", "math", "poet"]
            assert "poet" in [m.id for m in c.models.list().data]
            assert c.completions.create(model="poet", prompt="roses", max_tokens=3).model == "poet"
            status, r = admin(srv, "DELETE", "/admin/experts/math")
            assert status == 200 and r["experts"] == ["code", "poet"]
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model="math", prompt="x", max_tokens=1)
            status, r = admin(srv, "POST", "/admin/experts", {"name": "bad", "source": str(tmp_path / "missing")})
            assert status == 400 and "error" in r
            assert admin(srv, "POST", "/admin/experts", {"name": "x", "source": "y"}, key="nope")[0] == 401
    finally:
        sw.close()


def test_meswitch_serve_command(served):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meswitch.cli", "serve", str(served.dir / "bundle"), "--port",
                             str(port), "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 90
        while True:
            try:
                ids = [m.id for m in c.models.list().data]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.3)
        assert ids == ["auto", "base", "code", "math"]
        r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 3 plus 4 apples?"}],
                                      max_tokens=3)
        assert r.model == "math"
    finally:
        proc.terminate()
        proc.wait(20)
