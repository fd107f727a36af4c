"""The on-disk bundle: the compressed experts of one base model. Specified in docs/FORMAT.md.

    BUNDLE/
      manifest.json                        format version, base reference + fingerprint, experts
      experts/<name>-<hash>.safetensors    the expert's compressed deltas
      experts/<name>-<hash>/               its config.json, tokenizer files, chat template
      router/                              the trained router (router/core.py)
      .lock                                taken by every writer (an advisory lock)

Every file an expert needs is listed with its SHA-256 in the manifest and checked before use.
Every path in a manifest is confined to the bundle: relative, no `..`, under experts/ or
router/, and not leaving the bundle through a symlink; anything else is refused.

Changes are atomic and crash-safe. Expert files are named by their content, so a new version
never overwrites the files the current manifest names; they are written under temporary names,
fsynced and renamed into place; then, holding the bundle's lock (other writers, in this process
or another, wait), the manifest is re-read from disk, changed, written to a temporary file,
fsynced and renamed over manifest.json; files no longer named by it are deleted last. A crash at
any step leaves a manifest that names complete, matching files: the old version or the new one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..compression.delta import SVD_PARTS, CompressedDelta, delta_from_tensors
from ..compression.packing import SUPPORTED_BITS, packed_row_bytes
from ..compression.quantizer import num_groups
from ..files import (durable_replace, fsync_tree, is_temp_name, remove_path, temp_is_abandoned,
                     temp_path, write_text_atomic)
from ..tensorfile import write_safetensors

FORMAT_NAME = "meswitch-bundle"
FORMAT_VERSION = 1  # of the manifest
DELTA_FORMAT = "meswitch-delta"
# Delta files: version 2 adds an optional low-rank part to quantized tensors (`rank` in the layout
# record, tensors T.lowrank_a / T.lowrank_b) and the kind `svd` (quantized singular-vector blocks,
# tensors T.svd<i>.*). A writer writes 2 only for a file that has either, so files without them
# stay readable by version-1 readers; this reader reads both.
DELTA_FORMAT_VERSIONS = (1, 2)
LOWRANK_DELTA_VERSION = 2
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
EXPERTS_DIR = "experts"
ROUTER_DIR = "router"
EXAMPLES_FILE = "examples.jsonl"  # an expert's example queries (its calibration prompts), for the router
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Files and folders a writer names by content (`<stem>-<16 hex>[.ext]`): the only names in
# experts/ and router/ that a writer deletes when no manifest names them.
CONTENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*-[0-9a-f]{16}(\.safetensors|\.json)?$")


class BundleError(ValueError):
    """A bundle that is missing, corrupted, of another version, or used with the wrong base."""


class UnknownExpertError(BundleError):
    """No expert of that name in the bundle."""


class ExpertExistsError(BundleError):
    """An expert of that name is already in the bundle (and replacing it was not asked for)."""


class BaseMismatchError(BundleError):
    """Deltas computed against another base than the one given (fingerprints differ)."""


class UnsafePathError(BundleError):
    """A manifest names a path outside its bundle (absolute, `..`, or through a symlink)."""


def check_expert_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BundleError(
            f"invalid expert name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors(tensors, path: Path, metadata: dict[str, str]) -> None:
    """safetensors.save_file (or, for a TensorSource that does not fit in memory at once,
    tensorfile.write_safetensors), then the permissions any other new file gets (the library
    writes 0600), so that a server running as another user can read a bundle or a materialized expert."""
    if isinstance(tensors, dict):
        save_file(tensors, path, metadata=metadata)
    else:
        write_safetensors(path, tensors, metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def new_manifest(base_reference: str, base_fingerprint: str, base_config: dict, base_parameters: int) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base": {
            "reference": base_reference,
            "fingerprint": base_fingerprint,
            "model_type": base_config.get("model_type"),
            "architectures": base_config.get("architectures"),
            "num_parameters": base_parameters,
        },
        "experts": {},
    }


# ----- manifest validation ---------------------------------------------------------------------
def check_relpath(rel, top: str, what: str) -> str:
    """A manifest path: a normalized relative POSIX path strictly below `top`/ (no `..`, no
    absolute path, no empty or `.` parts, no backslash or NUL)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise UnsafePathError(f"{what}: invalid path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/"):
        raise UnsafePathError(f"{what}: absolute path {rel!r}; paths in a manifest are relative to the bundle")
    if ".." in p.parts or str(p) != rel or "." in p.parts:
        raise UnsafePathError(f"{what}: path {rel!r} is not a plain path inside the bundle (no '..', no '.')")
    if len(p.parts) < 2 or p.parts[0] != top:
        raise UnsafePathError(f"{what}: path {rel!r} must be inside {top}/")
    return rel


def _check_files(files, what: str) -> dict:
    if not isinstance(files, dict):
        raise BundleError(f"{what}: 'files' must be an object of path -> SHA-256")
    for rel, digest in files.items():
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise BundleError(f"{what}: file {rel!r} has no valid SHA-256 in the manifest")
    return files


def check_expert_entry(name, entry, what: str) -> None:
    check_expert_name(name)
    if not isinstance(entry, dict):
        raise BundleError(f"{what}: expert {name!r} is not an object")
    if entry.get("name", name) != name:
        raise BundleError(f"{what}: expert {name!r} names itself {entry.get('name')!r}")
    files = _check_files(entry.get("files", {}), f"{what}: expert {name!r}")
    weights, aux = entry.get("weights"), entry.get("aux_dir")
    if weights is not None:
        check_relpath(weights, EXPERTS_DIR, f"{what}: expert {name!r} weights")
        if weights not in files:
            raise BundleError(f"{what}: expert {name!r}: its weights {weights} are not listed (with a checksum) in 'files'")
    if aux is not None:
        check_relpath(aux, EXPERTS_DIR, f"{what}: expert {name!r} aux_dir")
    for rel in files:
        check_relpath(rel, EXPERTS_DIR, f"{what}: expert {name!r} file")
        if rel != weights and (aux is None or str(PurePosixPath(rel).parent) != aux):
            raise UnsafePathError(f"{what}: expert {name!r}: file {rel} is neither its weights nor in its aux_dir")


ROUTER_FILE_KEYS = ("weights", "vocabulary", "tokenizer")  # a router entry's paths (each also in its `files`)


def check_router_entry(entry, what: str) -> None:
    if not isinstance(entry, dict):
        raise BundleError(f"{what}: 'router' is not an object")
    files = _check_files(entry.get("files", {}), f"{what}: router")
    for rel in files:
        check_relpath(rel, ROUTER_DIR, f"{what}: router file")
    for key in ROUTER_FILE_KEYS:
        rel = entry.get(key)
        if rel is not None:
            check_relpath(rel, ROUTER_DIR, f"{what}: router {key}")
            if rel not in files:
                raise BundleError(f"{what}: router {key} {rel} is not listed (with a checksum) in 'files'")


def check_manifest(manifest, what: str) -> dict:
    """Refuse a manifest that is not a version-1 bundle manifest, or whose paths leave the bundle."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{what}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{what}: bundle format version {version!r} is not supported by this meswitch "
                          f"(it reads version {FORMAT_VERSION})")
    for key in ("base", "experts"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{what}: manifest has no {key!r} object")
    if not isinstance(manifest["base"].get("fingerprint"), str):
        raise BundleError(f"{what}: manifest has no base fingerprint")
    for name, entry in manifest["experts"].items():
        check_expert_entry(name, entry, what)
    if manifest.get("router") is not None:
        check_router_entry(manifest["router"], what)
    return manifest


def owned_paths(manifest: dict) -> set[str]:
    """The top-level entries of experts/ and router/ (files or folders) a manifest names."""
    rels: list[str] = []
    for entry in manifest.get("experts", {}).values():
        rels += [entry.get("weights"), entry.get("aux_dir"), *entry.get("files", {})]
    router = manifest.get("router") or {}
    rels += [*(router.get(k) for k in ROUTER_FILE_KEYS), *router.get("files", {})]
    return {"/".join(PurePosixPath(r).parts[:2]) for r in rels if r}


# ----- the delta file's layout (docs/FORMAT.md), checked from the header before any data is read --
def _dims(shape, what: str, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(shape, list) or (n is not None and len(shape) != n) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BundleError(f"{what}: invalid shape {shape!r}")
    return tuple(shape)


def check_layout_record(tname: str, record, header: Callable[[str], tuple[str, tuple[int, ...]] | None],
                        base_shape: tuple[int, ...] | None, version: int = 1) -> None:
    """Check the stored tensors of one model tensor against its layout record (dtype and shape of
    each part, from the file header), and the record against the base tensor it applies to."""
    if not isinstance(record, dict):
        raise BundleError(f"{tname}: layout record is not an object")

    def need(part: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, optional=False):
        h = header(f"{tname}.{part}")
        if h is None:
            if optional:
                return None
            raise BundleError(f"tensor {tname}.{part} is missing")
        dtype, got = h
        if dtype not in dtypes:
            raise BundleError(f"tensor {tname}.{part} has dtype {dtype}, expected {' or '.join(dtypes)}")
        if shape is not None and got != shape:
            raise BundleError(f"tensor {tname}.{part} has shape {list(got)}, expected {list(shape)}")
        return got

    floats = ("F16", "BF16", "F32")
    kind = record.get("kind")
    if kind == "quantized":
        out, cols = _dims(record.get("shape"), tname, 2)
        bits, group = record.get("bits"), record.get("group_size", 0)
        if bits not in SUPPORTED_BITS:
            raise BundleError(f"{tname}: unsupported bit width {bits!r}")
        if not isinstance(group, int) or isinstance(group, bool) or group < 0:
            raise BundleError(f"{tname}: invalid group_size {group!r}")
        (k,) = need("salient_idx", ("I32",), None) or (0,)
        if k > cols:
            raise BundleError(f"{tname}: {k} salient columns but only {cols} columns")
        need("salient_values", ("F16",), (out, k))
        need("codes", ("U8",), (out, packed_row_bytes(cols - k, bits)))
        scale = need("scale", ("F16",), None)
        if len(scale) != 2 or scale[0] not in (1, out) or scale[1] != num_groups(cols - k, group):
            raise BundleError(f"tensor {tname}.scale has shape {list(scale)}, expected [{out} or 1, "
                              f"{num_groups(cols - k, group)}]")
        need("offset", ("F16",), scale)
        rank = record.get("rank")
        if rank is not None:
            if version < LOWRANK_DELTA_VERSION:
                raise BundleError(f"{tname}: a low-rank part needs delta format version {LOWRANK_DELTA_VERSION}")
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(out, cols):
                raise BundleError(f"{tname}: invalid rank {rank!r}")
            need("lowrank_a", ("F16",), (out, rank))
            need("lowrank_b", ("F16",), (rank, cols))
        elif header(f"{tname}.lowrank_a") is not None or header(f"{tname}.lowrank_b") is not None:
            raise BundleError(f"{tname}: low-rank factors stored but no rank in its layout record")
        shape = (out, cols)
    elif kind == "svd":
        if version < LOWRANK_DELTA_VERSION:
            raise BundleError(f"{tname}: kind 'svd' needs delta format version {LOWRANK_DELTA_VERSION}")
        out, cols = _dims(record.get("shape"), tname, 2)
        blocks = record.get("blocks")
        if not isinstance(blocks, list):
            raise BundleError(f"{tname}: 'blocks' must be a list of {{rank, bits}}")
        total = 0
        for i, blk in enumerate(blocks):
            rank, bits = (blk.get("rank"), blk.get("bits")) if isinstance(blk, dict) else (None, None)
            if bits not in SUPPORTED_BITS or isinstance(bits, bool):
                raise BundleError(f"{tname}: block {i} has unsupported bit width {bits!r}")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise BundleError(f"{tname}: block {i} has invalid rank {rank!r}")
            total += rank
            for part in SVD_PARTS:
                n = out if part == "a_codes" else cols if part == "b_codes" else None
                need(f"svd{i}.{part}", ("U8",) if n else ("F16",), (rank, packed_row_bytes(n, bits) if n else 1))
        if total > min(out, cols):
            raise BundleError(f"{tname}: total rank {total} exceeds min({out}, {cols})")
        if header(f"{tname}.svd{len(blocks)}.a_codes") is not None:
            raise BundleError(f"{tname}: more svd blocks stored than its layout record lists")
        shape = (out, cols)
    elif kind == "dense":
        shape = _dims(record.get("shape"), tname)
        need("values", ("F16", "F32"), shape)
        idx = need("patch_index", ("I32", "I64"), None, optional=True)
        vals = need("patch_values", floats, None, optional=True)
        if (idx is None) != (vals is None) or (idx is not None and (len(idx) != 1 or vals != idx)):
            raise BundleError(f"{tname}: patch indices and values must be 1-D and come together")
    else:
        raise BundleError(f"{tname}: unknown delta kind {kind!r}")
    extra = need("extra_rows", floats, None, optional=True)
    if extra is not None and (len(extra) != len(shape) or extra[1:] != shape[1:]):
        raise BundleError(f"tensor {tname}.extra_rows has shape {list(extra)}, rows of {list(shape[1:])} expected")
    if base_shape is not None and tuple(base_shape) != shape:
        raise BundleError(f"{tname}: delta of shape {list(shape)} does not fit the base tensor of shape "
                          f"{list(base_shape)}")


class DeltaFile:
    """An expert's delta file (experts/<name>-<hash>.safetensors), read one tensor at a time:
    `layout` maps each model tensor to its layout record. Its header is checked on opening (format,
    base fingerprint, every layout record against docs/FORMAT.md and against `base_shapes` when
    set) before any tensor is read. Errors are prefixed with `label`."""

    def __init__(self, path: Path, base_fingerprint: str, base_shapes: dict[str, tuple[int, ...]] | None = None,
                 label: str | None = None):
        self.path, self.label = path, label or str(path)
        try:
            self._file = safe_open(path, framework="pt")
            meta = self._file.metadata() or {}
            version = meta.get("format_version")
            if meta.get("format") != DELTA_FORMAT or version not in [str(v) for v in DELTA_FORMAT_VERSIONS]:
                raise BundleError(f"not a {DELTA_FORMAT} file of a version this meswitch reads "
                                  f"({', '.join(map(str, DELTA_FORMAT_VERSIONS))}): version {version!r}")
            if meta.get("base_fingerprint") != base_fingerprint:
                raise BundleError("computed against another base than this bundle's")
            try:
                layout = json.loads(meta.get("tensors", ""))
            except json.JSONDecodeError as e:
                raise BundleError(f"the tensor layout in its header is not JSON ({e})") from e
            if not isinstance(layout, dict):
                raise BundleError("the tensor layout in its header is not an object")
            self._keys = set(self._file.keys())
            for tname, record in layout.items():
                if base_shapes is not None and tname not in base_shapes:
                    raise BundleError(f"{tname}: the base has no tensor of that name")
                check_layout_record(tname, record, self._header, None if base_shapes is None else base_shapes[tname],
                                    int(version))
            self.layout: dict[str, dict] = layout
        except BundleError as e:
            raise BundleError(f"{self.label}: {e}") from e
        except Exception as e:  # safetensors / json errors on a damaged file
            raise BundleError(f"{self.label}: cannot read the compressed expert ({e})") from e

    def _header(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        if key not in self._keys:
            return None
        s = self._file.get_slice(key)
        return s.get_dtype(), tuple(s.get_shape())

    def _tensor(self, key: str, default=...):
        if key not in self._keys:
            if default is not ...:
                return default
            raise BundleError(f"tensor {key} is missing")
        return self._file.get_tensor(key)

    def get(self, tname: str) -> CompressedDelta:
        try:
            return delta_from_tensors(tname, self.layout[tname], self._tensor)
        except BundleError as e:
            raise BundleError(f"{self.label}: {e}") from e
        except Exception as e:  # safetensors / torch errors on a damaged file
            raise BundleError(f"{self.label}: cannot read the compressed expert ({e})") from e

    def rows(self, tname: str) -> int:
        """Rows of the rebuilt tensor: the base's, plus any the expert added to its vocabulary."""
        extra = f"{tname}.extra_rows"
        added = self._file.get_slice(extra).get_shape()[0] if extra in self._keys else 0
        return int(self.layout[tname]["shape"][0]) + int(added)


@dataclass
class Bundle:
    path: Path
    manifest: dict
    # (inode, mtime, size) of the manifest.json this object's manifest was read from / written as
    stamp: tuple | None = field(default=None, repr=False, compare=False)
    # shapes of the base tensors the deltas apply to (set by a reader that has the base loaded):
    # load_deltas then refuses a delta that does not fit
    base_shapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False, compare=False)
    _listeners: list = field(default_factory=list, repr=False, compare=False)
    _mutex: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # ----- opening and validation ------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        p = Path(path)
        manifest, stamp = cls._read_manifest(p)
        return cls(p, manifest, stamp)

    @staticmethod
    def _read_manifest(p: Path) -> tuple[dict, tuple]:
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{p}: not a meswitch bundle (no {MANIFEST})")
        try:
            with open(mpath, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(64 << 20)  # far beyond any real manifest
            manifest = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BundleError(f"{mpath}: corrupted manifest ({e})") from e
        return check_manifest(manifest, str(mpath)), (st.st_ino, st.st_mtime_ns, st.st_size)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, base_reference: str, base_fingerprint: str,
                       base_config: dict, base_parameters: int) -> "Bundle":
        p = Path(path)
        if (p / MANIFEST).exists():
            b = cls.open(p)
            b.check_base_fingerprint(base_fingerprint, base_reference)
            return b
        if p.exists() and any(f.name != LOCK_FILE and not is_temp_name(f.name) for f in p.iterdir()):
            raise BundleError(f"{p}: exists, is not empty and is not a meswitch bundle; refusing to write into it")
        return cls(p, new_manifest(base_reference, base_fingerprint, base_config, base_parameters))

    @property
    def experts(self) -> dict[str, dict]:
        return self.manifest["experts"]

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    def entry(self, name: str) -> dict:
        experts = self.experts
        if name not in experts:
            known = ", ".join(sorted(experts)) or "none"
            raise UnknownExpertError(f"no expert {name!r} in bundle {self.path} (experts: {known})")
        return experts[name]

    def check_base_fingerprint(self, fingerprint: str, reference: str = "the given base") -> None:
        if fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"base mismatch: bundle {self.path} was computed against a base with fingerprint "
                f"{self.base_fingerprint} ({self.manifest['base'].get('reference')}), but {reference} has "
                f"fingerprint {fingerprint}; its deltas would produce wrong weights on this base"
            )

    def resolve(self, rel: str, top: str = EXPERTS_DIR) -> Path:
        """The file a manifest path names, refused if it leaves the bundle (checked again here,
        against the file system: a symlink inside the bundle may point anywhere)."""
        check_relpath(rel, top, f"bundle {self.path}")
        root = os.path.realpath(self.path)
        real = os.path.realpath(self.path / rel)
        if not real.startswith(root + os.sep):
            raise UnsafePathError(f"bundle {self.path}: {rel} leaves the bundle (through a symbolic link)")
        return self.path / rel

    def _check_file(self, name: str, rel: str, digest: str, top: str = EXPERTS_DIR) -> Path:
        f = self.resolve(rel, top)
        if not f.is_file():
            raise BundleError(f"expert {name!r}: file {rel} is missing from bundle {self.path}")
        if sha256_file(f) != digest:
            raise BundleError(f"expert {name!r}: file {rel} is corrupted (SHA-256 does not match the manifest)")
        return f

    def verify_files(self, name: str) -> None:
        """Check every file of an expert against its SHA-256 (and its aux_dir for unlisted files)."""
        entry = self.entry(name)
        self.verified_aux_dir(name)
        if entry.get("weights"):
            self._check_file(name, entry["weights"], entry["files"][entry["weights"]])

    def verified_aux_dir(self, name: str) -> Path:
        """The expert's aux_dir (config, tokenizer, chat template, generation config), every file
        in it checked against the manifest, and nothing in it the manifest does not list: callers
        hand the folder to transformers, which would read any file it finds there."""
        entry = self.entry(name)
        rel = entry.get("aux_dir")
        if not rel:
            raise BundleError(f"expert {name!r} has no aux_dir in bundle {self.path}")
        aux = self.resolve(rel)
        listed = {r: d for r, d in entry["files"].items() if r != entry.get("weights")}
        for r, digest in listed.items():
            self._check_file(name, r, digest)
        if not aux.is_dir():
            raise BundleError(f"expert {name!r}: folder {rel} is missing from bundle {self.path}")
        for f in aux.iterdir():
            if f"{rel}/{f.name}" not in listed:
                raise BundleError(f"expert {name!r}: {rel}/{f.name} is in the bundle but not in its manifest")
        return aux

    # ----- reading -------------------------------------------------------------------------
    def load_deltas(self, name: str, verify: bool = True) -> dict[str, CompressedDelta]:
        """The expert's compressed deltas, all in memory (see open_deltas)."""
        return self._retry_once(lambda: self._read_all(self._open_deltas(name, verify)))

    def open_deltas(self, name: str, verify: bool = True) -> DeltaFile:
        """The expert's deltas, read one tensor at a time (for writers that must not hold them all).
        The header is checked against docs/FORMAT.md (and against `base_shapes` when set) before
        any tensor is read."""
        return self._retry_once(lambda: self._open_deltas(name, verify))

    @staticmethod
    def _read_all(deltas: DeltaFile) -> dict[str, CompressedDelta]:
        return {tname: deltas.get(tname) for tname in deltas.layout}

    def _retry_once(self, read: Callable):
        """read(); if the files were replaced by another writer since this manifest was read, the
        manifest is re-read and read() tried once more."""
        try:
            return read()
        except BundleError:
            if self.refresh():
                return read()
            raise

    def _open_deltas(self, name: str, verify: bool) -> DeltaFile:
        entry = self.entry(name)
        rel = entry.get("weights")
        if not rel:
            raise BundleError(f"expert {name!r} has no weights file in bundle {self.path}")
        if verify:
            self.verify_files(name)
        f = self.resolve(rel)
        if not f.is_file():
            raise BundleError(f"expert {name!r}: file {rel} is missing from bundle {self.path}")
        return DeltaFile(f, self.base_fingerprint, self.base_shapes, f"expert {name!r}: {rel}")

    def aux_dir(self, name: str) -> Path:
        return self.resolve(self.entry(name)["aux_dir"])

    # ----- noticing changes made by other writers ------------------------------------------------
    def add_listener(self, fn: Callable[[set[str]], None]) -> None:
        """Call fn(names) whenever this object takes a new manifest (re-read, or written by a
        change): names = experts added, removed or replaced."""
        self._listeners.append(fn)

    def changed_on_disk(self) -> bool:
        """Whether manifest.json is no longer the file this object read or wrote (a stat)."""
        try:
            st = os.stat(self.path / MANIFEST)
        except FileNotFoundError:
            return self.stamp is not None
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self.stamp

    def refresh(self) -> set[str]:
        """Re-read the manifest if another writer changed it; returns the experts that changed."""
        with self._mutex:
            if not self.changed_on_disk():
                return set()
            changed = self._take(*self._read_manifest(self.path))
        self._notify(changed)
        return changed

    def _take(self, manifest: dict, stamp: tuple) -> set[str]:
        """Hold `manifest` from now on (lock held); returns the experts that differ."""
        old = self.manifest.get("experts", {})
        new = manifest["experts"]
        self.manifest, self.stamp = manifest, stamp
        return {n for n in set(old) | set(new) if old.get(n) != new.get(n)}

    def _notify(self, changed: set[str]) -> None:
        """Tell the listeners (outside every lock: they take their own)."""
        if changed:
            for fn in list(self._listeners):
                fn(changed)

    # ----- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The bundle's write lock: an flock on BUNDLE/.lock (released by the OS if the holder dies)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self._mutex, open(self.path / LOCK_FILE, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict]:
        """Change the bundle: under the lock, yields the manifest as it is on disk now (this
        object's own for a new bundle) to be changed in place; then writes it atomically and
        deletes the files it no longer names. Nothing is written if the block raises."""
        with self._locked():
            if (self.path / MANIFEST).exists():
                current, _ = self._read_manifest(self.path)
                if current["base"]["fingerprint"] != self.base_fingerprint:
                    raise BundleError(f"bundle {self.path} was recreated for another base meanwhile")
            else:
                current = json.loads(json.dumps(self.manifest))
            before = owned_paths(current)
            yield current
            check_manifest(current, f"bundle {self.path} (about to be written)")
            changed = self._write(current)
            for rel in sorted(before - owned_paths(current)):
                self._delete(rel)
            self.collect_garbage()
        self._notify(changed)

    def _write(self, manifest: dict) -> set[str]:
        write_text_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        st = os.stat(self.path / MANIFEST)
        return self._take(manifest, (st.st_ino, st.st_mtime_ns, st.st_size))

    def write_manifest(self) -> None:
        """Write this object's manifest as the bundle's (to create a bundle from a manifest built
        in memory); changes to an existing bundle go through transaction()."""
        check_manifest(self.manifest, f"bundle {self.path} (about to be written)")
        with self._locked():
            changed = self._write(self.manifest)
        self._notify(changed)

    def _real_dir(self, top: str | None) -> Path | None:
        """BUNDLE/top as a real folder of the bundle (None if missing or a symlink elsewhere)."""
        d = self.path / top if top else self.path
        real, root = os.path.realpath(d), os.path.realpath(self.path)
        if not d.is_dir() or real != os.path.join(root, top or "").rstrip(os.sep):
            return None
        return d

    def _delete(self, rel: str) -> None:
        """Delete a file or folder a manifest named, once no manifest names it: only inside the
        bundle's own experts/ or router/ folder, never following a symlink. A failure leaves a
        file behind (collected later) rather than failing a change that is already written."""
        try:
            top = PurePosixPath(rel).parts[0]
            check_relpath(rel, top, f"bundle {self.path}")
            if top in (EXPERTS_DIR, ROUTER_DIR) and self._real_dir(top) is not None:
                remove_path(self.path / rel)
        except (BundleError, OSError):
            pass

    def collect_garbage(self) -> None:
        """Delete what crashed writers left: their temporary files, and content-named files no
        manifest names (renamed into place before a manifest that never came). Lock held."""
        owned = owned_paths(self.manifest)
        for top in (EXPERTS_DIR, ROUTER_DIR, None):
            d = self._real_dir(top)
            if d is None:
                continue
            for f in d.iterdir():
                stale = is_temp_name(f.name) and temp_is_abandoned(f.name)
                orphan = top is not None and CONTENT_NAME_RE.match(f.name) and f"{top}/{f.name}" not in owned
                if stale or orphan:
                    try:
                        remove_path(f)
                    except OSError:
                        pass

    def new_temp_path(self, what: str, top: str = EXPERTS_DIR) -> Path:
        d = self.path / top
        d.mkdir(parents=True, exist_ok=True)
        return temp_path(d, what)

    def stage_expert(self, name: str, deltas: dict[str, CompressedDelta], save_aux) -> dict:
        """Write an expert's files under temporary names. Returns the staging record that
        commit() turns into a manifest entry; nothing visible changes before commit()."""
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, dict] = {}
        for tname, d in deltas.items():
            ts, meta = d.to_tensors(tname)
            tensors.update({k: v.contiguous() for k, v in ts.items()})
            layout[tname] = meta
        return self.stage_raw(name, tensors, self.delta_metadata(name, layout), save_aux)

    def delta_metadata(self, name: str, layout: dict[str, dict]) -> dict[str, str]:
        """The __metadata__ of an expert's delta file (docs/FORMAT.md): version 2 only when some
        tensor has a low-rank part or is of kind `svd`, so that every other file stays readable by
        version-1 readers."""
        lowrank = any(m.get("rank") or m.get("kind") == "svd" for m in layout.values())
        return {
            "format": DELTA_FORMAT,
            "format_version": str(LOWRANK_DELTA_VERSION if lowrank else 1),
            "expert": name,
            "base_fingerprint": self.base_fingerprint,
            "tensors": json.dumps(layout, separators=(",", ":")),
        }

    def stage_raw(self, name: str, tensors, metadata: dict[str, str], save_aux) -> dict:
        """stage_expert for tensors already in file form: a dict (an expert copied from another
        bundle), or a tensorfile.TensorSource read one tensor at a time (a large expert
        compressed layer by layer). The files get their final, content-derived names at commit()."""
        check_expert_name(name)
        if metadata.get("base_fingerprint") != self.base_fingerprint:
            raise BundleError(f"expert {name!r} was computed against another base than bundle {self.path}'s")
        weights_tmp = self.new_temp_path(f"{name}.safetensors")
        aux_tmp = self.new_temp_path(f"{name}.aux")
        record = {"name": name, "weights_tmp": weights_tmp, "aux_tmp": aux_tmp}
        try:
            save_safetensors(tensors, weights_tmp, metadata=metadata)
            save_aux(aux_tmp)
            fsync_tree(weights_tmp)
            fsync_tree(aux_tmp)
            aux_files = {}
            for p in sorted(aux_tmp.iterdir()):
                if p.is_symlink() or not p.is_file():
                    raise BundleError(f"expert {name!r}: its aux files must be plain files ({p.name} is not)")
                aux_files[p.name] = sha256_file(p)
        except BaseException:
            self.discard([record])
            raise
        digest = sha256_file(weights_tmp)
        aux_digest = hashlib.sha256("".join(f"{n}:{d}\n" for n, d in aux_files.items()).encode()).hexdigest()
        weights = f"{EXPERTS_DIR}/{name}-{digest[:16]}.safetensors"
        aux = f"{EXPERTS_DIR}/{name}-{aux_digest[:16]}"
        files = {weights: digest, **{f"{aux}/{n}": d for n, d in aux_files.items()}}
        record.update({"weights": weights, "aux_dir": aux, "files": files, "bytes": weights_tmp.stat().st_size})
        return record

    def commit(self, staged: list[tuple[dict, dict]], replace: bool = False) -> None:
        """Move staged files into place and write the manifest (entries from `staged`), under
        the bundle's lock. An expert already in the bundle (in its manifest on disk now, which
        another process may have changed) is refused unless `replace`."""
        with self.transaction() as current:
            experts = current["experts"]
            clash = [r["name"] for r, _ in staged if r["name"] in experts]
            if clash and not replace:
                raise ExpertExistsError(f"bundle {self.path} already has expert(s) {', '.join(clash)}")
            owned = owned_paths(current)
            for record, entry in staged:
                # Content-named: a file of that name that the manifest already names is this
                # very content; one it does not name is left over from a crash and replaced.
                for tmp, rel in ((record["weights_tmp"], record["weights"]), (record["aux_tmp"], record["aux_dir"])):
                    if rel in owned:
                        remove_path(tmp)
                        continue
                    final = self.resolve(rel)
                    if final.exists() or final.is_symlink():
                        remove_path(final)
                    durable_replace(tmp, final)
                entry = dict(entry)
                entry.update({
                    "name": record["name"],
                    "weights": record["weights"],
                    "aux_dir": record["aux_dir"],
                    "files": record["files"],
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                })
                experts[record["name"]] = entry

    def remove_expert(self, name: str) -> None:
        """Delete an expert: the manifest first (atomically), then its files (only files inside
        the bundle that no other expert names)."""
        with self.transaction() as current:
            if name not in current["experts"]:
                raise UnknownExpertError(f"no expert {name!r} in bundle {self.path}")
            del current["experts"][name]

    def discard(self, staged_records: list[dict]) -> None:
        for record in staged_records:
            for key in ("weights_tmp", "aux_tmp"):
                if record.get(key) is not None:
                    remove_path(Path(record[key]))

