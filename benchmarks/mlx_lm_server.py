"""mlx_lm.server on the same footing as mlx-loom: the same float32 weights, the same OpenBLAS.

`mlx_lm.server` cannot read GGUF, so `convert` writes the default model (or any GGUF) as an
mlx-lm model directory once: weights exactly as mlx_loom/models/loader.py loads them (dequantized to
float32, q/k rows already un-permuted), saved with mlx-lm's own `save_model` / `save_config`,
plus a tokenizer.json from our tokenizer and a tokenizer_config.json carrying the chat
template and the bos/eos tokens. `serve` preloads the same system OpenBLAS that mlx-loom uses
(mlx_loom/kernels/blas.py: ctypes, RTLD_GLOBAL, before mlx is imported) and then runs
`mlx_lm.server`'s own main() with the remaining arguments.

    .venv/bin/python benchmarks/mlx_lm_server.py convert --out benchmarks/.cache/smollm2-mlx-f32
    .venv/bin/python benchmarks/mlx_lm_server.py serve --model benchmarks/.cache/smollm2-mlx-f32 --port 8081
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
FORMAT_VERSION = 1  # bump to invalidate cached conversions


def default_out_dir(gguf: str | None = None) -> Path:
    name = Path(gguf).stem if gguf else "SmolLM2-135M-Instruct.Q4_1"
    return CACHE / f"{name}-mlx-f32"


def convert(out: Path, gguf: str | None = None, force: bool = False) -> Path:
    """Write (once) an mlx-lm directory of the GGUF's float32 weights; returns its path."""
    stamp = out / "mlx_loom_convert.json"
    if stamp.is_file() and not force:
        try:
            if json.loads(stamp.read_text()).get("format") == FORMAT_VERSION:
                return out
        except ValueError:
            pass
    sys.path.insert(0, str(ROOT))
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    from mlx_loom.models.loader import default_model_path, load_model

    src = gguf or default_model_path()
    loaded = load_model(src, dequantize=True)
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.dtype == mx.float32, loaded.dtype
    out.mkdir(parents=True, exist_ok=True)
    if out.parent == CACHE:
        (CACHE / ".gitignore").write_text("*\n")  # never committed
    save_model(out, model)
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    config["model_type"] = "llama"
    config["torch_dtype"] = "float32"
    # Every id our tokenizer stops on (eos plus end-of-turn control tokens), so both servers
    # stop on the same tokens.
    config["eos_token_id"] = sorted(tok.eos_token_ids)
    if tok.bos_token_id is not None:
        config["bos_token_id"] = tok.bos_token_id
    save_config(config, out / "config.json")
    tok.backend.save(str(out / "tokenizer.json"))
    name = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": tok.chat_template,
        "bos_token": name(tok.bos_token_id),
        "eos_token": name(tok.eos_token_id),
        "pad_token": name(tok.eos_token_id),
        "add_bos_token": bool(tok.add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": loaded.max_model_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    stamp.write_text(json.dumps({"format": FORMAT_VERSION, "source": src, "dtype": "float32"}) + "\n")
    return out


def serve(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from mlx_loom.kernels import blas  # ctypes only; importing the package already preloads

    path = blas.loaded_path() or blas.preload()
    print(f"mlx_lm_server wrapper: BLAS preloaded: {path}", file=sys.stderr, flush=True)
    from mlx_lm.server import main

    sys.argv = ["mlx_lm.server", *argv]
    main()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("convert", "serve"):
        sys.exit(__doc__)
    if sys.argv[1] == "serve":
        return serve(sys.argv[2:])
    import argparse

    ap = argparse.ArgumentParser(prog="mlx_lm_server.py convert")
    ap.add_argument("--gguf", default=None, help="GGUF to convert (default: the embedded model)")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/.cache/<name>-mlx-f32)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(sys.argv[2:])
    out = convert(Path(args.out) if args.out else default_out_dir(args.gguf), args.gguf, args.force)
    print(out)


if __name__ == "__main__":
    main()
