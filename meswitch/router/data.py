"""Queries for the router: example files, labelled evaluation files, chats, stored examples.

A query is a string or an OpenAI-style chat (a list of {"role", "content"} messages). Files:
- `.txt` (or any suffix but .json/.jsonl): one query per non-empty line;
- `.jsonl`: one JSON value per line; `.json`: a JSON list. Each value is a string or an object
  with one of: "messages" (a chat), "text", "prompt", "query", "question", or "instruction"
  (+ optional "input", appended on a new line, as in Alpaca-style data sets).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import RouterError

Query = str | list[dict]
MAX_STORED_EXAMPLES = 2000
TEXT_FIELDS = ("text", "prompt", "query", "question")


def query_of(obj, where: str) -> Query:
    """The query in one record (see the module docstring)."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise RouterError(f"{where}: expected a string or an object, got {type(obj).__name__}")
    if isinstance(obj.get("messages"), list):
        return [m for m in obj["messages"] if isinstance(m, dict)]
    for key in TEXT_FIELDS:
        if isinstance(obj.get(key), str):
            return obj[key]
    if isinstance(obj.get("instruction"), str):
        extra = obj.get("input")
        return obj["instruction"] + (f"\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    raise RouterError(f"{where}: needs one of the fields 'messages', {', '.join(map(repr, TEXT_FIELDS))} or 'instruction'")


def read_records(path: str | Path) -> list[tuple[object, str]]:
    """(record, where) for every record of a file: strings for text files, JSON values otherwise."""
    p = Path(path)
    if not p.is_file():
        raise RouterError(f"file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RouterError(f"{p}: not UTF-8 text ({e})") from e
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RouterError(f"{p}: invalid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise RouterError(f"{p}: expected a JSON list")
        return [(obj, f"{p}[{i}]") for i, obj in enumerate(data)]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if suffix == ".jsonl":
            try:
                records.append((json.loads(line), f"{p}:{i}"))
            except json.JSONDecodeError as e:
                raise RouterError(f"{p}:{i}: invalid JSON ({e.msg})") from e
        else:
            records.append((line.strip(), f"{p}:{i}"))
    return records


def load_queries(path: str | Path) -> list[Query]:
    """The queries of an example file; an empty file is an error."""
    queries = [query_of(obj, where) for obj, where in read_records(path)]
    queries = [q for q in queries if query_text(q).strip()]
    if not queries:
        raise RouterError(f"{path}: no queries in the file (empty example file)")
    return queries


def load_labelled(path: str | Path) -> list[tuple[Query, str]]:
    """(query, label) pairs of an evaluation file: JSON lines / list of objects with a "label"."""
    out = []
    for obj, where in read_records(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            raise RouterError(f"{where}: an evaluation record is an object with a 'label' (the expert's name)")
        out.append((query_of(obj, where), obj["label"]))
    if not out:
        raise RouterError(f"{path}: no labelled queries in the file")
    return out


def user_turns(messages: list[dict]) -> list[str]:
    """The text of a chat's user turns, oldest first (list-of-parts contents are joined)."""
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts
            c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        if isinstance(c, str) and c.strip():
            turns.append(c)
    return turns


def query_text(q: Query) -> str:
    """One string for a query: a chat's user turns joined by new lines."""
    return q if isinstance(q, str) else "\n".join(user_turns(q))


def sample_user_text(sample: dict) -> str:
    """The user side of a calibration sample (compression/calibration.py): text, prompt or user turns."""
    if "messages" in sample:
        return "\n".join(user_turns(sample["messages"]))
    return sample.get("prompt") or sample.get("text") or ""


def write_examples(path: Path, samples: list[dict], cap: int = MAX_STORED_EXAMPLES) -> int:
    """Store the user-side text of calibration samples as an expert's default router examples."""
    texts, seen = [], set()
    for s in samples:
        t = sample_user_text(s).strip()
        if t and t not in seen:
            seen.add(t)
            texts.append(t)
        if len(texts) >= cap:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return len(texts)
