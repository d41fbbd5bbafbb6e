"""Benchmarks: `python -m bench [names...]`. Each `bench/<name>.py` with a `main()` is one benchmark.

They print a table and write bench/results/<name>.json with the machine they ran on. They are not
tests: run them on a quiet machine, one at a time.
"""
