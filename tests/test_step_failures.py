"""One failing request fails alone: an exception inside a step ends the requests that cause it
with a clear error, and the engine serves the rest (same tokens as without the failure)."""

from __future__ import annotations

import asyncio

import pytest

from engine_driver import chat_ids, make_core, run
from mlx_loom.engine.messages import AddRequest
from mlx_loom.sched.params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)
TEXTS = ["What is the capital of France?", "Name three colors.", "Say hello in Spanish.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def prompts(default_model):
    return [chat_ids(default_model.tokenizer, t) for t in TEXTS]


@pytest.fixture(scope="module")
def plain(default_model, prompts):
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    return {rid: r.tokens for rid, r in run(make_core(default_model), reqs).items()}


def _poison(core, bad: str, when=lambda row: True):
    """Make the runner raise on any step that holds a row of request `bad` (when(row) says so)."""
    execute = core.runner.execute

    def failing(rows, *args, **kwargs):
        if any(r.request_id == bad and when(r) for r in rows):
            raise IndexError("injected failure")
        return execute(rows, *args, **kwargs)

    core.runner.execute = failing


def test_a_failing_request_fails_alone_and_the_rest_are_unchanged(default_model, prompts, plain):
    core = make_core(default_model)
    _poison(core, "bad", when=lambda row: len(row.token_ids) == 1)  # its prefill runs, its first decode fails
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)] + [("bad", prompts[0], GREEDY)]
    got = run(core, reqs, join_step={"bad": 2})
    assert got["bad"].finish_reason == "error" and "IndexError: injected failure" in got["bad"].error
    assert {rid: r.tokens for rid, r in got.items() if rid != "bad"} == plain
    assert all(got[rid].error is None for rid in plain)
    assert core.scheduler.num_free_blocks == core.scheduler.num_blocks  # cached blocks count as free
    after = run(core, [("later", prompts[1], GREEDY)])["later"]  # and the engine serves on
    assert after.tokens == plain["r1"]


def test_a_request_failing_on_its_own_step_gets_an_engine_error(default_model, prompts):
    core = make_core(default_model)
    _poison(core, "solo")
    out = run(core, [("solo", prompts[0], GREEDY)])["solo"]
    assert out.finish_reason == "error" and "failed while running this request" in out.error
    assert not core.has_unfinished()


def test_a_failure_after_state_changed_fails_the_whole_step(default_model, prompts, monkeypatch):
    """Past sampling, a retry would append tokens twice: every request of that step fails, each gets
    its error (none hangs), and later requests are served."""
    core = make_core(default_model)
    calls = {"n": 0}
    advance = core.structured.advance

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected after sampling")
        return advance(*args, **kwargs)

    monkeypatch.setattr(core.structured, "advance", failing)
    got = run(core, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts[:2])])
    assert all(r.finish_reason == "error" and "injected after sampling" in r.error for r in got.values())
    assert run(core, [("next", prompts[2], GREEDY)])["next"].error is None


def test_a_failed_add_fails_that_request_not_the_engine(default_model, prompts):
    from mlx_loom.engine.thread import EngineThread

    thread = EngineThread.__new__(EngineThread)  # only _apply: no model load, no thread
    core = make_core(default_model)
    thread.core = core
    core.add = lambda msg: (_ for _ in ()).throw(KeyError("boom"))
    out = thread._apply(AddRequest("x", tuple(prompts[0]), GREEDY))
    assert out.finish_reason == "error" and out.blame == "engine" and "KeyError" in out.error


def test_client_maps_blame_to_the_right_exception():
    from mlx_loom.engine.client import EngineDeadError, RequestFailed, RequestRejected, _error
    from mlx_loom.engine.messages import RequestOutput

    def err(blame):
        return _error(RequestOutput("r", (), finish_reason="error", error="why", blame=blame))

    assert isinstance(err("engine"), RequestFailed)
    assert isinstance(err("request"), RequestRejected)
    assert isinstance(err(None), EngineDeadError)


def test_server_answers_a_step_failure_with_500_and_keeps_serving():
    from fastapi.testclient import TestClient

    from mlx_loom.engine.client import RequestFailed
    from mlx_loom.server.app import create_app
    from mlx_loom.server.settings import Settings
    from server_fixtures import ByteTokenizer, FakeEngineClient

    class Failing(FakeEngineClient):
        async def generate(self, prompt_token_ids, params, request_id=None):
            if "FAILSTEP" in ByteTokenizer().decode(prompt_token_ids):
                await asyncio.sleep(0)
                raise RequestFailed("the engine failed while running this request (IndexError: x)")
            async for out in super().generate(prompt_token_ids, params, request_id):
                yield out

    with TestClient(create_app(Settings(), client=Failing())) as c:
        body = {"messages": [{"role": "user", "content": "FAILSTEP"}], "max_tokens": 4}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "engine_step_failed" and "IndexError" in err["message"]
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True}).text
        assert "engine_step_failed" in streamed
        ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200 and c.get("/health").status_code == 200

