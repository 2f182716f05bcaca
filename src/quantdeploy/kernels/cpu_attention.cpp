// Decode attention over the paged KV cache on x86 CPUs with AVX2 and FMA: one query per row against
// that row's own cached positions, read block by block through the block table (no gather, no mask,
// nothing past the row's length). Why and where it is used: cpu_native.py; the layout of the pool:
// engine/kv_cache.py. Built into the same extension as cpu_native.cpp.
//
// One task per (row, KV head): the query heads sharing that KV head (grouped-query attention) are
// scored together, so each key and value is loaded once per task. Two passes over the positions:
// scores (q·k / sqrt(D)) into a per-task buffer, then softmax weights times values, in fp32 whatever
// the cache's dtype (fp32 or bf16), as SDPA's CPU kernel accumulates.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxRep = 16;  // query heads per KV head up to this

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The eight sums of a[0..7], lane i holding the sum of a[i]'s lanes.
inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0 (softmax after the max is taken off): 2^n · p(r), x = n·ln2 + r, |r| <= ln2/2, p of
// degree 6 (relative error ~2e-7); below -87 (e^x under fp32's normal range) it gives 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Softmax of s[0..n) in place; returns 1 / the sum of the exponentials (the weights stay unnormalized).
inline float softmax_weights(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t p = 0;
  __m256 mv = _mm256_set1_ps(m);
  for (; p + 8 <= n; p += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + p));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  m = std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)));
  for (int64_t i = p; i < n; ++i) m = std::max(m, s[i]);
  const __m256 mb = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (p = 0; p + 8 <= n; p += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), mb));
    _mm256_storeu_ps(s + p, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum8(sv);
  for (int64_t i = p; i < n; ++i) sum += (s[i] = std::exp(s[i] - m));
  return 1.0f / sum;
}

// One row and KV head: the rep query heads q [rep, 8·V] against positions 0..length-1 held in blocks
// (block positions each, the KV head's rows at head_offset within a block's stride); out [rep, 8·V] fp32.
template <int V, typename T>
void attend_one(const float* q, int rep, const T* k_pool, const T* v_pool, const int32_t* blocks, int64_t length,
                int64_t block, int64_t head_offset, int64_t block_stride, float* scores, float* out) {
  constexpr int D = 8 * V;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto row = [&](const T* pool, int64_t p) { return pool + blocks[p / block] * block_stride + head_offset + (p % block) * D; };
  for (int r = 0; r < rep; ++r) {  // scores[r, p] = q_r · k_p / sqrt(D), eight positions at a time
    const float* qr = q + r * D;
    float* sr = scores + r * length;
    int64_t p = 0;
    for (; p + 8 <= length; p += 8) {  // blocks hold multiples of 8 positions: the eight rows are contiguous
      const T* k0 = row(k_pool, p);
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int j = 0; j < V; ++j) {
        const __m256 qj = _mm256_loadu_ps(qr + 8 * j);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qj, load8(k0 + i * D + 8 * j), acc[i]);
      }
      _mm256_storeu_ps(sr + p, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
    }
    for (; p < length; ++p) {
      const T* kp = row(k_pool, p);
      __m256 acc = _mm256_setzero_ps();
      for (int j = 0; j < V; ++j) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * j), load8(kp + 8 * j), acc);
      sr[p] = hsum8(acc) * scale;
    }
  }
  for (int r = 0; r < rep; ++r) {  // out_r = softmax(scores_r) · v, eight dims of accumulators at a time
    float* sr = scores + r * length;
    const __m256 inv = _mm256_set1_ps(softmax_weights(sr, length));
    for (int j0 = 0; j0 < V; j0 += 8) {
      constexpr int W = V < 8 ? V : 8;
      __m256 acc[W];
      for (int j = 0; j < W; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t p = 0; p < length; ++p) {
        const T* vp = row(v_pool, p) + 8 * j0;
        const __m256 w = _mm256_set1_ps(sr[p]);
        for (int j = 0; j < W; ++j) acc[j] = _mm256_fmadd_ps(w, load8(vp + 8 * j), acc[j]);
      }
      for (int j = 0; j < W; ++j) _mm256_storeu_ps(out + r * D + 8 * (j0 + j), _mm256_mul_ps(acc[j], inv));
    }
  }
}

template <int V, typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
         const int64_t* lengths, at::Tensor& y) {
  constexpr int D = 8 * V;
  const int64_t rows = q.size(0), heads = q.size(1);
  const int64_t kv_heads = k_cache.size(1), block = k_cache.size(2);
  const int rep = static_cast<int>(heads / kv_heads);
  const T* qp = q.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t tstride = table.stride(0);
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> scores, buf(2 * kMaxRep * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, length = lengths[b], at = (b * heads + g * rep) * D;
      float* qf = buf.data();
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(yp + at) : buf.data() + kMaxRep * D;
      for (int i = 0; i < rep * D; ++i) qf[i] = static_cast<float>(qp[at + i]);
      if (length == 0) {  // a row without positions: zeros
        std::fill(out, out + rep * D, 0.0f);
      } else {
        scores.resize(static_cast<size_t>(rep * length));
        attend_one<V, T>(qf, rep, kp, vp, tp + b * tstride, length, block, g * block * D, kv_heads * block * D,
                         scores.data(), out);
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int i = 0; i < rep * D; ++i) yp[at + i] = static_cast<T>(out[i]);
    }
  };
  int64_t positions = 0;
  for (int64_t b = 0; b < rows; ++b) positions += lengths[b];
  if (positions * heads * D < (int64_t{1} << 16)) work(0, rows * kv_heads);  // too little to share
  else at::parallel_for(0, rows * kv_heads, 1, work);
}

template <typename T>
void run_dim(int64_t dim, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& t,
             const int64_t* lengths, at::Tensor& y) {
  switch (dim) {
    case 16: return run<2, T>(q, k, v, t, lengths, y);
    case 32: return run<4, T>(q, k, v, t, lengths, y);
    case 64: return run<8, T>(q, k, v, t, lengths, y);
    case 128: return run<16, T>(q, k, v, t, lengths, y);
    case 256: return run<32, T>(q, k, v, t, lengths, y);
    default: TORCH_CHECK(false, "decode_attention: head_dim ", dim, " is not 16, 32, 64, 128 or 256");
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: q [B, H, D] and caches [blocks, Hkv, block, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(2) % 8 == 0,
              "decode_attention: contiguous caches, blocks of a multiple of 8 positions");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && q.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "decode_attention: q and caches all fp32 or all bf16");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == dim, "decode_attention: head_dim ", dim, " of q against ", k_cache.size(3));
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxRep, "decode_attention: ", heads, " heads over ",
              kv_heads, " KV heads");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
              block_table.size(0) >= rows, "decode_attention: an int32 block table row per query row");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.size(0) >= rows,
              "decode_attention: int64 lengths, one per query row");
  const at::Tensor len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= block_table.size(1) * k_cache.size(2), "decode_attention: row ", b,
                " length ", lp[b], " past its blocks");
  const at::Tensor qc = q.contiguous();
  at::Tensor y = at::empty(q.sizes(), q.options());
  if (dtype == at::kFloat) run_dim<float>(dim, qc, k_cache, v_cache, block_table, lp, y);
  else run_dim<c10::BFloat16>(dim, qc, k_cache, v_cache, block_table, lp, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantdeploy_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantdeploy_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
