"""Measurement harnesses that calibrate moesim against real hardware."""
