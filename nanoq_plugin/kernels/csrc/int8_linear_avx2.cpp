// int8-a8 linear layers on x86 CPUs with AVX2 (no AVX-512, no VNNI), compiled on first use by
// nanoq_plugin/kernels/cpu_int8_simd.py and registered as `nano_cpu::int8_dynamic_linear_avx2`.
//
// Scheme int8-a8: int8 weights per channel x int8 activations quantized per token at run time. The spec is
// nanoq_plugin/format/activations.py; this computes the same integers and the same float32 products, so it
// agrees with the spec bit for bit.
//
//   tensor    dtype    shape                 meaning
//   x         f32/bf16/f16  [M, K]           activations (contiguous)
//   packed    int8     [N/16, K/4, 16, 4]    q[4j + d, 16b + l] at [b, j, l, d] (the AVX-512 kernel's layout)
//   scales    float32  [N]                   per-channel weight scales
//   out       x.dtype  [M, N]
//
// AVX2 has no byte dot product with 32-bit sums. `vpmaddubsw` multiplies unsigned by signed bytes and adds
// pairs into int16 with saturation: with activations offset by +128 (as the VNNI kernel does) a pair reaches
// 2 * 255 * 127 and saturates. So the sign moves to the weights instead: |x_q| (0..127, unsigned) times
// sign(x_q) * q (-127..127) gives the same products, and a pair stays within 2 * 127 * 127 < 32767. Then
// `vpmaddwd` with ones adds the pairs into int32: per 32 bytes of weights (8 outputs x 4 inputs) and one row,
// sign + maddubs + madd + add. |x_q| is stored beside x_q when the row is quantized.
//
// Driver: parallel over blocks of 16 outputs (two registers of 8 int32 lanes, one 64-byte group of `packed`
// per 4 inputs); per block, row tiles of up to 4 rows walk all of K (the block's weights, 16 x K bytes, stay in
// L1/L2 between tiles); accumulators as named variables. Then both scales, and one rounding to x's dtype.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 8;          // int32 / float32 lanes per register
constexpr int64_t kBlockN = 16;        // outputs per group of `packed`, and per parallel task
constexpr int64_t kDepth = 4;          // inputs per int32 lane
constexpr int64_t kMaxMR = 4;          // rows per register tile (4 x 2 accumulators)
constexpr int64_t kQuantizeGrain = 16;  // rows quantized per task: fewer run inline

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// 8 float32 results stored in the output dtype, rounded to nearest even (as torch's conversions round).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Row m of x -> x_q (int8 [K]), |x_q| (uint8 [K]) and its scale s_x (format.activations: absmax / 127).
template <typename T>
float quantize_row(const T* x, int8_t* q, uint8_t* magnitude, int64_t K) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_bit, load8(x + k)));
  float absmax = reduce_max8(vmax);
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(x[k])));
  const float scale = absmax / 127.0f;
  if (!(scale > 0.0f)) {
    std::memset(q, 0, K);
    std::memset(magnitude, 0, K);
    return 0.0f;
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (k = 0; k + kLanes <= K; k += kLanes) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(load8(x + k), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    const __m128i i8 = _mm_packs_epi16(i16, i16);  // 8 values in the low 8 bytes
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), i8);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(magnitude + k), _mm_abs_epi8(i8));
  }
  for (; k < K; ++k) {
    const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(static_cast<float>(x[k]) / scale)));
    q[k] = static_cast<int8_t>(v);
    magnitude[k] = static_cast<uint8_t>(std::abs(static_cast<int>(v)));
  }
  return scale;
}

inline __m256i broadcast_dword(const void* p) {
  int32_t dword;
  std::memcpy(&dword, p, sizeof(dword));
  return _mm256_set1_epi32(dword);
}

// acc += sum over 4 inputs of x_q * q, per int32 lane (one output): |x_q| times q with x_q's sign.
inline __m256i dot4(__m256i acc, __m256i magnitude, __m256i x_q, __m256i w, __m256i ones) {
  const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w, x_q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

template <typename T>
struct Problem {
  const int8_t* q;            // [M, K] x_q
  const uint8_t* magnitude;   // [M, K] |x_q|
  const float* x_scales;      // [M]
  const int8_t* packed;       // [N/16, K/4, 16, 4]
  const float* w_scales;      // [N]
  T* out;                     // [M, N]
  int64_t N, K;

  void finish(__m256i acc, int64_t m, int64_t n) const {
    const __m256 exact = _mm256_cvtepi32_ps(acc);
    store8(out + m * N + n, _mm256_mul_ps(_mm256_mul_ps(exact, _mm256_set1_ps(x_scales[m])),
                                          _mm256_loadu_ps(w_scales + n)));
  }
};

#define NANO_ROW_DOT(i)                                                                                \
  if constexpr (MR > i) {                                                                              \
    const __m256i xq = broadcast_dword(p.q + (m0 + i) * p.K + k);                                      \
    const __m256i xm = broadcast_dword(p.magnitude + (m0 + i) * p.K + k);                              \
    c##i##0 = dot4(c##i##0, xm, xq, w0, ones);                                                         \
    c##i##1 = dot4(c##i##1, xm, xq, w1, ones);                                                         \
  }
#define NANO_ROW_FINISH(i)                                                                             \
  if constexpr (MR > i) {                                                                              \
    p.finish(c##i##0, m0 + i, n0);                                                                     \
    p.finish(c##i##1, m0 + i, n0 + kLanes);                                                            \
  }

// Rows m0..m0+MR-1 x outputs n0..n0+15 over all of K.
template <int MR, typename T>
void tile(const Problem<T>& p, int64_t m0, int64_t n0) {
  static_assert(MR >= 1 && MR <= kMaxMR, "tile out of range");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const int8_t* weights = p.packed + (n0 / kBlockN) * p.K * kBlockN;
  for (int64_t k = 0; k < p.K; k += kDepth, weights += kDepth * kBlockN) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + 32));
    NANO_ROW_DOT(0) NANO_ROW_DOT(1) NANO_ROW_DOT(2) NANO_ROW_DOT(3)
  }
  NANO_ROW_FINISH(0) NANO_ROW_FINISH(1) NANO_ROW_FINISH(2) NANO_ROW_FINISH(3)
}
#undef NANO_ROW_DOT
#undef NANO_ROW_FINISH

template <typename T>
void gemm(const Problem<T>& p, int64_t M) {
  const int64_t blocks = p.N / kBlockN;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
        switch (std::min(kMaxMR, M - m0)) {
          case 1: tile<1>(p, m0, b * kBlockN); break;
          case 2: tile<2>(p, m0, b * kBlockN); break;
          case 3: tile<3>(p, m0, b * kBlockN); break;
          default: tile<4>(p, m0, b * kBlockN); break;
        }
      }
    }
  });
}

template <typename T>
void dynamic_int8(const T* x, const at::Tensor& packed, const at::Tensor& scales, T* out, int64_t M, int64_t N,
                  int64_t K) {
  std::vector<int8_t> q(M * K);
  std::vector<uint8_t> magnitude(M * K);
  std::vector<float> xs(M);
  at::parallel_for(0, M, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) xs[m] = quantize_row(x + m * K, q.data() + m * K, magnitude.data() + m * K, K);
  });
  const Problem<T> problem{q.data(), magnitude.data(), xs.data(), packed.data_ptr<int8_t>(),
                           scales.data_ptr<float>(), out, N, K};
  gemm(problem, M);
}

at::Tensor int8_dynamic_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kBlockN;
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kBlockN && packed.size(3) == kDepth,
              "packed must be contiguous int8 [N/16, K/4, 16, 4]");
  TORCH_CHECK(packed.size(1) * kDepth == K, "packed has K = ", packed.size(1) * kDepth, ", x has K = ", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales must be contiguous float32 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: dynamic_int8(x.data_ptr<float>(), packed, scales, out.data_ptr<float>(), M, N, K); break;
    case at::kBFloat16:
      dynamic_int8(x.data_ptr<at::BFloat16>(), packed, scales, out.data_ptr<at::BFloat16>(), M, N, K);
      break;
    case at::kHalf: dynamic_int8(x.data_ptr<at::Half>(), packed, scales, out.data_ptr<at::Half>(), M, N, K); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("int8_dynamic_linear_avx2(Tensor x, Tensor packed, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("int8_dynamic_linear_avx2", int8_dynamic_linear_avx2);
}
