"""mlx-loom: an OpenAI-compatible LLM inference server on MLX.

One import namespace for everything we ship: `mlx_loom.server` (FastAPI front end, never imports
mlx), `mlx_loom.engine` (the engine thread and its client), `mlx_loom.sched` (scheduling, pure
Python), `mlx_loom.models` (loading), `mlx_loom.worker` (running a step), `mlx_loom.sample`,
`mlx_loom.spec` (speculative decoding), `mlx_loom.kernels` (compute kernels) and `mlx_loom.schemas`
(structured output); docs/ARCHITECTURE.md has the map. Importing this package imports nothing else.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlx-loom")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
