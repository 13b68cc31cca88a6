"""The config as ``_job.json`` keeps it (secrets redacted) and as a later command reads it back."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import Config

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
