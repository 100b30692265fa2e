// Weight-only int8 (per channel) and int2/3/4 (per group) linear layers on x86 CPUs with AVX2 + FMA, compiled on
// first use by nanoq_plugin/kernels/cpu_weight_only_avx2.py and registered as `nano_cpu::` ops.
//
// Why: without AVX-512 BF16, a bfloat16 GEMM (oneDNN's, PyTorch's) has no native instruction and runs ~7x
// slower than float32 FMAs; PyTorch's weight-only CPU kernels call it from a dozen rows on. Here the weights are
// decoded into a float32 panel and multiplied with FMAs in float32, whatever the activation dtype.
//
//   tensor    dtype    shape               meaning
//   x         f32/bf16/f16 [M, K]          activations (contiguous); converted to float32 once per call
//   int8:  packed  int8   [N/16, K, 16]    q[k, 16b + l] at [b, k, l];   W[n, k] = q * scale[n]
//          scales  f32    [N]              (applied to the sums)
//   int4:  packed  uint8  [N/16, K, 8]     byte [b, k, j] = q[k, 16b + j] | q[k, 16b + 8 + j] << 4 (codes 0..15)
//          scales  f32    [K/G, N]         W[n, k] = q * scales[k/G, n] + offsets[k/G, n]
//          offsets f32    [K/G, N]         (-zero * scale: the zero point folded in, 0 for symmetric schemes)
//   out       x.dtype  [M, N]
//
// Driver: parallel over blocks of 16 outputs; per block, K in chunks of 256: the chunk's weights are decoded once
// into a float32 panel [256][16] (16 KiB, stays in L1) and every row tile of up to 6 rows (12 accumulators of 8
// lanes) runs FMAs over it; sums between chunks wait in a per-thread [M, 16] buffer. The decode is paid once per
// weight whatever M is. Up to 3 rows (decode) the panel's store and reload would cost more than the FMAs it
// feeds: there the decoded registers go straight into the FMAs.

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 8;      // float32 lanes per register
constexpr int64_t kBlockN = 16;    // outputs per block: two registers
constexpr int64_t kChunk = 256;    // inputs per panel: 256 x 16 float32 = 16 KiB
constexpr int64_t kMaxMR = 6;      // rows per register tile (6 x 2 accumulators)
constexpr int64_t kDirectMaxRows = 3;  // up to here no panel: the decoded weights feed the FMAs directly

// Weight decoders: `each(b, k0, k1, f)` calls f(k, w0, w1) for inputs k0..k1-1 of outputs 16b..16b+15, with w0
// (outputs 0-7) and w1 (8-15) the float32 weights (int8: the codes, the channel scale comes after the sums).
struct Int8Channel {
  const int8_t* packed;  // [N/16, K, 16]
  int64_t K;
  template <typename F>
  inline void each(int64_t b, int64_t k0, int64_t k1, F&& f) const {
    const int8_t* src = packed + (b * K + k0) * kBlockN;
    for (int64_t k = k0; k < k1; ++k, src += kBlockN) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      f(k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))));
    }
  }
};

struct Int4Group {
  const uint8_t* packed;  // [N/16, K, 8]
  const float* scales;    // [K/G, N]
  const float* offsets;   // [K/G, N]
  int64_t K, N, G;
  template <typename F>
  inline void each(int64_t b, int64_t k0, int64_t k1, F&& f) const {
    const uint8_t* src = packed + (b * K + k0) * (kBlockN / 2);
    const __m256i low_nibble = _mm256_set1_epi32(0xF);
    for (int64_t k = k0; k < k1;) {
      const int64_t g = k / G, end = std::min(k1, (g + 1) * G);
      const float* s = scales + g * N + b * kBlockN;
      const float* o = offsets + g * N + b * kBlockN;
      const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + kLanes);
      const __m256 o0 = _mm256_loadu_ps(o), o1 = _mm256_loadu_ps(o + kLanes);
      for (; k < end; ++k, src += kBlockN / 2) {
        const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
        f(k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(codes, low_nibble)), s0, o0),
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4)), s1, o1));
      }
    }
  }
};

// The chunk's weights into panel[(k - k0) * 16 + l] (float32).
template <typename Decoder>
void decode_panel(const Decoder& weights, float* panel, int64_t b, int64_t k0, int64_t k1) {
  weights.each(b, k0, k1, [&](int64_t k, __m256 w0, __m256 w1) {
    _mm256_storeu_ps(panel + (k - k0) * kBlockN, w0);
    _mm256_storeu_ps(panel + (k - k0) * kBlockN + kLanes, w1);
  });
}

// Few rows (decode): the weights go from the decoder straight into the FMAs, no panel; each row keeps two sets of
// accumulators (even and odd k) so that one row has four independent FMA chains, not two (an FMA's latency is
// four cycles). Sums into partial [MR, 16] (float32).
template <int MR, typename Decoder>
void direct_rows(const Decoder& weights, const float* xf, float* partial, int64_t m0, int64_t K, int64_t b) {
  __m256 even[MR][2], odd[MR][2];
  for (int r = 0; r < MR; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm256_setzero_ps();
  weights.each(b, 0, K, [&](int64_t k, __m256 w0, __m256 w1) {
    if (k & 1) {
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xf + (m0 + r) * K + k);
        odd[r][0] = _mm256_fmadd_ps(xv, w0, odd[r][0]);
        odd[r][1] = _mm256_fmadd_ps(xv, w1, odd[r][1]);
      }
    } else {
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xf + (m0 + r) * K + k);
        even[r][0] = _mm256_fmadd_ps(xv, w0, even[r][0]);
        even[r][1] = _mm256_fmadd_ps(xv, w1, even[r][1]);
      }
    }
  });
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(partial + (m0 + r) * kBlockN, _mm256_add_ps(even[r][0], odd[r][0]));
    _mm256_storeu_ps(partial + (m0 + r) * kBlockN + kLanes, _mm256_add_ps(even[r][1], odd[r][1]));
  }
}

// acc[r] (two registers per row) over one chunk: rows m0..m0+MR-1 of xf [M, K] float32.
template <int MR>
void tile(const float* xf, const float* panel, float* partial, int64_t m0, int64_t K, int64_t k0, int64_t k1,
          bool first) {
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
#define NANO_INIT(i)                                                                              \
  if constexpr (MR > i) {                                                                         \
    a##i##0 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + (m0 + i) * kBlockN);       \
    a##i##1 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + (m0 + i) * kBlockN + kLanes); \
  }
  NANO_INIT(0) NANO_INIT(1) NANO_INIT(2) NANO_INIT(3) NANO_INIT(4) NANO_INIT(5)
#undef NANO_INIT
  const float* w = panel;
  for (int64_t k = k0; k < k1; ++k, w += kBlockN) {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + kLanes);
#define NANO_FMA(i)                                                     \
  if constexpr (MR > i) {                                               \
    const __m256 xv = _mm256_broadcast_ss(xf + (m0 + i) * K + k);       \
    a##i##0 = _mm256_fmadd_ps(xv, w0, a##i##0);                         \
    a##i##1 = _mm256_fmadd_ps(xv, w1, a##i##1);                         \
  }
    NANO_FMA(0) NANO_FMA(1) NANO_FMA(2) NANO_FMA(3) NANO_FMA(4) NANO_FMA(5)
#undef NANO_FMA
  }
#define NANO_KEEP(i)                                                        \
  if constexpr (MR > i) {                                                   \
    _mm256_storeu_ps(partial + (m0 + i) * kBlockN, a##i##0);                \
    _mm256_storeu_ps(partial + (m0 + i) * kBlockN + kLanes, a##i##1);       \
  }
  NANO_KEEP(0) NANO_KEEP(1) NANO_KEEP(2) NANO_KEEP(3) NANO_KEEP(4) NANO_KEEP(5)
#undef NANO_KEEP
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {  // round to nearest even, as torch's conversion does
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}
inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// out [M, N] = xf [M, K] @ W.T, W decoded by `weights`; `channel_scales` [N] multiply the sums when given.
template <typename T, typename Decoder>
void gemm(const Decoder& weights, const float* xf, const float* channel_scales, T* out, int64_t M, int64_t N,
          int64_t K) {
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kChunk * kBlockN), partial(M * kBlockN);
    for (int64_t b = begin; b < end; ++b) {
      if (M <= kDirectMaxRows) {
        switch (M) {
          case 1: direct_rows<1>(weights, xf, partial.data(), 0, K, b); break;
          case 2: direct_rows<2>(weights, xf, partial.data(), 0, K, b); break;
          default: direct_rows<3>(weights, xf, partial.data(), 0, K, b); break;
        }
      }
      for (int64_t k0 = 0; M > kDirectMaxRows && k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        decode_panel(weights, panel.data(), b, k0, k1);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
          switch (std::min(kMaxMR, M - m0)) {
            case 1: tile<1>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
            case 2: tile<2>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
            case 3: tile<3>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
            case 4: tile<4>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
            case 5: tile<5>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
            default: tile<6>(xf, panel.data(), partial.data(), m0, K, k0, k1, k0 == 0); break;
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t h = 0; h < kBlockN; h += kLanes) {
          __m256 v = _mm256_loadu_ps(partial.data() + m * kBlockN + h);
          if (channel_scales) v = _mm256_mul_ps(v, _mm256_loadu_ps(channel_scales + b * kBlockN + h));
          store8(out + m * N + b * kBlockN + h, v);
        }
      }
    }
  });
}

template <typename Decoder>
at::Tensor run(const at::Tensor& x, const Decoder& weights, const float* channel_scales, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: gemm(weights, xf.data_ptr<float>(), channel_scales, out.data_ptr<float>(), M, N, K); break;
    case at::kBFloat16:
      gemm(weights, xf.data_ptr<float>(), channel_scales, out.data_ptr<at::BFloat16>(), M, N, K);
      break;
    case at::kHalf: gemm(weights, xf.data_ptr<float>(), channel_scales, out.data_ptr<at::Half>(), M, N, K); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

at::Tensor int8_weight_only_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kBlockN, "packed must be contiguous int8 [N/16, K, 16]");
  const int64_t N = packed.size(0) * kBlockN, K = packed.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales must be contiguous float32 [N]");
  return run(x, Int8Channel{packed.data_ptr<int8_t>(), K}, scales.data_ptr<float>(), N);
}

at::Tensor int4_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& offsets, int64_t group_size) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == kBlockN / 2, "packed must be contiguous uint8 [N/16, K, 8]");
  const int64_t N = packed.size(0) * kBlockN, K = packed.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "K (", K, ") must be a multiple of the group size (",
              group_size, ")");
  for (const at::Tensor* t : {&scales, &offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == K / group_size && t->size(1) == N,
                "scales and offsets must be contiguous float32 [K/G, N] = [", K / group_size, ", ", N, "]");
  }
  return run(x, Int4Group{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(), K, N,
                          group_size}, nullptr, N);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("int8_weight_only_linear_avx2(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int4_linear_avx2(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("int8_weight_only_linear_avx2", int8_weight_only_linear_avx2);
  m.impl("int4_linear_avx2", int4_linear_avx2);
}
