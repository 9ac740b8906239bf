"""Random tiny models for tests and benchmarks (no test may download a checkpoint).
The runtime never imports this package (tests/test_structure.py checks it)."""
