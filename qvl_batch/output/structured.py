"""Structured output: a JSON schema in the job becomes typed Parquet columns.

:func:`columns_of` maps the schema's top-level properties to Arrow types (checked when the job
loads); :meth:`OutputParser.parse` turns a model's answer into a dict of typed values or an
OUTPUT_PARSE_ERROR message; :func:`example_for` makes a deterministic valid instance (the fake
engine answers with it). Validation is jsonschema's (draft 2020-12), so keywords such as
``minimum``, ``maxItems`` or ``pattern`` hold for every data row.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pyarrow as pa

_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
SHOWN_CHARS = 160  # how much of an unparsable answer its error message quotes


class SchemaError(ValueError):
    """A schema the runner cannot turn into columns (or not a valid JSON Schema)."""


def _type_of(node: Any, where: str) -> pa.DataType:
    if not isinstance(node, dict):
        raise SchemaError(f"{where}: must be a mapping, got {type(node).__name__}")
    kind = node.get("type")
    if isinstance(kind, list):  # ["string", "null"]: columns are nullable anyway
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise SchemaError(f"{where}: type {kind} must name one type besides null")
        kind = kinds[0]
    if kind is None and "enum" in node:
        values = node["enum"]
        if values and all(isinstance(v, str) for v in values):
            kind = "string"
        else:
            raise SchemaError(f"{where}: an enum without a type must list only strings")
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        if "items" not in node:
            raise SchemaError(f"{where}: an array needs 'items' (its column type)")
        return pa.list_(_type_of(node["items"], f"{where}.items"))
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, dict) or not props:
            raise SchemaError(f"{where}: an object needs 'properties'")
        return pa.struct([(k, _type_of(v, f"{where}.properties.{k}")) for k, v in props.items()])
    raise SchemaError(
        f"{where}: type {kind!r} is not supported; use string, integer, number, boolean, "
        "array (with items) or object (with properties)"
    )


def columns_of(schema: dict[str, Any]) -> pa.Schema:
    """The typed columns a schema adds to data/: one per top-level property, in order."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError as JsonSchemaError

    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise SchemaError("the top level must be {type: object, properties: {...}}")
    try:
        Draft202012Validator.check_schema(schema)
    except JsonSchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise SchemaError(f"not a valid JSON Schema at {where}: {exc.message}") from None
    struct = _type_of(schema, "json_schema")
    return pa.schema([struct.field(i) for i in range(struct.num_fields)])


class OutputParser:
    """Parses and validates answers against one schema; reused for every row of an actor."""

    def __init__(self, schema: dict[str, Any]):
        from jsonschema import Draft202012Validator

        self.schema = schema
        self.columns = columns_of(schema)
        self._validator = Draft202012Validator(schema)

    def parse(self, text: str | None, finish_reason: str | None) -> tuple[dict | None, str | None]:
        """(values by column, None) or (None, why the answer is not a valid instance)."""
        body = (text or "").strip()
        fenced = _FENCE.match(body)  # unguided models like to wrap JSON in a ```json block
        if fenced:
            body = fenced.group(1).strip()
        try:
            # strict=False: raw control characters inside strings are kept, not refused
            # (guided decoding with byte-level tokens can emit them; the value is still clear).
            value = json.loads(body, strict=False)
        except json.JSONDecodeError as exc:
            cut = " (output stopped at sampling.max_tokens)" if finish_reason == "length" else ""
            return None, f"not JSON{cut}: {exc.msg} at char {exc.pos}; output: {_shown(text)}"
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            return None, f"does not match the schema at {where}: {first.message}{more}"
        return {f.name: _coerce(value.get(f.name), f.type) for f in self.columns}, None


def _coerce(value: Any, kind: pa.DataType) -> Any:
    """Validated JSON to what Arrow takes for ``kind`` (an integer 3 in a number column: 3.0)."""
    if value is None:
        return None
    if pa.types.is_float64(kind):
        return float(value)
    if pa.types.is_list(kind):
        return [_coerce(v, kind.value_type) for v in value]
    if pa.types.is_struct(kind):
        return {f.name: _coerce(value.get(f.name), f.type) for f in kind}
    return value


def _shown(text: str | None) -> str:
    text = text or ""
    return repr(text[:SHOWN_CHARS] + ("..." if len(text) > SHOWN_CHARS else ""))


def example_for(schema: dict[str, Any], rng: random.Random) -> Any:
    """A valid instance of ``schema`` drawn from ``rng`` (the fake engine's answer)."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example_for(v, rng) for k, v in props.items()}
    if kind == "array":
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems", lo + 3)
        items = schema["items"]
        if schema.get("uniqueItems") and "enum" in items:
            k = rng.randint(lo, min(hi, len(items["enum"])))
            return rng.sample(list(items["enum"]), k)
        return [example_for(items, rng) for _ in range(rng.randint(lo, hi))]
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        lo, hi = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0))
        return round(rng.uniform(lo, hi), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    lo, hi = schema.get("minLength", 3), schema.get("maxLength", 24)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))
