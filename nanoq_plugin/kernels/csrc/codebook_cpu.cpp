// Codebook linear layers on x86 CPUs, compiled on first use by nanoq_plugin/kernels/cpu_codebook.py
// (torch.utils.cpp_extension) once per vector ISA, from this one source:
//
//   build              flags (cpu_extension.ISA_FLAGS)   op                               registers
//   AVX-512 F/BW/VL/DQ -DNANO_ISA_AVX512                 nano_cpu::codebook_linear        16 floats
//   AVX2 + FMA + F16C  -DNANO_ISA_AVX2                   nano_cpu::codebook_linear_avx2   8 floats
//
// Both libraries register into `nano_cpu`, so the op names differ (NANO_OP_SUFFIX). Only the small vector
// layer in `namespace simd` differs between the builds: decode a block of 32 codes into 32 / kWidth registers
// of levels, multiply-add, horizontal sum, bfloat16 store. The rotation, the direct path, the dense path and
// the threading below it are shared.
//
//   tensor   dtype          shape       meaning
//   x        f32/bf16/f16   [M, K]      activations (rotated here unless `signs` is empty)
//   signs    int8           [K] or [0]  the rotation's signs (format.hadamard); empty: x is already R x
//   codes    uint8          [N, K/2]    cpu_codebook.repack_codes: row n = output n; every block of 32
//                                       inputs k0..k0+31 takes 16 bytes, byte j = code[k0+j] | code[k0+16+j] << 4
//   scales   float16        [N, K/G]    one per output and group
//   table    float32        [8] / [16]  the levels, zero-padded: [8] when the scheme has <= 8 (2-3 bits)
//   out      x.dtype        [M, N]
//
//   x' = R x (per group of G inputs: signs, then a fast Walsh-Hadamard transform, / sqrt(G); format.hadamard)
//   y[m, n] = sum_g s[n, g] * sum_{k in g} table[code[n, k]] * x'[m, k]
//
// Decoding, no gather: the 16 bytes of a block widened to 32-bit lanes give, as they are, the codes of inputs
// k0..k0+15 in their low nibbles and, shifted right by 4, those of k0+16..k0+31; a permute of the table by
// them gives the levels. AVX-512: the 16 levels are one register and `vpermps` reads 4 index bits, so two
// permutes per block. AVX2: `vpermps` on 8 lanes reads 3 index bits, so 16 levels are two registers, each
// permuted, and the code's bit 3 (moved to the sign bit) picks one with `vblendvps`; a table of 8 is one
// register and one permute (the choice is a template argument, made once per call from the table's size).
// The decode bounds the one-row GEMV: measured on a Zen 4 (one thread, SmolLM2's MLP shapes) the AVX2 build
// takes ~1.05x the AVX-512 build's time with 8 levels and ~1.7x with 16 (per 8 codes two permutes, a blend and
// a shift, where AVX-512 spends one permute per 16); with four rows per pass ~1.0x and ~1.25x.
//
// `codebook_linear` does all of it in one call (an op dispatched from Python costs ~30 us, as much as the
// GEMV of a small layer): below `dense_min_rows` rows directly (four rows per pass over the codes, so one
// decode serves four rows; a single row gets several accumulators, so the FMA latency does not bound it),
// from there on by expanding rows of W' in chunks (bfloat16 for bfloat16 activations, else float32) and
// multiplying with ATen's GEMM (oneDNN), whose cost per row is far below the decode's.

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#if defined(NANO_ISA_AVX512)
#define NANO_OP_SUFFIX ""
#elif defined(NANO_ISA_AVX2)
#define NANO_OP_SUFFIX "_avx2"
#else
#error "build with -DNANO_ISA_AVX512 or -DNANO_ISA_AVX2 (kernels/cpu_extension.py ISA_FLAGS)"
#endif

namespace {

constexpr int64_t kBlock = 32;  // inputs per 16-byte block of codes

namespace simd {

#if defined(NANO_ISA_AVX512)

constexpr int kWidth = 16;  // float32 lanes per register
constexpr int kMaxAccumulators = 2;  // FMA chains per row tile of the direct path (gemm_rows)
using Vec = __m512;

struct Table {
  __m512 levels;  // all 16
};

inline Table load_table(const float* levels, int64_t size) {
  return {size == 16 ? _mm512_loadu_ps(levels) : _mm512_maskz_loadu_ps(0xFF, levels)};
}

// The 32 levels of a block: v[0] inputs k0..k0+15, v[1] k0+16..k0+31. `vpermps` reads index bits 0-3 only,
// so the low nibble needs no mask. One permute per register whatever the table's size.
template <bool kSmall>
inline void decode(const uint8_t* bytes, const Table& table, Vec (&v)[kBlock / kWidth]) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  v[0] = _mm512_permutexvar_ps(codes, table.levels);
  v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table.levels);
}

inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec broadcast(float value) { return _mm512_set1_ps(value); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }

// Rounded to nearest even, as at::BFloat16 does.
inline void store_bf16(uint16_t* p, Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

#else  // NANO_ISA_AVX2

constexpr int kWidth = 8;  // float32 lanes per register
constexpr int kMaxAccumulators = 4;  // FMA chains per row tile of the direct path (gemm_rows)
using Vec = __m256;

struct Table {
  __m256 low, high;  // levels 0-7 and 8-15 (high is zero for a table of 8)
};

inline Table load_table(const float* levels, int64_t size) {
  return {_mm256_loadu_ps(levels), size == 16 ? _mm256_loadu_ps(levels + 8) : _mm256_setzero_ps()};
}

// `codes` (3 index bits used), bit 3 of each code in the lane's sign bit: low[codes] or high[codes].
template <bool kSmall>
inline __m256 lookup(const Table& table, __m256i codes, __m256i bit3_in_sign) {
  const __m256 low = _mm256_permutevar8x32_ps(table.low, codes);
  if constexpr (kSmall) {
    return low;
  } else {
    return _mm256_blendv_ps(low, _mm256_permutevar8x32_ps(table.high, codes), _mm256_castsi256_ps(bit3_in_sign));
  }
}

// The 32 levels of a block: v[0] inputs k0..k0+7, v[1] k0+8..k0+15 (low nibbles of bytes 0-7, 8-15), v[2]
// k0+16..k0+23, v[3] k0+24..k0+31 (high nibbles). The bytes are sign-extended, so the high code's bit 3 (the
// byte's bit 7) is already each lane's sign bit; the low code's is moved there by a shift left by 28.
template <bool kSmall>
inline void decode(const uint8_t* bytes, const Table& table, Vec (&v)[kBlock / kWidth]) {
  const __m256i first = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i second = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
  if constexpr (kSmall) {
    v[0] = lookup<true>(table, first, first);
    v[1] = lookup<true>(table, second, second);
  } else {
    v[0] = lookup<false>(table, first, _mm256_slli_epi32(first, 28));
    v[1] = lookup<false>(table, second, _mm256_slli_epi32(second, 28));
  }
  v[2] = lookup<kSmall>(table, _mm256_srli_epi32(first, 4), first);
  v[3] = lookup<kSmall>(table, _mm256_srli_epi32(second, 4), second);
}

inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec broadcast(float value) { return _mm256_set1_ps(value); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }

inline float reduce_add(Vec v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// Rounded to nearest even, as at::BFloat16 does (the shifted values fit 16 bits: packus saturates nothing).
inline void store_bf16(uint16_t* p, Vec v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}

#endif

constexpr int kRegs = kBlock / kWidth;  // registers of levels per block: 2 (AVX-512) or 4 (AVX2)

}  // namespace simd

using simd::kRegs;
using simd::kWidth;
using simd::Vec;

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }

// `body(std::integral_constant<bool, small>)`, small when the table has 8 levels or fewer: hoists the
// table's size out of every loop.
template <typename Body>
void with_table_size(const at::Tensor& table, Body&& body) {
  if (table.numel() <= 8) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// ROWS activation rows (1..4) against outputs n0..n1: the codes are decoded once per block for all rows. A row
// accumulates in kChains registers: one row alone gets a chain per register of a block (else the FMA latency
// bounds it); several rows are independent chains already, and more would only cost registers and adds
// (kMaxAccumulators, the tile's chains in all, as measured best on Zen 4: 2 of 2/4/16 on AVX-512, 4 of 2/4/8
// on AVX2).
template <int ROWS, bool kSmall>
void gemm_rows(const float* x, const uint8_t* codes, const at::Half* scales, const simd::Table& table, float* out,
               int64_t n0, int64_t n1, int64_t N, int64_t K, int64_t G) {
  constexpr int kChains = std::max(1, std::min(kRegs, simd::kMaxAccumulators / ROWS));
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    const at::Half* row_scales = scales + n * groups;
    Vec total[ROWS];
    for (int r = 0; r < ROWS; ++r) total[r] = simd::zero();
    for (int64_t g = 0; g < groups; ++g) {
      Vec acc[ROWS][kChains];
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < kChains; ++c) acc[r][c] = simd::zero();
      for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += kBlock) {
        Vec levels[kRegs];
        simd::decode<kSmall>(row + k0 / 2, table, levels);
        for (int r = 0; r < ROWS; ++r) {
          const float* xr = x + r * K + k0;
          for (int j = 0; j < kRegs; ++j)
            acc[r][j % kChains] = simd::fmadd(levels[j], simd::load(xr + j * kWidth), acc[r][j % kChains]);
        }
      }
      const Vec scale = simd::broadcast(half_to_float(row_scales[g]));
      for (int r = 0; r < ROWS; ++r) {
        Vec sum = acc[r][0];
        for (int c = 1; c < kChains; ++c) sum = simd::add(sum, acc[r][c]);
        total[r] = simd::fmadd(sum, scale, total[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = simd::reduce_add(total[r]);
  }
}

void check_inputs(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table, int64_t K,
                  int64_t G) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous(), "codes: uint8 [N, K/2]");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.is_contiguous() && scales.size(0) == codes.size(0),
              "scales: float16 [N, K/G]");
  TORCH_CHECK(table.dtype() == at::kFloat && (table.numel() == 8 || table.numel() == 16) && table.is_contiguous(),
              "table: float32 [8] or [16]");
  TORCH_CHECK(G % kBlock == 0 && K % G == 0 && codes.size(1) * 2 == K && scales.size(1) == K / G,
              "shapes: K a multiple of G, G a multiple of 32");
}

// x float32 [M, K] (rotated) -> y float32 [M, N].
at::Tensor gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table,
                int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const simd::Table levels = simd::load_table(table.data_ptr<float>(), table.numel());
  with_table_size(table, [&](auto small) {
    constexpr bool kSmall = decltype(small)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = xp + m * K;
        float* om = op + m * N;
        switch (std::min<int64_t>(4, M - m)) {
          case 4: gemm_rows<4, kSmall>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
          case 3: gemm_rows<3, kSmall>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
          case 2: gemm_rows<2, kSmall>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
          default: gemm_rows<1, kSmall>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
        }
      }
    });
  });
  return out;
}

// x [M, K] (any float dtype) -> R x, float32 [M, K] (a new tensor).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& signs, int64_t group_size) {
  TORCH_CHECK(signs.dtype() == at::kChar && signs.numel() == x.size(1), "signs: int8 [K]");
  at::Tensor rotated = (x.to(at::kFloat) * signs.to(at::kFloat)).contiguous();
  float* data = rotated.data_ptr<float>();
  const float norm = 1.0f / std::sqrt(static_cast<float>(group_size));
  const int64_t groups = rotated.numel() / group_size;
  at::parallel_for(0, groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float* v = data + g * group_size;
      for (int64_t h = 1; h < group_size; h <<= 1) {  // Sylvester order: v <- H v
        for (int64_t i = 0; i < group_size; i += 2 * h) {
          for (int64_t j = i; j < i + h; ++j) {
            const float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
          }
        }
      }
      for (int64_t j = 0; j < group_size; ++j) v[j] *= norm;
    }
  });
  return rotated;
}

// Rows n0..n1 of the rotated weight W' [N, K], written into `out` [n1 - n0, K] (float32 or bfloat16).
void codebook_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table,
                         int64_t group_size, int64_t n0, int64_t n1, const at::Tensor& out) {
  const int64_t K = codes.size(1) * 2;
  check_inputs(codes, scales, table, K, group_size);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == n1 - n0 && out.size(1) == K &&
                  (out.dtype() == at::kFloat || out.dtype() == at::kBFloat16),
              "out: float32 or bfloat16 [n1 - n0, K] contiguous");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const simd::Table levels = simd::load_table(table.data_ptr<float>(), table.numel());
  const bool bf16 = out.dtype() == at::kBFloat16;
  void* base = out.data_ptr();
  const int64_t groups = K / group_size;
  with_table_size(table, [&](auto small) {
    constexpr bool kSmall = decltype(small)::value;
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
          Vec values[kRegs];
          simd::decode<kSmall>(cp + n * (K / 2) + k0 / 2, levels, values);
          const Vec scale = simd::broadcast(half_to_float(sp[n * groups + k0 / group_size]));
          const int64_t offset = (n - n0) * K + k0;
          for (int j = 0; j < kRegs; ++j) {
            const Vec value = simd::mul(values[j], scale);
            if (bf16) {
              simd::store_bf16(static_cast<uint16_t*>(base) + offset + j * kWidth, value);
            } else {
              simd::store(static_cast<float*>(base) + offset + j * kWidth, value);
            }
          }
        }
      }
    });
  });
}

// x [M, K] (float32 / bfloat16 / float16) -> y [M, N] in x's dtype; `signs` empty when x is already rotated.
// `bf16_gemm`: the dense path multiplies bfloat16 x bfloat16 (when x is bfloat16 and the CPU has native
// bfloat16 dot products); otherwise float32 — an emulated bfloat16 GEMM is several times slower than float32.
at::Tensor codebook_linear(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& codes,
                           const at::Tensor& scales, const at::Tensor& table, int64_t group_size,
                           int64_t dense_min_rows, int64_t chunk_elements, bool bf16_gemm) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  check_inputs(codes, scales, table, K, group_size);
  if (M < dense_min_rows) {
    const at::Tensor rotated = signs.numel() ? rotate(x, signs, group_size) : x.to(at::kFloat).contiguous();
    return gemm(rotated, codes, scales, table, group_size).to(x.scalar_type());
  }
  const auto dtype = bf16_gemm && x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor lhs = (signs.numel() ? rotate(x, signs, group_size) : x).to(dtype);
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(N, chunk_elements / K));
  at::Tensor weight = at::empty({step, K}, x.options().dtype(dtype));
  if (step == N) {  // the whole weight in one chunk (every linear of a small model): no output copy
    codebook_dequantize(codes, scales, table, group_size, 0, N, weight);
    return at::mm(lhs, weight.t()).to(x.scalar_type());
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(dtype));
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t n1 = std::min(N, n0 + step);
    at::Tensor rows = weight.narrow(0, 0, n1 - n0);
    codebook_dequantize(codes, scales, table, group_size, n0, n1, rows);
    out.narrow(1, n0, n1 - n0).copy_(at::mm(lhs, rows.t()));
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("codebook_linear" NANO_OP_SUFFIX "(Tensor x, Tensor signs, Tensor codes, Tensor scales, Tensor table, "
        "int group_size, int dense_min_rows, int chunk_elements, bool bf16_gemm) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("codebook_linear" NANO_OP_SUFFIX, codebook_linear);
}
