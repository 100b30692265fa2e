// Group-wise int4 weights in PyTorch's AVX-512 packing x bfloat16 activations on x86 CPUs with AVX-512 BF16,
// compiled on first use by nanoq_plugin/kernels/cpu_int4.py and registered as `nano_cpu::int4pack_linear_avx512bf16`.
//
// Why: `aten._weight_int4pack_mm_for_cpu` decodes the weight once per activation row (its time grows almost
// linearly with rows), so from a few rows on it is slower than a bf16 GEMM that reads 4x the bytes. Here each
// K-chunk of 64 outputs is decoded once into a bfloat16 panel that stays in L1, and every row tile runs `vdpbf16ps`
// (32 multiply-adds a register, float32 sums) over it: the decode is paid once per weight whatever the rows.
// It reads the tensors `cpu_int4.CpuInt4GroupKernel.prepare` made for PyTorch's kernel, so the two share one copy
// of the weights and the kernel picks either per call.
//
//   tensor       dtype   shape                meaning
//   x            bf16    [M, K]               activations (contiguous)
//   packed       uint8   [N, K/2]             PyTorch's AVX-512 packing, read as [N/64, K, 32]: byte [b, k, i] =
//                                             q[64b + i, k] | q[64b + 32 + i, k] << 4 (codes 0..15)
//   scale_zeros  bf16    [K/G, N, 2]          (s, z): W[n, k] = (q - 8) * s + z, in float32 (one fma), then
//                                             rounded to bfloat16 for the dot products
//   out          bf16    [M, N]               float32 sums rounded to nearest even
//
// Driver: parallel over blocks of 64 outputs; per block, K in chunks of 128 (the panel: 4 registers of 16 outputs
// x 64 pairs of inputs, 16 KiB, each float32 lane holding the bf16 weights of inputs k and k+1, the operand of
// `vdpbf16ps`); row tiles of up to 6 rows x 4 registers (24 accumulators) pass over the panel; their sums wait in
// a per-thread [M, 64] buffer between chunks.

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 16;               // outputs per register
constexpr int64_t kRegs = 4;                 // registers of outputs per block
constexpr int64_t kBlockN = kRegs * kLanes;  // outputs per block: PyTorch's packing unit
constexpr int64_t kChunk = 128;              // inputs per panel
constexpr int64_t kPairs = kChunk / 2;       // float32 lanes of bf16 pairs per output per panel
constexpr int64_t kMaxMR = 6;                // activation rows per tile (6 x 4 = 24 accumulators)

// Lane l of `scale_zeros` row (s, z pairs of bf16) as float32: s in the low half of each 32-bit lane, z in the
// high half; a bf16 is the high half of its float32.
inline void load_scale_zero(const at::BFloat16* sz, __m512* s, __m512* z) {
  const __m512i pairs = _mm512_loadu_si512(sz);
  *s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  *z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// Two inputs' float32 weights of 16 outputs -> 16 lanes of (bf16 w_k, bf16 w_k1), w_k in the low half.
inline __m512i interleave_bf16(__m512 w_k, __m512 w_k1) {
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(index, (__m512i)_mm512_cvtne2ps_pbh(w_k1, w_k));
}

struct Weights {
  const uint8_t* packed;           // [N/64, K, 32]
  const at::BFloat16* scale_zeros; // [K/G, N, 2]
  int64_t N, K, G;

  // Block b's inputs k0..k1-1 (k0, k1 even, both inside K) -> panel[r][(k - k0) / 2][16 lanes] for the 4
  // registers r of 16 outputs.
  void decode(int32_t* panel, int64_t b, int64_t k0, int64_t k1) const {
    const __m512 minus8_to_7 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 s[kRegs], z[kRegs];
    for (int64_t k = k0; k < k1; k += 2) {
      if (k == k0 || k % G == 0) {  // a group starts (G is even: inputs k and k + 1 share it)
        const at::BFloat16* sz = scale_zeros + ((k / G) * N + b * kBlockN) * 2;
        for (int r = 0; r < kRegs; ++r) load_scale_zero(sz + r * kLanes * 2, &s[r], &z[r]);
      }
      const uint8_t* src = packed + (b * K + k) * (kBlockN / 2);
      __m512 w[2][kRegs];
      for (int i = 0; i < 2; ++i) {  // inputs k and k + 1
        for (int half = 0; half < 2; ++half) {  // bytes 0-15 and 16-31: outputs 0-15 / 32-47, 16-31 / 48-63
          const __m512i bytes = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * (kBlockN / 2) + half * kLanes)));
          // vpermps reads the low 4 bits of each index: the low nibble as it is, the high one after a shift
          const int low = half, high = 2 + half;
          w[i][low] = _mm512_fmadd_ps(_mm512_permutexvar_ps(bytes, minus8_to_7), s[low], z[low]);
          w[i][high] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), minus8_to_7), s[high],
                                       z[high]);
        }
      }
      for (int r = 0; r < kRegs; ++r) {
        _mm512_storeu_si512(panel + (r * kPairs + (k - k0) / 2) * kLanes, interleave_bf16(w[0][r], w[1][r]));
      }
    }
  }
};

inline __m512i broadcast_pair(const at::BFloat16* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

// 16 float32 sums stored as bfloat16, rounded to nearest even (as torch's conversion rounds).
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// The accumulators are named variables: GCC keeps an array of them in memory and stores every update.
#define NANO_ACC(i)                                                                                  \
  __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;    \
  if constexpr (MR > i) {                                                                            \
    if (k0 > 0) {                                                                                    \
      const float* row = partial + (m0 + i) * kBlockN;                                               \
      c##i##0 = _mm512_loadu_ps(row);                                                                \
      c##i##1 = _mm512_loadu_ps(row + kLanes);                                                       \
      c##i##2 = _mm512_loadu_ps(row + 2 * kLanes);                                                   \
      c##i##3 = _mm512_loadu_ps(row + 3 * kLanes);                                                   \
    }                                                                                                \
  }
#define NANO_DOT(i)                                                                                  \
  if constexpr (MR > i) {                                                                            \
    const __m512bh xv = (__m512bh)broadcast_pair(x + (m0 + i) * K + k0 + 2 * p);                     \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, xv, w0);                                                     \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, xv, w1);                                                     \
    c##i##2 = _mm512_dpbf16_ps(c##i##2, xv, w2);                                                     \
    c##i##3 = _mm512_dpbf16_ps(c##i##3, xv, w3);                                                     \
  }
#define NANO_KEEP(i)                                                                                 \
  if constexpr (MR > i) {                                                                            \
    float* row = partial + (m0 + i) * kBlockN;                                                       \
    _mm512_storeu_ps(row, c##i##0);                                                                  \
    _mm512_storeu_ps(row + kLanes, c##i##1);                                                         \
    _mm512_storeu_ps(row + 2 * kLanes, c##i##2);                                                     \
    _mm512_storeu_ps(row + 3 * kLanes, c##i##3);                                                     \
  }
#define NANO_STORE(i)                                                                                \
  if constexpr (MR > i) {                                                                            \
    at::BFloat16* row = out + (m0 + i) * N + n0;                                                     \
    store16(row, c##i##0);                                                                           \
    store16(row + kLanes, c##i##1);                                                                  \
    store16(row + 2 * kLanes, c##i##2);                                                              \
    store16(row + 3 * kLanes, c##i##3);                                                              \
  }

// Rows m0..m0+MR-1 of x [M, K] x the panel of inputs k0..k1-1 of outputs n0..n0+63: the sums start from
// `partial [M, 64]` unless k0 == 0 and go back there unless k1 == K, where they are rounded into out [M, N].
template <int MR>
void tile(const at::BFloat16* x, const int32_t* panel, float* partial, at::BFloat16* out, int64_t m0, int64_t n0,
          int64_t N, int64_t K, int64_t k0, int64_t k1) {
  NANO_ACC(0) NANO_ACC(1) NANO_ACC(2) NANO_ACC(3) NANO_ACC(4) NANO_ACC(5)
  const int64_t pairs = (k1 - k0) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * kLanes);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + (kPairs + p) * kLanes);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(panel + (2 * kPairs + p) * kLanes);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(panel + (3 * kPairs + p) * kLanes);
    NANO_DOT(0) NANO_DOT(1) NANO_DOT(2) NANO_DOT(3) NANO_DOT(4) NANO_DOT(5)
  }
  if (k1 < K) {
    NANO_KEEP(0) NANO_KEEP(1) NANO_KEEP(2) NANO_KEEP(3) NANO_KEEP(4) NANO_KEEP(5)
  } else {
    NANO_STORE(0) NANO_STORE(1) NANO_STORE(2) NANO_STORE(3) NANO_STORE(4) NANO_STORE(5)
  }
}
#undef NANO_ACC
#undef NANO_DOT
#undef NANO_KEEP
#undef NANO_STORE

void row_tile(int64_t rows, const at::BFloat16* x, const int32_t* panel, float* partial, at::BFloat16* out,
              int64_t m0, int64_t n0, int64_t N, int64_t K, int64_t k0, int64_t k1) {
  switch (rows) {
    case 1: tile<1>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
    case 2: tile<2>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
    case 3: tile<3>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
    case 4: tile<4>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
    case 5: tile<5>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
    default: tile<6>(x, panel, partial, out, m0, n0, N, K, k0, k1); break;
  }
}

at::Tensor int4pack_linear_avx512bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zeros,
                                      int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be a contiguous bfloat16 [M, K] matrix, got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(0) % kBlockN == 0 && packed.size(1) * 2 == K,
              "packed must be contiguous uint8 [N, K/2] with N a multiple of ", kBlockN, " and K = ", K, ", got ",
              packed.sizes());
  const int64_t N = packed.size(0);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "K (", K,
              ") must be a multiple of the group size (", group_size, "), which must be even");
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous() && scale_zeros.dim() == 3 &&
                  scale_zeros.size(0) == K / group_size && scale_zeros.size(1) == N && scale_zeros.size(2) == 2,
              "scale_zeros must be contiguous bfloat16 [K/G, N, 2] = [", K / group_size, ", ", N, ", 2], got ",
              scale_zeros.scalar_type(), " ", scale_zeros.sizes());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) {
    return out;
  }
  const Weights weights{packed.data_ptr<uint8_t>(), scale_zeros.data_ptr<at::BFloat16>(), N, K, group_size};
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> panel(kRegs * kPairs * kLanes);
    std::vector<float> partial(K > kChunk ? M * kBlockN : 0);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        weights.decode(panel.data(), b, k0, k1);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
          row_tile(std::min(kMaxMR, M - m0), xp, panel.data(), partial.data(), op, m0, b * kBlockN, N, K, k0, k1);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("int4pack_linear_avx512bf16(Tensor x, Tensor packed, Tensor scale_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) { m.impl("int4pack_linear_avx512bf16", int4pack_linear_avx512bf16); }
