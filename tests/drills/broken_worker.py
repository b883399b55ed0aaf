"""A helper process for tests/drills/test_worker.py that cannot start: ``python -m
tests.drills.broken_worker`` fails at import, as a worker does whose code or environment is broken."""

from job.runtime.workers import serve, serve_nothing  # noqa: F401  (serve_nothing does not exist)
