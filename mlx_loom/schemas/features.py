"""What the grammar engine (llguidance) enforces natively, and the Problem a schema feature raises.

Pure data and small helpers (no llguidance import): the rewriter (rewrite.py) consults these to
decide, per subschema, whether a keyword is enforced as is, rewritten into an equivalent form,
or is a Problem (refused under strict, relaxed otherwise). Measured on llguidance 1.9 with
`lenient: false`; tests/test_schema_rewrites.py checks the table against the installed engine.
"""

from __future__ import annotations

from dataclasses import dataclass

UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas", "uniqueItems",
    "propertyNames", "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems",
    "$dynamicRef", "$recursiveRef",
})
"""Keywords llguidance refuses ("Unimplemented keys"); each is rewritten where sound, else a Problem."""

NATIVE_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6",
                            "uri", "uuid"})
"""String formats llguidance enforces itself."""

_PCT = "%[0-9A-Fa-f]{2}"
_PCHAR = f"(?:[A-Za-z0-9._~!$&'()*+,;=@-]|{_PCT})"  # RFC 3986 pchar without ':' (keeps it unambiguous)
_SEG_NZ = f"{_PCHAR}+"
_URI_REF = (f"(?:[A-Za-z][A-Za-z0-9+.-]*:)?"  # optional scheme
            f"(?://(?:[A-Za-z0-9._~!$&'()*+,;=-]|{_PCT})*(?:/{_PCHAR}*)*"  # authority + path-abempty
            f"|/(?:{_SEG_NZ}(?:/{_PCHAR}*)*)?"  # path-absolute
            f"|{_SEG_NZ}(?:/{_PCHAR}*)*"  # path-rootless / path-noscheme (no ':' in any segment)
            f")?"
            f"(?:\\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?")

FORMAT_PATTERNS = {
    # Each pattern matches only strings of the format (a subset where the full grammar is not regular
    # or not worth it); tests/test_schema_rewrites.py checks samples against reference checkers.
    "uri-reference": f"^{_URI_REF}$",
    "regex": r"^\^?(?:[A-Za-z0-9 _-]|\\[dDwWsS.]|\.\*?|\[[A-Za-z0-9_-]+\][*+?]?)*\$?$",
    "color": r"^#(?:[0-9A-Fa-f]{3}|[0-9A-Fa-f]{6})$",
    "hex-color": r"^#(?:[0-9A-Fa-f]{3}|[0-9A-Fa-f]{6})$",
    "byte": r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}
"""Formats enforced by an equivalent (or narrower) regex."""

STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex", "color", "host-name", "ip-address",
})
"""Formats JSON Schema defines (2020-12, and draft 3/4 names). Any other format is a custom one: the
specification makes an unknown format an annotation that every string satisfies, so it is
accepted and not enforced; a standard one not enforced is a Problem under strict."""

LEGACY_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")
"""Drafts in which the keywords beside a `$ref` are ignored (validators read only the $ref)."""

SMALL_ENUM = 6
"""Most distinct item values for which `uniqueItems` is rewritten into the enum of their subsets
(2^6 = 64 arrays at most; in schema order, so each set has one spelling)."""
MAX_BRANCHES = 64
"""Most alternatives one rewrite may add (dependencies multiply: each adds two)."""


@dataclass(frozen=True)
class Problem:
    """A feature the server cannot enforce exactly at `pointer` (RFC 6901 into the client's schema)."""

    pointer: str
    keyword: str
    why: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.why}"


def escape(part: object) -> str:
    """One JSON-pointer reference token."""
    return str(part).replace("~", "~0").replace("/", "~1")


def child(pointer: str, *parts: object) -> str:
    return pointer + "".join("/" + escape(p) for p in parts)


MAX_LISTED = 200
"""Most pointers one refusal lists (then "and N more"); real schemas stay far below."""


def unsupported_message(problems: list[Problem]) -> str:
    """One refusal naming every problem: grouped by reason, each with all its pointers."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        groups.setdefault(p.why, []).append(p.pointer or "/")
    parts, listed = [], 0
    for why, pointers in groups.items():
        shown = pointers[: max(0, MAX_LISTED - listed)]
        listed += len(shown)
        if shown:
            parts.append(f"{why} (at {', '.join(shown)})")
    more = len(problems) - listed
    tail = f"; and {more} more" if more > 0 else ""
    return (f"strict mode cannot enforce {len(problems)} part(s) of the JSON schema: " + "; ".join(parts) + tail
            + ". Remove or rewrite them, or set strict to false (response_format.json_schema.strict, or "
            "function.strict for tools): they are then relaxed, and a finished output that does not match the "
            "schema carries validation_error on its choice")
