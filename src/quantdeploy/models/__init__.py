"""Models: loading source checkpoints (HF folders, GGUF, LoRA adapters, the bundled model)."""

from quantdeploy.models.bundle import ModelBundle, SourceInfo
from quantdeploy.models.loading import load_model

__all__ = ["ModelBundle", "SourceInfo", "load_model"]
