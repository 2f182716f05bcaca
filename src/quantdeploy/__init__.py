"""quantdeploy: quantize a fine-tuned causal LM, measure what it cost, run it and serve it.

The stable public API::

    import quantdeploy as qd
    base = qd.load_model("path/or/model.gguf", adapter=None)
    q = qd.quantize(base, qd.RTNConfig(bits=4, group_size=64))
    qd.save(q, "out/")
    q2 = qd.load("out/")
    report = qd.evaluate({"int4": q2.model}, base, text_tokens)   # see quantdeploy.eval
    engine = qd.Engine.load("out/")                                # our runtime: KV cache, batching
    print(engine.generate("Tell me about Paris", qd.SamplingParams(max_tokens=64)).text)
"""

__version__ = "0.1.0"

from quantdeploy.errors import CheckpointError, ConfigError, DataError, ModelSourceError, QuantDeployError  # noqa: E402
from quantdeploy.engine import Completion, Engine, SamplingParams  # noqa: E402
from quantdeploy.formats import export  # noqa: E402
from quantdeploy.models import ModelBundle, load_model  # noqa: E402
from quantdeploy.pipeline import describe, generate, load, quantize, quantize_kv_cache, save  # noqa: E402
from quantdeploy.quant.calibration import CalibrationConfig  # noqa: E402
from quantdeploy.quant.kv_cache import KVCacheConfig  # noqa: E402
from quantdeploy.quant.methods.awq import AWQConfig  # noqa: E402
from quantdeploy.quant.methods.fp8 import FP8Config  # noqa: E402
from quantdeploy.quant.methods.gptq import GPTQConfig  # noqa: E402
from quantdeploy.quant.methods.nf4 import NF4Config  # noqa: E402
from quantdeploy.quant.methods.halfquad import HalfQuadConfig  # noqa: E402
from quantdeploy.quant.methods.rtn import RTNConfig  # noqa: E402
from quantdeploy.quant.methods.smoothquant import SmoothQuantConfig  # noqa: E402
from quantdeploy.quant.mixed import MixedConfig  # noqa: E402
from quantdeploy.quant.spec import QuantSpec  # noqa: E402
from quantdeploy.quant.targets import TargetConfig  # noqa: E402

__all__ = [
    "__version__", "Engine", "SamplingParams", "Completion", "load_model", "quantize", "quantize_kv_cache", "save", "load", "export", "generate", "describe", "ModelBundle",
    "RTNConfig", "NF4Config", "HalfQuadConfig", "FP8Config", "GPTQConfig", "AWQConfig", "SmoothQuantConfig", "MixedConfig", "CalibrationConfig", "KVCacheConfig", "QuantSpec", "TargetConfig",
    "QuantDeployError", "ConfigError", "ModelSourceError", "CheckpointError", "DataError",
]
