"""`response_format` as a llama.cpp grammar (B183): JSON output that always parses.

The worker samples only tokens the grammar allows, so a `json_object` reply is JSON and a
`json_schema` reply matches its schema (unless it is cut off by `max_tokens`: then
`finish_reason` is "length"). The JSON-schema → GBNF converter is llama.cpp's own, as
llama-cpp-python ships it in `llama_cpp/llama_grammar.py`; that file needs only the standard
library, so it is loaded on its own: importing the `llama_cpp` package would load libllama
(and numpy) into the agent, which otherwise never needs them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from types import ModuleType
from typing import Any

from rbee_agent.openai.wire import ResponseFormat
from rbee_agent.protocol import ErrorCode, RbeeError

_PARAM = "response_format"


@functools.cache
def _converter() -> ModuleType:
    spec = importlib.util.find_spec("llama_cpp")
    folders = spec.submodule_search_locations if spec is not None else None
    if not folders:
        raise RbeeError(ErrorCode.INTERNAL_ERROR,
                        "llama-cpp-python is not installed on this node, so JSON output "
                        "cannot be enforced", hint="Reinstall the agent: rbee nodes install NODE")
    path = f"{next(iter(folders))}/llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("rbee_llama_grammar", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def grammar_for(fmt: ResponseFormat | None) -> str | None:
    """The GBNF grammar that enforces `fmt`, or None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        if fmt.schema_ is not None:
            return schema_grammar(fmt.schema_, f"{_PARAM}.schema")
        return str(_converter().JSON_GBNF)
    if fmt.json_schema is None:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        "response_format of type json_schema needs a 'json_schema' object",
                        hint='Send {"type": "json_schema", "json_schema": {"name": "…", '
                        '"schema": {…}}}.', details={"param": f"{_PARAM}.json_schema"})
    if fmt.json_schema.schema_ is None:  # OpenAI allows it: any JSON object
        return str(_converter().JSON_GBNF)
    return schema_grammar(fmt.json_schema.schema_, f"{_PARAM}.json_schema.schema")


# What llama.cpp's converter turns into grammar rules. Anything else that constrains a value
# (minimum, multipleOf, oneOf's exclusivity, …) it would drop silently, and the reply could
# then break the schema, so such a schema is refused instead, naming the keyword.
_ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "pattern", "format",
    "minLength", "maxLength", "$defs", "definitions",
})
_ANNOTATIONS = frozenset({
    "title", "description", "examples", "default", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly",
})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def _unenforceable(schema: Any, path: str) -> tuple[str, str] | None:
    """The first (keyword, where) the grammar could not enforce, or None."""
    if not isinstance(schema, dict):
        return None
    for keyword in schema:
        if keyword not in _ENFORCED and keyword not in _ANNOTATIONS:
            return keyword, path or "the top level"
    children: list[tuple[Any, str]] = []
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(sub, f"{path}/{key}/{name}") for name, sub in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(sub, f"{path}/{key}/{i}") for i, sub in enumerate(schema[key])]
    children += [(schema[key], f"{path}/{key}") for key in _SUBSCHEMAS if key in schema]
    for child, where in children:
        found = _unenforceable(child, where)
        if found is not None:
            return found
    return None


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    found = _unenforceable(schema, "")
    if found is not None:
        keyword, where = found
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"The JSON schema uses '{keyword}' (at {where}), which rbee cannot enforce while "
            "generating, so the reply could break the schema",
            hint=f"Leave '{keyword}' out. Enforced: {', '.join(sorted(_ENFORCED))}.",
            details={"param": param, "keyword": keyword},
        )
    try:
        grammar = _converter().json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter asserts and raises on what it cannot handle
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"The JSON schema cannot be enforced: {exc}",
            hint="Use the JSON Schema features llama.cpp's converter supports (types, "
            "properties, required, enum, items, anyOf, $ref within the schema).",
            details={"param": param},
        ) from None
    return str(grammar)
