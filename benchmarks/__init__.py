"""The benchmark runner (`python -m benchmarks`), its pieces, and the Locust scenarios."""
