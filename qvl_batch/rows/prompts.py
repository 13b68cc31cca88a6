"""Per-row prompts: a fixed text, a ``{column}`` template, or a prompt column.

Templates accept plain ``{name}`` fields only: no attribute or index access, no conversions, so
a job file cannot reach into Python objects through a format string.
"""

from __future__ import annotations

import string
from typing import Any

from ..errors import RowError, RowFailure

_FORMATTER = string.Formatter()


def template_fields(template: str) -> list[str]:
    """Column names a template needs, in order; raises ValueError on unsupported syntax."""
    fields: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(
            f"prompt.template: {exc} (write literal braces as {{{{ and }}}})"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"prompt.template: field {{{name}}} is not allowed: use plain {{column}} fields"
            )
        fields.append(name)
    return list(dict.fromkeys(fields))


def render_prompt(template: str, fields: list[str], row: dict[str, Any]) -> str:
    """Fill a template from one row's values; null or missing fields are a row error."""
    values = {}
    for name in fields:
        value = row.get(name)
        if value is None:
            raise RowFailure(RowError.BAD_PROMPT, f"template field {{{name}}} is null or missing")
        values[name] = value
    return template.format_map(values)


def prompt_from_column(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowFailure(RowError.BAD_PROMPT, "prompt column is null or empty")
    return str(value)


def chat_messages(prompt: str, system: str | None) -> list[dict[str, Any]]:
    """The chat every engine renders with the model's template: an optional system turn, then
    one user turn with the image and the prompt. ``None``: no system turn, so the template's
    own default applies (Qwen2.5-VL: "You are a helpful assistant."); ``""``: an empty system
    turn, the way to have no system text at all."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    user = [{"type": "image"}, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": user})
    return messages
