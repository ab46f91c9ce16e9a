"""A validator for the subset of JSON Schema (draft 2020-12) that ParamCast's schemas use.

The device side must not pull in a schema library (jsonschema brings referencing, attrs and a
compiled rpds extension), so the few keywords `common/manifest.schema.json` uses are implemented
here: `type`, `const`, `enum`, `required`, `properties`, `additionalProperties`, `items`,
`minimum`, `minLength`, `pattern` and local `$ref`s (`#/$defs/...`). Any other keyword in a schema
is an error, so a schema can never silently promise more than this checks. A third party can
validate the same file with any full JSON Schema implementation.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from paramcast.common.errors import IntegrityError

MANIFEST_SCHEMA = Path(__file__).with_name("manifest.schema.json")

_KEYWORDS = {"$schema", "$id", "$defs", "title", "description", "$ref", "type", "const", "enum", "required",
             "properties", "additionalProperties", "items", "minimum", "minLength", "pattern"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaError(IntegrityError):
    """A document does not match its schema; `path` is where (e.g. "slots.head.up.max_rank")."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path or '(top level)'}: {problem}")
        self.path, self.problem = path, problem


@cache
def load_schema(path: Path = MANIFEST_SCHEMA) -> dict:
    schema = json.loads(path.read_text())
    _check_keywords(schema, "")
    return schema


def _check_keywords(schema, where: str) -> None:
    if isinstance(schema, dict):
        unknown = set(schema) - _KEYWORDS
        if unknown:
            raise ValueError(f"schema at {where or '/'} uses unsupported keywords {sorted(unknown)}")
        for key in ("properties", "$defs"):
            for name, sub in schema.get(key, {}).items():
                _check_keywords(sub, f"{where}/{key}/{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(schema.get(key), dict):
                _check_keywords(schema[key], f"{where}/{key}")


def validate(document, schema: dict | None = None) -> None:
    """Raise SchemaError naming the first place where `document` breaks `schema` (the manifest's by default)."""
    root = load_schema() if schema is None else schema
    _validate(document, root, root, "")


def _join(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _validate(value, schema: dict, root: dict, path: str) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        _validate(value, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[k](value) for k in kinds):
            raise SchemaError(path, f"expected {' or '.join(kinds)}, got {type(value).__name__} {_short(value)}")
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        raise SchemaError(path, f"must be {schema['const']!r}, got {_short(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(path, f"must be one of {schema['enum']}, got {_short(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema \
            and value < schema["minimum"]:
        raise SchemaError(path, f"must be >= {schema['minimum']}, got {value}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(path, f"must have at least {schema['minLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(path, f"{_short(value)} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise SchemaError(path, f"missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], root, _join(path, key))
            elif extra is False:
                raise SchemaError(path, f"unexpected field {key!r}")
            elif isinstance(extra, dict):
                _validate(item, extra, root, _join(path, key))
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _validate(item, schema["items"], root, _join(path, i))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."
