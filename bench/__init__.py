"""Benchmarks of relay: `python bench/run.py` (against baselines) and `python bench/rules.py`."""
