"""Benchmarks: seeded prompt traces, replay under reuse policies, reports and plots (`chorus trace`, `chorus bench`)."""
