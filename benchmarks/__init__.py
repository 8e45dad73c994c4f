"""lcl-fast benchmarks: every heavy component and a whole training step against ``reference``.

Run with ``pytest benchmarks/ --benchmark-only`` (the plain test command skips them); sizes
follow the device (``LCL_BENCH_SCALE=smoke|small|full`` overrides). ``python -m
benchmarks.report <json>`` turns a ``--benchmark-json`` file into ``RESULTS.md`` and a plot.
"""
