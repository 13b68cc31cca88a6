"""A job's settings checked against what they name in the wings below: the engine registry and
each engine's own settings, the prompt template's fields, the image formats Pillow decodes here,
the structured-output schema and the output columns it must not replace. ``config.py`` checks
each setting alone and imports none of these; every command that runs or plans a job loads it
with :func:`load_job`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..engines import ENGINES, check_job, settings_of
from ..engines.lengths import parse_lengths
from ..output.schema import reserved_columns
from ..output.structured import SchemaError, columns_of
from ..rows.images import known_formats
from ..rows.prompts import template_fields

log = logging.getLogger("qvl_batch")


def load_job(job_file: str | Path | None, overrides: list[str] | None = None) -> Config:
    """:func:`~qvl_batch.config.load_config`, then :func:`validate`."""
    return validate(load_config(job_file, overrides))


def validate(cfg: Config) -> Config:
    """``cfg`` if its settings fit the modules they name; else a ConfigError saying what to fix."""
    if cfg.engine.name not in ENGINES:
        raise ConfigError(f"engine.name: {cfg.engine.name!r} is not one of {ENGINES}")
    for name in ENGINES:  # each engine's own settings, checked by its dataclass
        settings_of(cfg, name)
    check_job(cfg)
    if cfg.engine.benchmark.answer_lengths:
        try:
            parse_lengths(cfg.engine.benchmark.answer_lengths)
        except ValueError as exc:
            raise ConfigError(f'engine.benchmark.answer_lengths: {exc} (or "": off)') from None
    known = known_formats()
    unknown = [name for name in cfg.image.formats if name not in known]
    if unknown:
        raise ConfigError(
            f"image.formats: {unknown}: not source formats Pillow decodes here (EPS never: it "
            f"runs Ghostscript); choose from {sorted(known)}"
        )
    try:
        template_fields(cfg.prompt.template)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    schema = cfg.structured.json_schema
    if schema is not None:
        try:
            columns_of(schema)
        except SchemaError as exc:
            raise ConfigError(f"structured.json_schema: {exc}") from None
        taken = reserved_columns() | set(cfg.input.passthrough_columns)
        clash = sorted(set(schema["properties"]) & taken)
        if clash:
            raise ConfigError(
                f"structured.json_schema: properties {clash} would replace output columns of the "
                "same name (core, lineage or input.passthrough_columns); rename them"
            )
    return cfg


def with_input_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """``cfg`` with the settings its input asks for (an OpenAI Batch file's ``max_tokens``,
    ...; ``rows.manifest.Plan.settings``), checked again like any setting."""
    changed = {}
    for key, value in settings.items():
        section, name = key.split(".")
        part = getattr(cfg, section)
        if getattr(part, name) != value:
            try:
                part = dataclasses.replace(part, **{name: value})
            except ConfigError as exc:
                raise ConfigError(f"the input asks for {key}={value!r}: {exc}") from None
            cfg = dataclasses.replace(cfg, **{section: part})
            changed[key] = value
    shown = {k: v for k, v in changed.items() if not k.startswith("input.")}
    if shown:
        listed = ", ".join(f"{k}={_brief(v)}" for k, v in shown.items())
        log.info("input: the Batch file's lines ask for %s; the job runs with them", listed)
    return validate(cfg) if changed else cfg


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
