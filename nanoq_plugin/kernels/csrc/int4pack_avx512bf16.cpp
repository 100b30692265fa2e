// Group-wise int4 weights in PyTorch's AVX-512 packing x bfloat16 activations on x86 CPUs with AVX-512 BF16,
// compiled on first use by nanoq_plugin/kernels/cpu_int4.py and registered as `nano_cpu::int4pack_linear_avx512bf16`.
//
// Why: `aten._weight_int4pack_mm_for_cpu` decodes the weight once per activation row (its time grows almost
// linearly with rows), so from a few rows on it is slower than a bf16 GEMM that reads 4x the bytes. Here each
// chunk of a group's inputs for 64 outputs is decoded once into a panel that stays in L1, and every row tile runs
// `vdpbf16ps` (32 multiply-adds a register, float32 sums) over it: the decode is paid once whatever the rows. It
// reads the tensors `cpu_int4.CpuInt4GroupKernel.prepare` made for PyTorch's kernel, so the two share one copy of
// the weights and the kernel picks either per call.
//
//   tensor       dtype   shape                meaning
//   x            bf16    [M, K]               activations (contiguous)
//   packed       uint8   [N, K/2]             PyTorch's AVX-512 packing, read as [N/64, K, 32]: byte [b, k, i] =
//                                             q[64b + i, k] | q[64b + 32 + i, k] << 4 (codes 0..15)
//   scale_zeros  bf16    [K/G, N, 2]          (s, z): W[n, k] = (q - 8) * s + z
//   out          bf16    [M, N]               float32 sums rounded to nearest even
//
// The scale and zero are applied per group to the sums, not to the weights:
//   sum_k x[k] W[n, k] = sum_g ( s[g, n] * sum_{k in g} x[k] (q[n, k] - 8)  +  z[g, n] * sum_{k in g} x[k] )
// so the panel holds q - 8 itself (exact in bfloat16; one table lookup `vpermw` per 32 codes, no float math), the
// dot products of a group are exact products summed in float32, and the row sums of x come once per call.
//
// Driver: parallel over blocks of 64 outputs; per block, K in chunks (a group, or 128 inputs of a larger one):
// the panel is 4 registers of 16 outputs x chunk/2 pairs of inputs, each float32 lane holding the bf16 values
// of inputs k and k+1 (the operand of `vdpbf16ps`); row tiles of up to 6 rows x 4 registers (24 accumulators)
// pass over it, then add s * sums + z * row sums into a per-thread [M, 64] buffer, rounded into out after the
// last chunk. Up to kDirectMaxRows rows there is no panel: each row tile decodes each pair of inputs into
// registers that go straight into its dot products (up to a few tiles, decoding again costs less than the panel's
// stores and loads).

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
constexpr int64_t kMaxChunk = 128;           // inputs per panel at most (16 KiB)
constexpr int64_t kMaxMR = 6;                // activation rows per tile (6 x 4 = 24 accumulators)
// Up to here each row tile decodes the codes itself: measured faster than the panel at 16 rows, slower at 64.
constexpr int64_t kDirectMaxRows = 24;

// Inputs per panel: the group, or 128 of a larger group that 128 divides; a chunk never straddles two groups.
inline int64_t chunk_for(int64_t G) { return G > kMaxChunk && G % kMaxChunk == 0 ? kMaxChunk : G; }

// The table `vpermw` reads q - 8 from: it takes the low 5 bits of each index, so entries i and i + 16 are both
// bf16(i - 8).
inline __m512i minus8_to_7() {
  return _mm512_set_epi16(
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, static_cast<int16_t>(0xBF80),
      static_cast<int16_t>(0xC000), static_cast<int16_t>(0xC040), static_cast<int16_t>(0xC080),
      static_cast<int16_t>(0xC0A0), static_cast<int16_t>(0xC0C0), static_cast<int16_t>(0xC0E0),
      static_cast<int16_t>(0xC100), 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
      static_cast<int16_t>(0xBF80), static_cast<int16_t>(0xC000), static_cast<int16_t>(0xC040),
      static_cast<int16_t>(0xC080), static_cast<int16_t>(0xC0A0), static_cast<int16_t>(0xC0C0),
      static_cast<int16_t>(0xC0E0), static_cast<int16_t>(0xC100));
}

// One pair of inputs k, k + 1 of a block (`src`: 32 bytes of input k, then 32 of input k + 1) as the 4 registers
// w0..w3 of 16 outputs: lane l of register r holds bf16 (q - 8) of output 16r + l for input k (low half) and k + 1.
inline void decode_pair(const uint8_t* src, __m512i table, __m512i& w0, __m512i& w1, __m512i& w2, __m512i& w3) {
  __m512i* low[2] = {&w0, &w1};
  __m512i* high[2] = {&w2, &w3};
  for (int half = 0; half < 2; ++half) {  // bytes 0-15: outputs 0-15 and 32-47; bytes 16-31: 16-31 and 48-63
    const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + half * kLanes));
    const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kBlockN / 2 + half * kLanes));
    // 16-bit lanes 2l, 2l + 1: the bytes of output l for inputs k, k + 1
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_unpacklo_epi8(first, second)), _mm_unpackhi_epi8(first, second), 1));
    *low[half] = _mm512_permutexvar_epi16(words, table);
    *high[half] = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
  }
}

// A chunk's `pairs` pairs of inputs of a block (`src`: its first byte) into panel[r][p][16 lanes], r = 0..3.
void decode_panel(const uint8_t* src, int64_t pairs, int32_t* panel) {
  const __m512i table = minus8_to_7();
  for (int64_t p = 0; p < pairs; ++p, src += kBlockN) {
    __m512i w0, w1, w2, w3;
    decode_pair(src, table, w0, w1, w2, w3);
    _mm512_storeu_si512(panel + p * kLanes, w0);
    _mm512_storeu_si512(panel + (pairs + p) * kLanes, w1);
    _mm512_storeu_si512(panel + (2 * pairs + p) * kLanes, w2);
    _mm512_storeu_si512(panel + (3 * pairs + p) * kLanes, w3);
  }
}

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

// What a chunk's epilogue adds to the dot products of its rows: s * dot + z * (the row's sum of x over the chunk).
struct Group {
  const float* scale;  // [64]: s of this group for the block's outputs, float32
  const float* zero;   // [64]: z
  const float* row_sums;  // row m's sum of x over this chunk's inputs (float32) at row_sums[m * chunks]
  int64_t chunks;         // chunks per row of K
};

// The accumulators are named variables: GCC keeps an array of them in memory and stores every update.
#define NANO_ACC(i) \
  __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define NANO_DOT(i)                                                                                  \
  if constexpr (MR > i) {                                                                            \
    const __m512bh xv = (__m512bh)broadcast_pair(x + (m0 + i) * K + k0 + 2 * p);                     \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, xv, w0);                                                     \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, xv, w1);                                                     \
    c##i##2 = _mm512_dpbf16_ps(c##i##2, xv, w2);                                                     \
    c##i##3 = _mm512_dpbf16_ps(c##i##3, xv, w3);                                                     \
  }
#define NANO_FINISH(i)                                                                               \
  if constexpr (MR > i) {                                                                            \
    const __m512 rs = _mm512_set1_ps(group.row_sums[(m0 + i) * group.chunks]);                       \
    float* row = partial + (m0 + i) * kBlockN;                                                       \
    finish(c##i##0, rs, group, row, 0, first, last, out + (m0 + i) * N + n0);                        \
    finish(c##i##1, rs, group, row, 1, first, last, out + (m0 + i) * N + n0);                        \
    finish(c##i##2, rs, group, row, 2, first, last, out + (m0 + i) * N + n0);                        \
    finish(c##i##3, rs, group, row, 3, first, last, out + (m0 + i) * N + n0);                        \
  }

// Register r of one row: acc = partial + s * dot + z * row sum, kept in partial, or rounded into out at the last.
inline void finish(__m512 dot, __m512 row_sum, const Group& group, float* partial, int r, bool first, bool last,
                   at::BFloat16* out) {
  const __m512 before = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + r * kLanes);
  const __m512 scaled = _mm512_fmadd_ps(dot, _mm512_loadu_ps(group.scale + r * kLanes), before);
  const __m512 acc = _mm512_fmadd_ps(row_sum, _mm512_loadu_ps(group.zero + r * kLanes), scaled);
  if (last) {
    store16(out + r * kLanes, acc);
  } else {
    _mm512_storeu_ps(partial + r * kLanes, acc);
  }
}

// Rows m0..m0+MR-1 of x [M, K] x inputs k0..k0+2*pairs-1 of outputs n0..n0+63, then the epilogue. The weights
// come from the chunk's panel, or (kDirect) are decoded from the chunk's codes `src` straight into the dot
// products.
template <int MR, bool kDirect>
void tile(const at::BFloat16* x, const int32_t* panel, const uint8_t* src, int64_t pairs, const Group& group,
          float* partial, at::BFloat16* out, int64_t m0, int64_t n0, int64_t N, int64_t K, int64_t k0, bool first,
          bool last) {
  NANO_ACC(0) NANO_ACC(1) NANO_ACC(2) NANO_ACC(3) NANO_ACC(4) NANO_ACC(5)
  const __m512i table = minus8_to_7();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i v0, v1, v2, v3;
    if constexpr (kDirect) {
      decode_pair(src + p * kBlockN, table, v0, v1, v2, v3);
    } else {
      v0 = _mm512_loadu_si512(panel + p * kLanes);
      v1 = _mm512_loadu_si512(panel + (pairs + p) * kLanes);
      v2 = _mm512_loadu_si512(panel + (2 * pairs + p) * kLanes);
      v3 = _mm512_loadu_si512(panel + (3 * pairs + p) * kLanes);
    }
    const __m512bh w0 = (__m512bh)v0, w1 = (__m512bh)v1, w2 = (__m512bh)v2, w3 = (__m512bh)v3;
    NANO_DOT(0) NANO_DOT(1) NANO_DOT(2) NANO_DOT(3) NANO_DOT(4) NANO_DOT(5)
  }
  NANO_FINISH(0) NANO_FINISH(1) NANO_FINISH(2) NANO_FINISH(3) NANO_FINISH(4) NANO_FINISH(5)
}
#undef NANO_ACC
#undef NANO_DOT
#undef NANO_FINISH

template <bool kDirect>
void row_tile(int64_t rows, const at::BFloat16* x, const int32_t* panel, const uint8_t* src, int64_t pairs,
              const Group& group, float* partial, at::BFloat16* out, int64_t m0, int64_t n0, int64_t N, int64_t K,
              int64_t k0, bool first, bool last) {
  switch (rows) {
    case 1: tile<1, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
    case 2: tile<2, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
    case 3: tile<3, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
    case 4: tile<4, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
    case 5: tile<5, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
    default: tile<6, kDirect>(x, panel, src, pairs, group, partial, out, m0, n0, N, K, k0, first, last); break;
  }
}

// Block b's s and z of group g as float32 [64] each (a bf16 is the high half of its float32).
void load_scale_zero(const at::BFloat16* scale_zeros, int64_t N, int64_t b, int64_t g, float* scale, float* zero) {
  const at::BFloat16* sz = scale_zeros + (g * N + b * kBlockN) * 2;
  for (int r = 0; r < kRegs; ++r) {
    const __m512i pairs = _mm512_loadu_si512(sz + r * kLanes * 2);  // lane l: s in the low half, z in the high
    _mm512_storeu_ps(scale + r * kLanes, _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
    _mm512_storeu_ps(zero + r * kLanes, _mm512_castsi512_ps(
        _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)))));
  }
}

// [M, K/chunk]: each row's sum of x over each chunk's inputs, in float32 in input order.
std::vector<float> chunk_row_sums(const at::BFloat16* x, int64_t M, int64_t K, int64_t chunk) {
  std::vector<float> sums(M * (K / chunk));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K / chunk; ++c) {
      float sum = 0.0f;
      for (int64_t k = c * chunk; k < (c + 1) * chunk; ++k) sum += static_cast<float>(x[m * K + k]);
      sums[m * (K / chunk) + c] = sum;
    }
  }
  return sums;
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
  const int64_t N = packed.size(0), G = group_size;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "K (", K, ") must be a multiple of the group size (", G,
              "), which must be even");
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous() && scale_zeros.dim() == 3 &&
                  scale_zeros.size(0) == K / G && scale_zeros.size(1) == N && scale_zeros.size(2) == 2,
              "scale_zeros must be contiguous bfloat16 [K/G, N, 2] = [", K / G, ", ", N, ", 2], got ",
              scale_zeros.scalar_type(), " ", scale_zeros.sizes());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) {
    return out;
  }
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t chunk = chunk_for(G);
  const std::vector<float> row_sums = chunk_row_sums(xp, M, K, chunk);
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> panel(M > kDirectMaxRows ? kRegs * (chunk / 2) * kLanes : 0);
    std::vector<float> partial(K > chunk ? M * kBlockN : 0), scale(kBlockN), zero(kBlockN);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t g = k0 / G, pairs = chunk / 2;
        const uint8_t* src = codes + (b * K + k0) * (kBlockN / 2);
        if (k0 % G == 0) load_scale_zero(sz, N, b, g, scale.data(), zero.data());
        const Group group{scale.data(), zero.data(), row_sums.data() + k0 / chunk, K / chunk};
        if (M <= kDirectMaxRows) {
          for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
            row_tile<true>(std::min(kMaxMR, M - m0), xp, nullptr, src, pairs, group, partial.data(), op, m0,
                           b * kBlockN, N, K, k0, k0 == 0, k0 + chunk == K);
          }
          continue;
        }
        decode_panel(src, pairs, panel.data());
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
          row_tile<false>(std::min(kMaxMR, M - m0), xp, panel.data(), nullptr, pairs, group, partial.data(), op, m0,
                          b * kBlockN, N, K, k0, k0 == 0, k0 + chunk == K);
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
