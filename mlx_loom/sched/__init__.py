"""Continuous-batching scheduling, pure Python (never imports mlx).

config (frozen engine configuration), params (sampling parameters), request, block_pool (KV pages
with prefix hashing), kv_cache_manager (a request's pages), scheduler (which tokens of which
requests run in each step, under a token budget; preemption).
"""
