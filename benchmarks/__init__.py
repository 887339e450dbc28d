"""Benchmark cases, one op per file (``benchmarks/bench_<op>.py``).

Shipped inside the package as ``llmfast.benchmarks`` so that ``llmfast bench``
and ``pytest benchmarks/`` (pytest-benchmark) time the same cases.
"""
