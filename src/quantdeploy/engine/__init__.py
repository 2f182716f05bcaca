"""The engine: QuantLinear modules, the static KV cache, sampling and the batched generation loop."""

from quantdeploy.engine.engine import Completion, Engine
from quantdeploy.engine.quant_linear import QuantEmbedding, QuantLinear
from quantdeploy.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "QuantEmbedding", "QuantLinear", "SamplingParams"]
