"""Bundles under faults and hostile input.

- Crash injection: `compress --overwrite` is stopped at every write step (before and after each
  durable file operation); the bundle as it is on disk at that instant is copied, and that copy
  must open, verify, and serve the old expert or the new one, never a mix; the next writer must
  succeed and clean up. One run is killed for real (SIGKILL in a subprocess).
- Hostile bundles: paths outside the bundle (absolute, `..`, symlinks), wrong checksums,
  malformed JSON, huge or lying safetensors headers, dtype / shape mismatches: each refused with
  a clear error; nothing outside the bundle read or deleted.
- Output folders: materialize / convert refuse a non-empty --out unless --overwrite.
- Two writers at once (two Bundle objects = two lock holders): neither update is lost.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import CORPUS, flip_byte, save_lively_experts

import meswitch.bundle.format as fmt
import meswitch.compression.pipeline as pipeline
from meswitch.bundle import Bundle, BundleError
from meswitch.bundle.format import UnsafePathError, sha256_file
from meswitch.cli import main
from meswitch.compression.layerwise import DeltaStore
from meswitch.runtime import Switch

PROMPT = CORPUS[0][:40]


def run_compress(base, name, expert, out, *extra) -> int:
    return main(["compress", "--base", str(base), "--expert", f"{name}={expert}", "--out", str(out),
                 "--calib-samples", "2", "--calib-max-len", "16", "--heldout", "0", *map(str, extra)])


@pytest.fixture(scope="module")
def versions(tokenizer, tmp_path_factory):
    """v1: a bundle with experts math and code; v2: the same after `compress --overwrite` of math
    from another checkpoint (the code expert's), with that compression's result kept so that
    later runs skip the work. Lively models: greedy answers of the two versions differ."""
    d = tmp_path_factory.mktemp("versions")
    save_lively_experts(d, tokenizer)
    tiny_models = {"base": d / "base", "math": d / "math", "code": d / "code"}
    assert run_compress(tiny_models["base"], "math", tiny_models["math"], d / "v1") == 0
    assert run_compress(tiny_models["base"], "code", tiny_models["code"], d / "v1") == 0
    shutil.copytree(d / "v1", d / "v2")
    results = []
    real = pipeline.compress_expert

    def keep(*a, **k):
        # The compressed parts live in the bundle's work directory, deleted once the bundle is
        # written: the kept result points to a copy of them, so that replays can stage them again.
        r = real(*a, **k)
        kept = d / "kept-result"
        shutil.copytree(r.store.path, kept)
        results.append(dataclasses.replace(r, store=DeltaStore(kept), workdir=kept))
        return r

    pipeline.compress_expert = keep
    try:
        assert run_compress(tiny_models["base"], "math", tiny_models["code"], d / "v2", "--overwrite") == 0
    finally:
        pipeline.compress_expert = real
    return {"dir": d, "v1": d / "v1", "v2": d / "v2", "result": results[0], "base": tiny_models["base"],
            "new_ckpt": tiny_models["code"]}


@pytest.fixture
def cached_compress(versions, monkeypatch):
    monkeypatch.setattr(pipeline, "compress_expert", lambda *a, **k: versions["result"])


def overwrite_math(versions, out) -> int:
    return run_compress(versions["base"], "math", versions["new_ckpt"], out, "--overwrite")


class Crash(BaseException):
    """A simulated crash (BaseException: no `except Exception` handles it)."""


PRIMITIVES = ("save_safetensors", "fsync_tree", "durable_replace", "write_text_atomic", "remove_path")


def instrument(monkeypatch, bundle_dir, crash_at: int | None, snapshot_dir):
    """Count every durable file operation of the bundle writer, before and after it runs; at step
    `crash_at`, copy the bundle as it is on disk (what a kill at that instant leaves) and crash."""
    steps = []

    def wrap(name, fn):
        def wrapped(*a, **k):
            for when in ("before", "after"):
                if when == "after":
                    result = fn(*a, **k)
                steps.append(f"{when} {name}")
                if len(steps) == crash_at:
                    shutil.copytree(bundle_dir, snapshot_dir, symlinks=True)
                    raise Crash(steps[-1])
            return result

        return wrapped

    for name in PRIMITIVES:
        monkeypatch.setattr(fmt, name, wrap(name, getattr(fmt, name)))
    return steps


def stored(b: Bundle, name: str) -> tuple:
    """What an expert's files hold: its delta tensors and header metadata, and its aux files by
    name. (Delta files are not compared by checksum: safetensors writes its header's metadata in
    an order that differs between runs.)"""
    from safetensors import safe_open

    entry = b.experts[name]
    with safe_open(b.path / entry["weights"], framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    aux = {rel.rsplit("/", 1)[1]: d for rel, d in entry["files"].items() if rel != entry["weights"]}
    return meta, tensors, aux


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and a[1][k].equal(b[1][k]) for k in a[1])


def test_compress_overwrite_survives_a_crash_at_every_write_step(versions, cached_compress, monkeypatch, tmp_path):
    v1, v2 = Bundle.open(versions["v1"]), Bundle.open(versions["v2"])
    old, new = stored(v1, "math"), stored(v2, "math")
    assert not same(old, new) and v1.experts["code"] == v2.experts["code"]

    def version_of(b: Bundle) -> str:
        for name in b.experts:
            b.verify_files(name)
        now = stored(b, "math")
        return "old" if same(now, old) else "new" if same(now, new) else "a mix"
    # count the steps of an uninterrupted run
    with monkeypatch.context() as m:
        shutil.copytree(versions["v1"], tmp_path / "count")
        steps = instrument(m, tmp_path / "count", None, None)
        assert overwrite_math(versions, tmp_path / "count") == 0
    assert len(steps) >= 14 and "before write_text_atomic" in steps  # staging, renames, manifest, deletions

    # one Switch serves every crashed state (copied to `live`; it notices the manifest changed)
    live = tmp_path / "live"
    shutil.copytree(versions["v1"], live)
    sw = Switch.load(live, dtype="float32")

    def serve(state):
        shutil.rmtree(live)
        shutil.copytree(state, live, symlinks=True)
        sw.sync_bundle()
        sw._forget({"math"})  # read it from disk again even if its entry did not change
        return sw.generate(PROMPT, expert="math", temperature=0, max_tokens=4).text

    try:
        expected = {"old": serve(versions["v1"]), "new": serve(versions["v2"])}
        assert expected["old"] != expected["new"]
        seen = set()
        for k in range(1, len(steps) + 1):
            work, snap = tmp_path / f"w{k}", tmp_path / f"crash{k}"
            shutil.copytree(versions["v1"], work)
            with monkeypatch.context() as m:
                instrument(m, work, k, snap)
                with pytest.raises(Crash):
                    overwrite_math(versions, work)
            where = f"crash at step {k} ({steps[k - 1]})"
            b = Bundle.open(snap)
            version = version_of(b)
            assert version in ("old", "new"), where  # never a mix
            assert b.experts["code"] == v1.experts["code"], where
            seen.add(version)
            assert serve(snap) == expected[version], where
            # the next writer succeeds, and leaves only what its manifest names (+ temporary files
            # of a writer that may still run: this process)
            assert overwrite_math(versions, snap) == 0, where
            b = Bundle.open(snap)
            assert version_of(b) == "new", where
            left = {f"experts/{f.name}" for f in (snap / "experts").iterdir() if not f.name.startswith(".tmp-")}
            assert left == fmt.owned_paths(b.manifest), where
            shutil.rmtree(work)
        assert seen == {"old", "new"}
    finally:
        sw.close()


def test_a_killed_compress_leaves_the_old_bundle_and_its_leftovers_are_collected(versions, cached_compress, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(versions["v1"], work)
    # SIGKILL just before the manifest is written: the new files are in place, under their final names
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import meswitch.bundle.format as fmt
        import meswitch.compression.pipeline as pipeline
        from types import SimpleNamespace
        import torch
        from meswitch.bundle import Bundle
        # the compression itself is not what is tested: take its result from the finished bundle
        from meswitch.compression.layerwise import DeltaStore
        v2 = Bundle.open({str(versions['v2'])!r})
        store = DeltaStore({str(tmp_path / "parts")!r})
        store.write("all", v2.load_deltas("math"))
        done = SimpleNamespace(store=store, dtype=torch.bfloat16, quality={{}}, tuning={{}},
                               seconds=0.0, **{{k: v2.experts["math"][k] for k in ("num_parameters", "payload_bytes")}})
        done.nbytes = done.payload_bytes
        pipeline.compress_expert = lambda *a, **k: done
        real = fmt.write_text_atomic
        def die(path, text):
            if path.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, text)
        fmt.write_text_atomic = die
        from meswitch.cli import main
        main(["compress", "--base", {str(versions['base'])!r}, "--expert", "math={versions['new_ckpt']}",
              "--out", {str(work)!r}, "--overwrite"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    b = Bundle.open(work)
    assert b.experts == Bundle.open(versions["v1"]).experts  # the old bundle, whole
    for name in b.experts:
        b.verify_files(name)
    leftovers = {f.name for f in (work / "experts").iterdir()} - {p.split("/")[1] for p in fmt.owned_paths(b.manifest)}
    assert any(n.startswith(".tmp-") for n in leftovers) or leftovers  # the killed writer's files
    assert overwrite_math(versions, work) == 0
    b = Bundle.open(work)
    names = {f"experts/{f.name}" for f in (work / "experts").iterdir()}
    assert names == fmt.owned_paths(b.manifest)  # temporary files of the dead writer and orphans collected


def test_two_writers_at_once_lose_nothing(versions, tmp_path):
    """Two Bundle objects (as a CLI compress and a server would be) add experts at the same time:
    each takes the lock and re-reads the manifest, so both experts are kept."""
    work = tmp_path / "b"
    shutil.copytree(versions["v1"], work)
    src = Bundle.open(versions["v2"])
    tensors_file = work.parent / "w.safetensors"
    shutil.copy(versions["v2"] / src.experts["math"]["weights"], tensors_file)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(tensors_file, framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(tensors_file)
    aux = src.aux_dir("math")
    barrier = threading.Barrier(2)
    errors = []

    def add(name):
        try:
            b = Bundle.open(work)  # both read the manifest before either writes
            staged = b.stage_raw(name, tensors, dict(meta, expert=name), lambda d: shutil.copytree(aux, d))
            barrier.wait()
            b.commit([(staged, {"description": name})])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    b = Bundle.open(work)
    assert sorted(b.experts) == ["code", "math", "one", "two"]
    for name in b.experts:
        b.verify_files(name)


# ----- hostile bundles ------------------------------------------------------------------------------
@pytest.fixture
def bundle(versions, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(versions["v1"], out)
    return out


def edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def outside(tmp_path):
    """A folder outside the bundle, with a file a hostile manifest might point at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("do not read or delete")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_absolute_and_dotdot_paths_are_refused_and_nothing_outside_is_deleted(bundle, outside):
    entry = Bundle.open(bundle).experts["math"]
    for key, value in (("aux_dir", str(outside)), ("aux_dir", "experts/../../outside"), ("aux_dir", "experts"),
                       ("weights", str(outside / "secret.txt")), ("weights", "../outside/secret.txt"),
                       ("weights", "manifest.json")):
        edit_manifest(bundle, lambda m: m["experts"]["math"].update({key: value}))
        with pytest.raises(UnsafePathError) as e:
            Bundle.open(bundle)
        assert repr(value)[1:-1] in str(e.value) or value in str(e.value)
        # a writer holding an older manifest re-reads it from disk before changing anything
        stale = Bundle(bundle, {**json.loads((bundle / "manifest.json").read_text()), "experts": {"math": entry}})
        with pytest.raises(UnsafePathError):
            stale.remove_expert("math")
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt", "tokenizer.json"]
        edit_manifest(bundle, lambda m: m["experts"]["math"].update({key: entry[key]}))
    Bundle.open(bundle).verify_files("math")


def test_files_must_be_the_weights_or_in_the_aux_dir_and_weights_must_be_listed(bundle):
    def unlisted(m):
        del m["experts"]["math"]["files"][m["experts"]["math"]["weights"]]

    edit_manifest(bundle, unlisted)
    with pytest.raises(BundleError, match="not listed"):
        Bundle.open(bundle)


def test_a_stray_file_in_a_manifest_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["experts"]["math"]["files"].update({"experts/elsewhere/x.json": "0" * 64}))
    with pytest.raises(UnsafePathError, match="neither its weights nor in its aux_dir"):
        Bundle.open(bundle)


def test_symlinks_out_of_the_bundle_are_not_followed(bundle, outside):
    b = Bundle.open(bundle)
    aux = bundle / b.experts["math"]["aux_dir"]
    # a listed file replaced by a link to a file outside, with a matching checksum
    (aux / "tokenizer.json").unlink()
    os.symlink(outside / "tokenizer.json", aux / "tokenizer.json")
    edit_manifest(bundle, lambda m: m["experts"]["math"]["files"].update(
        {f"{b.experts['math']['aux_dir']}/tokenizer.json": sha256_file(outside / "tokenizer.json")}))
    b = Bundle.open(bundle)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        b.verify_files("math")
    with pytest.raises(UnsafePathError):
        b.verified_aux_dir("math")
    # the whole aux folder a link to a folder outside: removing the expert removes the link only
    shutil.rmtree(aux)
    os.symlink(outside, aux)
    with pytest.raises(UnsafePathError):
        Bundle.open(bundle).load_deltas("math")
    Bundle.open(bundle).remove_expert("math")
    assert not aux.is_symlink() and sorted(p.name for p in outside.iterdir()) == ["secret.txt", "tokenizer.json"]


def test_an_unlisted_file_in_an_aux_dir_is_refused(bundle):
    b = Bundle.open(bundle)
    (bundle / b.experts["math"]["aux_dir"] / "tokenizer_config.json.extra").write_text("{}")
    with pytest.raises(BundleError, match="not in its manifest"):
        b.verified_aux_dir("math")


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "meswitch-bundle", "format_version": 1}', "[" * 100000,
                                  '{"format": "meswitch-bundle", "format_version": 2, "base": {}, "experts": {}}'])
def test_malformed_manifests_are_refused(bundle, text):
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError):
        Bundle.open(bundle)


def rewrite_weights(bundle, data: bytes) -> None:
    """Replace math's delta file with `data` and fix its checksum (so that only the content is wrong)."""
    b = Bundle.open(bundle)
    rel = b.experts["math"]["weights"]
    (bundle / rel).write_bytes(data)
    edit_manifest(bundle, lambda m: m["experts"]["math"]["files"].update({rel: sha256_file(bundle / rel)}))


def read_header(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def test_checksum_mismatch_is_refused(bundle):
    b = Bundle.open(bundle)
    flip_byte(bundle / b.experts["math"]["weights"])
    with pytest.raises(BundleError, match="corrupted"):
        b.load_deltas("math")


def test_huge_and_lying_safetensors_headers_are_refused(bundle):
    b = Bundle.open(bundle)
    f = bundle / b.experts["math"]["weights"]
    header, payload = read_header(f)
    rewrite_weights(bundle, struct.pack("<Q", 1 << 62) + b"{}")  # a header length of 4 EiB
    with pytest.raises(BundleError, match="cannot read"):
        Bundle.open(bundle).load_deltas("math")
    lying = json.loads(json.dumps(header))
    key = next(k for k in lying if k != "__metadata__")
    lying[key]["data_offsets"][1] += 1 << 40  # a tensor far beyond the end of the file
    rewrite_weights(bundle, with_header(lying, payload))
    with pytest.raises(BundleError, match="cannot read"):
        Bundle.open(bundle).load_deltas("math")


@pytest.mark.parametrize("change,message", [
    (lambda h, k: h[k].update(dtype="I8"), "dtype"),
    (lambda h, k: h[k].update(shape=[h[k]["shape"][0] // 2, h[k]["shape"][1] * 2]), "shape"),
])
def test_dtype_and_shape_mismatches_are_refused(bundle, change, message):
    b = Bundle.open(bundle)
    header, payload = read_header(bundle / b.experts["math"]["weights"])
    key = next(k for k in sorted(header) if k.endswith(".codes") and header[k]["shape"][0] % 2 == 0)
    change(header, key)
    rewrite_weights(bundle, with_header(header, payload))
    with pytest.raises(BundleError, match=message) as e:
        Bundle.open(bundle).load_deltas("math")
    assert key.removesuffix(".codes") in str(e.value)


def test_a_delta_for_another_shape_of_base_is_refused(bundle):
    b = Bundle.open(bundle)
    name = next(iter(b.load_deltas("math")))
    b.base_shapes = {name: (3, 3)}
    with pytest.raises(BundleError, match="does not fit the base"):
        b.load_deltas("math")


# ----- output folders of materialize and convert -------------------------------------------------------
def test_materialize_refuses_a_non_empty_output_folder(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    assert main(["materialize", str(bundle), "math", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "the user's"
    assert main(["materialize", str(bundle), "math", "--out", str(bundle / "experts")]) == 1  # never into the input
    assert main(["materialize", str(bundle), "math", "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_convert_refuses_a_non_empty_output_folder(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    assert main(["convert", str(gguf), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "the user's"
    assert main(["convert", str(gguf), "--out", str(tmp_path), "--overwrite"]) == 1  # it holds the input
    assert "holds an input" in capsys.readouterr().err and gguf.is_file()


# ----- what the runtime reads from an expert's folder --------------------------------------------------
def test_tokenizer_and_generation_config_are_verified_before_they_are_read(bundle):
    from meswitch.runtime import RequestError

    b = Bundle.open(bundle)
    aux = bundle / b.experts["math"]["aux_dir"]
    with Switch.load(bundle, dtype="float32", start=False) as sw:
        (aux / "tokenizer.json").write_text((aux / "tokenizer.json").read_text().replace('"<unk>"', '"<UNK>"'))
        with pytest.raises(BundleError, match="tokenizer.json is corrupted"):
            sw.submit("2 + 2 =", expert="math")
        with pytest.raises(RequestError, match="lone surrogate"):
            sw.submit("2 + \ud800", expert="code")


def test_a_generation_config_that_is_not_json_is_a_clear_error(versions, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(versions["v1"], out)
    b = Bundle.open(out)
    rel = f"{b.experts['math']['aux_dir']}/generation_config.json"
    (out / rel).write_text("{not json")
    edit_manifest(out, lambda m: m["experts"]["math"]["files"].update({rel: sha256_file(out / rel)}))
    with Switch.load(out, dtype="float32", start=False) as sw:
        with pytest.raises(BundleError, match="generation_config.json is not JSON"):
            sw.submit("2 + 2 =", expert="math")


def test_an_expert_removed_while_its_request_waits_is_reported_as_unknown(bundle):
    from meswitch.bundle.format import UnknownExpertError

    with Switch.load(bundle, dtype="float32", start=False) as sw:
        waiting = sw.submit("2 + 2 =", expert="math", max_tokens=2)
        other = sw.submit("2 + 2 =", expert="code", max_tokens=2)
        sw.remove_expert("math")
        sw.engine.start()
        failed, done = waiting.wait(30), other.wait(30)
        assert failed.finish_reason == "error" and isinstance(failed.exception, UnknownExpertError)
        assert done.finish_reason == "length" and done.completion_tokens == 2
