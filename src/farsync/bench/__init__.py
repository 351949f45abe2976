"""Benchmarks that train real models: `farsync bench ...`.

``quality``: data-parallel vs DiLoCo vs Streaming DiLoCo on the same model, data, token
budget and seed — final loss against bytes sent (:mod:`farsync.bench.quality`).
"""
