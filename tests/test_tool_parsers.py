"""Tool-call parsing without a model: every parser gives the same calls however the text is split."""

import json

import pytest

from mlx_loom.server.tool_parsers import ArgumentsParser, CallListParser, HermesParser, merge

NAMES = frozenset({"get_weather", "f"})


def run(parser, text: str, step: int):
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    deltas += parser.finish()
    content, calls = merge(deltas)
    return content, [(c.name, "".join(c.arguments)) for c in calls], deltas


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_call_list_streams_names_then_arguments(step):
    args0 = {"city": 'Pa}ris"]', "days": [1, {"a": "{"}], "esc": "back\\slash"}
    text = json.dumps([{"name": "get_weather", "arguments": args0}, {"name": "f", "arguments": {}}],
                      separators=(", ", ": "))
    content, calls, deltas = run(CallListParser(), text, step)
    assert content == ""
    assert calls == [("get_weather", json.dumps(args0, separators=(", ", ": "))), ("f", "{}")]
    firsts = [c for d in deltas for c in d.calls if c.id is not None]
    assert [c.index for c in firsts] == [0, 1] and all(c.id.startswith("call_") for c in firsts)
    assert len({c.id for c in firsts}) == 2


def test_call_list_sends_arguments_before_the_call_ends():
    parser = CallListParser()
    first = parser.feed('[{"name": "f", "arguments": {"q": "he')
    assert [(c.name, c.arguments) for d in first for c in d.calls] == [("f", '{"q": "he')]
    assert parser.feed('llo"}}]') and parser.num_calls == 1


def test_call_list_that_is_not_a_call_list_comes_back_as_content():
    content, calls, _ = run(CallListParser(), "I cannot call tools.", 3)
    assert content == "I cannot call tools." and calls == []


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_arguments_parser(step):
    content, calls, deltas = run(ArgumentsParser("f"), '{"x": 1}', step)
    assert content == "" and calls == [("f", '{"x": 1}')]
    assert deltas[0].calls[0].name == "f" and deltas[0].calls[0].id


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_hermes_blocks_become_calls_and_text_stays_content(step):
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>[{"name": "f", "arguments": "{}"}]</tool_call> bye '
            '<tool_call>{"name": "unknown"}</tool_call> <tool')
    content, calls, _ = run(HermesParser(NAMES), text, step)
    assert calls == [("get_weather", '{"city": "Paris"}'), ("f", "{}")]
    # An undeclared function and a half tag are the model's text: returned, not dropped.
    assert content == 'Sure.\n\n bye <tool_call>{"name": "unknown"}</tool_call> <tool'


def test_hermes_unclosed_block_at_the_end_still_counts():
    content, calls, _ = run(HermesParser(NAMES), '<tool_call>{"name": "f", "parameters": {"a": 1}}', 2)
    assert content == "" and calls == [("f", '{"a": 1}')]


def test_hermes_without_calls_is_plain_text():
    text = "The weather <is> fine < tool_call > ok"
    content, calls, _ = run(HermesParser(NAMES), text, 1)
    assert content == text and calls == []


# ---- Llama 3.1+ JSON calls ----

from mlx_loom.server.tool_parsers import Delta, Llama3JsonParser  # noqa: E402
from mlx_loom.server.tools import tool_call_format  # noqa: E402

LLAMA3_NAMES = frozenset({"get_weather", "get_time"})


def _llama3(chunks: list[str]):
    p = Llama3JsonParser(LLAMA3_NAMES)
    deltas = [d for c in chunks for d in p.feed(c)] + p.finish()
    return merge(deltas)


def _pieces(text: str, n: int = 3) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("prefix", ["", "<|python_tag|>", "  "])
def test_llama3_json_calls_streamed_in_pieces(prefix):
    text = prefix + '{"name": "get_weather", "parameters": {"city": "Paris; FR"}}; {"name": "get_time", "parameters": {}}'
    content, calls = _llama3(_pieces(text))
    assert content == ""
    assert [(c.name, json.loads("".join(c.arguments))) for c in calls] == [
        ("get_weather", {"city": "Paris; FR"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", ["The weather is fine.", '{"name": "unknown", "parameters": {}}',
                                  '{"name": "get_weather", "parameters": {"city": "Pa', "<b>hi</b>", "<|python_tag|>"])
def test_llama3_text_and_non_calls_come_back_as_content(text):
    content, calls = _llama3(_pieces(text, 2))
    assert calls == [] and content == text


def test_llama3_text_streams_before_the_end():
    p = Llama3JsonParser(LLAMA3_NAMES)
    assert p.feed("Hel") == [Delta(content="Hel")] and p.feed("lo") == [Delta(content="lo")]


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_call_format_follows_the_models_template():
    llama3 = "{% if message.role == 'ipython' %}...<|python_tag|>{{ tool_call | tojson }}{% endif %}"
    assert tool_call_format(_Tok(llama3)) == "llama3_json"
    assert tool_call_format(_Tok("{% for tool in tools %}<tool_call>{% endfor %}")) == "hermes"
    assert tool_call_format(_Tok(None)) == "hermes"
