"""The cells stage: adaptive S2 partitions, heads, calibration, support spots."""
