// Codebook linear layers on x86 CPUs with AVX-512 (F + BW), compiled on first use by
// nanoq_plugin/kernels/cpu_codebook.py (torch.utils.cpp_extension) and registered as `nano_cpu::` ops.
//
// Weight layout (made by cpu_codebook.repack_codes): codes `[N, K/2]` uint8, row n = output n; every block
// of 32 inputs k0..k0+31 takes 16 bytes, byte j = code[k0 + j] | code[k0 + 16 + j] << 4. So one 16-byte load
// widened to 16 int32 lanes gives, masked, the codes of inputs k0..k0+15 and, shifted, those of k0+16..k0+31:
// both index the table of levels (16 floats, one register) with a permute, no gather.
// Scales `[N, K/G]` float16 (one per output and group), table `[16]` float32 (levels, zero-padded).
//
//   x' = R x (per group of G inputs: signs, then a fast Walsh-Hadamard transform, / sqrt(G); format.hadamard)
//   y[m, n] = sum_g s[n, g] * sum_{k in g} table[code[n, k]] * x'[m, k]
//
// `codebook_linear` does all of it in one call (an op dispatched from Python costs ~30 us, as much as the
// GEMV of a small layer): below `dense_min_rows` rows directly (four rows per pass over the codes), from there
// on by expanding rows of W' in chunks and multiplying with ATen's GEMM (oneDNN).

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kBlock = 32;  // inputs per 16-byte block of codes

inline void decode_block(const uint8_t* bytes, const __m512 table, __m512& low, __m512& high) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  low = _mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0xF)), table);
  high = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
}

// ROWS activation rows (1..4) against outputs n0..n1: the codes are decoded once per block for all rows.
template <int ROWS>
void gemm_rows(const float* x, const uint8_t* codes, const at::Half* scales, const __m512 table, float* out,
               int64_t n0, int64_t n1, int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    const at::Half* row_scales = scales + n * groups;
    __m512 total[ROWS];
    for (int r = 0; r < ROWS; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[ROWS];
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += kBlock) {
        __m512 low, high;
        decode_block(row + k0 / 2, table, low, high);
        for (int r = 0; r < ROWS; ++r) {
          const float* xr = x + r * K + k0;
          acc[r] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xr), acc[r]);
          acc[r] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xr + 16), acc[r]);
        }
      }
      const __m512 scale = _mm512_set1_ps(static_cast<float>(row_scales[g]));
      for (int r = 0; r < ROWS; ++r) total[r] = _mm512_fmadd_ps(acc[r], scale, total[r]);
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = _mm512_reduce_add_ps(total[r]);
  }
}

void check_inputs(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table, int64_t K,
                  int64_t G) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous(), "codes: uint8 [N, K/2]");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.is_contiguous() && scales.size(0) == codes.size(0),
              "scales: float16 [N, K/G]");
  TORCH_CHECK(table.dtype() == at::kFloat && table.numel() == 16 && table.is_contiguous(), "table: float32 [16]");
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
  const __m512 levels = _mm512_loadu_ps(table.data_ptr<float>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += 4) {
      const float* xm = xp + m * K;
      float* om = op + m * N;
      switch (std::min<int64_t>(4, M - m)) {
        case 4: gemm_rows<4>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
        case 3: gemm_rows<3>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
        case 2: gemm_rows<2>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
        default: gemm_rows<1>(xm, cp, sp, levels, om, n0, n1, N, K, group_size); break;
      }
    }
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
  const __m512 levels = _mm512_loadu_ps(table.data_ptr<float>());
  const bool bf16 = out.dtype() == at::kBFloat16;
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t groups = K / group_size;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
        __m512 low, high;
        decode_block(cp + n * (K / 2) + k0 / 2, levels, low, high);
        const __m512 scale = _mm512_set1_ps(static_cast<float>(sp[n * groups + k0 / group_size]));
        __m512 values[2] = {_mm512_mul_ps(low, scale), _mm512_mul_ps(high, scale)};
        for (int half = 0; half < 2; ++half) {
          const int64_t offset = (n - n0) * K + k0 + 16 * half;
          if (bf16) {  // round to nearest even, as at::BFloat16 does
            const __m512i bits = _mm512_castps_si512(values[half]);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(base + offset * 2),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
          } else {
            _mm512_storeu_ps(reinterpret_cast<float*>(base) + offset, values[half]);
          }
        }
      }
    }
  });
}

// x [M, K] (float32 / bfloat16 / float16) -> y [M, N] in x's dtype; `signs` empty when x is already rotated.
at::Tensor codebook_linear(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& codes,
                           const at::Tensor& scales, const at::Tensor& table, int64_t group_size,
                           int64_t dense_min_rows, int64_t chunk_elements) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  check_inputs(codes, scales, table, K, group_size);
  if (M < dense_min_rows) {
    const at::Tensor rotated = signs.numel() ? rotate(x, signs, group_size) : x.to(at::kFloat).contiguous();
    return gemm(rotated, codes, scales, table, group_size).to(x.scalar_type());
  }
  const auto dtype = x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;  // oneDNN's fast GEMMs
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
  m.def("codebook_linear(Tensor x, Tensor signs, Tensor codes, Tensor scales, Tensor table, int group_size, "
        "int dense_min_rows, int chunk_elements) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("codebook_linear", codebook_linear);
}
