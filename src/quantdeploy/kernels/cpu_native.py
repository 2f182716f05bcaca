"""Our own CPU kernels for weight-only int4 and int8 layers (``cpu_native.cpp``), built once per machine.

Why they exist: PyTorch's packed CPU kernels (``cpu_packed.py``) are no faster than an fp32 matmul on the
bundled SmolLM2's layer shapes at one row of activations, on a 2-core AVX2 EPYC: 3072x576 int4 g32 183 µs
against 186 µs fp32, while its 0.9 MB of codes take ~50 µs to read; llama.cpp's whole Q4_0 decode step
took 6.0 ms there against our 17.7 ms (``benchmarks/cpu_kernels.py``, ``benchmarks/engine_cpu.py``).

How: each row of activations is rounded to int16 with one fp32 scale per block of 32 (each value moves by
at most 2^-16 of its block's largest magnitude: finer than the bf16 rounding the packed kernels need, and
than the 8-bit activations of llama.cpp's dot products; an outlier channel spoils only its own block).
The codes are widened to int16 and multiplied into the activations' codes with ``vpmaddwd``, eight
blocks (a chunk) at a time: both are stored interleaved (``kernel_order``) so that each int32 lane of the
sixteen products gathers one block's dot product, exact in int32 (and in fp32 under 2^24: int4); the
zero points come off in int32 (the code's zero times the block's sum of activation codes), then the
eight totals are scaled by the eight activation scales times the weight scales with one FMA. No
horizontal sum per block, no scalar scale per block: one thread, one row, a 512x1536 int4 g32 layer in
cache, 3.4 cycles a block against 5.0 for one block at a time (int8 per channel 3.5 against 4.1); eight
rows 1.9 against 2.9. Up to four rows share each unpacked chunk; channels are split over torch's
intra-op threads. Whole engine: record ``results/engine-cpu-vs-llamacpp-smollm2-avx2.txt``. Tests bound
the difference to the reference by what the int16 rounding can cost each output.

W8A8 int8 (``w8a8_mm``, used by ``cpu_w8a8.py`` where ``torch._int_mm`` has no VNNI kernel): the tokens
quantized to int8 per token inside the op, exactly as the reference does, the same integer dots, the
scales applied in the reference's order: its bits.

Decode attention (``decode_attention``, ``cpu_attention.cpp``, built into the same library): one query per
row against that row's own positions, read block by block through the paged cache's block table, the
query heads of a KV head scored together, fp32 math over fp32 or bf16 caches. It replaced, where it can
serve (``attends``), both attention paths of a CPU decode step: the in-graph reduction over every
reserved position and the gather of the longest row's blocks (bundled SmolLM2, one row of ~170
positions, 2 cores: ~25 µs a layer against ~90; the compiled int8 step at eight rows 45 ms against 59).

Layouts, made once when a weight is prepared (the checkpoint keeps its canonical layout), each row in
``kernel_order`` (chunks of 256 values interleaved, the blocks past the last chunk as they are):
- int4: ``codes`` uint8 ``[n, k/2]``: a chunk as 128 bytes, byte ``i`` holding stored value ``i`` in its
  low nibble and ``128 + i`` in its high one; a block past the chunks as 16 bytes, byte ``j`` holding
  its weights ``j`` and ``16 + j`` (either unpacks with one mask and one shift); ``zeros`` uint8 per
  group (none for symmetric grids: 8); ``scales`` fp16 per group, as the checkpoint stores them (half the
  bytes of fp32: at one row the codes and scales stream from memory, 4.5 bits a weight at g32).
- int8, symmetric: ``codes`` int8 ``[n, k]`` (the stored code minus 128), ``scales`` fp16 per group or per
  channel.
Groups must be multiples of 32 (per-channel int4 too: ``k`` a multiple of 32).

Build: ``torch.utils.cpp_extension.load`` with ``-O3 -march=native`` into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), about 15 s on 2 cores the first time,
a load of the built library after that. It needs a C++ compiler, ninja and a CPU with AVX2 and FMA;
without one of them ``unavailable()`` names what is missing, it is logged once as a warning, and the
weight goes to PyTorch's packed kernels instead (the layer reports backend ``cpu_packed``, not
``cpu_native``). ``QUANTDEPLOY_CPU_KERNELS=packed`` asks for the packed kernels (for comparisons).

Rows: the integer dots cost ~4 instructions per block and row, so their time grows with the rows; from
``DENSE_FROM_ROWS`` rows (a prefill, a large batch) the same op dequantizes 128 channels at a time into an
fp32 buffer per thread and multiplies it with BLAS (``at::mm_out``), exact fp32 weights and activations:
the fp32 GEMM's speed without holding an fp32 copy. The thresholds are where that route overtook the dots
summed over the bundled model's layer shapes (``benchmarks/cpu_kernels.py --sweep``, 2-core AVX2 EPYC,
with the chunked dots: int4 g32 at 48-64 rows, dense/dots 1.01 then 0.95; int8 at 96-128, 1.01 then 0.97);
per shape the crossing moves by a factor of two either way (results/cpu-kernels-sweep-chunked-avx2.txt).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from quantdeploy.kernels.cpu_packed import _Packed
from quantdeploy.quant.packing import unpack_bits
from quantdeploy.quant.primitives import QuantizedWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.cpp")
ATTENTION_SOURCE = Path(__file__).with_name("cpu_attention.cpp")  # decode attention, built into the same library
#: head sizes the decode-attention kernel is built for
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)
#: rows of activations from which a call dequantizes and runs the dense matmul
DENSE_FROM_ROWS = {"int8": 128, "int4": 64}


@functools.cache
def unavailable() -> str | None:
    """Why the kernels cannot run here (None: built or loaded, ops registered)."""
    if os.environ.get("QUANTDEPLOY_CPU_KERNELS", "native") == "packed":
        return "QUANTDEPLOY_CPU_KERNELS=packed"
    capability = torch.backends.cpu.get_cpu_capability()  # AVX2 means AVX2 and FMA to PyTorch
    if not capability.startswith(("AVX2", "AVX512")):
        return f"the CPU has no AVX2 and FMA (PyTorch sees {capability})"
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    try:
        # -fopenmp: at::parallel_for is inline OpenMP (without it, one thread); libgomp resolves to torch's own
        cpp_extension.load(name=f"quantdeploy_cpu_{torch.__version__.split('+')[0].replace('.', '_')}",
                           sources=[str(SOURCE), str(ATTENTION_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, ImportError) as e:  # a failed build: the compiler's message is in e
        return f"building {SOURCE.name} failed: {str(e).strip().splitlines()[-1]}"
    _register_fakes()
    return None


def available() -> bool:
    reason = unavailable()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("CPU kernels: PyTorch's packed int4/int8 kernels instead of ours (%s)", reason)


def _register_fakes() -> None:
    """Shapes for torch.compile: the ops are opaque calls in the compiled decode step."""

    @torch.library.register_fake("quantdeploy_cpu::w4_mm")
    def _w4(x, codes, scales, zeros, order, group, blas):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("quantdeploy_cpu::w8_mm")
    def _w8(x, codes, scales, order, group, blas):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("quantdeploy_cpu::w8a8_mm")
    def _w8a8(x, w, ws):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("quantdeploy_cpu::decode_attention")
    def _attention(q, k_cache, v_cache, block_table, lengths):
        return q.new_empty(q.shape)


def attends(dtype: torch.dtype, kv_quant: str | None, head_dim: int) -> bool:
    """Whether ``quantdeploy_cpu::decode_attention`` (``cpu_attention.cpp``) serves a cache of ``dtype``
    (fp32 or bf16, not quantized) with heads of ``head_dim`` here; else the cache's other paths do
    (``engine/kv_cache.py``)."""
    return (kv_quant is None and dtype in (torch.float32, torch.bfloat16) and head_dim in ATTENTION_HEAD_DIMS
            and unavailable() is None)


def supports(qw: QuantizedWeight) -> bool:
    spec, (n, k) = qw.spec, qw.shape
    group = spec.group_for(k)
    if spec.activations is not None or group % 32 or k % group or qw.tensors["scales"].dtype != torch.float16:
        return False
    if spec.dtype == "int8":
        return spec.symmetric
    return spec.dtype == "int4" and (spec.symmetric or qw.tensors["zeros"].dtype == torch.uint8)


@functools.cache
def kernel_order(k: int) -> torch.Tensor:
    """The kernels' order of a row of ``k`` values: stored position ``s`` holds value ``order[s]``.

    Chunks of eight blocks (256 values) first: the chunk's stored vector ``v`` (16 int16 lanes, one
    ``vpmaddwd``) holds in lane ``p`` value ``2v + p % 2`` of the chunk's block ``p // 2``, so a chunk's
    sixteen products leave each block's dot product in its own int32 lane; the values past the last chunk
    (k = 576: two blocks) keep their order. Activations are written in it by the op, weights stored in it."""
    chunks = k // 256
    s = torch.arange(256)
    v, p = s // 16, s % 16
    within = 32 * (p // 2) + 2 * v + p % 2
    return torch.cat([within + 256 * c for c in range(chunks)] + [torch.arange(256 * chunks, k)])


def repack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` codes (< 16) to the kernel's ``[n, k/2]`` bytes, in ``kernel_order``: a chunk's 256 values
    as 128 bytes, byte ``i`` holding stored value ``i`` in its low nibble and ``128 + i`` in its high one
    (one mask and one shift give stored vectors ``j`` and ``j + 8``); a block past the chunks as 16 bytes,
    byte ``j`` holding its values ``j`` and ``16 + j``."""
    n, k = codes.shape
    stored = codes.to(torch.uint8)[:, kernel_order(k)]
    split = 256 * (k // 256)
    chunks = stored[:, :split].reshape(n, -1, 2, 128)
    tail = stored[:, split:].reshape(n, -1, 2, 16)
    return torch.cat([(chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, -1),
                      (tail[:, :, 0] | (tail[:, :, 1] << 4)).reshape(n, -1)], dim=1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``repack_int4`` undone: the ``[n, k]`` codes in their own order."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    split = 128 * (k // 256)
    chunks, tail = packed[:, :split].reshape(n, -1, 1, 128), packed[:, split:].reshape(n, -1, 1, 16)
    stored = torch.cat([torch.cat([chunks & 15, chunks >> 4], dim=2).reshape(n, -1),
                        torch.cat([tail & 15, tail >> 4], dim=2).reshape(n, -1)], dim=1)
    codes = torch.empty_like(stored)
    codes[:, kernel_order(k)] = stored
    return codes


class NativeInt4(_Packed):
    backend = "cpu_native"

    def __init__(self, qw: QuantizedWeight) -> None:
        n, k = qw.shape
        self.group = qw.spec.group_for(k)
        self.order = kernel_order(k)
        self.codes = repack_int4(unpack_bits(qw.tensors["qweight"], 4, k))
        self.scales = qw.tensors["scales"].contiguous()  # [n, k/G] fp16, as stored
        # symmetric: none (codes 0..15 around 8, not read per group)
        zeros = torch.empty(0) if qw.spec.symmetric else qw.tensors["zeros"]
        self.zeros = zeros.to(torch.uint8).contiguous()
        self.dense_from = DENSE_FROM_ROWS["int4"]

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantdeploy_cpu.w4_mm(x2.float().contiguous(), self.codes, self.scales, self.zeros, self.order,
                                               self.group, False)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantdeploy_cpu.w4_mm(x2.float().contiguous(), self.codes, self.scales, self.zeros, self.order,
                                               self.group, True)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[n, k]`` weight the kernel multiplies, ``s·(q − z)``, from the kernel's layout."""
        q = unpack_int4(self.codes)
        n, k = q.shape
        q = q.view(n, -1, self.group).to(dtype)
        zeros = self.zeros.view(n, -1) if self.zeros.numel() else torch.full_like(self.scales, 8)
        w = (q - zeros.unsqueeze(-1).to(dtype)) * self.scales.unsqueeze(-1).to(dtype)
        return w.reshape(n, k)


class NativeInt8(_Packed):
    backend = "cpu_native"

    def __init__(self, qw: QuantizedWeight) -> None:
        k = qw.shape[1]
        self.group = qw.spec.group_for(k)
        self.order = kernel_order(k)
        codes = (qw.tensors["qweight"].to(torch.int16) - 128).to(torch.int8)  # [n, k]
        self.codes = codes[:, self.order].contiguous()
        self.scales = qw.tensors["scales"].contiguous()  # [n, k/G] fp16, as stored
        self.dense_from = DENSE_FROM_ROWS["int8"]

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantdeploy_cpu.w8_mm(x2.float().contiguous(), self.codes, self.scales, self.order, self.group,
                                               False)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantdeploy_cpu.w8_mm(x2.float().contiguous(), self.codes, self.scales, self.order, self.group,
                                               True)


def pack(qw: QuantizedWeight) -> NativeInt4 | NativeInt8:
    return NativeInt8(qw) if qw.spec.dtype == "int8" else NativeInt4(qw)
