"""Quantization: specs, pure math (primitives, packing, nf4), targeting and the method registry."""
