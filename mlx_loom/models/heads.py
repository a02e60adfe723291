"""Which mlx-lm model classes end in a plain head, so the generic path may run the head on the
sampled positions only (mlx_loom/worker/generic_forward.py).

Listed by class, read from each class's source: its call is `head(self.model(inputs, cache))`, the
head being `lm_head` or the tied embedding's `as_linear`, chosen as the class chooses it. Never
decided by comparing outputs on a probe: a clamp or scale a probe does not reach would be dropped.
A class not listed (gemma2's softcap, granite's and cohere's logit scales, any subclass) runs whole.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels.mlx_lm_classes import mlx_lm_classes

Head = Callable[[mx.array], mx.array]

# How each listed Model class picks its head: from args.tie_word_embeddings, its own
# tie_word_embeddings attribute, always lm_head, or always the embedding.
_ARGS_TIED = ("llama", "qwen2", "qwen3", "qwen3_moe", "phi3", "olmo2", "olmoe", "starcoder2", "mixtral",
              "exaone4", "ministral3", "internlm3")
_LM_HEAD = ("qwen2_moe", "glm4", "deepseek_v2", "deepseek_v3", "gpt_oss", "step3p5")
_EMBED = ("gemma",)
_SELF_TIED = ("gemma3_text",)

HEAD_RULES: dict[str, frozenset[type]] = {
    "args_tied": mlx_lm_classes(*_ARGS_TIED),
    "lm_head": mlx_lm_classes(*_LM_HEAD),
    "embed": mlx_lm_classes(*_EMBED),
    "self_tied": mlx_lm_classes(*_SELF_TIED),
}


def _tied(model: nn.Module, rule: str) -> bool:
    if rule == "args_tied":
        return bool(model.args.tie_word_embeddings)
    if rule == "self_tied":
        return bool(model.tie_word_embeddings)
    return rule == "embed"


def plain_head(model: nn.Module) -> Head | None:
    """The head h -> logits when `model` is exactly (not a subclass of) a listed class, whose call is
    head(model.model(x)); None otherwise (the whole model then runs)."""
    rule = next((r for r, classes in HEAD_RULES.items() if type(model) in classes), None)
    if rule is None:
        return None
    if _tied(model, rule):  # looked up per call: the self-check may give the embedding its own class back
        return lambda h: model.model.embed_tokens.as_linear(h)
    return model.lm_head
