// Weight-only int4 and int8 matmul on x86 CPUs with AVX2 and FMA: y[m, n] = sum_k x[m, k] * w[n, k],
// w = s_g * (q - z_g), fp32 in and out; and W8A8 int8 with exact integer sums. Why these exist, the
// layouts and how they are chosen: cpu_native.py. Built once per machine with -march=native by torch's
// extension loader.
//
// The activations are rounded to int16 per block of 32 (one fp32 scale a block), the codes widened to
// int16, and the two multiplied with vpmaddwd, both stored interleaved so that eight blocks' exact int32
// dot products come out in the eight lanes of one vector; then scaled and summed in fp32. Work is split
// over output channels (torch's intra-op threads); each channel meets the rows in tiles of up to four, so
// a chunk is unpacked once per tile. From many rows the op dequantizes blocks of channels into BLAS
// instead (dense_blocks).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "quantdeploy's CPU kernels need AVX2 and FMA"
#endif

namespace {

constexpr int kTile = 4;  // rows of activations per pass over a channel's weights
constexpr int64_t kGrain = 16;  // channels per thread task at least
constexpr int64_t kChannels = 64;  // channels whose weights stay in cache while every tile of rows passes
constexpr int64_t kDenseChannels = 128;  // channels dequantized at a time for BLAS (with k = 1536: 768 KB)
constexpr int64_t kBlock = 32;  // weights per block: one activation scale, one exact integer dot product
constexpr int64_t kChunk = 8;  // blocks whose dot products are summed into one vector, then scaled with one FMA

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

// Where the codes of a row sit: chunks of kChunk blocks (256 values) first, each interleaved so that one
// vpmaddwd multiplies a pair of values of every block of the chunk (stored vector v, 16 int16 lanes: lane
// p holds value 2v + p % 2 of block p / 2), then the blocks past the last chunk in their natural order.
// The activations' codes are written in this order, the weights are stored in it (cpu_native.py
// `kernel_order`): a chunk's dot products then come out as eight int32 lanes, lane i block i's, with no
// horizontal sums.
inline int64_t chunked(int64_t k) { return k / (kBlock * kChunk) * kChunk; }  // blocks in chunks

// Activations [rows, k] to int16 codes with one fp32 scale per block of 32: q = round(x / s),
// s = max|x| / 32767 over the block (1 for a block of zeros); each block's sum of codes (for zero points);
// the codes in the order above.
void quantize_rows(const float* x, int64_t rows, int64_t k, int16_t* q, float* s, int32_t* sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const int64_t blocks = k / kBlock, in_chunks = chunked(k);
  for (int64_t r = 0; r < rows; ++r) {
    alignas(32) int16_t natural[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * k + b * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      }
      const float m = hmax(amax);
      const float scale = m > 0.0f ? m / 32767.0f : 1.0f;
      s[r * blocks + b] = scale;
      const __m256 inv = _mm256_set1_ps(1.0f / scale);
      __m256i c[4];
      for (int j = 0; j < 4; ++j)
        c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // round to nearest even
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
      sums[r * blocks + b] = static_cast<int32_t>(hsum(_mm256_cvtepi32_ps(total)));  // |sum| < 2^24: exact
      // packs works within 128-bit lanes: [0-3, 8-11, 4-7, 12-15] before the permute
      const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);
      const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8);
      int16_t* out = q + r * k + b * kBlock;
      if (b >= in_chunks) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), hi);
        continue;
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(natural), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(natural + 16), hi);
      // pair u of block i (values 2u, 2u + 1) to the chunk's int32 slot 8u + i
      const int64_t i = b % kChunk;
      int16_t* chunk = q + r * k + (b - i) * kBlock;
      for (int u = 0; u < kBlock / 2; ++u) std::memcpy(chunk + 2 * (kChunk * u + i), natural + 2 * u, 4);
    }
  }
}

// A block of 32 int16 weights (two vectors) against one row's int16 codes: eight int32 lanes, exact.
inline __m256i dot(__m256i w0, __m256i w1, const int16_t* q) {
  return _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
                          _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16))));
}

// The codes of one channel (int4: 0..15, the zero point not taken off; int8: signed), as int16 vectors.
// pair(b0, j, a, b): stored vectors j and j + 8 of the chunk from block b0; block(b, w0, w1): a block
// past the chunks, values 0-15 and 16-31.
struct Int4Codes {  // a chunk: 128 bytes, byte i holding stored value i (low nibble) and 128 + i (high)
  const uint8_t* row;
  void pair(int64_t b0, int j, __m256i& a, __m256i& b) const {
    const __m256i raw = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b0 * kBlock / 2 + 16 * j)));
    a = _mm256_and_si256(raw, _mm256_set1_epi16(0x0F));
    b = _mm256_srli_epi16(raw, 4);
  }
  void block(int64_t b, __m256i& w0, __m256i& w1) const { pair(b, 0, w0, w1); }  // byte j: values j and 16 + j
};

struct Int8Codes {
  const int8_t* row;
  void pair(int64_t b0, int j, __m256i& a, __m256i& b) const {
    const int8_t* chunk = row + b0 * kBlock;
    a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 16 * j)));
    b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 128 + 16 * j)));
  }
  void block(int64_t b, __m256i& w0, __m256i& w1) const {
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock + 16)));
  }
};

// How the groups of a weight meet chunks of kChunk blocks, worked out once a call (the same for every
// channel): a chunk's weight scales (and zero points) come from one load, a broadcast, a permute or, for
// groups that meet chunks unevenly (g96), eight scalar reads.
struct Groups {
  enum Spread : uint8_t { kEach, kOne, kPairs, kQuads, kAny };  // a group a block / the chunk / two / four / other
  Spread spread;
  std::vector<int32_t> of;  // the group of each block
  Groups(int64_t blocks, int64_t group) : of(blocks) {
    const int64_t r = group / kBlock;  // blocks a group
    for (int64_t b = 0; b < blocks; ++b) of[b] = static_cast<int32_t>(b / r);
    spread = r == 1 ? kEach : r % kChunk == 0 ? kOne : r == 2 ? kPairs : r == 4 ? kQuads : kAny;
  }
  // the weight scales of blocks b0 .. b0 + 7 (s: the channel's fp16 scales, one a group)
  __m256 scales(const uint16_t* s, int64_t b0) const {
    const int32_t g0 = of[b0];
    switch (spread) {
      case kEach: return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g0)));
      case kOne: return _mm256_set1_ps(_cvtsh_ss(s[g0]));
      case kPairs: return _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + g0)))),
          _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
      case kQuads: {
        int32_t two;
        std::memcpy(&two, s + g0, 4);
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))),
                                        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
      }
      default: {
        if (of[b0 + kChunk - 1] == g0) return _mm256_set1_ps(_cvtsh_ss(s[g0]));
        alignas(32) float v[kChunk];
        for (int i = 0; i < kChunk; ++i) v[i] = _cvtsh_ss(s[of[b0 + i]]);
        return _mm256_load_ps(v);
      }
    }
  }
  // the zero points of blocks b0 .. b0 + 7 (z: the channel's, one a group)
  __m256i zeros(const uint8_t* z, int64_t b0) const {
    const int32_t g0 = of[b0];
    if (spread == kEach) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + g0)));
    if (of[b0 + kChunk - 1] == g0) return _mm256_set1_epi32(z[g0]);
    alignas(32) int32_t v[kChunk];
    for (int i = 0; i < kChunk; ++i) v[i] = z[of[b0 + i]];
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
  }
};

// One output channel for MT rows. A chunk of eight blocks: sixteen vpmaddwd a row leave the eight blocks'
// exact dot products in the eight int32 lanes; the zero points come off in int32 (z times the block's sum
// of activation codes); converted (int4: |total| <= 32 x 15 x 32767 < 2^24, exact; int8's up to 2^27
// round to fp32's 24 bits) and scaled by the eight activation scales times the eight weight scales with
// one FMA. The blocks past the last chunk go one by one.
enum class Zero { kNone, kEight, kGroup };  // int8 / symmetric int4 (codes 0..15 around 8) / a zero a group

template <int MT, Zero Zeros, typename Codes>
void channel(const int16_t* q, const float* sx, const int32_t* sums, int64_t k, const uint16_t* scales,
             const uint8_t* zeros, const Groups& groups, const Codes& codes, float* y, int64_t ldy) {
  const int64_t blocks = k / kBlock, in_chunks = chunked(k);
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < in_chunks; b0 += kChunk) {
    __m256i dots[MT][2];  // two sums a row: the additions do not wait on each other
    for (int m = 0; m < MT; ++m) dots[m][0] = dots[m][1] = _mm256_setzero_si256();
    for (int j = 0; j < kChunk; ++j) {
      __m256i a, b;
      codes.pair(b0, j, a, b);
      for (int m = 0; m < MT; ++m) {
        const int16_t* qm = q + m * k + b0 * kBlock + 16 * j;
        dots[m][0] = _mm256_add_epi32(dots[m][0], _mm256_madd_epi16(a, _mm256_loadu_si256(
                                                                         reinterpret_cast<const __m256i*>(qm))));
        dots[m][1] = _mm256_add_epi32(dots[m][1], _mm256_madd_epi16(b, _mm256_loadu_si256(
                                                                         reinterpret_cast<const __m256i*>(qm + 128))));
      }
    }
    const __m256 sw = groups.scales(scales, b0);
    __m256i z;
    if constexpr (Zeros == Zero::kEight) z = _mm256_set1_epi32(8);
    if constexpr (Zeros == Zero::kGroup) z = groups.zeros(zeros, b0);
    for (int m = 0; m < MT; ++m) {
      __m256i total = _mm256_add_epi32(dots[m][0], dots[m][1]);
      if constexpr (Zeros != Zero::kNone)
        total = _mm256_sub_epi32(total, _mm256_mullo_epi32(z, _mm256_loadu_si256(
                                                                  reinterpret_cast<const __m256i*>(sums + m * blocks + b0))));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(_mm256_loadu_ps(sx + m * blocks + b0), sw),
                               acc[m]);
    }
  }
  float tail[MT] = {};
  for (int64_t b = in_chunks; b < blocks; ++b) {
    const int32_t g = groups.of[b];
    __m256i w0, w1;
    codes.block(b, w0, w1);
    for (int m = 0; m < MT; ++m) {
      const __m256i lanes = dot(w0, w1, q + m * k + b * kBlock);
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      int32_t total = _mm_cvtsi128_si32(s);
      if constexpr (Zeros != Zero::kNone)
        total -= (Zeros == Zero::kEight ? 8 : int32_t{zeros[g]}) * sums[m * blocks + b];
      tail[m] += static_cast<float>(total) * (sx[m * blocks + b] * _cvtsh_ss(scales[g]));
    }
  }
  for (int m = 0; m < MT; ++m) y[m * ldy] = hsum(acc[m]) + tail[m];
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

// The activations' codes, scales and block sums, then every channel through `codes_of(c)`; `zeros`:
// one a group (uint8) with Zero::kGroup, else null.
template <Zero Zeros, typename CodesOf>
at::Tensor matmul(const at::Tensor& x, int64_t n, const uint16_t* scales, const uint8_t* zeros, int64_t group,
                  CodesOf&& codes_of) {
  const int64_t rows = x.size(0), k = x.size(1), groups = k / group, blocks = k / kBlock;
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kShort));
  at::Tensor sx = at::empty({rows, blocks}, x.options());
  at::Tensor sums = at::empty({rows, blocks}, x.options().dtype(at::kInt));
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* sp = sx.data_ptr<float>();
  const int32_t* up = sums.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  quantize_rows(x.data_ptr<float>(), rows, k, q.data_ptr<int16_t>(), sx.data_ptr<float>(), sums.data_ptr<int32_t>());
  const Groups layout(blocks, group);
  for_channels(n, rows, [&](int64_t c, int64_t m, auto mt) {
    channel<decltype(mt)::value, Zeros>(qp + m * k, sp + m * blocks, up + m * blocks, k, scales + c * groups,
                                        zeros == nullptr ? nullptr : zeros + c * groups, layout, codes_of(c),
                                        yp + m * n + c, n);
  });
  return y;
}

// 16 int16 codes to two vectors of eight floats, s * (code - z) lane by lane (exact up to the one rounding of
// the product, as the reference's).
inline void dequantize16(__m256i w, __m256 s0, __m256 z0, __m256 s1, __m256 z1, float* out) {
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(w)));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(w, 1)));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(lo, z0), s0));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_sub_ps(hi, z1), s1));
}

// For many rows (a prefill): each block of kDenseChannels channels is dequantized to fp32 into a buffer
// of its thread's, in the stored order, and multiplied by BLAS (at::mm_out, single-threaded inside the
// parallel region) with the activations' columns put in that order (one index_select a call) into its
// columns of y. The fp32 GEMM does 16 multiply-adds a cycle where the integer dots above do ~5 per row, and
// dequantizing a block costs one pass over its codes.
template <typename CodesOf>
at::Tensor dense_blocks(const at::Tensor& x, const at::Tensor& order, int64_t n, const uint16_t* scales,
                        const uint8_t* zeros, int fixed_zero, int64_t group, CodesOf&& codes_of) {
  const int64_t rows = x.size(0), k = x.size(1), groups = k / group, blocks = k / kBlock, in_chunks = chunked(k);
  const at::Tensor xs = in_chunks > 0 ? x.index_select(1, order) : x;
  at::Tensor y = at::empty({rows, n}, x.options());
  const Groups layout(blocks, group);
  const bool inference = c10::InferenceMode::is_enabled();  // a thread-local: the workers do not inherit it
  at::parallel_for(0, n, kDenseChannels, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    at::Tensor buffer = at::empty({kDenseChannels, k}, x.options());
    for (int64_t c0 = begin; c0 < end; c0 += kDenseChannels) {
      const int64_t c1 = std::min(end, c0 + kDenseChannels);
      for (int64_t c = c0; c < c1; ++c) {
        float* out = buffer.data_ptr<float>() + (c - c0) * k;
        const auto codes = codes_of(c);
        const uint16_t* sc = scales + c * groups;
        const uint8_t* zc = zeros != nullptr ? zeros + c * groups : nullptr;
        auto scale_zero = [&](int64_t b, float& s, float& z) {
          s = _cvtsh_ss(sc[layout.of[b]]), z = zc ? zc[layout.of[b]] : fixed_zero;
        };
        for (int64_t b0 = 0; b0 < in_chunks; b0 += kChunk) {
          float s[kChunk], z[kChunk];  // lane p of a stored vector is block p / 2's
          for (int i = 0; i < kChunk; ++i) scale_zero(b0 + i, s[i], z[i]);
          const __m256 s0 = _mm256_setr_ps(s[0], s[0], s[1], s[1], s[2], s[2], s[3], s[3]);
          const __m256 s1 = _mm256_setr_ps(s[4], s[4], s[5], s[5], s[6], s[6], s[7], s[7]);
          const __m256 z0 = _mm256_setr_ps(z[0], z[0], z[1], z[1], z[2], z[2], z[3], z[3]);
          const __m256 z1 = _mm256_setr_ps(z[4], z[4], z[5], z[5], z[6], z[6], z[7], z[7]);
          for (int j = 0; j < kChunk; ++j) {
            __m256i a, b;
            codes.pair(b0, j, a, b);
            dequantize16(a, s0, z0, s1, z1, out + b0 * kBlock + 16 * j);
            dequantize16(b, s0, z0, s1, z1, out + b0 * kBlock + 128 + 16 * j);
          }
        }
        for (int64_t b = in_chunks; b < blocks; ++b) {
          float s, z;
          scale_zero(b, s, z);
          const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
          __m256i w0, w1;
          codes.block(b, w0, w1);
          dequantize16(w0, sv, zv, sv, zv, out + b * kBlock);
          dequantize16(w1, sv, zv, sv, zv, out + b * kBlock + 16);
        }
      }
      at::Tensor columns = y.narrow(1, c0, c1 - c0);
      at::mm_out(columns, xs, buffer.narrow(0, 0, c1 - c0).t());
    }
  });
  return y;
}

void check(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& order, int64_t k,
           int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [m, k]");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(group > 0 && group % 32 == 0 && k % group == 0, "group ", group, " must be a multiple of 32 dividing ", k);
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
              "codes and fp16 scales must be contiguous");
  TORCH_CHECK(scales.numel() == codes.size(0) * (k / group), "one scale per channel and group");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == k, "order: int64 [k], the stored order (kernel_order)");
}

at::Tensor w4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                 const at::Tensor& order, int64_t group, bool blas) {
  const int64_t n = codes.size(0), k = 2 * codes.size(1);
  check(x, codes, scales, order, k, group);
  const bool symmetric = zeros.numel() == 0;  // codes 0..15 around 8
  TORCH_CHECK(codes.scalar_type() == at::kByte && zeros.scalar_type() == at::kByte && zeros.is_contiguous() &&
                  (symmetric || zeros.numel() == scales.numel()),
              "int4: uint8 codes [n, k/2] and uint8 zeros like the scales (none: symmetric, 8)");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint8_t* zp = symmetric ? nullptr : zeros.data_ptr<uint8_t>();
  auto codes_of = [&](int64_t c) { return Int4Codes{cp + c * (k / 2)}; };
  if (blas) return dense_blocks(x, order, n, sp, zp, 8, group, codes_of);
  return symmetric ? matmul<Zero::kEight>(x, n, sp, nullptr, group, codes_of)
                   : matmul<Zero::kGroup>(x, n, sp, zp, group, codes_of);
}

at::Tensor w8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& order,
                 int64_t group, bool blas) {
  const int64_t n = codes.size(0), k = codes.size(1);
  check(x, codes, scales, order, k, group);
  TORCH_CHECK(codes.scalar_type() == at::kChar, "int8: int8 codes [n, k]");
  const int8_t* cp = codes.data_ptr<int8_t>();
  auto codes_of = [&](int64_t c) { return Int8Codes{cp + c * k}; };
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return blas ? dense_blocks(x, order, n, sp, nullptr, 0, group, codes_of)
              : matmul<Zero::kNone>(x, n, sp, nullptr, group, codes_of);
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
  m.def("w4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, Tensor order, int group, bool blas) -> Tensor");
  m.def("w8_mm(Tensor x, Tensor codes, Tensor scales, Tensor order, int group, bool blas) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor w, Tensor ws) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantdeploy_cpu, CPU, m) {
  m.impl("w4_mm", &w4_mm);
  m.impl("w8_mm", &w8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
}
