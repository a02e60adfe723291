"""The engine: one thread that owns every MLX array, and the asyncio-facing client in front of it.

thread (EngineThread: start, inbox, stop), core (EngineCore: one step = schedule, forward, sample,
update; load-time checks), client (EngineClient for the event loop), messages (what crosses threads),
info (what the server learns at start-up), pipeline (whether the next decode step launches before
the host sees this one's tokens), warm_up. client, thread, messages and info never import mlx.
"""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before any mlx import)
