"""Admission control against the fake engine: 429 + Retry-After over the cap, slots always given
back, API keys, and the bounded drain at shutdown."""

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from mlx_loom.server.admission import Admission
from mlx_loom.server.app import create_app
from mlx_loom.server.errors import ApiError
from mlx_loom.server.graceful import make_server
from mlx_loom.server.settings import Settings
from server_fixtures import FakeEngineClient, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 4}
KEY = "sk-test-5ecret"


def slow_chat(tokens: int, **extra) -> dict:
    """A chat request the fake engine answers at 0.05 s per token, `tokens` tokens long."""
    return {"messages": [{"role": "user", "content": "SLOW ECHO:" + "x" * tokens}], "max_tokens": tokens, **extra}


@contextlib.contextmanager
def running(settings: Settings, fake: FakeEngineClient):
    """The app under the production server class (uvicorn + drain) in a thread: (server, base URL, state)."""
    app = create_app(settings, client=fake)
    server = make_server(app, "127.0.0.1", free_port(), "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive())
    assert server.started, "uvicorn did not start"
    try:
        yield server, f"http://127.0.0.1:{server.config.port}", app.state.loom
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "server did not stop"


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


async def async_wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


async def read_stream(http: httpx.AsyncClient, body: dict, leave: asyncio.Event | None = None) -> list:
    """SSE payloads of a streamed request; with `leave`, disconnect once it is set."""
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text = ""
        async for chunk in r.aiter_text():
            text += chunk
            if leave is not None:
                await leave.wait()
                break
    return sse(text)


# ---- queue cap ----

def test_over_the_cap_is_429_with_retry_after_then_slots_come_back():
    fake = FakeEngineClient(max_model_len=2048)
    with running(Settings(max_num_seqs=1, max_queued_requests=1), fake) as (_, base, state):
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                # Hold both slots with streams, then leave them: a disconnect gives the slots back.
                leave = asyncio.Event()
                held = [asyncio.create_task(read_stream(http, slow_chat(200), leave)) for _ in range(2)]
                await async_wait_until(lambda: len(fake.active) == 2)
                r = await http.post("/v1/chat/completions", json=CHAT)
                err = assert_error(r, 429, "too_many_requests")
                assert r.headers["Retry-After"] == "1" and "retry" in err["message"]
                assert_error(await http.post("/v1/completions", json={"prompt": "x"}), 429, "too_many_requests")
                leave.set()
                await asyncio.gather(*held)
            await async_wait_until(lambda: state.admission.in_flight == 0 and not fake.active)
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
                # Two choices fit the cap of 2; three never can: a 400 naming n, not a 429 to retry forever.
                assert (await http.post("/v1/chat/completions", json={**CHAT, "n": 2})).status_code == 200
                err = assert_error(await http.post("/v1/chat/completions", json={**CHAT, "n": 3}), 400)
                assert err["param"] == "n" and "--max-queued-requests" in err["message"]

        asyncio.run(go())
        assert state.rejected["queue_full"] == 2 and state.admission.in_flight == 0


def test_n_counts_as_n_engine_requests():
    fake = FakeEngineClient(max_model_len=2048)
    with running(Settings(max_num_seqs=2, max_queued_requests=1), fake) as (_, base, state):
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                leave = asyncio.Event()
                held = asyncio.create_task(read_stream(http, slow_chat(200, n=2), leave))
                await async_wait_until(lambda: len(fake.active) == 2)
                assert_error(await http.post("/v1/chat/completions", json={**CHAT, "n": 2}), 429)
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200  # the third slot
                leave.set()
                await held

        asyncio.run(go())
        wait_until(lambda: state.admission.in_flight == 0)


def test_slots_come_back_after_finish_error_and_disconnect():
    fake = FakeEngineClient(max_model_len=2048)
    with running(Settings(max_num_seqs=1, max_queued_requests=0), fake) as (_, base, state):
        cases = [
            ("/v1/chat/completions", CHAT, 200),
            ("/v1/chat/completions", {**CHAT, "stream": True}, 200),
            ("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}, 200),
            ("/v1/chat/completions", {**CHAT, "max_tokens": None, "stop": ["STOP"]}, 200),  # stop string aborts
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "REJECT"}]}, 400),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "DIE"}]}, 503),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "DIE"}], "stream": True}, 200),
            ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400),  # refused before admission
        ]
        with httpx.Client(base_url=base, timeout=30) as http:
            for path, body, status in cases:
                assert http.post(path, json=body).status_code == status, (path, body)
                wait_until(lambda: state.admission.in_flight == 0)
            with http.stream("POST", "/v1/chat/completions", json={**slow_chat(200), "stream": True}) as r:
                lines = r.iter_lines()  # kept: a dropped iterator closes the response
                next(lines)
                assert state.admission.in_flight == 1
        wait_until(lambda: state.admission.in_flight == 0 and not fake.active)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(base + "/v1/chat/completions", json=slow_chat(200), timeout=0.5)
        wait_until(lambda: state.admission.in_flight == 0 and not fake.active)
        assert httpx.post(base + "/v1/chat/completions", json=CHAT).status_code == 200  # the one slot is free
        assert state.rejected["queue_full"] == 0


# ---- API key ----

@pytest.fixture
def keyed():
    fake = FakeEngineClient()
    with TestClient(create_app(Settings(api_key=KEY), client=fake)) as http:
        yield http


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_v1_routes_need_the_key(keyed, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/engine/stats"), ("GET", "/v1/nothing")):
        r = keyed.request(method, path, json=CHAT, headers=headers)
        err = assert_error(r, 401, "invalid_api_key")
        assert err["type"] == "invalid_request_error" and "Authorization" in err["message"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.app.state.loom.rejected["unauthorized"] == 5


def test_right_key_is_served_and_probes_stay_public(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    assert keyed.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    for path in ("/health", "/docs", "/openapi.json", "/metrics"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.app.state.loom.rejected["unauthorized"] == 0


def test_openai_sdk_sends_the_key():
    fake = FakeEngineClient()
    with running(Settings(api_key=KEY), fake) as (_, base, _state):
        good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="fake-model", **CHAT).choices[0].message.content
        bad = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# ---- shutdown ----

def test_draining_refuses_new_requests_with_503():
    fake = FakeEngineClient()
    with TestClient(create_app(Settings(), client=fake)) as http:
        state = http.app.state.loom
        http.portal.call(state.begin_shutdown)  # on the app's event loop, as the server does
        assert_error(http.post("/v1/chat/completions", json=CHAT), 503, "server_shutting_down")
        assert_error(http.post("/v1/completions", json={"prompt": "x"}), 503, "server_shutting_down")
        assert_error(http.get("/health"), 503)
        assert state.rejected["shutting_down"] == 2 and not fake.submitted


def test_shutdown_lets_short_requests_finish_and_stops_long_ones_cleanly():
    fake = FakeEngineClient(max_model_len=2048)
    settings = Settings(shutdown_timeout=4)
    with running(settings, fake) as (server, base, state):
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                short = asyncio.create_task(http.post("/v1/chat/completions", json=slow_chat(20)))  # ~1 s
                long_plain = asyncio.create_task(http.post("/v1/chat/completions", json=slow_chat(400)))
                long_stream = asyncio.create_task(read_stream(http, slow_chat(400)))
                await async_wait_until(lambda: len(fake.active) == 3)
                server.should_exit = True  # what SIGTERM/SIGINT do
                return await asyncio.gather(short, long_plain, long_stream)

        short, long_plain, events = asyncio.run(go())
        assert short.status_code == 200 and short.json()["choices"][0]["message"]["content"] == "x" * 20
        assert "grace period" in assert_error(long_plain, 503, "server_shutting_down")["message"]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert fake.dead_reason == "engine stopped" and not fake.active  # then the engine stopped
    assert state.admission.in_flight == 0 and len(fake.aborted) == 2


def test_guard_stops_parked_and_late_consumers_but_leaves_other_cancellations_alone():
    async def forever():
        yield 1
        await asyncio.sleep(3600)
        yield 2

    async def first_then_next(guarded):
        assert await anext(guarded) == 1
        return await anext(guarded)

    async def go():
        admission = Admission(1, 0, Counter())
        task = asyncio.create_task(first_then_next(admission.guard(forever())))
        await asyncio.sleep(0.05)
        task.cancel()  # e.g. the client left: still a plain cancellation
        with pytest.raises(asyncio.CancelledError):
            await task
        parked = asyncio.create_task(first_then_next(admission.guard(forever())))
        await asyncio.sleep(0.05)
        admission.begin_drain(0.05)
        with pytest.raises(ApiError, match="grace period") as stopped:
            await parked
        assert stopped.value.status == 503 and stopped.value.code == "server_shutting_down"
        with pytest.raises(ApiError, match="grace period"):  # arriving after the deadline
            await anext(admission.guard(forever()))

    asyncio.run(go())
