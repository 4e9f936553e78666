"""schemathesis hooks for tests/serving/test_schemathesis.py (loaded by name through SCHEMATHESIS_HOOKS): the
document's `model` (in every request body, and /v1/models/{model}) is narrowed to the served model before any
case is generated, so that schema-valid requests reach generation instead of a 404 in every phase."""

import schemathesis

from registry.names import CHAT_MODEL

SERVED = {"type": "string", "enum": [CHAT_MODEL]}


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict) -> None:
    for schema in raw_schema["components"]["schemas"].values():
        if "model" in schema.get("properties", {}) and "model" in schema.get("required", []):
            schema["properties"]["model"] = SERVED
    for operation in raw_schema["paths"].get("/v1/models/{model}", {}).values():
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "model":
                parameter["schema"] = SERVED
