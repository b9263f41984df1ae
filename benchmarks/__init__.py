"""The benchmarks: each a module run from the repository root as `.venv/bin/python -m benchmarks.NAME`."""
