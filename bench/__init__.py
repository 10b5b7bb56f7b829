"""Benchmarks run by hand against a production-shaped Tollgate (see bench/README.md)."""
