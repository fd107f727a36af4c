"""The on-disk bundle: the compressed experts of one base model. Specified in docs/FORMAT.md.

    BUNDLE/
      manifest.json                 format version, base reference + fingerprint, experts
      experts/<name>.safetensors    the expert's compressed deltas
      experts/<name>/               its config.json, tokenizer files, chat template

Every file an expert needs is listed with its SHA-256 in the manifest and checked on load.
Writes are atomic: new files are written under temporary names and renamed, the manifest last,
so a failed or interrupted `compress` leaves an existing bundle as it was.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..compression.delta import CompressedDelta, delta_from_tensors
from ..tensorfile import write_safetensors

FORMAT_NAME = "meswitch-bundle"
FORMAT_VERSION = 1
DELTA_FORMAT = "meswitch-delta"
MANIFEST = "manifest.json"
EXAMPLES_FILE = "examples.jsonl"  # an expert's example queries (its calibration prompts), for the router
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class BundleError(ValueError):
    """A bundle that is missing, corrupted, of another version, or used with the wrong base."""


def check_expert_name(name: str) -> str:
    if not NAME_RE.match(name):
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class DeltaFile:
    """An expert's delta file (experts/<name>.safetensors), checked on opening and read one
    tensor at a time: `layout` maps each model tensor to its layout record."""

    def __init__(self, path: Path, base_fingerprint: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
            meta = self._file.metadata() or {}
            if meta.get("format") != DELTA_FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
                raise BundleError(f"{path}: not a version-{FORMAT_VERSION} {DELTA_FORMAT} file")
            if meta.get("base_fingerprint") != base_fingerprint:
                raise BundleError(f"{path}: computed against another base than this bundle's")
            self.layout: dict[str, dict] = json.loads(meta["tensors"])
            self._keys = set(self._file.keys())
        except BundleError:
            raise
        except Exception as e:  # safetensors / json errors on a damaged file
            raise BundleError(f"{path}: cannot read compressed expert ({e})") from e

    def _tensor(self, key: str, default=...):
        if key not in self._keys:
            if default is not ...:
                return default
            raise BundleError(f"{self.path}: tensor {key} is missing")
        return self._file.get_tensor(key)

    def get(self, tname: str) -> CompressedDelta:
        try:
            return delta_from_tensors(tname, self.layout[tname], self._tensor)
        except BundleError:
            raise
        except Exception as e:
            raise BundleError(f"{self.path}: cannot read compressed expert ({e})") from e

    def rows(self, tname: str) -> int:
        """Rows of the rebuilt tensor: the base's, plus any the expert added to its vocabulary."""
        extra = f"{tname}.extra_rows"
        added = self._file.get_slice(extra).get_shape()[0] if extra in self._keys else 0
        return int(self.layout[tname]["shape"][0]) + int(added)


@dataclass
class Bundle:
    path: Path
    manifest: dict

    # ----- opening and validation ------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{p}: not a meswitch bundle (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: corrupted manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise BundleError(f"{mpath}: not a {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {version!r} is not supported by this meswitch "
                f"(it reads version {FORMAT_VERSION})"
            )
        for key in ("base", "experts"):
            if not isinstance(manifest.get(key), dict):
                raise BundleError(f"{mpath}: manifest has no {key!r} object")
        return cls(p, manifest)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, base_reference: str, base_fingerprint: str,
                       base_config: dict, base_parameters: int) -> "Bundle":
        p = Path(path)
        if (p / MANIFEST).exists():
            b = cls.open(p)
            b.check_base_fingerprint(base_fingerprint, base_reference)
            return b
        if p.exists() and any(p.iterdir()):
            raise BundleError(f"{p}: exists, is not empty and is not a meswitch bundle; refusing to write into it")
        return cls(p, new_manifest(base_reference, base_fingerprint, base_config, base_parameters))

    @property
    def experts(self) -> dict[str, dict]:
        return self.manifest["experts"]

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    def entry(self, name: str) -> dict:
        if name not in self.experts:
            known = ", ".join(sorted(self.experts)) or "none"
            raise BundleError(f"no expert {name!r} in bundle {self.path} (experts: {known})")
        return self.experts[name]

    def check_base_fingerprint(self, fingerprint: str, reference: str = "the given base") -> None:
        if fingerprint != self.base_fingerprint:
            raise BundleError(
                f"base mismatch: bundle {self.path} was computed against a base with fingerprint "
                f"{self.base_fingerprint} ({self.manifest['base'].get('reference')}), but {reference} has "
                f"fingerprint {fingerprint}; its deltas would produce wrong weights on this base"
            )

    def verify_files(self, name: str) -> None:
        entry = self.entry(name)
        for rel, digest in entry["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise BundleError(f"expert {name!r}: file {rel} is missing from bundle {self.path}")
            if sha256_file(f) != digest:
                raise BundleError(f"expert {name!r}: file {rel} is corrupted (SHA-256 does not match the manifest)")

    # ----- reading -------------------------------------------------------------------------
    def load_deltas(self, name: str, verify: bool = True) -> dict[str, CompressedDelta]:
        deltas = self.open_deltas(name, verify)
        return {tname: deltas.get(tname) for tname in deltas.layout}

    def open_deltas(self, name: str, verify: bool = True) -> "DeltaFile":
        """The expert's deltas, read one tensor at a time (for writers that must not hold them all)."""
        entry = self.entry(name)
        if verify:
            self.verify_files(name)
        return DeltaFile(self.path / entry["weights"], self.base_fingerprint)

    def aux_dir(self, name: str) -> Path:
        return self.path / self.entry(name)["aux_dir"]

    # ----- writing -------------------------------------------------------------------------
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
        """The __metadata__ of an expert's delta file (docs/FORMAT.md)."""
        return {
            "format": DELTA_FORMAT,
            "format_version": str(FORMAT_VERSION),
            "expert": name,
            "base_fingerprint": self.base_fingerprint,
            "tensors": json.dumps(layout, separators=(",", ":")),
        }

    def stage_raw(self, name: str, tensors, metadata: dict[str, str], save_aux) -> dict:
        """stage_expert for tensors already in file form: a dict (an expert copied from another
        bundle), or a tensorfile.TensorSource read one tensor at a time (a large expert
        compressed layer by layer)."""
        check_expert_name(name)
        if metadata.get("base_fingerprint") != self.base_fingerprint:
            raise BundleError(f"expert {name!r} was computed against another base than bundle {self.path}'s")
        experts_dir = self.path / "experts"
        experts_dir.mkdir(parents=True, exist_ok=True)
        weights_tmp = experts_dir / f".{name}.safetensors.tmp"
        save_safetensors(tensors, weights_tmp, metadata=metadata)
        aux_tmp = experts_dir / f".{name}.aux.tmp"
        shutil.rmtree(aux_tmp, ignore_errors=True)
        save_aux(aux_tmp)
        files = {f"experts/{name}.safetensors": sha256_file(weights_tmp)}
        for p in sorted(aux_tmp.iterdir()):
            files[f"experts/{name}/{p.name}"] = sha256_file(p)
        return {"name": name, "weights_tmp": weights_tmp, "aux_tmp": aux_tmp, "files": files,
                "bytes": weights_tmp.stat().st_size}

    def remove_expert(self, name: str) -> None:
        """Delete an expert: the manifest first (atomically), then its files."""
        entry = self.entry(name)
        del self.experts[name]
        _atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")
        (self.path / entry["weights"]).unlink(missing_ok=True)
        shutil.rmtree(self.path / entry["aux_dir"], ignore_errors=True)

    def commit(self, staged: list[tuple[dict, dict]]) -> None:
        """Move staged files into place and write the manifest (entries from `staged`)."""
        experts_dir = self.path / "experts"
        for record, entry in staged:
            name = record["name"]
            os.replace(record["weights_tmp"], experts_dir / f"{name}.safetensors")
            aux = experts_dir / name
            if aux.exists():
                shutil.rmtree(aux)
            os.replace(record["aux_tmp"], aux)
            entry = dict(entry)
            entry.update({
                "name": name,
                "weights": f"experts/{name}.safetensors",
                "aux_dir": f"experts/{name}",
                "files": record["files"],
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            self.experts[name] = entry
        self.write_manifest()

    def write_manifest(self) -> None:
        """Write the in-memory manifest atomically (the last step of every change to a bundle)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

    def discard(self, staged_records: list[dict]) -> None:
        for record in staged_records:
            Path(record["weights_tmp"]).unlink(missing_ok=True)
            shutil.rmtree(record["aux_tmp"], ignore_errors=True)
