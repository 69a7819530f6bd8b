"""Benchmarks of hpcft on this machine (python -m bench); not part of the test suite."""
