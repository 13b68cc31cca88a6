"""The config as ``_job.json`` keeps it (secrets redacted, local paths absolute) and as a later
command reads it back (older outputs' relative paths resolved)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any

from ..config import Config, local_absolute, model_absolute

SECRET_WORDS = {
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "credentials",
    "session",
    "sas",
    "auth",
    "authorization",
    "signature",
}
REDACTED = "***"


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _is_secret_key(key: str) -> bool:
    """True for keys like ``secret``, ``access_key``, ``sessionToken``, ``sas_token``; not for
    ``max_tokens`` (whole words only, split at ``_``, ``-``, ``.`` and camelCase)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key).replace("_", " ").replace("-", " ")
    return any(w in SECRET_WORDS for w in words.replace(".", " ").lower().split())


def _schema_keys(cfg: Any) -> frozenset[str]:
    """Every field name of ``cfg``'s dataclasses (the engines' settings too, once built):
    settings, never secrets (``token_latency_s``)."""
    keys, todo = set(), [cfg]
    while todo:
        obj = todo.pop()
        for f in dataclasses.fields(obj):
            keys.add(f.name)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                todo.append(value)
    return frozenset(keys)


def redact(value: Any, parent_key: str = "", settings: frozenset[str] = frozenset()) -> Any:
    """Copy with secret-looking values replaced (credentials in storage or engine options);
    keys in ``settings`` (the schema's field names) are never secrets."""
    if isinstance(value, dict):
        return {k: redact(v, str(k), settings) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, parent_key, settings) for v in value]
    if value is not None and _is_secret_key(parent_key) and parent_key not in settings:
        return REDACTED
    return value


def saved_config(cfg: Config) -> dict[str, Any]:
    """The config as ``_job.json`` keeps it: secrets redacted, the output schema verbatim (a
    property may well be called ``token``)."""
    saved = redact(to_dict(cfg), settings=_schema_keys(cfg))
    saved["structured"] = to_dict(cfg)["structured"]
    return saved


def without_redacted(value: Any) -> Any:
    """A saved config less its redacted values: they fall back to defaults / credential chains."""
    if not isinstance(value, dict):
        return value
    hidden = lambda v: v == REDACTED or (isinstance(v, list) and REDACTED in v)  # noqa: E731
    return {k: without_redacted(v) for k, v in value.items() if not hidden(v)}


def read_back(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as today's schema reads it: redacted values dropped, and names older
    outputs saved under moved to where they live now (``engine.hf.answer_lengths``, saved by
    every hf job before it became ``engine.benchmark.answer_lengths``)."""
    out = without_redacted(saved)
    hf = (out.get("engine") or {}).get("hf")
    if isinstance(hf, dict) and "answer_lengths" in hf:
        lengths = hf.pop("answer_lengths")
        if lengths:
            out["engine"].setdefault("benchmark", {})["answer_lengths"] = lengths
    return out


# ---- older outputs: local paths saved relative ---------------------------------------------


def _job_dir(saved_output: Any, url: str) -> str | None:
    """The directory a job ran from, read off its relative ``output.path`` as saved and where
    the output is now (``out`` saved, ``/home/u/proj/out`` now: ``/home/u/proj``); None when the
    saved path was absolute or a URL, or the output has moved under another name."""
    if not isinstance(saved_output, str) or "://" in saved_output or "://" in url:
        return None
    if not saved_output or os.path.isabs(saved_output):
        return None
    here = Path(os.path.abspath(url)).parts
    rel = Path(os.path.normpath(saved_output)).parts
    if ".." in rel or len(rel) >= len(here) or here[-len(rel) :] != rel:
        return None
    return str(Path(*here[: -len(rel)]))


def _exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return bool(glob.glob(path, recursive=True))
    return os.path.exists(path)


def absolute_saved_paths(saved: dict[str, Any], url: str) -> list[tuple[str, str]]:
    """Make the relative local paths of an older output's saved config absolute, in place.

    Versions before paths were saved absolute kept ``input.paths``, ``input.manifest`` and
    ``engine.model`` as typed, relative to wherever the job ran. They are resolved against that
    directory when the saved ``output.path`` tells it (see :func:`_job_dir`), else against the
    current one: the first where every input path exists. Returns the ``(key, path)`` of input
    paths found in neither (the caller says how to override them)."""
    inp, engine = saved.get("input") or {}, saved.get("engine") or {}
    relative = lambda p: isinstance(p, str) and p and "://" not in p and not os.path.isabs(p)  # noqa: E731
    entries = [(f"input.paths[{i}]", p) for i, p in enumerate(inp.get("paths") or [])]
    entries += [("input.manifest", inp.get("manifest"))]
    entries = [(k, os.path.expanduser(p)) for k, p in entries if relative(p)]
    model = engine.get("model")
    if not entries and not relative(model):
        return []
    bases = [b for b in (_job_dir((saved.get("output") or {}).get("path"), url), os.getcwd()) if b]
    base = next((b for b in bases if all(_exists(os.path.join(b, p)) for _, p in entries)), None)
    base = base or bases[0]
    missing = [(k, p) for k, p in entries if not _exists(os.path.join(base, p))]
    if "paths" in inp:
        inp["paths"] = [local_absolute(p, base) for p in inp["paths"]]
    if inp.get("manifest"):
        inp["manifest"] = local_absolute(inp["manifest"], base)
    if relative(model):
        engine["model"] = model_absolute(model, base)
    return missing
