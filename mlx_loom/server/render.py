"""Prompts -> token ids: chat messages through the model's chat template, completion prompts as
text or ids. Runs in a worker thread (templates and tokenizers are CPU work, not loop work), and
encodes through mlx_loom.server.encoding so that a big prompt does not hold the GIL either.

Chat: control tokens count only where the template wrote them; a user's "<|im_end|>" is text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Sequence

from mlx_loom.server.encoding import Shield, encoder_for
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


def check_turns(messages: Sequence[ChatMessage]) -> None:
    """OpenAI's conversation rules that a template would not catch: a tool result answers a call an
    earlier assistant message made, and an assistant message says something or calls something."""
    call_ids: set[str] = set()
    for i, msg in enumerate(messages):
        if msg.role == "assistant":
            if msg.content is None and not msg.tool_calls:
                raise bad_request(f"messages.{i}: an assistant message needs 'content' or 'tool_calls'",
                                  f"messages.{i}")
            call_ids.update(call.id for call in msg.tool_calls or ())
        elif msg.role == "tool":
            if msg.tool_call_id is None:
                raise bad_request("a 'tool' message needs 'tool_call_id'", f"messages.{i}.tool_call_id")
            if msg.tool_call_id not in call_ids:
                raise bad_request(f"messages.{i}: tool_call_id {msg.tool_call_id!r} does not answer any tool call of "
                                  "an earlier assistant message; send the assistant message with that call in "
                                  "'tool_calls' first", f"messages.{i}.tool_call_id")


def _render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # the template rejected these messages (e.g. role order)
        raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from None


def _chat_ids(tokenizer, messages: Sequence[ChatMessage], plan: ToolPlan | None) -> list[int]:
    """Messages -> prompt ids (in a worker thread). Client text goes through the template with its
    special-token strings covered by sentinels, which are then encoded as plain text."""
    encoder = encoder_for(tokenizer)
    aware = template_knows_tools(tokenizer)
    dicts = with_tool_section(message_dicts(messages, aware), plan, aware)
    tools = plan.template_tools() if plan is not None and aware else None
    shield = Shield(encoder.specials)
    dicts, tools = shield.cover(dicts), shield.cover(tools)
    if shield.found and not encoder.can_encode_plain:
        raise bad_request("the messages contain a control token of this model's chat template (one of "
                          f"{', '.join(sorted(encoder.specials))}), which this tokenizer cannot encode as "
                          "plain text; remove it", _special_param(messages, encoder.specials))
    return encoder.encode_template(_render(tokenizer, dicts, tools), shield)


def _special_param(messages: Sequence[ChatMessage], specials: dict[str, int]) -> str:
    """The first message holding a special-token string (the tools, if no message does)."""
    for i, msg in enumerate(messages):
        text = json.dumps(msg.model_dump(), ensure_ascii=False)
        if any(json.dumps(s, ensure_ascii=False)[1:-1] in text for s in specials):
            return f"messages.{i}"
    return "tools"


async def render_chat(tokenizer, messages: Sequence[ChatMessage], plan: ToolPlan | None = None) -> list[int]:
    check_turns(messages)
    return await asyncio.to_thread(_chat_ids, tokenizer, messages, plan)


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

    def encode_all() -> list[list[int]]:  # completion prompts are raw text: control tokens count
        encoder = encoder_for(tokenizer)
        return [encoder.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    return await asyncio.to_thread(encode_all)
