"""What a constrained request asks for, and the Protocol a mask engine implements.

Pure Python (no mlx, no llguidance): the server builds GrammarSpecs, the engine holds
Matchers, and any backend (llguidance today) plugs in behind GrammarBackend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


ERROR_DETAIL_CHARS = 200
"""Most characters of a grammar engine's own error text passed on to a client."""


def short_error(text: str | None, limit: int = ERROR_DETAIL_CHARS) -> str:
    """A grammar engine's error text cut to its first part: no parser-state dump, at most `limit` chars."""
    text = (text or "").split("<state>", 1)[0].split("<non-verbose", 1)[0]
    text = " ".join(text.split()) or "unknown error"
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class GrammarError(ValueError):
    """A schema that cannot be enforced: the message says what is wrong and what to change."""

    def __init__(self, message: str, param: str | None = "response_format") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    """"json_object" (any JSON object) or "json_schema"."""
    schema: str | None = None
    """Compact JSON text of the schema, key order kept (it is the order properties are generated in)."""
    name: str | None = None
    strict: bool = True
    """True: the output matches the schema exactly, or compile() refuses it naming every feature it
    cannot enforce. False (best effort): what cannot be enforced is relaxed (CompiledGrammar.relaxed)
    and the finished output is validated instead; only a schema that is not valid JSON Schema is refused."""

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: object, name: str | None = None, strict: bool = True) -> GrammarSpec:
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}",
                               "response_format.json_schema.schema")
        try:
            text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"the JSON schema is not serializable JSON: {exc}",
                               "response_format.json_schema.schema") from None
        return cls("json_schema", text, name, strict)

    @property
    def key(self) -> str:
        """Cache key: equal for the same kind, schema text and strictness."""
        return hashlib.sha256(f"{self.kind}\0{self.schema}\0{self.strict}".encode()).hexdigest()

    def schema_obj(self) -> object:
        """The schema to enforce and validate against (json_object: any object)."""
        return json.loads(self.schema) if self.schema is not None else {"type": "object"}


@dataclass(frozen=True)
class CompiledGrammar:
    spec: GrammarSpec
    grammar: str
    """Backend-specific serialized grammar."""
    compile_ms: float
    relaxed: tuple[str, ...] = ()
    """Best effort only: "pointer: why" for each constraint the grammar does not enforce."""
    narrowed: tuple[str, ...] = ()
    """"pointer: why" for each constraint enforced by allowing fewer documents than the schema does."""


class Matcher(Protocol):
    def consume(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar did not allow it."""

    def is_stopped(self) -> bool:
        """Nothing may follow: the document is complete."""

    def is_accepting(self) -> bool:
        """The tokens so far form a complete document (EOS is allowed)."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens consumed tokens (speculative decoding)."""

    def error(self) -> str | None: ...


class GrammarBackend(Protocol):
    vocab_size: int
    mask_words: int
    """int32 words per token bitmask: ceil(vocab_size / 32)."""

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Thread-safe and cached; raises GrammarError naming the problem."""

    def new_matcher(self, grammar: CompiledGrammar) -> Matcher: ...

    def fill_masks(self, matchers: Sequence[Matcher], out: np.ndarray) -> None:
        """out int32 [len(matchers), mask_words]: bit t % 32 of word t // 32 set = token t allowed."""
