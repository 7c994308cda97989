"""Benchmark scripts (a package, so that opacus's top-level `benchmarks` package cannot shadow it)."""
