"""Test helpers for the HTTP server: a scripted fake engine, and servers on free ports.

FakeEngineClient has EngineClient's interface and answers from a script (no model), so the
route, SSE, stop-string and error tests run in milliseconds. `serve_in_thread` runs any app
under uvicorn on 127.0.0.1; `real_server` starts `python -m mlx_loom.server.cli serve` with the
default model in a subprocess, the way a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from mlx_loom.engine.client import EngineDeadError, RequestRejected
from mlx_loom.engine.messages import EngineStats, RequestOutput, TokenLogprob

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ēta", "θeta", "日本", "🙂"]


class ByteTokenizer:
    """Token id = UTF-8 byte + 3 (ids 0-2 are special): multi-byte characters span tokens."""

    eos_token_ids = (1,)
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = "" if skip_special_tokens else "".join("<s>" if i == 1 else "" for i in ids if i < 3)
        return specials + bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if any(m["role"] == "assistant" and m["content"] == "RAISE" for m in messages):
            raise ValueError("Conversation roles must alternate")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass(frozen=True)
class FakeInfo:
    model_name: str
    max_model_len: int
    tokenizer: ByteTokenizer
    num_blocks: int
    block_size: int
    grammar: object | None = None


class PassThroughGrammar:
    """A GrammarBackend stand-in that accepts every schema (the fake engine ignores grammars)."""

    def compile(self, spec):
        from mlx_loom.schemas.grammar import CompiledGrammar
        return CompiledGrammar(spec, "", 0.0)


def reply_text(prompt_ids, params) -> str:
    """The scripted answer: what follows "ECHO:" in the prompt (to its line end); else fixed when
    greedy, seeded words otherwise."""
    prompt = ByteTokenizer().decode(prompt_ids) if prompt_ids else ""
    if "ECHO:" in prompt:
        return prompt.split("ECHO:", 1)[1].split("\n", 1)[0]
    if params.temperature == 0:
        return "Hello, wörld! The answer is 42. STOP here 🙂 and more text follows."
    rng = random.Random(params.seed)
    return " ".join(rng.choice(WORDS) for _ in range(12))


class FakeEngineClient:
    """EngineClient's interface over a script. Prompt text markers: REJECT, DIE, SLOW."""

    def __init__(self, delay: float = 0.0, load_time: float = 0.0, fail_load: str | None = None,
                 max_model_len: int = 256, grammar: bool = False) -> None:
        self.delay, self.load_time, self.fail_load = delay, load_time, fail_load
        self.grammar = PassThroughGrammar() if grammar else None
        self.info: FakeInfo | None = None
        self.max_model_len = max_model_len
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.submitted: list[tuple[str, tuple[int, ...], object]] = []
        self._dead: str | None = None
        self.phase = "not started"

    @property
    def ready(self) -> bool:
        return self.info is not None and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    async def start(self) -> FakeInfo:
        self.phase = "loading the model"
        await asyncio.sleep(self.load_time)
        if self.fail_load:
            self._dead = f"model failed to load: {self.fail_load}"
            raise EngineDeadError(self._dead)
        self.info = FakeInfo("fake-model", self.max_model_len, ByteTokenizer(), num_blocks=64, block_size=16,
                             grammar=self.grammar)
        self.phase = "ready"
        return self.info

    async def generate(self, prompt_token_ids, params, request_id=None):
        if not self.ready:
            raise EngineDeadError(self._dead or "engine not ready")
        prompt = ByteTokenizer().decode(prompt_token_ids)
        self.submitted.append((request_id, tuple(prompt_token_ids), params))
        if "REJECT" in prompt:
            raise RequestRejected("request needs more KV blocks than the pool has")
        self.active.add(request_id)
        finished = False
        try:
            tokens = ByteTokenizer().encode(reply_text(prompt_token_ids, params))
            delay = 0.05 if "SLOW" in prompt else self.delay
            for i, tok in enumerate(tokens[: params.max_tokens]):
                await asyncio.sleep(delay)
                if "DIE" in prompt and i == 3:
                    raise EngineDeadError("engine crashed: boom")
                last = i + 1 == min(len(tokens), params.max_tokens)
                finish = ("length" if params.max_tokens <= len(tokens) else "stop") if last else None
                finished = last
                yield RequestOutput(request_id, (tok,), _logprobs(tok, params), finish,
                                    len(prompt_token_ids), num_cached_tokens=16 if len(prompt_token_ids) > 32 else 0)
        finally:
            self.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def stats(self) -> EngineStats | None:
        if self.info is None:
            return None  # as EngineClient: no stats until the model has loaded
        return EngineStats(len(self.active), 0, 64, 64 - 2 * len(self.active), 0, 0, 0, 0)

    async def shutdown(self) -> None:
        self._dead = "engine stopped"


def _logprobs(tok: int, params):
    if not params.wants_logprobs:
        return None
    top = tuple((tok + k, -0.25 - k) for k in range(params.top_logprobs))
    return (TokenLogprob(tok, -0.25, top),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None) -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 in a daemon thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_ready(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> list[int]:
    """Poll /health until 200; returns the statuses seen (503s while the model loads)."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            status = httpx.get(base_url + "/health", timeout=2).status_code
            seen.append(status)
            if status == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not become ready")


@contextlib.contextmanager
def real_server(*args: str) -> Iterator[str]:
    """`python -m mlx_loom.server.cli serve` with the default model on a free port; yields the base URL."""
    port = free_port()
    log_path = ROOT / ".pytest_cache" / f"server-{port}.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_loom.server.cli", "serve", "--port", str(port), *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(base, proc)
            except Exception:
                raise RuntimeError(f"server did not start; log:\n{log_path.read_text()[-4000:]}") from None
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
