"""Serving one model over every rank of an `mx.distributed` group (`mlx.launch -- mlx-loom serve`).

Rank 0 runs the HTTP server, the scheduler and sampling; every rank runs each step on its shard
(mlx-lm's own `shard()` for tensor parallel, `pipeline()` for pipeline parallel). What a step needs
crosses once per step as int32 frames over the group (`wire.py`, `channel.py`). Nothing here is
imported by a single-process server.
"""
