"""EngineClient: the asyncio face of the engine thread (real default model)."""

import asyncio
import time

import pytest

from engine_driver import chat_ids
from mlx_loom.engine.client import EngineClient, EngineDeadError, RequestRejected
from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
from mlx_loom.sched.params import SamplingParams

CONFIG = EngineConfig(cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=512))


async def wait_free(client: EngineClient, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        s = await client.stats()
        if s is not None and s.num_running == 0 and s.num_blocks_free == s.num_blocks_total:
            return s
        assert time.monotonic() < deadline, f"blocks not freed: {s}"
        await asyncio.sleep(0.02)


def test_stream_abort_reject_and_shutdown():
    async def scenario():
        client = EngineClient(CONFIG)
        info = await client.start()
        assert client.ready and info.max_model_len == 512
        prompt = chat_ids(info.tokenizer, "What is the capital of France?")
        greedy = SamplingParams(max_tokens=12, temperature=0.0)

        deltas = [out async for out in client.generate(prompt, greedy)]
        tokens = [t for d in deltas for t in d.new_token_ids]
        assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        assert "Paris" in info.tokenizer.decode(tokens)
        assert deltas[-1].num_prompt_tokens == len(prompt)

        # Two concurrent requests: both finish, same tokens as alone.
        async def text():
            return [t async for d in client.generate(prompt, greedy) for t in d.new_token_ids]
        assert await asyncio.gather(text(), text()) == [tokens, tokens]

        # Leaving the stream early aborts the request and frees its blocks.
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        async for _ in client.generate(prompt, long):
            break
        await wait_free(client)

        with pytest.raises(RequestRejected, match="context"):
            async for _ in client.generate(list(range(600)), greedy):
                pass

        await client.shutdown()
        assert not client.ready
        with pytest.raises(EngineDeadError):
            async for _ in client.generate(prompt, greedy):
                pass

    asyncio.run(scenario())
