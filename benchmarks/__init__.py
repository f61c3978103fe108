"""Benchmark suites (pytest-benchmark); see README.md. A package so its conftest does not shadow tests/conftest.py."""
