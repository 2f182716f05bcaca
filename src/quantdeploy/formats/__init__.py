"""Checkpoint formats: the canonical quantdeploy folder (exporters to other engines come later)."""

from quantdeploy.formats.checkpoint import FORMAT_VERSION, is_checkpoint, read_checkpoint, write_checkpoint

__all__ = ["FORMAT_VERSION", "is_checkpoint", "read_checkpoint", "write_checkpoint"]
