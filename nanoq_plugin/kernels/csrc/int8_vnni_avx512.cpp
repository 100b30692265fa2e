// Scheme int8-a8 on x86 CPUs with AVX-512 VNNI: int8 weights x int8 activations quantized per token at run
// time, compiled on first use by nanoq_plugin/kernels/cpu_int8_dynamic.py and registered as
// `nano_cpu::int8_dynamic_linear`. The spec is nanoq_plugin/format/activations.py; this computes the same
// integers and the same float32 products, so it agrees with the spec before the final rounding.
//
// Weight layout (made by cpu_int8_dynamic.pack_weight): `packed [N/16, K/4, 16, 4]` int8: for every block of
// 16 outputs and 4 inputs, 64 bytes, output lane n holding q[k0..k0+3, n] — one `vpdpbusd` operand, whose
// 16 int32 lanes each accumulate a 4-input dot product. `vpdpbusd` multiplies unsigned by signed bytes, so
// the activations are stored offset by +128 (u = x_q + 128, 1..255) and the sums corrected once:
//     sum_k x_q[k] q[k, n] = sum_k u[k] q[k, n] - 128 sum_k q[k, n]      (weight_sums [N] int32)
//
// One call quantizes x (per row: absmax, x / s rounded half to even, clamped to +-127) and runs the GEMM in
// register tiles of MR rows x NR*16 outputs (int32 accumulators), parallel over blocks of 64 outputs, then
// scales each sum by s_x[m] and s_w[n] in float32 and rounds once to the activation dtype. With more rows
// than one tile holds, K is walked in chunks whose 64-output weight panel (16 KiB) stays in L1 while every
// row tile passes over it (the int32 sums wait in a per-thread buffer between chunks); without the chunks
// each row tile streams the panel again from L2, and measured here that halved the multiply rate.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 16;   // outputs per register
constexpr int64_t kDepth = 4;    // inputs per int32 lane
constexpr int64_t kMaxNR = 4;    // registers of outputs per tile (64 outputs)
constexpr int64_t kMaxMR = 6;    // activation rows per tile (6 x 4 = 24 accumulators)
constexpr int64_t kPartialStride = kMaxNR * kLanes;  // int32 sums kept per row between K chunks
constexpr int64_t kChunkK = 256;  // inputs per K chunk: 64 outputs x 256 inputs = 16 KiB of weights
constexpr int64_t kQuantizeGrain = 16;  // rows quantized per task: fewer run inline (a parallel region costs more)

// 16 activations from x (float32 / bfloat16 / float16) as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 float32 results stored in the output dtype, rounded to nearest even (as torch's conversions round).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Row m of x -> u = x_q + 128 (uint8 [K]) and its scale s_x (format.activations: absmax / 127).
template <typename T>
float quantize_row(const T* x, uint8_t* u, int64_t K) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x + k)));
  float absmax = _mm512_reduce_max_ps(vmax);
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(x[k])));
  const float scale = absmax / 127.0f;
  if (!(scale > 0.0f)) {
    std::memset(u, 128, K);
    return 0.0f;
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (k = 0; k + kLanes <= K; k += kLanes) {
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x + k), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    const __m512i shifted = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(shifted));
  }
  for (; k < K; ++k) {
    const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(static_cast<float>(x[k]) / scale)));
    u[k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
  }
  return scale;
}

// Sums of one accumulator -> y = (float(acc - 128 sum_k q) * s_x) * s_w, stored as 16 outputs.
template <typename T>
inline void finish(__m512i acc, __m512i offset, __m512 w_scales, float x_scale, T* out) {
  const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, offset));
  store16(out, _mm512_mul_ps(_mm512_mul_ps(exact, _mm512_set1_ps(x_scale)), w_scales));
}

// Rows m0..m0+MR-1 x outputs n0..n0+NR*16-1: int32 dot products over K, then the scales, then the store.
// The MR x NR accumulators are named variables (GCC keeps an array of them in memory, storing every update).
#define NANO_ROW_ACC(i) __m512i c##i##0, c##i##1, c##i##2, c##i##3;                                   \
  c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_setzero_si512();                                     \
  if constexpr (MR > i) {                                                                               \
    if (k0 > 0) {                                                                                       \
      const int32_t* row = partial + (m0 + i) * kPartialStride;                                         \
      c##i##0 = _mm512_loadu_si512(row);                                                                \
      if constexpr (NR > 1) c##i##1 = _mm512_loadu_si512(row + kLanes);                                 \
      if constexpr (NR > 2) c##i##2 = _mm512_loadu_si512(row + 2 * kLanes);                             \
      if constexpr (NR > 3) c##i##3 = _mm512_loadu_si512(row + 3 * kLanes);                             \
    }                                                                                                   \
  }
#define NANO_ROW_DOT(i)                                                                                 \
  if constexpr (MR > i) {                                                                               \
    int32_t quad;                                                                                       \
    std::memcpy(&quad, u + (m0 + i) * K + k, sizeof(quad));                                             \
    const __m512i xv = _mm512_set1_epi32(quad);                                                          \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, xv, w0);                                                      \
    if constexpr (NR > 1) c##i##1 = _mm512_dpbusd_epi32(c##i##1, xv, w1);                                \
    if constexpr (NR > 2) c##i##2 = _mm512_dpbusd_epi32(c##i##2, xv, w2);                                \
    if constexpr (NR > 3) c##i##3 = _mm512_dpbusd_epi32(c##i##3, xv, w3);                                \
  }
#define NANO_ROW_FINISH(i, j)                                                                           \
  if constexpr (MR > i) finish(c##i##j, offset, ws, x_scales[m0 + i], out + (m0 + i) * N + n);
#define NANO_ROW_KEEP(i)                                                                                \
  if constexpr (MR > i) {                                                                               \
    int32_t* row = partial + (m0 + i) * kPartialStride;                                                 \
    _mm512_storeu_si512(row, c##i##0);                                                                  \
    if constexpr (NR > 1) _mm512_storeu_si512(row + kLanes, c##i##1);                                   \
    if constexpr (NR > 2) _mm512_storeu_si512(row + 2 * kLanes, c##i##2);                               \
    if constexpr (NR > 3) _mm512_storeu_si512(row + 3 * kLanes, c##i##3);                               \
  }

// Inputs k0..k1-1 of the tile: the sums start from `partial` unless k0 == 0 and end there unless k1 == K.
template <int MR, int NR, typename T>
void tile(const uint8_t* u, const float* x_scales, const int8_t* packed, const int32_t* weight_sums,
          const float* w_scales, T* out, int32_t* partial, int64_t m0, int64_t n0, int64_t k0, int64_t k1,
          int64_t N, int64_t K) {
  static_assert(MR >= 1 && MR <= kMaxMR && NR >= 1 && NR <= kMaxNR, "tile out of range");
  NANO_ROW_ACC(0) NANO_ROW_ACC(1) NANO_ROW_ACC(2) NANO_ROW_ACC(3) NANO_ROW_ACC(4) NANO_ROW_ACC(5)
  const int64_t block_bytes = K * kLanes;  // one block of 16 outputs: [K/4, 16, 4]
  const int8_t* w = packed + (n0 / kLanes) * block_bytes;
  for (int64_t k = k0; k < k1; k += kDepth) {
    const int8_t* wk = w + k * kLanes;
    const __m512i w0 = _mm512_loadu_si512(wk);
    const __m512i w1 = NR > 1 ? _mm512_loadu_si512(wk + block_bytes) : w0;
    const __m512i w2 = NR > 2 ? _mm512_loadu_si512(wk + 2 * block_bytes) : w0;
    const __m512i w3 = NR > 3 ? _mm512_loadu_si512(wk + 3 * block_bytes) : w0;
    NANO_ROW_DOT(0) NANO_ROW_DOT(1) NANO_ROW_DOT(2) NANO_ROW_DOT(3) NANO_ROW_DOT(4) NANO_ROW_DOT(5)
  }
  if (k1 < K) {
    NANO_ROW_KEEP(0) NANO_ROW_KEEP(1) NANO_ROW_KEEP(2) NANO_ROW_KEEP(3) NANO_ROW_KEEP(4) NANO_ROW_KEEP(5)
    return;
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j * kLanes;
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(weight_sums + n), 7);  // 128 * sum_k q
    const __m512 ws = _mm512_loadu_ps(w_scales + n);
    switch (j) {
      case 0: NANO_ROW_FINISH(0, 0) NANO_ROW_FINISH(1, 0) NANO_ROW_FINISH(2, 0) NANO_ROW_FINISH(3, 0)
              NANO_ROW_FINISH(4, 0) NANO_ROW_FINISH(5, 0) break;
      case 1: NANO_ROW_FINISH(0, 1) NANO_ROW_FINISH(1, 1) NANO_ROW_FINISH(2, 1) NANO_ROW_FINISH(3, 1)
              NANO_ROW_FINISH(4, 1) NANO_ROW_FINISH(5, 1) break;
      case 2: NANO_ROW_FINISH(0, 2) NANO_ROW_FINISH(1, 2) NANO_ROW_FINISH(2, 2) NANO_ROW_FINISH(3, 2)
              NANO_ROW_FINISH(4, 2) NANO_ROW_FINISH(5, 2) break;
      default: NANO_ROW_FINISH(0, 3) NANO_ROW_FINISH(1, 3) NANO_ROW_FINISH(2, 3) NANO_ROW_FINISH(3, 3)
               NANO_ROW_FINISH(4, 3) NANO_ROW_FINISH(5, 3) break;
    }
  }
}
#undef NANO_ROW_ACC
#undef NANO_ROW_DOT
#undef NANO_ROW_FINISH
#undef NANO_ROW_KEEP

template <int NR, typename T>
void rows_tile(int64_t rows, const uint8_t* u, const float* xs, const int8_t* packed, const int32_t* sums,
               const float* ws, T* out, int32_t* partial, int64_t m0, int64_t n0, int64_t k0, int64_t k1,
               int64_t N, int64_t K) {
  switch (rows) {
    case 1: tile<1, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
    case 2: tile<2, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
    case 3: tile<3, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
    case 4: tile<4, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
    case 5: tile<5, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
    default: tile<6, NR>(u, xs, packed, sums, ws, out, partial, m0, n0, k0, k1, N, K); break;
  }
}

template <typename T>
void run(const T* x, const int8_t* packed, const int32_t* sums, const float* ws, T* out, int64_t M, int64_t N,
         int64_t K) {
  std::vector<uint8_t> u(M * K);
  std::vector<float> xs(M);
  at::parallel_for(0, M, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) xs[m] = quantize_row(x + m * K, u.data() + m * K, K);
  });
  const int64_t wide = kMaxNR * kLanes;
  const int64_t blocks = (N + wide - 1) / wide;
  const int64_t chunk = M > kMaxMR ? kChunkK : K;  // one row tile reads the panel once: no chunks needed
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> partial(chunk < K ? M * kPartialStride : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * wide, width = std::min(wide, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t k1 = std::min(K, k0 + chunk);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
          const int64_t rows = std::min(kMaxMR, M - m0);
          if (width == wide) {
            rows_tile<kMaxNR>(rows, u.data(), xs.data(), packed, sums, ws, out, partial.data(), m0, n0, k0, k1,
                              N, K);
          } else {
            for (int64_t n = n0; n < n0 + width; n += kLanes)
              rows_tile<1>(rows, u.data(), xs.data(), packed, sums, ws, out,
                           partial.data() + (n - n0), m0, n, k0, k1, N, K);
          }
        }
      }
    }
  });
}

at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sums,
                               const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(3) == kDepth,
              "packed must be contiguous int8 [N/16, K/4, 16, 4]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kLanes;
  TORCH_CHECK(packed.size(1) * kDepth == K, "packed has K = ", packed.size(1) * kDepth, ", x has K = ", K);
  TORCH_CHECK(weight_sums.scalar_type() == at::kInt && weight_sums.numel() == N && weight_sums.is_contiguous(),
              "weight_sums must be contiguous int32 [N]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales must be contiguous float32 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const int32_t* sums = weight_sums.data_ptr<int32_t>();
  const float* ws = scales.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: run(x.data_ptr<float>(), w, sums, ws, out.data_ptr<float>(), M, N, K); break;
    case at::kBFloat16: run(x.data_ptr<at::BFloat16>(), w, sums, ws, out.data_ptr<at::BFloat16>(), M, N, K); break;
    case at::kHalf: run(x.data_ptr<at::Half>(), w, sums, ws, out.data_ptr<at::Half>(), M, N, K); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("int8_dynamic_linear(Tensor x, Tensor packed, Tensor weight_sums, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) { m.impl("int8_dynamic_linear", int8_dynamic_linear); }
