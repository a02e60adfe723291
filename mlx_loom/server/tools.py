"""tools + tool_choice -> a ToolPlan: which calls are allowed, the grammar that forces them, and the
tool section of the prompt.

Modes, as in vLLM: "none" (plain text, tools not shown), "auto" (tools shown; calls parsed from
`<tool_call>` blocks in the output, Hermes style), "required" (output constrained to a JSON
array of {"name", "arguments"} calls of the given tools) and a named function (output
constrained to that function's arguments object). Templates that know tools (their source
mentions `tools`) get them as the `tools` variable; others get a Hermes-style system section.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from mlx_loom.schemas.grammar import GrammarError, GrammarSpec
from mlx_loom.server.errors import bad_request
from mlx_loom.server.protocol import ChatCompletionRequest, NamedToolChoice

ToolMode = Literal["auto", "required", "named"]
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str | None
    parameters: dict
    """JSON Schema of the arguments object."""
    strict: bool = False
    """function.strict: enforce `parameters` exactly or refuse (else best effort, as OpenAI)."""

    def openai_dict(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    functions: tuple[FunctionSpec, ...]
    named: str | None = None
    parallel: bool = True
    call_format: str = "hermes"
    """How the model writes calls in "auto" mode: "hermes" (<tool_call> blocks) or "llama3_json"."""

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    def grammar_spec(self) -> GrammarSpec | None:
        """The constraint of "required" / named mode (None for "auto": the model may answer in text)."""
        if self.mode == "auto":
            return None
        if self.mode == "named":
            fn = next(f for f in self.functions if f.name == self.named)
            schema, param = fn.parameters, f"tools.{self._index(fn.name)}.function.parameters"
            strict = fn.strict
        else:
            schema, param = self._calls_schema(), "tools"
            strict = all(f.strict for f in self.functions)  # one grammar: strict only if every function is
        try:
            return GrammarSpec.json_schema(schema, name=self.named or "tool_calls", strict=strict)
        except GrammarError as exc:
            raise bad_request(str(exc), param, "invalid_schema") from None

    def _calls_schema(self) -> dict:
        """The array of calls. A function's parameters that refer to themselves ("#/$defs/...", as
        pydantic writes nested models) move whole into the wrapper's root $defs under their own
        name, their refs rewritten to point there: nested inline, they would point at the wrapper."""
        defs: dict[str, dict] = {}
        calls = []
        for i, f in enumerate(self.functions):
            arguments = f.parameters
            if _has_local_ref(arguments):
                defs[f"tool_{i}"] = _rebase_refs(arguments, f"#/$defs/tool_{i}")
                arguments = {"$ref": f"#/$defs/tool_{i}"}
            # "name" first: properties are generated in schema order, so the name streams before the arguments.
            calls.append({"type": "object", "properties": {"name": {"const": f.name}, "arguments": arguments},
                          "required": ["name", "arguments"], "additionalProperties": False})
        item = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "items": item, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return schema

    def _index(self, name: str) -> int:
        return next(i for i, f in enumerate(self.functions) if f.name == name)

    def template_tools(self) -> list[dict]:
        return [f.openai_dict() for f in self.functions]


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are JSON data, not schemas: a "$ref" key inside them is not a reference."""


def _has_local_ref(schema: object) -> bool:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            return True
        return any(_has_local_ref(v) for k, v in schema.items() if k not in _DATA_KEYWORDS)
    return isinstance(schema, list) and any(_has_local_ref(v) for v in schema)


def _rebase_refs(schema: object, base: str) -> object:
    """A copy of `schema` whose document-local refs ("#", "#/$defs/X", "#/properties/a") point under
    `base`, where the schema now lives; other refs and data values unchanged."""
    if isinstance(schema, list):
        return [_rebase_refs(v, base) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYWORDS else _rebase_refs(v, base)) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """None when the request has no tools or tool_choice is "none"; 400s name what to fix."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs a non-empty 'tools' list", "tool_choice")
        return None
    functions = tuple(_function_spec(i, tool.function) for i, tool in enumerate(req.tools))
    _check_unique(functions)
    if choice == "none":
        return None
    if req.response_format is not None and req.response_format.type != "text":
        raise bad_request("response_format cannot be combined with tool calls; use tool_choice 'none' "
                          "or drop response_format", "response_format")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {f.name for f in functions}:
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is not in 'tools'",
                              "tool_choice.function.name")
        return ToolPlan("named", functions, choice.function.name)
    mode: ToolMode = "required" if choice == "required" else "auto"
    return ToolPlan(mode, functions, parallel=req.parallel_tool_calls is not False)


def _function_spec(i: int, fn) -> FunctionSpec:
    if not NAME_RE.fullmatch(fn.name):
        raise bad_request(f"function name {fn.name!r} must be 1-64 characters from a-z, A-Z, 0-9, '_' and '-'",
                          f"tools.{i}.function.name")
    params = NO_PARAMETERS if fn.parameters is None else fn.parameters
    problem = _schema_problem(params)
    if problem:
        raise bad_request(f"tools.{i}.function.parameters is not a valid JSON Schema: {problem}",
                          f"tools.{i}.function.parameters", "invalid_schema")
    return FunctionSpec(fn.name, fn.description, params, fn.strict is True)


def _schema_problem(schema: dict) -> str | None:
    import jsonschema

    if schema.get("type", "object") != "object":
        return "the arguments must be an object (type 'object')"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "" if exc.json_path == "$" else f" (at {exc.json_path})"
        return exc.message + where
    return None


def _check_unique(functions: tuple[FunctionSpec, ...]) -> None:
    seen: set[str] = set()
    for i, f in enumerate(functions):
        if f.name in seen:
            raise bad_request(f"function name {f.name!r} appears twice in 'tools'", f"tools.{i}.function.name")
        seen.add(f.name)


# ---- prompt side ----

def tool_call_format(tokenizer) -> str:
    """The call format the model's own chat template teaches: Llama 3.1+ templates (ipython role,
    <|python_tag|>) ask for bare JSON calls; Hermes / Qwen templates and ours for <tool_call> blocks."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<tool_call>" not in template and (
            "<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"


def template_knows_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tools_system_text(plan: ToolPlan) -> str:
    """Hermes-style tool section for templates that do not render tools themselves."""
    listing = "\n".join(json.dumps(f.openai_dict(), ensure_ascii=False) for f in plan.functions)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tool_call_text(name: str, arguments: str) -> str:
    """How an earlier assistant call is written back into a prompt (same format the model emits)."""
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n</tool_call>'
