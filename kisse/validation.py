"""JSON-schema validation of request data (REST bodies and WS frame data alike).

fastjsonschema compiles each schema to Python once. It stops at the first
error, so a hostile document costs at most one pass over what the schema
bounds (every array and object has a size limit), and its messages name the
rule, never the offending value, so nothing a client sent is echoed back.

Forward compatibility: an object schema made by `obj()` accepts properties it
does not know (newer clients send fields older servers have not heard of) and
`validate` returns only the known ones, so unknown fields are never stored or
echoed. Known fields keep every check. Integers come back as `int` even when
the client wrote `2.0`.
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import fastjsonschema
import orjson

from kisse.errors import BadRequest

Schema = dict[str, Any]
Normalizer = Callable[[Any], Any]
# Unknown fields are ignored, but not without bound: no request needs more.
MAX_PROPERTIES = 64
# Compiled once per schema; schemas are module-level constants, so id() is stable.
_compiled: dict[int, tuple[Callable[[Any], Any], Normalizer]] = {}


# Documents at least this large are parsed with the collector paused: a body of
# 350,000 empty lists made it run a dozen times inside one orjson.loads (43 ms
# instead of 16 ms, measured), and nothing else runs meanwhile anyway.
_LARGE = 64 * 1024


def parse_json(raw: str | bytes) -> Any:
    """`orjson.loads`, cheaper for large documents; raises `orjson.JSONDecodeError`."""
    if len(raw) < _LARGE or not gc.isenabled():
        return orjson.loads(raw)
    gc.disable()
    try:
        return orjson.loads(raw)
    finally:
        gc.enable()


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> Schema:
    """A record schema: these properties (others are ignored), `required` among them."""
    schema: Schema = {"type": "object", "properties": properties, "maxProperties": MAX_PROPERTIES}
    if required:
        schema["required"] = list(required)
    return schema


def validate(document: Any, schema: Schema, where: str = "body") -> Any:
    """`document` reduced to what `schema` knows, if it matches; else a 400 naming the field.

    `where` names the document in messages: "body" for REST, "data" for WebSocket frames.
    """
    compiled = _compiled.get(id(schema))
    if compiled is None:
        compiled = _compiled[id(schema)] = (fastjsonschema.compile(schema), _normalizer(schema))
    check, normalize = compiled
    try:
        check(document)
    except fastjsonschema.JsonSchemaValueException as error:
        raise _explain(error, document, where) from None
    return normalize(document)


def _explain(error: fastjsonschema.JsonSchemaValueException, document: Any, where: str) -> BadRequest:
    path = [str(p) for p in (error.path or ["data"])[1:]]
    field = ".".join(path) or where
    if error.rule == "required":
        node = document
        for step in (error.path or [])[1:]:
            node = node[int(step)] if isinstance(node, list) else node[step]  # fastjsonschema says "0"
        missing = [name for name in error.rule_definition if name not in node]
        names = sorted(".".join([*path, name]) for name in missing)
        return BadRequest(f"missing fields: {', '.join(names)}", code="missing_fields", details={"fields": names})
    if error.rule == "anyOf" and all(set(alt) == {"required"} for alt in error.rule_definition):
        names = sorted(".".join([*path, n]) for alt in error.rule_definition for n in alt["required"])
        return BadRequest(f"give at least one of: {', '.join(names)}", code="missing_fields",
                          details={"fields": names})
    # fastjsonschema says "<name> must ...", with its own name for the document.
    rule = error.message[len(error.name):].strip() if error.name and error.message.startswith(error.name) \
        else error.message
    return BadRequest(f"{field}: {rule}", code="invalid_field", details={"field": field})


def _normalizer(schema: Schema) -> Normalizer:
    """A function that keeps what `schema` describes (a valid document) and makes
    its integers ints; built once per schema so requests pay only for their fields."""
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        return lambda value: int(value) if isinstance(value, float) else value
    properties = schema.get("properties")
    if properties is not None:
        fields = {name: _normalizer(sub) for name, sub in properties.items()}

        def record(value: Any) -> Any:
            if not isinstance(value, dict):
                return value
            return {name: keep(value[name]) for name, keep in fields.items() if name in value}
        return record
    values = schema.get("additionalProperties")
    if isinstance(values, dict):
        keep_value = _normalizer(values)
        if keep_value is not _unchanged:
            return lambda value: {k: keep_value(v) for k, v in value.items()} if isinstance(value, dict) else value
    items = schema.get("items")
    if isinstance(items, dict):
        keep_item = _normalizer(items)
        if keep_item is not _unchanged:
            return lambda value: [keep_item(v) for v in value] if isinstance(value, list) else value
    return _unchanged


def _unchanged(value: Any) -> Any:
    return value
