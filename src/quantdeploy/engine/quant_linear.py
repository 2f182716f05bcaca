"""QuantLinear and QuantEmbedding: modules that hold a quantized weight in the canonical layout.

They replace ``nn.Linear`` / ``nn.Embedding`` in a model. Their buffers are exactly the stored
tensors (``qweight``, ``scales``, ``zeros`` ...), so a state dict round-trips through the checkpoint
unchanged. ``forward`` goes through the kernels facade. ``prepare()`` repacks the weight for the fast
kernel of the device it sits on (after loading, on the target device; a spec with no kernel there is
dequantized once into ``compute_dtype``, ``kernels/dense.py``); the repacked copy is a plain attribute,
never saved, and dropped when the module moves. Without it, ``forward`` takes the
reference path (dequantize, then matmul).
"""

from __future__ import annotations

import torch
from torch import nn

from quantdeploy import kernels
from quantdeploy.quant import nf4
from quantdeploy.quant.primitives import QuantizedWeight, tensor_layout
from quantdeploy.quant.spec import QuantSpec


class _QuantWeightHolder(nn.Module):
    """Shared plumbing: buffers laid out by ``tensor_layout`` and a QuantizedWeight view over them."""

    def _init_buffers(self, spec: QuantSpec, out_features: int, in_features: int) -> None:
        self.spec = spec
        self._names = []
        for name, (shape, dtype) in tensor_layout(spec, out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
            self._names.append(name)

    def _fill(self, qw: QuantizedWeight) -> None:
        if set(qw.tensors) != set(self._names):
            raise ValueError(f"tensors {sorted(qw.tensors)} do not match layout {sorted(self._names)}")
        for name, tensor in qw.tensors.items():
            getattr(self, name).copy_(tensor)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.spec, self._shape(), {n: getattr(self, n) for n in self._names})

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Device moves are fine; a dtype cast would corrupt the stored codes and scales: refuse it
        # before anything is touched, by probing what ``fn`` does to each stored dtype.
        for name in self._names:
            dtype = getattr(self, name).dtype
            if fn(torch.zeros(1, dtype=dtype)).dtype != dtype:
                raise TypeError(f"{type(self).__name__}: casting '{name}' ({dtype}) would corrupt it; "
                                "move quantized models with .to(device) only")
        self.prepared = None  # a kernel's repacked copy belongs to the old device
        return super()._apply(fn, recurse)


class QuantLinear(_QuantWeightHolder):
    """``y = x @ W.T + b`` with ``W`` stored quantized. ``dtype`` is the compute dtype of bias/output."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self._init_buffers(spec, out_features, in_features)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.prepared: kernels.PreparedWeight | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantLinear":
        out_features, in_features = qw.shape
        module = cls(in_features, out_features, qw.spec, bias is not None, dtype)
        module._fill(qw)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def _shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def prepare(self, backend: str = "auto") -> str:
        """Repack the weight for the fastest kernel on its device; returns the backend chosen."""
        if self.spec.dtype == "nf4":  # its lookup tables on the device before anything compiles or captures
            nf4.tables_on(self.qweight.device)
        self.prepared = kernels.prepare(self.quantized_weight(), backend, self.compute_dtype)
        return "reference" if self.prepared is None else self.prepared.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared is not None:
            return self.prepared(x, self.bias)
        return kernels.qlinear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.describe()}"


class QuantEmbedding(_QuantWeightHolder):
    """Embedding table stored quantized, rows grouped along the embedding dimension."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype = dtype
        self._init_buffers(spec, num_embeddings, embedding_dim)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, dtype: torch.dtype) -> "QuantEmbedding":
        module = cls(qw.shape[0], qw.shape[1], qw.spec, dtype)
        module._fill(qw)
        return module

    def _shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.qembedding(ids, self.quantized_weight(), self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, spec={self.spec.describe()}"
