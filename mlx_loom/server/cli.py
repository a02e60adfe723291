"""`mlx-loom` console script: `mlx-loom serve [options]` (options documented by --help), and
`mlx-loom search-patterns` (offline sparse-prefill pattern search, mlx_loom/models/search_patterns.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mlx_loom.models.model_source import ModelSourceError, is_hub_id, resolve_hub_model
from mlx_loom.server.settings import Settings, add_arguments, from_namespace, launched_rank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-loom", description="OpenAI-compatible LLM server on MLX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/models, /health, docs at /docs). Every option can also be "
                    "set with an environment variable MLX_LOOM_<OPTION>; the command line wins.")
    add_arguments(serve)
    search = commands.add_parser(
        "search-patterns", help="Search per-head sparse prefill patterns (MInference) for a model.",
        description="Prefill calibration text and pick, per attention head, the sparse pattern with the "
                    "lowest output error at a compute budget (dense where none is good enough); writes "
                    "MInference's JSON config.")
    _add_search_arguments(search)
    return parser


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    from mlx_loom.kernels.search_settings import add_arguments as add_search  # pure Python, no mlx

    add_search(parser)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as exc:  # a malformed MLX_LOOM_* variable
        print(f"mlx-loom: error: {exc}", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    if ns.command == "search-patterns":
        from mlx_loom.models.search_patterns import run  # imports mlx: only for this command

        return run(ns)
    try:
        settings = from_namespace(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if settings.model is not None and is_hub_id(settings.model):
        try:  # before the server starts: a download shows its progress here, a miss exits with the reason
            resolve_hub_model(settings.model)
        except ModelSourceError as exc:
            print(f"mlx-loom serve: error: {exc}", file=sys.stderr)
            return 2
    serve(settings)
    return 0


def serve(settings: Settings) -> None:
    from mlx_loom.server.app import create_app
    from mlx_loom.server.graceful import make_server

    logging.basicConfig(level=_py_level(settings.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if launched_rank():  # rank 1, 2, ... of an mlx.launch group: run rank 0's steps, no HTTP
        from mlx_loom.engine.follower import run_follower

        run_follower(settings.engine_config())
        return
    app = create_app(settings)
    make_server(app, settings.host, settings.port, settings.log_level).run()


def _py_level(name: str) -> int:
    return logging.DEBUG if name == "trace" else getattr(logging, name.upper())


if __name__ == "__main__":
    sys.exit(main())
