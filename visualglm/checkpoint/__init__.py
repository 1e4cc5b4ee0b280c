"""Checkpoint formats: key maps (data), loading into a model built on the meta device, conversion."""
