"""The runtime: delta layers, the int4 backend, the expert store and the continuous-batching engine.

Reference for exactness: the same compressed expert written out by `materialize` and run by
plain transformers. In float32 the runtime and the materialized model compute the same sums in
another order, so logits agree to ~1e-5 and greedy tokens are identical. In bfloat16 the
materialized model rounds W_base + delta to bf16 while the runtime keeps base and delta apart,
so logits agree only to bf16 rounding (tolerance below).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch
from conftest import CORPUS, derive_expert, lively, random_model, save_checkpoint, save_lively_experts
from transformers import AutoModelForCausalLM

from meswitch.bundle.format import Bundle
from meswitch.cli import main
from meswitch.compression.packing import pack_codes, unpack_codes, unpack_codes_reference
from meswitch.bundle.format import UnknownExpertError
from meswitch.runtime import MemoryBudgetError, QueueFullError, RequestError, Switch, parse_memory
from meswitch.runtime.engine import EngineStoppedError, Request, SamplingParams

FP32_LOGIT_TOL = 1e-4  # float32: same math, other summation order
BF16_LOGIT_TOL = 0.15  # bfloat16: the materialized reference rounds W + delta to 8 mantissa bits
PROMPTS = ["Tom has 12 apples", "def add(a, b):", "The quick brown fox", "Write a Python function"]


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tokenizer):
    """A tiny bundle (experts math, code) over a lively base, plus float32 materialized experts."""
    d = tmp_path_factory.mktemp("rt")
    save_lively_experts(d, tokenizer)
    calib = d / "calib.txt"
    calib.write_text("\n".join(CORPUS) + "\n")
    assert main(["compress", "--base", str(d / "base"), "--expert", f"math={d / 'math'}",
                 "--expert", f"code={d / 'code'}", "--out", str(d / "bundle"), "--calib", str(calib),
                 "--description", "math=arithmetic"]) == 0
    for name in ("math", "code"):
        assert main(["materialize", str(d / "bundle"), name, "--out", str(d / f"mat_{name}"), "--dtype", "float32"]) == 0
    return d


@pytest.fixture(scope="module")
def sw32(rt):
    with Switch.load(rt / "bundle", dtype="float32") as sw:
        yield sw


def reference(rt, name):
    path = rt / ("base" if name is None else f"mat_{name}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ----- packing ---------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fast_unpacking_matches_the_bitstream_definition(bits):
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 9, 64, 571):
        codes = torch.randint(0, 1 << bits, (5, cols), generator=g, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, cols), unpack_codes_reference(packed, bits, cols))
        assert torch.equal(unpack_codes(packed, bits, cols), codes)


# ----- exactness of the delta layers -------------------------------------------------------------
def ragged_logits(sw, requests):
    """One forward pass of the engine (Engine.forward, the code path that serves requests) over
    several (expert, ids) at once; the logits of every position of every request. The switch's
    engine must be idle (its KV-cache slots are borrowed)."""
    reqs = []
    for slot, (expert, ids) in enumerate(requests):
        req = Request(list(ids), expert, SamplingParams(), None, frozenset(), slot=slot)
        req.hot = None if expert is None else sw.store.acquire_blocking(expert)
        reqs.append(req)
    work = [(r, r.prompt_ids, 0, True) for r in reqs]
    try:
        logits = sw.engine.forward(work, all_positions=True)  # sorted in place: by expert
    finally:
        for r in reqs:
            if r.hot is not None:
                sw.store.release(r.hot)
    out, pos = {}, 0
    for r, toks, _, _ in work:
        out[r.slot] = logits[pos:pos + len(toks)].float()
        pos += len(toks)
    return [out[i] for i in range(len(reqs))]


def test_mixed_forward_matches_each_materialized_expert_float32(rt, sw32):
    reqs = [(e, sw32.encode(p, e)) for e, p in zip(["math", "code", None, "math"], PROMPTS)]
    got = ragged_logits(sw32, reqs)
    for (expert, ids), logits in zip(reqs, got):
        want = reference(rt, expert)(input_ids=torch.tensor([ids])).logits[0]
        assert (logits - want).abs().max() < FP32_LOGIT_TOL, expert
    # the experts really differ from the base, so the comparison could fail
    ids = reqs[0][1]
    base_logits = reference(rt, None)(input_ids=torch.tensor([ids])).logits[0]
    assert (got[0] - base_logits).abs().max() > 1000 * FP32_LOGIT_TOL


def test_bfloat16_forward_is_within_rounding_of_the_materialized_expert(rt):
    with Switch.load(rt / "bundle", dtype="bfloat16") as sw:
        hot = sw.store.acquire_blocking("math")
        assert type(next(r for r in hot.linear if r is not None)).__name__ == "PackedDelta"
        sw.store.release(hot)
        reqs = [(e, sw.encode(p, e)) for e, p in zip(["math", "code"], PROMPTS)]
        for (expert, ids), logits in zip(reqs, ragged_logits(sw, reqs)):
            want = reference(rt, expert)(input_ids=torch.tensor([ids])).logits[0]
            other = reference(rt, "code" if expert == "math" else "math")(input_ids=torch.tensor([ids])).logits[0]
            err = (logits - want).abs().max()
            assert err < BF16_LOGIT_TOL * want.abs().max()
            assert err < (other - want).abs().max()  # closer to its own expert than to the other one


def test_greedy_generation_equals_transformers_on_the_materialized_expert(rt, sw32):
    for expert in ("math", "code", None):
        ref = reference(rt, expert)
        for prompt in PROMPTS[:2]:
            ids = sw32.encode(prompt, expert)
            want = hf_greedy(ref, ids, 16)
            assert len(set(want)) > 3  # a wandering sequence, not one repeated token
            got = sw32.generate(prompt, expert=expert, temperature=0, max_tokens=16)
            assert got.token_ids == want and got.finish_reason == "length"
            assert got.text == sw32.tokenizer(expert).decode(want, skip_special_tokens=True)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(sw32):
    experts = ["math", "code", None, "code", "math", None, "math", "code"]
    prompts = [PROMPTS[i % 4] for i in range(8)]
    alone = [sw32.generate(p, expert=e, temperature=0, max_tokens=12).token_ids for p, e in zip(prompts, experts)]
    together = sw32.generate(prompts, expert=experts, temperature=0, max_tokens=12)
    assert [c.token_ids for c in together] == alone
    assert len({tuple(a) for a in alone}) > 3


def test_requests_joining_mid_flight_and_chunked_prefill(rt):
    with Switch.load(rt / "bundle", dtype="float32", start=False, max_step_tokens=4) as sw:
        for e in ("math", "code"):  # loaded beforehand: loads run in the background, steps do not wait
            sw.store.release(sw.store.acquire_blocking(e))
        a = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=20)
        for _ in range(8):
            sw.engine.step()
        assert 0 < len(a.output_ids) < 20  # a is decoding ...
        b = sw.submit(PROMPTS[1], "code", temperature=0, max_tokens=10)  # ... when b arrives
        sw.engine.step()
        # one step holds 4 tokens: a's next token and the first 3 of b's prompt, which is prefilled in chunks
        assert b.cursor == 3 and len(b.prompt_ids) > 6
        while not (a.done and b.done):
            sw.engine.step()
    with Switch.load(rt / "bundle", dtype="float32") as ref:
        assert a.result.token_ids == ref.generate(PROMPTS[0], expert="math", temperature=0, max_tokens=20).token_ids
        assert b.result.token_ids == ref.generate(PROMPTS[1], expert="code", temperature=0, max_tokens=10).token_ids


def test_other_families_biases_and_untied_heads(tmp_path, tokenizer):
    """Qwen2 (biases), Mistral, Qwen3 (q/k norms over heads), untied heads: each alone and in a
    mixed batch with the base, equal to the materialized expert."""
    for family in ("qwen2", "mistral", "qwen3"):
        d = tmp_path / family
        base = lively(random_model(family, tied=False, seed=5))
        save_checkpoint(base, tokenizer, d / "base")
        save_checkpoint(derive_expert(base, seed=6, scale=0.05), tokenizer, d / "e")
        assert main(["compress", "--base", str(d / "base"), "--expert", f"e={d / 'e'}", "--out", str(d / "b")]) == 0
        assert main(["materialize", str(d / "b"), "e", "--out", str(d / "m"), "--dtype", "float32"]) == 0
        with Switch.load(d / "b", dtype="float32") as sw:
            ids = sw.encode(PROMPTS[0], "e")
            ids2 = sw.encode(PROMPTS[1], None)
            got, got_base, got2 = ragged_logits(sw, [("e", ids), (None, ids2), ("e", ids2)])
        want = AutoModelForCausalLM.from_pretrained(d / "m", dtype=torch.float32)
        base_ref = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
        assert (got - want(input_ids=torch.tensor([ids])).logits[0]).abs().max() < FP32_LOGIT_TOL, family
        assert (got2 - want(input_ids=torch.tensor([ids2])).logits[0]).abs().max() < FP32_LOGIT_TOL, family
        assert (got_base - base_ref(input_ids=torch.tensor([ids2])).logits[0]).abs().max() < FP32_LOGIT_TOL, family
        assert (got2 - got_base).abs().max() > 100 * FP32_LOGIT_TOL  # the delta matters


def test_an_expert_with_added_tokens(tmp_path, tokenizer):
    base = lively(random_model(seed=21))
    save_checkpoint(base, tokenizer, tmp_path / "base")
    expert = derive_expert(base, seed=22, scale=0.05)
    expert.resize_token_embeddings(base.config.vocab_size + 32)
    with torch.no_grad():
        expert.get_input_embeddings().weight[-32:] = torch.randn(32, 64) * 2
    save_checkpoint(expert, tokenizer, tmp_path / "e")
    assert main(["compress", "--base", str(tmp_path / "base"), "--expert", f"big={tmp_path / 'e'}",
                 "--out", str(tmp_path / "b")]) == 0
    assert main(["materialize", str(tmp_path / "b"), "big", "--out", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with Switch.load(tmp_path / "b", dtype="float32") as sw:
        ids = [5, 17, base.config.vocab_size + 3, 40]  # includes a token only this expert has
        (got,) = ragged_logits(sw, [("big", ids)])
        want = ref(input_ids=torch.tensor([ids])).logits[0]
        assert got.shape == want.shape and (got - want).abs().max() < FP32_LOGIT_TOL
        with pytest.raises(ValueError, match="outside"):
            ragged_logits(sw, [(None, ids)])  # the base does not know that token


# ----- the engine ----------------------------------------------------------------------------------
def test_cancellation_frees_the_slot(rt):
    with Switch.load(rt / "bundle", dtype="float32", max_batch=1) as sw:
        first = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=200)
        second = sw.submit(PROMPTS[1], "code", temperature=0, max_tokens=3)
        time.sleep(0.3)
        assert not second.done  # the only slot is taken
        first.cancel()
        assert first.wait(30).finish_reason == "cancelled"
        assert second.wait(30).finish_reason == "length"
        assert sw.engine._free_slots == [0] and sw.stats()["requests_cancelled"] == 1


def test_sampling_parameters_seed_stop_and_streaming(sw32):
    a = sw32.generate(PROMPTS[2], expert="code", temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    b = sw32.generate(PROMPTS[2], expert="code", temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    c = sw32.generate(PROMPTS[2], expert="code", temperature=1.0, top_p=0.9, seed=8, max_tokens=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    full = sw32.generate(PROMPTS[0], expert="math", temperature=0, max_tokens=16)
    stop = full.text[5:8]
    # a vanishing temperature is greedy, not a numerical error (5e-324: found by the server fuzzer)
    assert sw32.generate(PROMPTS[0], expert="math", temperature=5e-324, max_tokens=16).token_ids == full.token_ids
    cut = sw32.generate(PROMPTS[0], expert="math", temperature=0, max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]

    async def collect():
        pieces = []
        async for item in sw32.stream(PROMPTS[0], expert="math", temperature=0, max_tokens=16):
            pieces.append(item)
        return pieces

    pieces = asyncio.run(collect())
    assert "".join(pieces[:-1]) == pieces[-1].text == full.text and len(pieces) > 3


def test_bad_requests_give_clear_errors(sw32):
    with pytest.raises(RequestError, match="unknown expert 'nope'.*code, math"):
        sw32.generate("hi", expert="nope")
    with pytest.raises(RequestError, match="empty"):
        sw32.generate("", expert="math")
    with pytest.raises(RequestError, match="context length"):
        sw32.generate("apples " * 400, expert="math")
    with pytest.raises(RequestError, match="temperature"):
        sw32.generate("hi", expert="math", temperature=-1)
    with pytest.raises(RequestError, match="max_tokens"):
        sw32.generate("hi", expert="math", max_tokens=0)
    with pytest.raises(RequestError, match="messages"):
        sw32.generate([{"role": "user"}], expert="math")


def test_bounded_queue(rt):
    with Switch.load(rt / "bundle", dtype="float32", max_queue=2, start=False) as sw:
        sw.submit("a", "math", max_tokens=1)
        sw.submit("b", "math", max_tokens=1)
        with pytest.raises(QueueFullError):
            sw.submit("c", "math", max_tokens=1)


def expert_sizes(rt, backend):
    """(KV cache bytes, {expert: (packed bytes, compute-ready bytes)}) of the rt bundle."""
    with Switch.load(rt / "bundle", dtype="float32", backend=backend, start=False) as probe:
        sizes = {}
        for e in ("math", "code"):
            deltas = probe.store.read_packed(e)
            sizes[e] = (sum(d.nbytes for d in deltas.values()), probe.store._ready_bytes(deltas))
        return probe.engine.cache.nbytes, sizes


def test_memory_budget_evicts_least_recently_used_experts(rt):
    # The reference backend's compute-ready form is a dense copy: the two tiers matter there.
    kv, sizes = expert_sizes(rt, "reference")
    one = max(p + h for p, h in sizes.values())
    packed = max(p for p, _ in sizes.values())
    # Room for the KV cache, one expert (packed + dense) and the other one's packed form: the
    # dense forms take turns.
    budget = kv + one + packed + 64
    with Switch.load(rt / "bundle", dtype="float32", backend="reference", max_memory=budget) as sw:
        peak = 0
        for e in ["math", "code", "math", "code"]:
            assert sw.generate(PROMPTS[0], expert=e, max_tokens=2).finish_reason == "length"
            peak = max(peak, sw.store.memory_bytes() + sw.engine.cache.nbytes)
        s = sw.stats()
        assert peak <= budget
        assert s["store_disk_loads"] == 2 and s["store_hot_evictions"] == 3 and s["store_packed_evictions"] == 0
        assert s["residency"] == {"code": "hot", "math": "packed"}
        # both experts in one batch cannot be hot together: served one after the other, correctly
        outs = sw.generate(PROMPTS[:2], expert=["math", "code"], temperature=0, max_tokens=4)
        alone = [sw.generate(p, expert=e, temperature=0, max_tokens=4).token_ids
                 for p, e in zip(PROMPTS[:2], ["math", "code"])]
        assert [o.token_ids for o in outs] == alone
    # Room for one expert only: the other one is dropped to disk each time.
    with Switch.load(rt / "bundle", dtype="float32", backend="reference", max_memory=kv + one + 64) as sw:
        for e in ["math", "code", "math", "code"]:
            sw.generate(PROMPTS[0], expert=e, max_tokens=2)
            assert sw.store.memory_bytes() + sw.engine.cache.nbytes <= kv + one + 64
        s = sw.stats()
        assert s["store_disk_loads"] == 4 and s["store_packed_evictions"] == 3
        assert s["residency"] == {"code": "hot", "math": "disk"}
    # An expert that cannot fit at all fails its requests with a typed error; others still work.
    with Switch.load(rt / "bundle", dtype="float32", max_memory=kv + 1000) as tiny:
        out = tiny.generate("x", expert="math", max_tokens=1)
        assert out.finish_reason == "error" and isinstance(out.exception, MemoryBudgetError)
        assert "memory budget" in out.error
        assert tiny.generate("x", expert=None, max_tokens=1).finish_reason in ("length", "stop")
    assert parse_memory("2GiB") == 2 << 30 and parse_memory("500MB") == 500_000_000
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_experts_used_by_running_requests_are_never_evicted(rt):
    kv, sizes = expert_sizes(rt, "cpu")
    one = max(p + h for p, h in sizes.values())
    with Switch.load(rt / "bundle", dtype="float32", backend="cpu", max_memory=kv + one + 64, start=False) as sw:
        a = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=12)
        deadline = time.time() + 60
        while a.hot is None and not a.done and time.time() < deadline:
            sw.engine.step()
            time.sleep(0.001)
        assert a.hot is not None, a.result
        math_hot = a.hot
        b = sw.submit(PROMPTS[1], "code", temperature=0, max_tokens=4)
        for _ in range(6):  # math keeps running; code has no room while math is pinned
            sw.engine.step()
            time.sleep(0.01)
        assert not a.done and b.hot is None and sw.stats()["residency"]["math"] == "hot"
        assert sw.store.acquire("math") is math_hot  # the same form, never evicted
        sw.store.release(math_hot)
        deadline = time.time() + 60
        while not b.done and time.time() < deadline:
            sw.engine.step()
            time.sleep(0.001)
        assert a.done and a.result.finish_reason == "length" and b.result.finish_reason == "length"
    with Switch.load(rt / "bundle", dtype="float32") as ref:
        assert a.result.token_ids == ref.generate(PROMPTS[0], expert="math", temperature=0, max_tokens=12).token_ids
        assert b.result.token_ids == ref.generate(PROMPTS[1], expert="code", temperature=0, max_tokens=4).token_ids


def blocking_loads(sw):
    """Make the store's disk reads wait until the returned event is set (a slow disk)."""
    gate = threading.Event()
    read = sw.store.bundle.load_deltas

    def slow(name, verify=True):
        gate.wait(30)
        return read(name, verify)

    sw.store.bundle.load_deltas = slow
    return gate


def test_loading_runs_in_the_background(rt):
    """While an expert is read from a slow disk, requests for the base and for loaded experts
    are served; the waiting request completes once the load ends."""
    with Switch.load(rt / "bundle", dtype="float32") as sw:
        sw.generate("x", expert="code", max_tokens=1)  # code is hot
        gate = blocking_loads(sw)
        slow = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=4)
        t0 = time.perf_counter()
        assert sw.generate(PROMPTS[1], expert="code", temperature=0, max_tokens=4).finish_reason == "length"
        assert sw.generate(PROMPTS[1], expert=None, temperature=0, max_tokens=4).finish_reason == "length"
        assert time.perf_counter() - t0 < 20 and not slow.done
        assert sw.stats()["residency"]["math"] == "loading"
        gate.set()
        assert slow.wait(30).finish_reason == "length"
        assert sw.stats()["residency"]["math"] == "hot"


def test_an_expert_removed_while_loading_is_not_resurrected(rt, tmp_path):
    import shutil

    shutil.copytree(rt / "bundle", tmp_path / "live")
    with Switch.load(tmp_path / "live", dtype="float32") as sw:
        gate = blocking_loads(sw)
        req = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=4)
        time.sleep(0.2)
        sw.remove_expert("math")
        gate.set()
        out = req.wait(30)
        assert out.finish_reason == "error" and isinstance(out.exception, UnknownExpertError)
        time.sleep(0.2)
        assert "math" not in sw.stats()["residency"] and sw.store.memory_bytes() == 0
        assert sw.generate(PROMPTS[1], expert="code", max_tokens=2).finish_reason == "length"


def test_a_corrupted_expert_fails_only_its_requests(rt, tmp_path):
    import shutil

    shutil.copytree(rt / "bundle", tmp_path / "live")
    m = json.loads((tmp_path / "live/manifest.json").read_text())
    f = tmp_path / "live" / m["experts"]["math"]["weights"]
    data = bytearray(f.read_bytes())
    data[-100:] = bytes(100)  # payload bytes changed: the checksum no longer matches
    f.write_bytes(bytes(data))
    with Switch.load(tmp_path / "live", dtype="float32") as sw:
        reqs = [sw.submit(p, e, temperature=0, max_tokens=4) for p, e in zip(PROMPTS, ["math", "code", None, "math"])]
        outs = [r.wait(60) for r in reqs]
        assert [o.finish_reason for o in outs] == ["error", "length", "length", "error"]
        assert "math" in outs[0].error and outs[0].exception is not None
        assert sw.stats()["store_load_failures"] >= 1
        # a later request tries again (and fails again, with the same clear error)
        assert sw.generate("x", expert="math", max_tokens=1).finish_reason == "error"
        assert sw.generate("x", expert="code", max_tokens=1).finish_reason == "length"


def test_stopping_cancels_every_request(rt):
    sw = Switch.load(rt / "bundle", dtype="float32", max_batch=1)
    running = sw.submit(PROMPTS[0], "math", temperature=0, max_tokens=200, ignore_eos=True)
    queued = sw.submit(PROMPTS[1], "code", temperature=0, max_tokens=4)
    time.sleep(0.3)
    sw.close()
    assert running.wait(10).finish_reason == "cancelled" and queued.wait(10).finish_reason == "cancelled"
    with pytest.raises(EngineStoppedError):
        sw.submit(PROMPTS[0], "math", max_tokens=1)


def test_loading_is_lazy_and_prefetched(rt):
    with Switch.load(rt / "bundle", dtype="float32") as sw:
        assert sw.stats()["residency"] == {"code": "disk", "math": "disk"}
        sw.generate("x", expert="code", max_tokens=1)
        assert sw.stats()["residency"] == {"code": "hot", "math": "disk"}
        s = sw.stats()  # the submit started the load (prefetch); the engine found it loading
        assert s["store_prefetches"] == 1 and s["store_disk_loads"] == 1 and s["store_hot_builds"] == 1
        sw.generate("x", expert="code", max_tokens=1)
        assert sw.stats()["store_hits"] >= 1 and sw.stats()["store_disk_loads"] == 1


def test_experts_added_and_removed_at_run_time(rt, tmp_path, tokenizer):
    other = tmp_path / "other"
    assert main(["compress", "--base", str(rt / "base"), "--expert", f"poet={rt / 'code'}", "--out", str(other),
                 "--bits", "3", "--description", "poet=poems"]) == 0
    import shutil

    shutil.copytree(rt / "bundle", tmp_path / "live")
    with Switch.load(other, dtype="float32") as alone:  # the expert served from its own bundle
        poet_alone = alone.generate(PROMPTS[0], expert="poet", temperature=0, max_tokens=8).token_ids
    with Switch.load(tmp_path / "live", dtype="float32") as sw:
        code_before = sw.generate(PROMPTS[1], expert="code", temperature=0, max_tokens=8).token_ids
        sw.add_expert("poet", other)
        assert sw.experts == ["code", "math", "poet"] and sw.description("poet") == "poems"
        assert sw.generate(PROMPTS[0], expert="poet", temperature=0, max_tokens=8).token_ids == poet_alone
        sw.remove_expert("math")
        with pytest.raises(RequestError, match="unknown expert 'math'"):
            sw.generate("x", expert="math")
        assert sw.generate(PROMPTS[1], expert="code", temperature=0, max_tokens=8).token_ids == code_before
    assert len(set(poet_alone)) > 2 and poet_alone != code_before
    b = Bundle.open(tmp_path / "live")
    assert sorted(b.experts) == ["code", "poet"]
    assert not [f for f in (tmp_path / "live/experts").iterdir() if f.name.startswith("math")]  # its files deleted
    b.verify_files("poet")
    # a bundle built on another base is refused
    base2 = random_model(seed=99)
    save_checkpoint(base2, tokenizer, tmp_path / "base2")
    save_checkpoint(derive_expert(base2, seed=3), tokenizer, tmp_path / "e2")
    assert main(["compress", "--base", str(tmp_path / "base2"), "--expert", f"alien={tmp_path / 'e2'}",
                 "--out", str(tmp_path / "alien")]) == 0
    with Switch.load(tmp_path / "live", dtype="float32") as sw:
        with pytest.raises(Exception, match="base"):
            sw.add_expert("alien", tmp_path / "alien")
        assert "alien" not in sw.experts


def test_a_bundle_refuses_another_base(rt, tmp_path, tokenizer):
    other = save_checkpoint(random_model(seed=42), tokenizer, tmp_path / "other")
    with pytest.raises(Exception, match="base mismatch"):
        Switch.load(rt / "bundle", base=other)


def test_concurrent_clients_from_threads(sw32):
    experts = ["math", "code", None] * 4
    results = [None] * len(experts)

    def client(i):
        results[i] = sw32.generate(PROMPTS[i % 4], expert=experts[i], temperature=0, max_tokens=6).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(experts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, e in enumerate(experts):
        assert results[i] == sw32.generate(PROMPTS[i % 4], expert=e, temperature=0, max_tokens=6).token_ids


def test_cli_generate(rt, capsys):
    assert main(["generate", str(rt / "bundle"), "--expert", "math", "--prompt", PROMPTS[0],
                 "--max-tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert "5 generated tokens, finish: length" in out.err and out.out.strip()
    assert main(["generate", str(rt / "bundle"), "--expert", "nope", "--prompt", "x"]) == 1
    assert "unknown expert 'nope'" in capsys.readouterr().err
    m = json.loads((rt / "bundle/manifest.json").read_text())
    assert set(m["experts"]) == {"math", "code"}


def test_the_served_model_still_works_as_a_plain_base_model(rt, sw32):
    """Outside the engine (the router reads base hidden states), the wrapped model is the base,
    padding masks included, even while the engine serves experts in another thread."""
    ref = reference(rt, None)
    tok = sw32.tokenizer(None)
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    req = sw32.submit(PROMPTS[0], "math", temperature=0, max_tokens=30)
    with torch.inference_mode():
        got = sw32.model(**enc).logits
        want = ref(**enc).logits
    req.wait(60)
    mask = enc["attention_mask"].bool()
    assert (got[mask] - want[mask]).abs().max() < FP32_LOGIT_TOL
