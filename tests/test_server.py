"""The HTTP server, exercised with the official `openai` client against a real uvicorn server on a
free loopback port, serving a tiny bundle (experts math and code, a lexical router)."""
from __future__ import annotations

import contextlib
import json
import shutil
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
from conftest import CORPUS, CODE_Q, MATH_Q, flip_byte, make_served_bundle, save_lively_experts

from meswitch.bundle import Bundle
from meswitch.cli import main
from meswitch.runtime import Switch
from meswitch.server import create_app
from meswitch.server.cli import load_router

KEY = "test-key"
ADMIN = "admin-key"


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


@contextlib.contextmanager
def serving_a_copy(served, tmp_path, damage=None, **server_kwargs):
    """A server over a copy of the bundle (changed by `damage(copy)` first), for tests that change it."""
    live = tmp_path / "live"
    shutil.copytree(served.dir / "bundle", live)
    if damage is not None:
        damage(live)
    sw = Switch.load(live, dtype="float32")
    try:
        with LiveServer(sw, **server_kwargs) as srv:
            srv.bundle_dir, srv.switch = live, sw
            yield srv
    finally:
        sw.close()


def admin(srv, method, path, body=None, key=ADMIN):
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
    cr = c.completions.create(model="auto", prompt="What is 12 minus 5?", max_tokens=2)
    assert cr.model == "math"


def test_a_follow_up_stays_with_the_expert_that_answered(served):
    """Every user turn is ambiguous (words of neither domain), so the router alone gives both
    conversations the same expert: only the server's memory of who answered can tell them apart."""
    c = served.client()
    first = [{"role": "user", "content": "hello there"}]
    routed = {}
    for expert in ("math", "code"):
        answer = c.chat.completions.create(model=expert, messages=first, max_tokens=4, temperature=0)
        follow = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                          {"role": "user", "content": "please go on"}]
        routed[expert] = c.chat.completions.create(model="auto", messages=follow, max_tokens=2, temperature=0).model
        # the same conversation with an answer this server never gave: the router decides alone
        follow[1]["content"] += " (edited)"
        routed[expert + " unknown"] = c.chat.completions.create(model="auto", messages=follow, max_tokens=2).model
    assert routed["math"] == "math" and routed["code"] == "code"
    assert routed["math unknown"] == routed["code unknown"]


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
    # streaming: closing the stream early cancels too (counted as cancelled, not finished)
    before = sw.stats()["requests_cancelled"]
    stream = served.client().chat.completions.create(model="code", messages=[{"role": "user", "content": "go on"}],
                                                    max_tokens=5000, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while sw.stats()["requests_cancelled"] == before and time.time() < deadline:
        time.sleep(0.1)
    assert sw.stats()["requests_cancelled"] == before + 1 and sw.stats()["running"] == 0


def test_admin_adds_and_removes_experts_without_restart(served, tmp_path):
    other = tmp_path / "other"
    assert main(["compress", "--base", str(served.dir / "base"), "--expert", f"poet={served.dir / 'code'}",
                 "--out", str(other), "--bits", "3", "--description", "poet=poems"]) == 0
    with serving_a_copy(served, tmp_path, api_key=KEY, admin_key=ADMIN, source_dirs=[tmp_path]) as srv:
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
        assert status == 400 and r["error"]["code"] == "invalid_source"
        status, r = admin(srv, "POST", "/admin/experts", {"name": "poet", "source": str(other)})
        assert status == 409 and "already" in r["error"]["message"]
        assert admin(srv, "DELETE", "/admin/experts/nope")[0] == 404
        # the inference key is not the admin key, and a wrong key gets nothing
        assert admin(srv, "POST", "/admin/experts", {"name": "x", "source": "y"}, key="nope")[0] == 401
        assert admin(srv, "DELETE", "/admin/experts/code", key=KEY)[0] == 401
        assert sorted(Bundle.open(srv.bundle_dir).experts) == ["code", "poet"]


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


# ----- README promises over HTTP -------------------------------------------------------------------
def test_stop_seed_top_p_and_max_completion_tokens(served):
    c = served.client()
    msgs = [{"role": "user", "content": "Write a Python function that reverses a list."}]
    full = c.chat.completions.create(model="code", messages=msgs, max_tokens=16, temperature=0).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    r = c.chat.completions.create(model="code", messages=msgs, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    # max_completion_tokens wins over max_tokens
    r = c.chat.completions.create(model="code", messages=msgs, max_tokens=16, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # a seed makes sampling repeatable, and gives what the Python API gives with that seed
    sampled = [c.chat.completions.create(model="math", messages=msgs, max_tokens=8, temperature=1.0, seed=s)
               .choices[0].message.content for s in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1] == alone_sampled(served, "math", msgs, seed=1)
    greedy = alone(served, "math", messages=msgs, max_tokens=8)
    assert any(t != greedy for t in sampled)  # temperature 1 does sample (so the top_p check below can fail)
    # top_p that keeps only the most likely token is greedy decoding, whatever the seed
    for seed in (1, 2, 3, 4):
        r = c.chat.completions.create(model="math", messages=msgs, max_tokens=8, temperature=1.0, top_p=1e-6, seed=seed)
        assert r.choices[0].message.content == greedy


def alone_sampled(srv, model, messages, seed):
    return srv.switch.generate(messages, expert=model, temperature=1.0, seed=seed, max_tokens=8).text


def test_route_fallback_header(served):
    from meswitch.router import Router

    strict = Router.load(Bundle.open(served.dir / "bundle"), threshold=0.999)  # nothing is that sure
    with LiveServer(served.switch, router=strict, api_key=KEY) as srv:
        raw = srv.client().chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "What is 7 times 8?"}], max_tokens=2)
        assert raw.headers["x-meswitch-route-fallback"] == "true" and raw.parse().model == "base"
    raw = served.client().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is 7 times 8?"}], max_tokens=2)
    assert raw.headers["x-meswitch-route-fallback"] == "false" and raw.parse().model == "math"


def test_an_expert_over_the_memory_budget_is_a_503(served):
    sw = Switch.load(served.dir / "bundle", dtype="float32", max_memory=1024)  # 1 KiB: no expert fits
    try:
        with LiveServer(sw, api_key=KEY) as srv:
            c = srv.client()
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as e:
                    r = c.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, stream=stream)
                    list(r) if stream else None
                assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
                assert "memory budget" in e.value.body["message"] and e.value.body["code"] == "memory_budget_exceeded"
            # the base needs no expert memory
            assert c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2).usage.completion_tokens == 2
    finally:
        sw.close()


def test_admin_is_403_without_an_admin_key(served):
    assert admin(served, "POST", "/admin/experts", {"name": "x", "source": "y"})[0] == 403
    status, r = admin(served, "DELETE", "/admin/experts/math", key=KEY)
    assert status == 403 and "--admin-key" in r["error"]["message"]
    assert "math" in served.switch.experts


# ----- hardening ---------------------------------------------------------------------------------------
def post_raw(srv, path, body: bytes, key=KEY):
    req = urllib.request.Request(srv.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("body,where", [
    (b'{"model": "math", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "math", "prompt": "\\ud800"}', "prompt"),
    (b'{"model": "math", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"model": "math", "messages": [{"role": "user"}]}', "content"),
    (b'{"model": "math", "messages": [{"role": "user", "content": null}]}', "content"),
    (b'{"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "math", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "seed"),
    (b'{"model": "math", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "text content"),
])
def test_invalid_requests_are_400_as_openai_answers(served, body, where):
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    status, text = post_raw(served, path, body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert where in err["message"] and "Traceback" not in text and err["type"] == "invalid_request_error"


def test_several_inference_keys_and_keys_never_logged(served, caplog):
    with LiveServer(served.switch, api_key=["key-one", "key-two"], admin_key="admin-secret-1") as srv:
        with caplog.at_level("DEBUG"):
            for key in ("key-one", "key-two"):
                assert srv.client(key=key).completions.create(model="base", prompt="hi", max_tokens=1).model == "base"
            for key in ("key-three", "admin-secret-1", ""):
                with pytest.raises(openai.AuthenticationError):
                    srv.client(key=key or "x").models.list()
            assert admin(srv, "DELETE", "/admin/experts/nope", key="key-one")[0] == 401
            assert admin(srv, "DELETE", "/admin/experts/nope", key="admin-secret-1")[0] == 404
    for secret in ("key-one", "key-two", "key-three", "admin-secret-1"):
        assert secret not in caplog.text
    with pytest.raises(ValueError, match="differ"):
        create_app(served.switch, api_key="same", admin_key="same")


def test_admin_sources_are_confined(served, tmp_path):
    import os

    outside = tmp_path / "outside"
    shutil.copytree(served.dir / "bundle", outside / "b")
    inside = tmp_path / "sources"
    inside.mkdir()
    os.symlink(outside / "b", inside / "link")
    with serving_a_copy(served, tmp_path, api_key=KEY, admin_key=ADMIN, source_dirs=[inside]) as srv:
        for source in (str(outside / "b"), "../outside/b", "link", str(inside / "link")):
            status, r = admin(srv, "POST", "/admin/experts", {"name": "copy", "source": source, "source_name": "math"})
            assert status == 403 and "source folders" in r["error"]["message"], source
        # a source bundle inside the folder, but whose manifest points outside: refused, nothing copied
        hostile = inside / "hostile"
        shutil.copytree(served.dir / "bundle", hostile)
        m = json.loads((hostile / "manifest.json").read_text())
        m["experts"]["math"]["aux_dir"] = str(outside / "b" / "experts")
        (hostile / "manifest.json").write_text(json.dumps(m))
        status, r = admin(srv, "POST", "/admin/experts", {"name": "copy", "source": "hostile", "source_name": "math"})
        assert status == 400 and "absolute path" in r["error"]["message"]
        assert sorted(Bundle.open(srv.bundle_dir).experts) == ["code", "math"]


def test_a_damaged_expert_is_a_clear_500_and_the_others_keep_serving(served, tmp_path):
    def damage(live):
        flip_byte(live / Bundle.open(live).experts["math"]["weights"], -3)

    with serving_a_copy(served, tmp_path, damage, api_key=KEY) as srv:
        c = srv.client()
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 500 and "corrupted" in e.value.body["message"]
        assert e.value.body["code"] == "expert_unavailable"
        r = c.chat.completions.create(model="code", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                      temperature=0)
        assert r.choices[0].message.content == alone(served, "code", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=2)


def test_the_server_sees_experts_a_cli_compress_adds(served, tmp_path):
    """A `meswitch compress` into the bundle a server is serving: the server serves the new expert
    at its next request, and a later admin change keeps it (the bundle's lock, manifest re-read)."""
    with serving_a_copy(served, tmp_path, api_key=KEY, admin_key=ADMIN) as srv:
        c = srv.client()
        assert main(["compress", "--base", str(served.dir / "base"), "--expert", f"poet={served.dir / 'code'}",
                     "--out", str(srv.bundle_dir), "--bits", "3"]) == 0
        assert "poet" in [m.id for m in c.models.list().data]
        assert c.completions.create(model="poet", prompt="roses", max_tokens=2).model == "poet"
        status, r = admin(srv, "DELETE", "/admin/experts/code")
        assert status == 200 and r["experts"] == ["math", "poet"]
        assert sorted(Bundle.open(srv.bundle_dir).experts) == ["math", "poet"]


# ----- fuzzing ------------------------------------------------------------------------------------------
# The OpenAPI schema fuzzed with schemathesis (hypothesis underneath): valid and invalid requests for
# every operation, inference and admin alike. No answer may be a 5xx, no body may carry a traceback.
# The app serves a copy of the bundle with a short context (generations stay short); the admin may
# only add experts from an empty folder, and whatever it removes is the copy's.
@pytest.fixture(scope="module")
def fuzzed(served, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(served.dir / "bundle", d / "bundle")
    (d / "sources").mkdir()
    sw = Switch.load(d / "bundle", dtype="float32", max_model_len=48, max_queue=64)
    sw.dir = d
    yield sw
    sw.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    import schemathesis

    app = create_app(fuzzed, router=load_router(fuzzed), api_key=KEY, admin_key=ADMIN, source_dirs=[fuzzed.dir / "sources"])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_finds_no_server_errors_and_no_tracebacks(api_schema, mode):
    """Requests drawn from the schema's operations (valid ones, then ones that break it)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/admin/experts"}
    cases = st.one_of([op.as_strategy(generation_mode=GenerationMode(mode)) for op in operations])
    statuses = []

    # A schema cannot list the served models; most drawn requests get one, so that they generate.
    @given(case=cases, model=st.sampled_from([None, "auto", "base", "math", "code"]))
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case, model):
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        key = ADMIN if case.path.startswith("/admin") else KEY
        response = case.call(headers={"Authorization": f"Bearer {key}"})
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        assert "Traceback" not in response.text and 'File "' not in response.text
        if response.status_code >= 400:
            err = response.json()["error"]
            assert isinstance(err["message"], str) and err["type"]

    check()
    from collections import Counter

    print(mode, sorted(Counter(statuses).items()))
    assert any(400 <= s < 500 for s in statuses)
    if mode == "positive":
        assert sum(s == 200 for s in statuses) >= 10  # generations were reached


def test_the_fuzzed_bundle_is_still_whole(fuzzed):
    """Whatever the fuzzer removed, every expert left verifies, and nothing came from outside."""
    b = Bundle.open(fuzzed.dir / "bundle")
    assert set(b.experts) <= {"math", "code"}
    for name in b.experts:
        b.verify_files(name)
