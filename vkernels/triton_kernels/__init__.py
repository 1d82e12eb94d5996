"""Triton kernels and their pure launchers, one op family per module."""
