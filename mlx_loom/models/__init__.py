"""Models: loading (mlx-lm dirs, Hugging Face dirs, hub ids, GGUF), what they need from the engine.

loader (load_model: weights, quantization, routing, backend description), gguf_arch (GGUF
architectures mapped onto mlx-lm models), tokenizer (tokenizers, chat templates, detokenization),
layout (the model's KV layout and structural checks), routing (the loader's switch of known
mlx-lm leaf modules to native kernels). tokenizer never imports mlx.
"""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before any mlx import)
