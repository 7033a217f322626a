"""nsteer benchmarks: one module per section, sharing the timing harness (harness.py) and fixtures (fixtures.py)."""
