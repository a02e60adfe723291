"""GET /metrics against the scripted fake engine: names, and counters that move by exact amounts."""

import collections
import json
import time

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import FakeEngineClient, serve_in_thread

P = "mlx_loom:"
ENGINE_SERIES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_kv_blocks_free",
                 "num_kv_blocks_total", "prefix_cache_hit_rate", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "engine_steps_total"]
REQUEST_SERIES = ["prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                  "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                  "request_prompt_tokens_count", "request_generation_tokens_count"]


def scrape(http) -> dict[tuple, float]:
    """Every sample as (name, sorted labels) -> value."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def val(samples: dict, name: str, **labels) -> float:
    return samples.get((P + name, tuple(sorted(labels.items()))), 0.0)


def names(samples: dict) -> set[str]:
    return {name.removeprefix(P) for name, _ in samples}


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def chat(http, content: str, **kw) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_counters_and_histograms_move_by_the_requests_served():
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as http:
        before = scrape(http)
        assert set(ENGINE_SERIES + REQUEST_SERIES) <= names(before)
        assert val(before, "generation_tokens_total") == 0
        usages = [chat(http, "hi", temperature=0, max_tokens=5)["usage"],  # length
                  chat(http, "ECHO:abc", max_tokens=50)["usage"],  # eos: stop
                  chat(http, "hi", temperature=0, max_tokens=100, stop=["STOP"])["usage"]]  # stop string
        stream = http.post("/v1/completions", json={"prompt": "ECHO:xyz", "max_tokens": 20, "stream": True,
                                                    "stream_options": {"include_usage": True}})
        usages.append(_last_usage(stream.text))
        after = scrape(http)
    k = len(usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert val(after, "request_success_total", finished_reason="length") == 1
    assert val(after, "request_success_total", finished_reason="stop") == 3
    assert val(after, "generation_tokens_total") == generated
    assert val(after, "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert val(after, hist + "_count") == k, hist
    assert val(after, "inter_token_latency_seconds_count") == generated - k  # the fake sends one token per output
    assert val(after, "request_generation_tokens_sum") == generated
    assert val(after, "time_to_first_token_seconds_bucket", le="+Inf") == k
    assert val(after, "num_kv_blocks_total") == 64 and val(after, "num_kv_blocks_free") == 64
    assert val(after, "kv_cache_usage_perc") == 0 and val(after, "num_requests_running") == 0


def _last_usage(sse_text: str) -> dict:
    chunks = [json.loads(b[len("data: "):]) for b in sse_text.split("\n\n") if b.startswith("data: {")]
    return chunks[-1]["usage"]


def test_each_of_n_choices_is_one_engine_request():
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as http:
        usage = chat(http, "hi", temperature=1.0, seed=3, n=3, max_tokens=4)["usage"]
        m = scrape(http)
    assert val(m, "request_success_total", finished_reason="length") == 3
    assert val(m, "time_to_first_token_seconds_count") == 3
    assert val(m, "generation_tokens_total") == usage["completion_tokens"] == 12
    assert val(m, "prompt_tokens_total") == 3 * usage["prompt_tokens"]  # usage counts the prompt once


def test_engine_errors_count_as_error_and_admission_refusals_not_at_all():
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "DIE"}]})
        assert r.status_code == 503
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "REJECT"}]})
        assert r.status_code == 400
        m = scrape(http)
    assert val(m, "request_success_total", finished_reason="error") == 1
    assert val(m, "e2e_request_latency_seconds_count") == 1
    assert val(m, "generation_tokens_total") == 3  # DIE fails after three tokens


def test_client_disconnect_counts_as_abort():
    fake = FakeEngineClient()
    with serve_in_thread(create_app(Settings(), client=fake)) as base:
        body = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 60, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body) as r:
            next(r.iter_lines())
        with httpx.Client(base_url=base) as http:
            wait_until(lambda: val(scrape(http), "request_success_total", finished_reason="abort") == 1)
            assert val(scrape(http), "request_success_total", finished_reason="stop") == 0


def test_answers_while_loading_without_engine_series():
    with TestClient(create_app(Settings(), client=FakeEngineClient(load_time=0.3))) as http:
        assert http.get("/health").status_code == 503
        loading = scrape(http)
        assert not set(ENGINE_SERIES) & names(loading)
        assert set(REQUEST_SERIES) <= names(loading)
        wait_until(lambda: http.get("/health").status_code == 200)
        assert set(ENGINE_SERIES) <= names(scrape(http))


def test_rejections_are_read_from_server_state():
    app = create_app(Settings(), client=FakeEngineClient())
    with TestClient(app) as http:
        app.state.loom.rejected = collections.Counter({"queue_full": 2, "prompt_too_long": 1})
        m = scrape(http)
    assert val(m, "request_rejected_total", reason="queue_full") == 2
    assert val(m, "request_rejected_total", reason="prompt_too_long") == 1


def test_apps_keep_separate_registries():
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as a, \
            TestClient(create_app(Settings(), client=FakeEngineClient())) as b:
        chat(a, "ECHO:abc")
        assert val(scrape(a), "generation_tokens_total") == 3
        assert val(scrape(b), "generation_tokens_total") == 0


def test_openmetrics_accept_still_gets_the_text_format_with_colons():
    """prometheus_client's OpenMetrics encoder would rename samples but not HELP/TYPE (client_python#1177)."""
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as http:
        r = http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "\nmlx_loom:prompt_tokens_total 0.0\n" in r.text and "mlx_loom_" not in r.text


def test_speculative_decoding_series_and_usage_extension():
    from mlx_loom.engine.messages import EngineStats
    from mlx_loom.server.metrics import engine_families
    from mlx_loom.server.output import ChoiceEvent, ChoiceSpec, Collector

    stats = EngineStats(num_running=0, num_waiting=0, num_blocks_total=8, num_blocks_free=8, num_preemptions=0,
                        prefix_cache_queries=0, prefix_cache_hits=0, steps=3, spec_enabled=True,
                        spec_num_drafts=10, spec_proposed=(40, 12), spec_accepted=(28, 6))
    samples = {(s.name, tuple(s.labels.items())): s.value for f in engine_families(stats) for s in f.samples}
    assert samples[("mlx_loom:spec_decode_num_drafts_total", ())] == 10
    assert samples[("mlx_loom:spec_decode_num_draft_tokens_total", (("level", "1"),))] == 40
    assert samples[("mlx_loom:spec_decode_num_accepted_tokens_total", (("level", "2"),))] == 6
    assert samples[("mlx_loom:spec_decode_mean_accepted_length", ())] == 1 + 28 / 10
    plain = EngineStats(0, 0, 8, 8, 0, 0, 0, 3)
    assert not any("spec_decode" in f.name for f in engine_families(plain))

    c = Collector([ChoiceSpec(0, [1, 2, 3], None, "r0")], 1)
    c.add(ChoiceEvent(0, "ab", (5, 6), (), None, 3, 0, 4, 3))
    c.add(ChoiceEvent(0, "c", (7,), (), "stop", 3, 0, 8, 5))
    assert c.usage()["speculative_decoding"] == {"draft_tokens": 8, "accepted_tokens": 5, "acceptance_rate": 0.625}
    c2 = Collector([ChoiceSpec(0, [1], None, "r1")], 1)
    c2.add(ChoiceEvent(0, "x", (5,), (), "stop", 1, 0))
    assert "speculative_decoding" not in c2.usage()
