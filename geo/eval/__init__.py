"""Evaluation: suites, metrics, published results, SQL and reports over predictions."""
