"""The fusion stage: signals, the posterior over them, tuning and calibration."""
