"""Checkpoints whose config nests the text model's settings in `text_config` (Ministral 3 and
Mistral Small 4 as mistral3, Gemma 4 as gemma4): the context length, vocabulary size and head count
are the text model's, and a prompt longer than 4096 tokens is served."""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import pytest

from engine_driver import make_core, run
from mlx_loom.models.loader import load_model
from mlx_loom.sched.params import SamplingParams
from tiny_archs import WRAPPED, make_wrapped_arch_dir

LONG = 4200  # past the 4096 a missing context length fell back to


@pytest.mark.parametrize("case", sorted(WRAPPED))
def test_nested_text_config_gives_the_text_models_settings_and_serves_long_prompts(case, tmp_path):
    loaded = load_model(str(make_wrapped_arch_dir(tmp_path / case, case)))
    text = WRAPPED[case]["text_config"]
    assert loaded.max_model_len == text["max_position_embeddings"] > 4096
    assert loaded.vocab_size == text["vocab_size"]  # not the tokenizer's 259 (mistral3 has no top-level one)
    assert loaded.num_heads == text["num_attention_heads"]
    core = make_core(loaded, num_blocks=300, max_num_seqs=2, budget=512)
    assert core.info.max_model_len > LONG
    prompt = [3 + (13 * i + 7) % 250 for i in range(LONG)]
    out = run(core, [("long", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))])["long"]
    assert out.error is None and len(out.tokens) == 4 and out.finish_reason == "length"
