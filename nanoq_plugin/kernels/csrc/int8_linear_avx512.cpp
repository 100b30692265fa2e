// int8 linear layers on x86 CPUs with AVX-512, compiled on first use by nanoq_plugin/kernels/cpu_int8_simd.py and
// registered as two `nano_cpu::` ops that share one GEMM driver (register tiles, K chunks, threads):
//
// `int8_dynamic_linear` — scheme int8-a8 (needs VNNI): int8 weights x int8 activations quantized per token at
// run time. The spec is nanoq_plugin/format/activations.py; this computes the same integers and the same float32
// products, so it agrees with the spec before the final rounding. Weights `packed [N/16, K/4, 16, 4]` int8: for
// every 16 outputs and 4 inputs, 64 bytes, output lane n holding q[k0..k0+3, n] — one `vpdpbusd` operand, whose
// 16 int32 lanes each accumulate a 4-input dot product (64 multiply-adds per instruction). `vpdpbusd` multiplies
// unsigned by signed bytes, so the activations are stored offset by +128 (u = x_q + 128, 1..255) and the sums
// corrected once:  sum_k x_q[k] q[k, n] = sum_k u[k] q[k, n] - 128 sum_k q[k, n]   (weight_sums [N] int32).
//
// `int8_weight_only_linear` — scheme int8 with bfloat16 activations (needs AVX-512 BF16): the activations are
// used as they are. Weights `packed [N/16, K/2, 16, 2]` int8; per K chunk the 64-output panel is converted once
// to bfloat16 (exact: |q| <= 127) into a per-thread buffer that stays in L1, and `vdpbf16ps` (32 multiply-adds,
// float32 sums) runs the tiles on it; the channel scales are applied to the sums.
//
// Driver: parallel over blocks of 64 outputs; per block, K in chunks (a panel of 64 outputs x one chunk stays in
// L1 while every row tile of MR <= 6 rows passes over it; the sums wait in a per-thread buffer between chunks);
// register tiles of MR rows x NR <= 4 registers of 16 outputs, the accumulators named variables (GCC keeps an
// array of them in memory and stores every update). Then scales, and one rounding to the activation dtype.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 16;                 // outputs per register
constexpr int64_t kMaxNR = 4;                  // registers of outputs per tile
constexpr int64_t kMaxMR = 6;                  // activation rows per tile (6 x 4 = 24 accumulators)
constexpr int64_t kBlockN = kMaxNR * kLanes;   // outputs per parallel task, and sums kept per row
constexpr int64_t kQuantizeGrain = 16;         // rows quantized per task: fewer run inline

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
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Accumulators kept between K chunks (4-byte lanes, unaligned buffer).
template <typename Acc>
inline Acc load_sums(const int32_t* p) {
  Acc acc;
  std::memcpy(&acc, p, sizeof(acc));
  return acc;
}
template <typename Acc>
inline void keep_sums(int32_t* p, Acc acc) { std::memcpy(p, &acc, sizeof(acc)); }

inline __m512i broadcast_dword(const void* p) {
  int32_t dword;
  std::memcpy(&dword, p, sizeof(dword));
  return _mm512_set1_epi32(dword);
}

// ---------------------------------------------------------------- int8-a8: VNNI on per-token int8 activations

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
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x + k), vscale),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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

template <typename T>
struct DynamicInt8 {
  using Acc = __m512i;
  static constexpr int64_t kDepth = 4;     // inputs per int32 lane
  static constexpr int64_t kChunk = 256;   // 64 outputs x 256 inputs = 16 KiB of int8 weights
  static constexpr int64_t kPanelElements = 0;  // the packed weights are the operand: no panel
  const uint8_t* u;                        // [M, K] activations + 128
  const float* x_scales;                   // [M]
  const int8_t* packed;                    // [N/16, K/4, 16, 4]
  const int32_t* weight_sums;              // [N]
  const float* w_scales;                   // [N]
  T* out;                                  // [M, N]
  int64_t N, K;

  static Acc zero() { return _mm512_setzero_si512(); }
  static Acc dot(Acc acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, x, w); }
  int64_t chunk(int64_t M) const { return M > kMaxMR ? kChunk : K; }  // one row tile reads the panel once
  void load_panel(int16_t*, int64_t, int64_t, int64_t, int64_t) const {}
  __m512i weights(const int16_t*, int64_t n, int64_t, int64_t, int64_t k) const {
    return _mm512_loadu_si512(packed + ((n / kLanes) * K + k) * kLanes);
  }
  __m512i activations(int64_t m, int64_t k) const { return broadcast_dword(u + m * K + k); }
  void finish(Acc acc, int64_t m, int64_t n) const {
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(weight_sums + n), 7);  // 128 * sum_k q
    const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, offset));
    store16(out + m * N + n, _mm512_mul_ps(_mm512_mul_ps(exact, _mm512_set1_ps(x_scales[m])),
                                           _mm512_loadu_ps(w_scales + n)));
  }
};

// ------------------------------------------------------- int8 weight-only: bfloat16 dot products on a bf16 panel

struct WeightOnlyInt8 {
  using Acc = __m512;
  static constexpr int64_t kDepth = 2;     // inputs per float32 lane of vdpbf16ps
  static constexpr int64_t kChunk = 128;   // 64 outputs x 128 inputs = 16 KiB of bfloat16 panel
  static constexpr int64_t kPanelElements = kMaxNR * kChunk * kLanes;
  const at::BFloat16* x;                   // [M, K]
  const int8_t* packed;                    // [N/16, K/2, 16, 2]
  const float* w_scales;                   // [N]
  at::BFloat16* out;                       // [M, N]
  int64_t N, K;

  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc dot(Acc acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  int64_t chunk(int64_t) const { return kChunk; }
  // Outputs n0..n0+width-1, inputs k0..k1-1 -> panel[j][(k - k0) / 2][32 bf16]: the same order as `packed`.
  void load_panel(int16_t* panel, int64_t n0, int64_t width, int64_t k0, int64_t k1) const {
    const int64_t steps = (k1 - k0) / kDepth;
    for (int64_t j = 0; j < width / kLanes; ++j) {
      const int8_t* src = packed + ((n0 / kLanes + j) * K + k0) * kLanes;
      int16_t* dst = panel + j * kChunk * kLanes;
      for (int64_t s = 0; s < steps; ++s, src += 2 * kLanes, dst += 2 * kLanes) {
        const __m128i* bytes = reinterpret_cast<const __m128i*>(src);
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1)));
        _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(high, low));
      }
    }
  }
  __m512i weights(const int16_t* panel, int64_t n, int64_t n0, int64_t k0, int64_t k) const {
    return _mm512_loadu_si512(panel + ((n - n0) / kLanes) * kChunk * kLanes + (k - k0) * kLanes);
  }
  __m512i activations(int64_t m, int64_t k) const { return broadcast_dword(x + m * K + k); }
  void finish(Acc acc, int64_t m, int64_t n) const {
    store16(out + m * N + n, _mm512_mul_ps(acc, _mm512_loadu_ps(w_scales + n)));
  }
};

// ------------------------------------------------------------------------------------------- shared GEMM driver

#define NANO_ROW_ACC(i)                                                                                   \
  Acc c##i##0 = P::zero(), c##i##1 = P::zero(), c##i##2 = P::zero(), c##i##3 = P::zero();               \
  if constexpr (MR > i) {                                                                                 \
    if (k0 > 0) {                                                                                         \
      const int32_t* row = partial + (m0 + i) * kBlockN;                                                  \
      c##i##0 = load_sums<Acc>(row);                                                                      \
      if constexpr (NR > 1) c##i##1 = load_sums<Acc>(row + kLanes);                                       \
      if constexpr (NR > 2) c##i##2 = load_sums<Acc>(row + 2 * kLanes);                                   \
      if constexpr (NR > 3) c##i##3 = load_sums<Acc>(row + 3 * kLanes);                                   \
    }                                                                                                     \
  }
#define NANO_ROW_DOT(i)                                                                                   \
  if constexpr (MR > i) {                                                                                 \
    const __m512i xv = p.activations(m0 + i, k);                                                          \
    c##i##0 = P::dot(c##i##0, xv, w0);                                                                    \
    if constexpr (NR > 1) c##i##1 = P::dot(c##i##1, xv, w1);                                              \
    if constexpr (NR > 2) c##i##2 = P::dot(c##i##2, xv, w2);                                              \
    if constexpr (NR > 3) c##i##3 = P::dot(c##i##3, xv, w3);                                              \
  }
#define NANO_ROW_KEEP(i)                                                                                  \
  if constexpr (MR > i) {                                                                                 \
    int32_t* row = partial + (m0 + i) * kBlockN;                                                          \
    keep_sums(row, c##i##0);                                                                              \
    if constexpr (NR > 1) keep_sums(row + kLanes, c##i##1);                                               \
    if constexpr (NR > 2) keep_sums(row + 2 * kLanes, c##i##2);                                           \
    if constexpr (NR > 3) keep_sums(row + 3 * kLanes, c##i##3);                                           \
  }
#define NANO_ROW_FINISH(i)                                                                                \
  if constexpr (MR > i) {                                                                                 \
    p.finish(c##i##0, m0 + i, n0);                                                                        \
    if constexpr (NR > 1) p.finish(c##i##1, m0 + i, n0 + kLanes);                                         \
    if constexpr (NR > 2) p.finish(c##i##2, m0 + i, n0 + 2 * kLanes);                                     \
    if constexpr (NR > 3) p.finish(c##i##3, m0 + i, n0 + 3 * kLanes);                                     \
  }

// Rows m0..m0+MR-1 x outputs n0..n0+NR*16-1 over inputs k0..k1-1 of one chunk (whose panel starts at output
// panel_n0): the sums start from `partial` unless k0 == 0, and end there unless k1 == K.
template <int MR, int NR, typename P>
void tile(const P& p, const int16_t* panel, int32_t* partial, int64_t m0, int64_t n0, int64_t panel_n0,
          int64_t k0, int64_t k1) {
  using Acc = typename P::Acc;
  static_assert(MR >= 1 && MR <= kMaxMR && NR >= 1 && NR <= kMaxNR, "tile out of range");
  NANO_ROW_ACC(0) NANO_ROW_ACC(1) NANO_ROW_ACC(2) NANO_ROW_ACC(3) NANO_ROW_ACC(4) NANO_ROW_ACC(5)
  for (int64_t k = k0; k < k1; k += P::kDepth) {
    const __m512i w0 = p.weights(panel, n0, panel_n0, k0, k);
    const __m512i w1 = NR > 1 ? p.weights(panel, n0 + kLanes, panel_n0, k0, k) : w0;
    const __m512i w2 = NR > 2 ? p.weights(panel, n0 + 2 * kLanes, panel_n0, k0, k) : w0;
    const __m512i w3 = NR > 3 ? p.weights(panel, n0 + 3 * kLanes, panel_n0, k0, k) : w0;
    NANO_ROW_DOT(0) NANO_ROW_DOT(1) NANO_ROW_DOT(2) NANO_ROW_DOT(3) NANO_ROW_DOT(4) NANO_ROW_DOT(5)
  }
  if (k1 < p.K) {
    NANO_ROW_KEEP(0) NANO_ROW_KEEP(1) NANO_ROW_KEEP(2) NANO_ROW_KEEP(3) NANO_ROW_KEEP(4) NANO_ROW_KEEP(5)
    return;
  }
  NANO_ROW_FINISH(0) NANO_ROW_FINISH(1) NANO_ROW_FINISH(2) NANO_ROW_FINISH(3) NANO_ROW_FINISH(4) NANO_ROW_FINISH(5)
}
#undef NANO_ROW_ACC
#undef NANO_ROW_DOT
#undef NANO_ROW_KEEP
#undef NANO_ROW_FINISH

template <int NR, typename P>
void row_tile(const P& p, int64_t rows, const int16_t* panel, int32_t* partial, int64_t m0, int64_t n0,
              int64_t panel_n0, int64_t k0, int64_t k1) {
  switch (rows) {
    case 1: tile<1, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
    case 2: tile<2, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
    case 3: tile<3, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
    case 4: tile<4, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
    case 5: tile<5, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
    default: tile<6, NR>(p, panel, partial, m0, n0, panel_n0, k0, k1); break;
  }
}

// `out [M, N] = x [M, K] @ W.T` through policy P: parallel over blocks of 64 outputs, K chunks, row tiles.
template <typename P>
void gemm(const P& p, int64_t M) {
  const int64_t blocks = (p.N + kBlockN - 1) / kBlockN;
  const int64_t chunk = p.chunk(M);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> partial(chunk < p.K ? M * kBlockN : 0);  // float32 or int32 sums, 4 bytes each
    std::vector<int16_t> panel(P::kPanelElements);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kBlockN, width = std::min(kBlockN, p.N - n0);
      for (int64_t k0 = 0; k0 < p.K; k0 += chunk) {
        const int64_t k1 = std::min(p.K, k0 + chunk);
        p.load_panel(panel.data(), n0, width, k0, k1);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
          const int64_t rows = std::min(kMaxMR, M - m0);
          if (width == kBlockN) {
            row_tile<kMaxNR>(p, rows, panel.data(), partial.data(), m0, n0, n0, k0, k1);
          } else {  // 16-output registers one at a time, each with its own slot of the kept sums
            for (int64_t n = n0; n < n0 + width; n += kLanes)
              row_tile<1>(p, rows, panel.data(), partial.data() + (n - n0), m0, n, n0, k0, k1);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------ ops

void check_weights(const at::Tensor& packed, int64_t depth, int64_t K, const at::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(3) == depth,
              "packed must be contiguous int8 [N/16, K/", depth, ", 16, ", depth, "]");
  TORCH_CHECK(packed.size(1) * depth == K, "packed has K = ", packed.size(1) * depth, ", x has K = ", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == packed.size(0) * kLanes &&
                  scales.is_contiguous(), "scales must be contiguous float32 [N]");
}

template <typename T>
void dynamic_int8(const T* x, const at::Tensor& packed, const at::Tensor& sums, const at::Tensor& scales, T* out,
                  int64_t M, int64_t N, int64_t K) {
  std::vector<uint8_t> u(M * K);
  std::vector<float> xs(M);
  at::parallel_for(0, M, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) xs[m] = quantize_row(x + m * K, u.data() + m * K, K);
  });
  const DynamicInt8<T> policy{u.data(), xs.data(), packed.data_ptr<int8_t>(), sums.data_ptr<int32_t>(),
                              scales.data_ptr<float>(), out, N, K};
  gemm(policy, M);
}

at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sums,
                               const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kLanes;
  check_weights(packed, DynamicInt8<float>::kDepth, K, scales);
  TORCH_CHECK(weight_sums.scalar_type() == at::kInt && weight_sums.numel() == N && weight_sums.is_contiguous(),
              "weight_sums must be contiguous int32 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      dynamic_int8(x.data_ptr<float>(), packed, weight_sums, scales, out.data_ptr<float>(), M, N, K);
      break;
    case at::kBFloat16:
      dynamic_int8(x.data_ptr<at::BFloat16>(), packed, weight_sums, scales, out.data_ptr<at::BFloat16>(), M, N, K);
      break;
    case at::kHalf:
      dynamic_int8(x.data_ptr<at::Half>(), packed, weight_sums, scales, out.data_ptr<at::Half>(), M, N, K);
      break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

at::Tensor int8_weight_only_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be a contiguous bfloat16 [M, K] matrix");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kLanes;
  check_weights(packed, WeightOnlyInt8::kDepth, K, scales);
  at::Tensor out = at::empty({M, N}, x.options());
  const WeightOnlyInt8 policy{x.data_ptr<at::BFloat16>(), packed.data_ptr<int8_t>(), scales.data_ptr<float>(),
                              out.data_ptr<at::BFloat16>(), N, K};
  gemm(policy, M);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("int8_dynamic_linear(Tensor x, Tensor packed, Tensor weight_sums, Tensor scales) -> Tensor");
  m.def("int8_weight_only_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("int8_dynamic_linear", int8_dynamic_linear);
  m.impl("int8_weight_only_linear", int8_weight_only_linear);
}
