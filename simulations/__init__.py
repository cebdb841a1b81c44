"""Experiment drivers and experiment settings (TOML)."""
