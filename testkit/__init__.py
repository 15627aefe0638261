"""Helpers for the tests, the benchmarks and the demo: tiny models written in the real
on-disk formats, free ports for local process groups. Not used by the library code."""
