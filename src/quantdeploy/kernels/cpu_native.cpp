// Weight-only int4 and int8 matmul on x86 CPUs with AVX2 and FMA: y[m, n] = sum_k x[m, k] * w[n, k],
// w = s_g * (q - z_g), fp32 in and out; and W8A8 int8 with exact integer sums. Why these exist, the
// layouts and how they are chosen: cpu_native.py. Built once per machine with -march=native by torch's
// extension loader.
//
// The activations are rounded to int16 per block of 32 (one fp32 scale a block), a block of codes widened
// to int16, and the two multiplied with vpmaddwd: an exact int32 dot product a block, then scaled and
// summed in fp32. Work is split over output channels (torch's intra-op threads); each channel meets the
// rows in tiles of up to four, so a block is unpacked once per tile. From many rows the op dequantizes
// blocks of channels into BLAS instead (dense_blocks).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "quantdeploy's CPU kernels need AVX2 and FMA"
#endif

namespace {

constexpr int kTile = 4;  // rows of activations per pass over a channel's weights
constexpr int64_t kGrain = 16;  // channels per thread task at least
constexpr int64_t kChannels = 64;  // channels whose weights stay in cache while every tile of rows passes
constexpr int64_t kDenseChannels = 128;  // channels dequantized at a time for BLAS (with k = 1536: 768 KB)
constexpr int64_t kBlock = 32;  // weights per block: one activation scale, one exact integer dot product

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations [rows, k] to int16 codes with one fp32 scale per block of 32: q = round(x / s),
// s = max|x| / 32767 over the block (1 for a block of zeros).
void quantize_rows(const float* x, int64_t rows, int64_t k, int16_t* q, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < rows * k; i += kBlock) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + i + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    const float m = hmax(amax);
    const float scale = m > 0.0f ? m / 32767.0f : 1.0f;
    s[i / kBlock] = scale;
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    __m256i c[4];
    for (int j = 0; j < 4; ++j)
      c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // round to nearest even
    // packs works within 128-bit lanes: [0-3, 8-11, 4-7, 12-15] before the permute
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i + 16), hi);
  }
}

// A block of 32 int16 weights (two vectors) against each row of the tile: the dot product with the
// row's int16 codes is exact in int32, and each of its eight lanes (four products, |sum| <= 4 x 128 x 32767
// < 2^24) exact in fp32 too; then scaled by scale[m] (the row's block scale times the weight's group scale)
// into acc[m].
template <int MT>
inline void dot_block(__m256i w0, __m256i w1, const int16_t* q, int64_t ldq, const float* scale, __m256 acc[]) {
  for (int m = 0; m < MT; ++m) {
    const int16_t* qm = q + m * ldq;
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm))),
        _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + 16))));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale[m]), acc[m]);
  }
}

// One output channel for MT rows: `weights(b, g)` gives the 32 weights from b (in group g) as two int16 vectors.
// A row's blocks go to U accumulators in turn (U * MT >= Chains chains of FMAs): int4 asks for 4, as with
// one chain each block's FMA waited on the previous block's (one row, bundled model's shapes on a Zen 3
// core, in cache: 7.8 cycles a block against 11.3); int8 (1) was slower with more chains (4.9 against 4.0).
template <int MT, int Chains, typename Weights>
void channel(const int16_t* q, const float* sx, int64_t k, const float* scales, int64_t group, Weights&& weights,
             float* y, int64_t ldy) {
  constexpr int U = MT >= Chains ? 1 : Chains / MT;
  __m256 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  const int64_t blocks = k / kBlock;
  if constexpr (U == 1) {
    for (int64_t g = 0, b = 0; b < k; ++g) {  // groups, then their blocks: no division in the loop
      const float sw = scales[g];
      for (const int64_t end = b + group; b < end; b += kBlock) {
        __m256i w0, w1;
        weights(b, g, w0, w1);
        float scale[MT];
        for (int m = 0; m < MT; ++m) scale[m] = sx[m * blocks + b / kBlock] * sw;
        __m256 part[MT];
        for (int m = 0; m < MT; ++m) part[m] = acc[m][0];
        dot_block<MT>(w0, w1, q + b, k, scale, part);
        for (int m = 0; m < MT; ++m) acc[m][0] = part[m];
      }
    }
  } else {  // blocks in turns of U, the group followed by a counter
    const int64_t per_group = group / kBlock;
    int64_t g = 0, left = per_group;  // the group of the next block, and its blocks not yet taken
    auto block = [&](int64_t blk, auto u) {
      const float sw = scales[g];
      __m256i w0, w1;
      weights(blk * kBlock, g, w0, w1);
      if (--left == 0) ++g, left = per_group;
      float scale[MT];
      for (int m = 0; m < MT; ++m) scale[m] = sx[m * blocks + blk] * sw;
      __m256 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = acc[m][decltype(u)::value];
      dot_block<MT>(w0, w1, q + blk * kBlock, k, scale, part);
      for (int m = 0; m < MT; ++m) acc[m][decltype(u)::value] = part[m];
    };
    int64_t blk = 0;
    for (; blk + U <= blocks; blk += U)
      [&]<int... us>(std::integer_sequence<int, us...>) {
        (block(blk + us, std::integral_constant<int, us>{}), ...);
      }(std::make_integer_sequence<int, U>{});
    for (; blk < blocks; ++blk) block(blk, std::integral_constant<int, 0>{});
  }
  for (int m = 0; m < MT; ++m) {
    __m256 sum = acc[m][0];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][u]);
    y[m * ldy] = hsum(sum);
  }
}

// Rows of activations in tiles of kTile (the last tile shorter), for one channel.
template <typename Channel>
void tiles(int64_t rows, Channel&& run) {
  int64_t m = 0;
  for (; m + kTile <= rows; m += kTile) run(m, std::integral_constant<int, kTile>{});
  switch (rows - m) {
    case 3: run(m, std::integral_constant<int, 3>{}); break;
    case 2: run(m, std::integral_constant<int, 2>{}); break;
    case 1: run(m, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Every (channel, tile of rows) pair, the channels split over threads. Channels go in blocks of kChannels
// and, within a block, tiles of rows outermost: a block's weights stay in L2 and a tile's activations in
// L1 while they meet (at a 512-token prefill the activations alone outgrow L2).
template <typename Run>
void for_channels(int64_t n, int64_t rows, Run&& run) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChannels) {
      const int64_t c1 = std::min(end, c0 + kChannels);
      tiles(rows, [&](int64_t m, auto mt) {
        for (int64_t c = c0; c < c1; ++c) run(c, m, mt);
      });
    }
  });
}

// The activations' codes and scales, then every channel through `weights_of(c)` (its block reader).
template <int Chains, typename WeightsOf>
at::Tensor matmul(const at::Tensor& x, int64_t n, const float* scales, int64_t group, WeightsOf&& weights_of) {
  const int64_t rows = x.size(0), k = x.size(1), groups = k / group;
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kShort));
  at::Tensor sx = at::empty({rows, k / kBlock}, x.options());
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* sp = sx.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  quantize_rows(x.data_ptr<float>(), rows, k, q.data_ptr<int16_t>(), sx.data_ptr<float>());
  for_channels(n, rows, [&](int64_t c, int64_t m, auto mt) {
    channel<decltype(mt)::value, Chains>(qp + m * k, sp + m * (k / kBlock), k, scales + c * groups, group, weights_of(c),
                                 yp + m * n + c, n);
  });
  return y;
}

// For many rows (a prefill): each block of kDenseChannels channels is dequantized to fp32 into a buffer
// of its thread's and multiplied by BLAS (at::mm_out, single-threaded inside the parallel region) into its
// columns of y. The fp32 GEMM does 16 multiply-adds a cycle where the integer dots above do ~5 per row, and
// dequantizing a block costs one pass over its codes.
template <typename WeightsOf>
at::Tensor dense_blocks(const at::Tensor& x, int64_t n, const float* scales, int64_t group, WeightsOf&& weights_of) {
  const int64_t rows = x.size(0), k = x.size(1), groups = k / group;
  at::Tensor y = at::empty({rows, n}, x.options());
  const bool inference = c10::InferenceMode::is_enabled();  // a thread-local: the workers do not inherit it
  at::parallel_for(0, n, kDenseChannels, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    at::Tensor buffer = at::empty({kDenseChannels, k}, x.options());
    for (int64_t c0 = begin; c0 < end; c0 += kDenseChannels) {
      const int64_t c1 = std::min(end, c0 + kDenseChannels);
      for (int64_t c = c0; c < c1; ++c) {
        float* out = buffer.data_ptr<float>() + (c - c0) * k;
        auto weights = weights_of(c);
        for (int64_t g = 0, b = 0; b < k; ++g) {
          const __m256 sw = _mm256_set1_ps(scales[c * groups + g]);
          for (const int64_t stop = b + group; b < stop; b += kBlock) {
            __m256i w[2];
            weights(b, g, w[0], w[1]);
            for (int h = 0; h < 2; ++h) {  // 16 int16 weights: two vectors of eight floats
              const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(w[h])));
              const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(w[h], 1)));
              _mm256_storeu_ps(out + b + 16 * h, _mm256_mul_ps(lo, sw));
              _mm256_storeu_ps(out + b + 16 * h + 8, _mm256_mul_ps(hi, sw));
            }
          }
        }
      }
      at::Tensor columns = y.narrow(1, c0, c1 - c0);
      at::mm_out(columns, x, buffer.narrow(0, 0, c1 - c0).t());
    }
  });
  return y;
}

void check(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t k, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [m, k]");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(group > 0 && group % 32 == 0 && k % group == 0, "group ", group, " must be a multiple of 32 dividing ", k);
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kFloat,
              "codes and fp32 scales must be contiguous");
  TORCH_CHECK(scales.numel() == codes.size(0) * (k / group), "one scale per channel and group");
}

at::Tensor w4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                 int64_t group, bool blas) {
  const int64_t n = codes.size(0), k = 2 * codes.size(1);
  check(x, codes, scales, k, group);
  TORCH_CHECK(codes.scalar_type() == at::kByte && zeros.scalar_type() == at::kByte && zeros.is_contiguous() &&
                  zeros.numel() == scales.numel(), "int4: uint8 codes [n, k/2] and uint8 zeros like the scales");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  const int64_t groups = k / group;
  auto weights_of = [&](int64_t c) {
    return [row = cp + c * (k / 2), zero = zp + c * groups](int64_t b, int64_t g, __m256i& w0, __m256i& w1) {
      // each byte widened to 16 bits: its low nibble is weight j, the rest (>> 4) weight 16 + j
      const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b / 2)));
      const __m256i z = _mm256_set1_epi16(zero[g]);
      w0 = _mm256_sub_epi16(_mm256_and_si256(raw, _mm256_set1_epi16(0x0F)), z);
      w1 = _mm256_sub_epi16(_mm256_srli_epi16(raw, 4), z);
    };
  };
  return blas ? dense_blocks(x, n, scales.data_ptr<float>(), group, weights_of)
              : matmul<4>(x, n, scales.data_ptr<float>(), group, weights_of);
}

at::Tensor w8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t group, bool blas) {
  const int64_t n = codes.size(0), k = codes.size(1);
  check(x, codes, scales, k, group);
  TORCH_CHECK(codes.scalar_type() == at::kChar, "int8: int8 codes [n, k]");
  const int8_t* cp = codes.data_ptr<int8_t>();
  auto weights_of = [&](int64_t c) {
    return [row = cp + c * k](int64_t b, int64_t, __m256i& w0, __m256i& w1) {
      w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b)));
      w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b + 16)));
    };
  };
  return blas ? dense_blocks(x, n, scales.data_ptr<float>(), group, weights_of)
              : matmul<1>(x, n, scales.data_ptr<float>(), group, weights_of);
}

// W8A8 int8 (SmoothQuant): each row of x quantized to int8 with its own scale, multiplied by the int8
// weight with exact int32 sums, then scaled: what reference.w8a8_int8 computes, bit for bit (the same
// fp32 operations in the same order). Where torch._int_mm has no VNNI kernel (AVX2) it runs scalar code.
void quantize_rows_int8(const float* x, int64_t rows, int64_t k, int16_t* q, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f), neg = _mm256_set1_ps(-127.0f);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * k;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xm + i)));
    const float a = hmax(amax);
    const float scale = a > 0.0f ? a / 127.0f : 1.0f;  // torch: amax / 127.0, one fp32 division
    s[m] = scale;
    const __m256 sv = _mm256_set1_ps(scale);
    for (int64_t i = 0; i < k; i += 16) {  // round(x / s) half to even, clamped to +-127, as torch.round
      __m256 v0 = _mm256_div_ps(_mm256_loadu_ps(xm + i), sv), v1 = _mm256_div_ps(_mm256_loadu_ps(xm + i + 8), sv);
      v0 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), neg), lim);
      v1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), neg), lim);
      const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * k + i), _mm256_permute4x64_epi64(packed, 0xD8));
    }
  }
}

template <int MT>
void int_channel(const int16_t* q, const float* sx, int64_t k, const int8_t* w, float sw, float* y, int64_t ldy) {
  __m256i acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
  for (int64_t b = 0; b < k; b += kBlock) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b + 16)));
    for (int m = 0; m < MT; ++m) {  // |w·q| <= 127·127 a product: int32 holds any K this accepts
      const int16_t* qm = q + m * k + b;
      acc[m] = _mm256_add_epi32(acc[m], _mm256_add_epi32(
          _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm))),
          _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + 16)))));
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[m]), _mm256_extracti128_si256(acc[m], 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    y[m * ldy] = static_cast<float>(_mm_cvtsi128_si32(s)) * sx[m] * sw;  // (acc · s_x) · s_w, torch's order
  }
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "w8a8_mm: contiguous fp32 x [m, k]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w8a8_mm: contiguous int8 w [n, k]");
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && k % kBlock == 0, "w8a8_mm: k ", k, " must match and be a multiple of 32");
  TORCH_CHECK(k <= (int64_t{1} << 17), "w8a8_mm: k ", k, " could overflow the int32 sums");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == n, "w8a8_mm: fp32 scales [n]");
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kShort));
  at::Tensor sx = at::empty({rows}, x.options());
  at::Tensor y = at::empty({rows, n}, x.options());
  quantize_rows_int8(x.data_ptr<float>(), rows, k, q.data_ptr<int16_t>(), sx.data_ptr<float>());
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* sp = sx.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* wsp = ws.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_channels(n, rows, [&](int64_t c, int64_t m, auto mt) {
    int_channel<decltype(mt)::value>(qp + m * k, sp + m, k, wp + c * k, wsp[c], yp + m * n + c, n);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(quantdeploy_cpu, m) {
  m.def("w4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group, bool blas) -> Tensor");
  m.def("w8_mm(Tensor x, Tensor codes, Tensor scales, int group, bool blas) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor w, Tensor ws) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantdeploy_cpu, CPU, m) {
  m.impl("w4_mm", &w4_mm);
  m.impl("w8_mm", &w8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
}
