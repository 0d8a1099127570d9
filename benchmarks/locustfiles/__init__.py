"""Locust scenarios against `POST /t2i`. Run them from the repository root (Locust puts the
working directory on `sys.path`, which is how they import `benchmarks.locustfiles.common`)."""
