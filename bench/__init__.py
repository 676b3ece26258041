"""Benchmarks (`pytest bench --benchmark-only`) and the GPU report; a package so `bench.*` imports resolve."""
