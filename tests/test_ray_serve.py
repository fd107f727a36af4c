"""`meswitch serve --ray`: the OpenAI API on Ray Serve (2 Switch replicas, expert-affine routing),
compared with the single-process server on the same tiny bundle through the official openai
client. One local Ray instance and one deployment for the whole module (Ray's start-up dominates)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from test_server import ADMIN, KEY, LiveServer, free_port  # noqa: E402

from meswitch.runtime import Switch  # noqa: E402
from meswitch.server.conversations import ConversationMemory  # noqa: E402
from meswitch.server.cli import load_router  # noqa: E402
from meswitch.server.ray_serve import APP_NAME, REPLICA_HEADER, app_builder, local_copy  # noqa: E402

pytestmark = pytest.mark.ray
LONG_PROMPT = [{"role": "user", "content": "Tom has 12 apples and gives 5 to Anna. Tell me the whole story."}]


@pytest.fixture(scope="module")
def both(served_bundle):
    """(single-process server, Ray Serve endpoint) over the same bundle, both float32 and keyed.
    Ray gets the bundle as a file:// URI, so each node (here: one) copies it once."""
    bundle, d = served_bundle, served_bundle.parent
    sw = Switch.load(bundle, dtype="float32", max_batch=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the arguments as `serve run meswitch.server.ray_serve:app_builder key=value ...` passes them
        args = dict(bundle=f"file://{bundle}", replicas="2", experts_per_replica="1", dtype="float32", max_batch="2",
                    threads="1", api_key=KEY, admin_key=ADMIN, cache_dir=str(d / "cache"))
        serve.run(app_builder(args), name=APP_NAME, route_prefix="/")
        with LiveServer(sw, router=load_router(sw), api_key=KEY) as single:
            single.switch = sw
            ray_url = f"http://127.0.0.1:{port}"
            yield single, Endpoint(ray_url), d
    finally:
        ray.shutdown()  # ends Serve with the local instance (serve.shutdown would drain replicas first)
        sw.close()


class Endpoint:
    def __init__(self, url):
        self.url = url

    def client(self, key=KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 60), **kw)


def chat(c, model, messages, **kw):
    raw = c.chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0, **kw)
    return raw.headers, raw.parse()


def test_same_answers_as_the_single_process_server(both):
    single, rayep, _ = both
    s, r = single.client(), rayep.client()
    assert [m.id for m in r.models.list().data] == [m.id for m in s.models.list().data] == ["auto", "base", "code", "math"]
    for model, q in (("math", "What is 7 times 8?"), ("code", "Write a Python function that reverses a list."),
                     ("base", "Hello there"), ("auto", "What is 6 times 9 apples?"),
                     ("auto", "Write a Python function to sort a list.")):
        msgs = [{"role": "user", "content": q}]
        (hs, a), (hr, b) = chat(s, model, msgs, max_tokens=8), chat(r, model, msgs, max_tokens=8)
        assert b.choices[0].message.content == a.choices[0].message.content, model
        assert b.model == a.model and hr["x-meswitch-expert"] == hs["x-meswitch-expert"] and REPLICA_HEADER in hr
        assert b.usage.model_dump() == a.usage.model_dump()
        cs = s.completions.create(model=model, prompt=q, max_tokens=6, temperature=0)
        cr = r.completions.create(model=model, prompt=q, max_tokens=6, temperature=0)
        assert (cr.model, cr.choices[0].text) == (cs.model, cs.choices[0].text)


def test_streaming_is_the_same(both):
    single, rayep, _ = both
    msgs = [{"role": "user", "content": "Write a Python function that reverses a list."}]

    def streamed(c):
        pieces, finish, usage = [], None, None
        for ch in c.chat.completions.create(model="code", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
            if ch.choices and ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
            usage = ch.usage or usage
        return "".join(pieces), finish, usage.completion_tokens

    assert streamed(rayep.client()) == streamed(single.client())
    text = "".join(ch.choices[0].text for ch in rayep.client().completions.create(
        model="math", prompt="Tom has", max_tokens=5, temperature=0, stream=True))
    assert text == single.switch.generate("Tom has", expert="math", temperature=0, max_tokens=5).text


@pytest.mark.parametrize("kwargs", [dict(model="nope"), dict(model="math", temperature=3), dict(model="math", n=2),
                                    dict(model="math", messages=[{"role": "user", "content": "apples " * 400}])])
def test_same_errors(both, kwargs):
    single, rayep, _ = both
    kwargs.setdefault("messages", [{"role": "user", "content": "hi"}])
    errs = []
    for c in (single.client(), rayep.client()):
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(**kwargs)
        errs.append((e.value.status_code, e.value.body))
    assert errs[0] == errs[1] and errs[0][0] in (400, 404)  # the context-length 400 comes from a replica's Switch
    for c in (single.client(key="wrong"), rayep.client(key="wrong")):
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_experts_stick_to_their_replicas_and_metrics_are_per_replica(both):
    _, rayep, _ = both
    c = rayep.client()
    # warm-up, slowly (Serve's routers learn where experts are within ~0.1 s), until the placement
    # holds for two rounds
    placements = []
    while len(placements) < 2 or placements[-1] != placements[-2]:
        assert len(placements) < 12, placements
        placement = []
        for model in ("math", "code"):
            placement.append(chat(c, model, [{"role": "user", "content": "warm up"}], max_tokens=1)[0][REPLICA_HEADER])
            time.sleep(0.3)
        placements.append(placement)
    seen = {"math": set(), "code": set()}
    for i in range(6):
        for model in ("math", "code"):
            headers, _ = chat(c, model, [{"role": "user", "content": f"question {i}"}], max_tokens=2)
            seen[model].add(headers[REPLICA_HEADER])
    # one expert per replica (experts_per_replica=1): each expert's requests all went to its holder
    assert len(seen["math"]) == 1 and len(seen["code"]) == 1 and seen["math"] != seen["code"], seen
    time.sleep(1.5)  # replicas report their stats every second
    text = urllib.request.urlopen(rayep.url + "/metrics").read().decode()
    for model in ("math", "code"):
        (replica,) = seen[model]
        assert f'meswitch_expert_resident{{expert="{model}",replica="{replica}",tier="hot"}} 1.0' in text, model
    assert 'meswitch_requests_total{endpoint="chat",expert="math",status="200"}' in text
    health = json.loads(urllib.request.urlopen(rayep.url + "/health").read())
    assert health["status"] == "ok" and health["experts"] == ["code", "math"]


def test_conversation_memory_is_shared_outside_the_ingress(both):
    _, rayep, _ = both
    c = rayep.client()
    msgs = [{"role": "user", "content": "Write a Python function to sort a list."}]
    first = c.chat.completions.create(model="auto", messages=msgs, max_tokens=4, temperature=0)
    assert first.model == "code"
    answer = first.choices[0].message.content
    key = ConversationMemory.key(msgs + [{"role": "assistant", "content": answer}])
    coordinator = serve.get_deployment_handle("Coordinator", app_name=APP_NAME)
    deadline = time.time() + 10
    while coordinator.lookup.remote(key).result() != "code":
        assert time.time() < deadline
        time.sleep(0.1)
    follow = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "please continue"}]
    assert c.chat.completions.create(model="auto", messages=follow, max_tokens=2).model == "code"


def test_admin_is_refused_clearly(both):
    _, rayep, _ = both
    req = urllib.request.Request(rayep.url + "/admin/experts", method="POST",
                                 data=json.dumps({"name": "x", "source": "other-bundle"}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not supported on Ray Serve" in json.loads(e.value.read())["error"]["message"]
    req = urllib.request.Request(rayep.url + "/admin/experts/math", method="DELETE",
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not supported on Ray Serve" in json.loads(e.value.read())["error"]["message"]


def test_a_replica_killed_mid_flight(both):
    """Three requests for math run on its replica when it is killed: a greedy stream that already
    sent text (retried, the sent text checked, the rest streamed), a sampled stream that already
    sent text (ends with an error event), and a plain greedy request (retried). Then the endpoint
    keeps answering from the other replica."""
    single, rayep, _ = both
    c = rayep.client(timeout=60)
    want = single.switch.generate(LONG_PROMPT, expert="math", temperature=0, max_tokens=200).text
    assert len(want) > 100  # a long answer: still running when the replica is killed
    headers, _ = chat(c, "math", [{"role": "user", "content": "where?"}], max_tokens=1)
    victim = headers[REPLICA_HEADER]

    greedy = c.chat.completions.with_streaming_response.create(model="math", messages=LONG_PROMPT, max_tokens=200,
                                                               temperature=0, stream=True)
    sampled = c.chat.completions.with_streaming_response.create(model="math", messages=LONG_PROMPT, max_tokens=200,
                                                                temperature=1.0, stream=True)
    results = {}
    with greedy as g, sampled as s:
        assert g.headers[REPLICA_HEADER] == s.headers[REPLICA_HEADER] == victim
        g_iter, s_iter = g.iter_lines(), s.iter_lines()
        g_first, s_first = [next(line for line in it if line.startswith("data: {")) for it in (g_iter, s_iter)]
        assert '"content": ""' in g_first  # the role chunk; text follows
        plain = threading.Thread(target=lambda: results.setdefault("plain", chat(
            c, "math", LONG_PROMPT, max_tokens=200)[1].choices[0].message.content), daemon=True)
        plain.start()
        g_text = [json.loads(next(line for line in g_iter if line.startswith("data: {"))[6:])]
        s_text = [json.loads(next(line for line in s_iter if line.startswith("data: {"))[6:])]
        assert g_text[0]["choices"][0]["delta"]["content"] and s_text[0]["choices"][0]["delta"]["content"]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#SwitchReplica#{victim}", namespace="serve"), no_restart=True)
        t0 = time.time()
        g_rest = [json.loads(line[6:]) for line in g_iter if line.startswith("data: {")]
        s_rest = [json.loads(line[6:]) for line in s_iter if line.startswith("data: {")]
    plain.join(60)
    assert time.time() - t0 < 60 and not plain.is_alive()
    greedy_text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in g_text + g_rest if "choices" in ch)
    assert greedy_text == want and g_rest[-1]["choices"][0]["finish_reason"] == "length"
    assert results["plain"] == want
    # the sampled stream had sent text that a retry could not reproduce: it ends with a clear error
    if "error" in s_rest[-1]:
        assert "replica serving this request stopped" in s_rest[-1]["error"]["message"]
    else:  # it finished before the kill reached it (possible, not expected): then it finished normally
        assert s_rest[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for i in range(4):  # the endpoint keeps answering
        headers, r = chat(c, "math", [{"role": "user", "content": f"after {i}"}], max_tokens=2)
        assert headers[REPLICA_HEADER] != victim and r.choices[0].finish_reason == "length"


def test_uri_bundles_are_copied_once(served_bundle, tmp_path):
    d = served_bundle.parent
    cache = tmp_path / "cache"
    first = local_copy(f"file://{d / 'bundle'}", cache)
    assert (first / "manifest.json").is_file() and first.parent.parent == cache
    (first / "marker").write_text("kept")
    assert local_copy(f"file://{d / 'bundle'}", cache) == first and (first / "marker").exists()  # not copied again
    assert local_copy(str(d / "bundle"), cache) == d / "bundle"  # a plain path is used where it is
    with pytest.raises(ValueError, match="not found"):
        local_copy(f"file://{tmp_path / 'missing'}", cache)


def test_cli_flags_reach_the_deployment(monkeypatch):
    import meswitch.server.ray_serve as rs
    from meswitch.cli import main

    got = {}
    monkeypatch.setattr(rs, "run", lambda cfg, host, port: got.update(cfg=cfg, port=port))
    assert main(["serve", "b/", "--ray", "--autoscale", "1:3", "--experts-per-replica", "2", "--port", "9",
                 "--threads", "2"]) == 0
    assert got["cfg"].autoscale == "1:3" and got["cfg"].experts_per_replica == 2 and got["cfg"].threads == 2
    assert got["port"] == 9
    assert main(["serve", "b/", "--ray", "--autoscale", "3:1"]) != 0
    with pytest.raises(SystemExit):
        main(["serve", "b/", "--ray", "--replicas", "2", "--autoscale", "1:2"])


def test_the_single_process_server_does_not_import_ray():
    code = ("import sys, meswitch.cli, meswitch.server.cli, meswitch.server.app; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----- the ingress's retry rules, on scripted replica streams (no Ray cluster) ------------------------
class ScriptedStream:
    """A replica's stream: its items, then (optionally) the replica dies."""

    def __init__(self, items, die=False):
        self.items, self.die, self.cancelled = list(items), die, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            item = self.items.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        if self.die:
            raise ray.exceptions.ActorDiedError()
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class ScriptedReplicas:
    """Stands in for the SwitchReplica handle: each call takes the next scripted stream."""

    def __init__(self, *streams):
        self.streams, self.calls = list(streams), []
        self.generate = self

    def options(self, **kw):
        self.calls.append(kw)
        return self

    def remote(self, prompt, expert, params):
        return self.streams.pop(0)


def done(text):
    from meswitch.runtime import Completion

    return ("done", Completion(1, "math", text, [], "length", 3, 4))


def drive(replicas, temperature=0.0, seed=None):
    """Submit one request through a RemoteSwitch; -> (text handed out piece by piece, result, request)."""
    import asyncio

    from meswitch.runtime import SamplingParams
    from meswitch.server.ray_serve import RemoteSwitch

    pieces, finished = [], []

    async def go():
        sw = RemoteSwitch(bundle=None, replicas=replicas, coordinator=None)
        req = await sw.submit("q", "math", on_update=lambda r, d, c: (pieces.append(d), c and finished.append(c)),
                              params=SamplingParams(temperature=temperature, seed=seed))
        await asyncio.wait_for(req.task, 10)
        return req

    req = asyncio.run(go())
    assert len(finished) == 1 and req.result is finished[0]
    return "".join(pieces), req.result, req


def test_retry_continues_a_reproducible_stream_after_the_text_already_sent():
    r = ScriptedReplicas(ScriptedStream([("replica", "a"), ("text", "Hello"), ("text", " wor")], die=True),
                         ScriptedStream([("replica", "b"), ("text", "Hel"), ("text", "lo world"), ("text", "!"),
                                         done("Hello world!")]))
    text, result, req = drive(r)
    assert text == result.text == "Hello world!" and result.finish_reason == "length"
    assert r.calls[0] == {"stream": True, "multiplexed_model_id": "math"} and not r.streams


def test_retry_that_diverges_from_the_sent_text_fails_clearly():
    r = ScriptedReplicas(ScriptedStream([("replica", "a"), ("text", "Hello")], die=True),
                         ScriptedStream([("replica", "b"), ("text", "Help me"), done("Help me")]))
    text, result, _ = drive(r, seed=7)
    assert text == "Hello" and result.finish_reason == "error" and "differs" in result.error


def test_sampled_stream_with_text_sent_is_not_retried():
    r = ScriptedReplicas(ScriptedStream([("replica", "a"), ("text", "Hi")], die=True), ScriptedStream([]))
    text, result, _ = drive(r, temperature=0.8)
    assert result.finish_reason == "error" and "not reproducible" in result.error and len(r.streams) == 1
    # ... unless nothing had been sent yet
    r = ScriptedReplicas(ScriptedStream([("replica", "a")], die=True),
                         ScriptedStream([("replica", "b"), ("text", "Yo"), done("Yo")]))
    text, result, req = drive(r, temperature=0.8)
    assert text == result.text == "Yo" and req.response_headers == {REPLICA_HEADER: "b"}


def test_refusals_and_dead_replicas_before_acceptance():
    from meswitch.runtime import RequestError
    from meswitch.server.ray_serve import NoReplicaError

    refusal = ray.exceptions.RayTaskError("generate", "tb", RequestError("the prompt has 900 tokens")).as_instanceof_cause()
    with pytest.raises(RequestError, match="900 tokens") as e:
        drive(ScriptedReplicas(ScriptedStream([refusal])))
    assert type(e.value) is RequestError  # the app maps it exactly as for a local Switch
    dead = [ScriptedStream([], die=True) for _ in range(3)]
    with pytest.raises(NoReplicaError, match="ActorDiedError"):
        drive(ScriptedReplicas(*dead))
