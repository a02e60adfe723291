"""Prompts -> token ids: chat messages through the model's chat template, completion prompts as
text or ids. Runs in a worker thread (templates and tokenizers are CPU work, not loop work).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from server.errors import bad_request
from server.protocol import ChatMessage


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts; text parts are joined, anything else is refused."""
    out = []
    for i, msg in enumerate(messages):
        if msg.role == "tool":
            raise bad_request("messages with role 'tool' are not supported yet", f"messages.{i}.role")
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": _content_text(msg, i)})
    return out


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


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # the template rejected these messages (e.g. role order)
        raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from None
    return list(tokenizer.encode(text))


async def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    dicts = message_dicts(messages)
    return await asyncio.to_thread(_chat_ids, tokenizer, dicts)


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
