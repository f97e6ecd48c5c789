"""Benchmark harness for infercc (not part of the installed package).

Run from the repository root: ``python -m benchmarks --list`` or
``python -m benchmarks roundtrip --rounds 5 --mode fresh --out DIR``.
"""
