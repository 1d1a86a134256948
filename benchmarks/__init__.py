"""Benchmark scripts: each prints the ratios it measures side by side in one run, ending in a
`ratio R` line where it has one (docs/benchmarks.md lists them with their figures). Run them as
files (``python benchmarks/pipeline.py``) or as modules (``python -m benchmarks.pipeline``); a file
re-executes itself as its module first (``launch/__init__.py`` says why)."""
