"""The engine: modules and runtime that execute quantized models (QuantLinear so far)."""

from quantdeploy.engine.quant_linear import QuantEmbedding, QuantLinear

__all__ = ["QuantEmbedding", "QuantLinear"]
