"""Prompts -> token ids: chat messages through the model's chat template, completion prompts as
text or ids. Runs in a worker thread (templates and tokenizers are CPU work, not loop work).
"""

from __future__ import annotations

import asyncio
import json
from typing import Sequence

from mlx_loom.server.errors import bad_request
from mlx_loom.server.protocol import ChatMessage, ToolCall
from mlx_loom.server.tools import ToolPlan, template_knows_tools, tool_call_text, tools_system_text


def message_dicts(messages: Sequence[ChatMessage], tool_aware: bool = False) -> list[dict]:
    """Plain {"role", "content"} dicts; text parts are joined, anything else is refused.

    Tool turns: for templates that know tools, assistant "tool_calls" and "tool" messages pass
    through (arguments as objects, as HF templates expect); for others, calls are written as
    <tool_call> blocks and tool results as <tool_response> blocks in a user turn (Hermes style).
    """
    out: list[dict] = []
    for i, msg in enumerate(messages):
        text = _content_text(msg, i)
        if msg.role == "tool":
            if msg.tool_call_id is None:
                raise bad_request("a 'tool' message needs 'tool_call_id'", f"messages.{i}.tool_call_id")
            out.append(_tool_result(out, text) if not tool_aware else
                       {"role": "tool", "content": text, "tool_call_id": msg.tool_call_id})
            continue
        role = "system" if msg.role == "developer" else msg.role
        entry: dict = {"role": role, "content": text}
        if msg.tool_calls:
            if msg.role != "assistant":
                raise bad_request("only assistant messages carry 'tool_calls'", f"messages.{i}.tool_calls")
            calls = [_call_arguments(i, j, c) for j, c in enumerate(msg.tool_calls)]
            if tool_aware:
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.function.name, "arguments": args}}
                                       for c, args in zip(msg.tool_calls, calls)]
            else:
                blocks = [tool_call_text(c.function.name, json.dumps(args, ensure_ascii=False))
                          for c, args in zip(msg.tool_calls, calls)]
                entry["content"] = "\n".join(([text] if text else []) + blocks)
        out.append(entry)
    return out


def _call_arguments(i: int, j: int, call: ToolCall) -> object:
    try:
        return json.loads(call.function.arguments or "{}")
    except ValueError:
        raise bad_request("tool call arguments must be a JSON text", f"messages.{i}.tool_calls.{j}.function.arguments") \
            from None


def _tool_result(out: list[dict], text: str) -> dict:
    """A tool result as a user turn; consecutive results share one turn (returned or merged)."""
    block = f"<tool_response>\n{text}\n</tool_response>"
    if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
        last = out.pop()
        return {"role": "user", "content": last["content"] + "\n" + block}
    return {"role": "user", "content": block}


def with_tool_section(messages: list[dict], plan: ToolPlan | None, tool_aware: bool) -> list[dict]:
    """Prepend the tool listing to the system turn (templates that do not render tools)."""
    if plan is None or tool_aware:
        return messages
    section = tools_system_text(plan)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + section}
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _content_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None:
        if msg.role != "assistant":
            raise bad_request(f"messages.{i}.content is required for role '{msg.role}'", f"messages.{i}.content")
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for j, part in enumerate(msg.content):
        if part.type != "text":
            raise bad_request(f"content part type {part.type!r} is not supported (only 'text' parts)",
                              f"messages.{i}.content.{j}.type")
        if part.text is None:
            raise bad_request("a 'text' content part needs a 'text' string", f"messages.{i}.content.{j}.text")
        texts.append(part.text)
    return "".join(texts)


def _chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # the template rejected these messages (e.g. role order)
        raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from None
    return list(tokenizer.encode(text))


async def render_chat(tokenizer, messages: Sequence[ChatMessage], plan: ToolPlan | None = None) -> list[int]:
    aware = template_knows_tools(tokenizer)
    dicts = with_tool_section(message_dicts(messages, aware), plan, aware)
    tools = plan.template_tools() if plan is not None and aware else None
    return await asyncio.to_thread(_chat_ids, tokenizer, dicts, tools)


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """Normalize the four accepted shapes to a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is an empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


async def render_prompts(tokenizer, prompt: str | list) -> list[list[int]]:
    prompts = _prompt_list(prompt)

    def encode_all() -> list[list[int]]:
        return [list(tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in prompts]

    return await asyncio.to_thread(encode_all)
