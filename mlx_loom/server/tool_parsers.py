"""Model output text -> content and tool-call deltas, incrementally, one parser per choice.

The streaming route sends each delta as it comes; the non-streaming route feeds the whole
text through the same parser and merges the deltas, so both return the same calls.

- ArgumentsParser (named function, constrained): the output is the arguments object itself.
- CallListParser ("required", constrained): `[{"name": "f", "arguments": {...}}, ...]` in the
  grammar's fixed layout; each call's name is sent once complete, its arguments as they grow.
- HermesParser ("auto", Hermes / Qwen templates and ours): free text with `<tool_call>{...}</tool_call>`
  blocks; text outside blocks is content, a block is held until it closes and becomes a call if it
  parses as one of the declared functions (else it is returned as content, never dropped).
- Llama3JsonParser ("auto", Llama 3.1+ templates): the reply is either text or, after an optional
  `<|python_tag|>`, `{"name": ..., "parameters": {...}}` objects separated by ";". A reply that starts
  like a call is held to the end and returned as content if it is not one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from mlx_loom.server.tools import ToolPlan


@dataclass(frozen=True)
class CallDelta:
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None
    """id and name are set on a call's first delta only."""


@dataclass(frozen=True)
class Delta:
    content: str = ""
    calls: tuple[CallDelta, ...] = ()


class ToolParser(Protocol):
    num_calls: int

    def feed(self, text: str) -> list[Delta]: ...

    def finish(self) -> list[Delta]:
        """The end of the output: whatever was held back."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def make_parser(plan: ToolPlan) -> ToolParser:
    if plan.mode == "named":
        return ArgumentsParser(plan.named or "")
    if plan.mode == "required":
        return CallListParser()
    if plan.call_format == "llama3_json":
        return Llama3JsonParser(plan.names)
    return HermesParser(plan.names)


def _start(index: int, name: str, arguments: str = "") -> CallDelta:
    return CallDelta(index, arguments, new_call_id(), name)


class ArgumentsParser:
    def __init__(self, name: str) -> None:
        self.name = name
        self.num_calls = 0

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self.num_calls == 0:
            self.num_calls = 1
            return [Delta(calls=(_start(0, self.name, text),))]
        return [Delta(calls=(CallDelta(0, text),))]

    def finish(self) -> list[Delta]:
        return []


_HEADER = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_HEADER_START = '{"name": "'


class CallListParser:
    """Scans the constrained array; only bytes already final are sent (the text only grows)."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0  # next unscanned character
        self.num_calls = 0
        self.in_args = False
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.failed = False

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        calls: list[CallDelta] = []
        while not self.failed and self.pos < len(self.buf):
            if self.in_args:
                piece = self._scan_args()
                if calls and calls[-1].index == self.num_calls - 1:  # one delta per call per feed
                    last = calls.pop()
                    calls.append(CallDelta(last.index, last.arguments + piece, last.id, last.name))
                elif piece:
                    calls.append(CallDelta(self.num_calls - 1, piece))
            elif not self._next_header(calls):
                break
        return [Delta(calls=tuple(calls))] if calls else []

    def _next_header(self, calls: list[CallDelta]) -> bool:
        """Skip `[`, the last call's `}` and `, `, then take `{"name": "...", "arguments": `.

        False: more text is needed (or the array ended, or the text is not a call list).
        """
        rest = self.buf[self.pos:]
        lead = len(rest) - len(rest.lstrip("[}, "))
        match = _HEADER.match(rest, lead)
        if match is None:
            tail = rest[lead:]
            if tail and not tail.startswith("]") and not _HEADER_START.startswith(tail[:len(_HEADER_START)]):
                self.failed = True
            return False
        calls.append(_start(self.num_calls, json.loads(f'"{match.group(1)}"')))
        self.num_calls += 1
        self.pos += match.end()
        self.in_args, self.depth = True, 0
        return True

    def _scan_args(self) -> str:
        """Arguments text up to the end of the buffer or of the arguments value."""
        start = self.pos
        while self.pos < len(self.buf) and self.in_args:
            ch = self.buf[self.pos]
            self.pos += 1
            if self.escaped:
                self.escaped = False
            elif self.in_string:
                self.escaped = ch == "\\"
                self.in_string = ch != '"'
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.in_args = self.depth > 0
        return self.buf[start:self.pos]

    def finish(self) -> list[Delta]:
        if self.num_calls == 0 and self.buf:
            return [Delta(content=self.buf)]  # not a call list at all: say what the model wrote
        return []


OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.buf = ""  # text not yet sent: a possible start of OPEN, or an open block
        self.in_block = False
        self.num_calls = 0

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        while True:
            if self.in_block:
                end = self.buf.find(CLOSE)
                if end < 0:
                    return out
                out.append(self._block(self.buf[:end], OPEN + self.buf[:end + len(CLOSE)]))
                self.buf, self.in_block = self.buf[end + len(CLOSE):], False
            else:
                start = self.buf.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(self.buf, OPEN)
                    if len(self.buf) > keep:
                        out.append(Delta(content=self.buf[:len(self.buf) - keep]))
                        self.buf = self.buf[len(self.buf) - keep:]
                    return out
                if start:
                    out.append(Delta(content=self.buf[:start]))
                self.buf, self.in_block = self.buf[start + len(OPEN):], True

    def finish(self) -> list[Delta]:
        """An unclosed block (the model stopped before CLOSE) still counts if it parses."""
        rest, self.buf = self.buf, ""
        if self.in_block:
            self.in_block = False
            return [self._block(rest, OPEN + rest)]
        return [Delta(content=rest)] if rest else []

    def _block(self, body: str, raw: str) -> Delta:
        calls = _parse_calls(body, self.names)
        if calls is None:
            return Delta(content=raw)
        deltas = tuple(_start(self.num_calls + i, name, args) for i, (name, args) in enumerate(calls))
        self.num_calls += len(deltas)
        return Delta(calls=deltas)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _parse_calls(body: str, names: frozenset[str]) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] from one block: an object or a list of {"name", "arguments"}."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return _calls_of(doc, names)


def _calls_of(doc: object, names: frozenset[str]) -> list[tuple[str, str]] | None:
    items = doc if isinstance(doc, list) else [doc]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.buf = ""
        self.mode: str | None = None  # None: undecided, "content" or "call"

    def feed(self, text: str) -> list[Delta]:
        if self.mode == "content":
            return [Delta(content=text)] if text else []
        self.buf += text
        head = self.buf.lstrip()
        if self.mode == "call" or PYTHON_TAG.startswith(head):  # nothing yet, or maybe the tag
            return []
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self.mode = "call"
            return []
        self.mode, out, self.buf = "content", self.buf, ""
        return [Delta(content=out)]

    def finish(self) -> list[Delta]:
        rest, self.buf = self.buf, ""
        calls = _llama3_calls(rest, self.names) if self.mode != "content" else None
        if not calls:
            return [Delta(content=rest)] if rest else []
        return [Delta(calls=tuple(_start(i, name, args) for i, (name, args) in enumerate(calls)))]


def _llama3_calls(text: str, names: frozenset[str]) -> list[tuple[str, str]] | None:
    """Every object of `[<|python_tag|>]{...}; {...}` as a call of a declared function, else None."""
    body = text.strip().removeprefix(PYTHON_TAG)
    decoder, pos, calls = json.JSONDecoder(), 0, []
    while True:
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
        if pos == len(body):
            return calls or None
        try:
            doc, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        found = _calls_of(doc, names) if isinstance(doc, dict) else None
        if found is None:
            return None
        calls.extend(found)


# ---- merging (non-streaming responses) ----

@dataclass
class MergedCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


def merge(deltas: list[Delta]) -> tuple[str, list[MergedCall]]:
    """All deltas of one choice -> (content, calls in index order)."""
    content: list[str] = []
    calls: dict[int, MergedCall] = {}
    for d in deltas:
        content.append(d.content)
        for c in d.calls:
            if c.id is not None:
                calls[c.index] = MergedCall(c.id, c.name or "")
            calls[c.index].arguments.append(c.arguments)
    return "".join(content), [calls[i] for i in sorted(calls)]
