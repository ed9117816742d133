"""JSON-schema validation of request data (REST bodies and WS frame data alike)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator

from kisse.errors import BadRequest

Schema = dict[str, Any]
# Compiled once per schema; schemas are module-level constants, so id() is stable.
# fastjsonschema (compiled to Python) answers "valid?" fast on the hot path;
# jsonschema explains what is wrong, naming every missing field.
_checks: dict[int, Callable[[Any], Any]] = {}
_explainers: dict[int, Draft202012Validator] = {}


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> Schema:
    """An object schema that refuses unknown properties."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


EMPTY = obj({})
ID = {"type": "string", "minLength": 1, "maxLength": 64}


def validate(document: Any, schema: Schema) -> Any:
    """Return `document` if it matches `schema`; else raise a 400 that names the fields."""
    check = _checks.get(id(schema))
    if check is None:
        check = _checks[id(schema)] = fastjsonschema.compile(schema)
    try:
        check(document)
        return document
    except fastjsonschema.JsonSchemaException:
        pass
    explainer = _explainers.get(id(schema))
    if explainer is None:
        explainer = _explainers[id(schema)] = Draft202012Validator(schema)
    errors = list(explainer.iter_errors(document))
    if not errors:  # the two libraries disagree: trust the thorough one
        return document
    missing = sorted(e.message.split("'")[1] for e in errors if e.validator == "required")
    if missing:
        raise BadRequest(f"missing fields: {', '.join(missing)}", code="missing_fields",
                         details={"fields": missing})
    error = min(errors, key=lambda e: len(e.absolute_path))
    where = ".".join(str(p) for p in error.absolute_path) or "body"
    raise BadRequest(f"{where}: {error.message}", code="invalid_field", details={"field": where})
