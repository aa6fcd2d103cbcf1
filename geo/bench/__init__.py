"""Benchmarks: suites, metrics, published results, predictions SQL and reports.

Entry points: :func:`geo.bench.runner.run_suite` (Python) and
:func:`geo.bench.cli.register` (adds ``geo bench``, ``geo sql``, ``geo report``).
"""
