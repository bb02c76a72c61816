// Weight-only quantized linear layers for the CPU (AVX2, FMA, F16C; AVX-512 VNNI where the build enables it):
// y = x W^T with W in blocks of 32.
//
// q4: 4-bit codes q in 0..15 with a float16 scale d and minimum m per block, w = d * q + m (GGUF's Q4_1).
//     A matrix row is K/2 bytes: byte i of a block holds element i (low nibble) and element i + 16 (high).
// q8: int8 codes with a float16 scale per block, w = d * q (GGUF's Q8_0).
// The activation is quantized to int16 per block of 32 (times 32767 over its largest magnitude), so
// vpmaddwd (vpdpwssd with VNNI) does the products in integers while the activation keeps 16 bits: the result differs from
// dequantize-then-multiply by about 1e-5 of each block's largest term. A block's int32 sums are scaled
// in float, eight blocks' scales converted at a time. K need not be a multiple of 32: the activation's
// last block is zero-padded, and so are the codes (the caller packs them that way).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr float kLevels = 32767.f;  // |q| <= 127 times this, twice, still fits an int32 lane of vpmaddwd
constexpr int64_t kRowsPerTask = 16;  // rows of W one thread takes at a time: small layers still split

struct QuantizedActivation {
  int64_t rows, blocks;
  std::vector<int16_t> codes;  // [rows, blocks * 32]
  std::vector<float> scales;   // [rows, blocks]: largest magnitude / 32767
  std::vector<float> sums;     // [rows, blocks]: the block's float sum (q4's minimum term)
  // AVX-512's q4 takes blocks two at a time (A, B): codes again, each pair laid out as [A 0..15, B 0..15,
  // A 16..31, B 16..31] to match the low and high nibbles of the pair's 32 bytes. Empty for AVX2.
  std::vector<int16_t> paired;
};

QuantizedActivation quantize_activation(const float* x, int64_t rows, int64_t K) {
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  QuantizedActivation q{rows, blocks, std::vector<int16_t>(rows * blocks * kBlock, 0),
                        std::vector<float>(rows * blocks), std::vector<float>(rows * blocks)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kBlock, count = std::min(kBlock, K - first);
      const float* v = x + r * K + first;
      float amax = 0.f, sum = 0.f;
      for (int64_t i = 0; i < count; ++i) {
        amax = std::max(amax, std::fabs(v[i]));
        sum += v[i];
      }
      const float scale = amax / kLevels;
      const float inverse = scale > 0.f ? 1.f / scale : 0.f;
      int16_t* out = q.codes.data() + (r * blocks + b) * kBlock;
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int16_t>(std::nearbyint(v[i] * inverse));
      q.scales[r * blocks + b] = scale;
      q.sums[r * blocks + b] = sum;
    }
  }
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  q.paired.assign(q.codes.size(), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b + 1 < blocks; b += 2) {
      const int16_t* a = q.codes.data() + (r * blocks + b) * kBlock;
      int16_t* out = q.paired.data() + (r * blocks + b) * kBlock;
      for (int64_t half = 0; half < 2; ++half) {  // first the elements 0..15 of A and B, then 16..31
        std::copy(a + half * 16, a + half * 16 + 16, out + half * 32);
        std::copy(a + kBlock + half * 16, a + kBlock + half * 16 + 16, out + half * 32 + 16);
      }
    }
  }
#endif
  return q;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// A block's 32 products, as int32 partial sums, and a float accumulator of them, in the widest vectors the
// build allows: AVX-512 VNNI (vpdpwssd: multiply and add in one instruction, 32 products at once) or AVX2.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
using BlockSums = __m512i;
using Accumulator = __m512;

inline Accumulator accumulator_zero() { return _mm512_setzero_ps(); }
inline Accumulator accumulate(Accumulator acc, BlockSums sums, float scale) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale), acc);
}
inline float accumulator_sum(Accumulator acc) { return _mm512_reduce_add_ps(acc); }

inline BlockSums q4_block(const uint8_t* codes, const int16_t* x) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  // elements 0..15 are the low nibbles, 16..31 the high ones: side by side they are in order
  const __m256i ordered = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
  return _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_cvtepu8_epi16(ordered), _mm512_loadu_si512(x));
}

inline BlockSums q8_block(const int8_t* codes, const int16_t* x) {
  const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  return _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_cvtepi8_epi16(both), _mm512_loadu_si512(x));
}

// Two q4 blocks A, B (32 bytes) against their paired activation: lanes 0..7 sum A's products, 8..15 B's.
inline __m512i q4_pair(const uint8_t* codes, const int16_t* paired) {
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m512i low = _mm512_cvtepu8_epi16(_mm256_and_si256(packed, mask));
  const __m512i high = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 4), mask));
  const __m512i sums = _mm512_dpwssd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(paired));
  return _mm512_dpwssd_epi32(sums, high, _mm512_loadu_si512(paired + 32));
}

// A q4 row two blocks per instruction: eight blocks' scales at a time, spread over the pairs' halves.
inline float q4_row_dot(const uint8_t* row, const int16_t* paired, const int16_t* plain, const uint16_t* scales,
                        const uint16_t* minimums, const float* xs, const float* xsum, int64_t blocks) {
  __m512 acc = _mm512_setzero_ps();
  __m256 minimum_acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b))),
                                   _mm256_loadu_ps(xs + b));
    const __m512 d16 = _mm512_castps256_ps512(d);
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(minimums + b)));
    minimum_acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + b), minimum_acc);
    for (int pair = 0; pair < 4; ++pair) {
      const __m512i which = _mm512_inserti64x4(_mm512_set1_epi32(2 * pair), _mm256_set1_epi32(2 * pair + 1), 1);
      const int64_t first = b + 2 * pair;
      const __m512i sums = q4_pair(row + first * kBlock / 2, paired + first * kBlock);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(which, d16), acc);
    }
  }
  float tail = 0.f;
  for (; b < blocks; ++b) {
    acc = accumulate(acc, q4_block(row + b * kBlock / 2, plain + b * kBlock), half_to_float(scales[b]) * xs[b]);
    tail += half_to_float(minimums[b]) * xsum[b];
  }
  return _mm512_reduce_add_ps(acc) + horizontal_sum(minimum_acc) + tail;
}
#else
using BlockSums = __m256i;
using Accumulator = __m256;

inline Accumulator accumulator_zero() { return _mm256_setzero_ps(); }
inline Accumulator accumulate(Accumulator acc, BlockSums sums, float scale) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc);
}
inline float accumulator_sum(Accumulator acc) { return horizontal_sum(acc); }

inline __m256i load16(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

inline BlockSums q4_block(const uint8_t* codes, const int16_t* x) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i low = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));
  const __m256i high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
  return _mm256_add_epi32(_mm256_madd_epi16(low, load16(x)), _mm256_madd_epi16(high, load16(x + 16)));
}

inline BlockSums q8_block(const int8_t* codes, const int16_t* x) {
  const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i first = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(both));
  const __m256i second = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(both, 1));
  return _mm256_add_epi32(_mm256_madd_epi16(first, load16(x)), _mm256_madd_epi16(second, load16(x + 16)));
}
#endif

// One row of W against one quantized activation row. `Block(b)` gives block b's int32 sums.
template <bool kHasMinimum, typename Block>
inline float row_dot(Block block, const uint16_t* scales, const uint16_t* minimums, const float* xs,
                     const float* xsum, int64_t blocks) {
  Accumulator acc = accumulator_zero();
  __m256 minimum_acc = _mm256_setzero_ps();
  alignas(32) float block_scales[8];
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {  // eight blocks' float16 scales converted at once
    _mm256_store_ps(block_scales,
                    _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b))),
                                  _mm256_loadu_ps(xs + b)));
    if constexpr (kHasMinimum) {
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(minimums + b)));
      minimum_acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + b), minimum_acc);
    }
    for (int j = 0; j < 8; ++j) acc = accumulate(acc, block(b + j), block_scales[j]);
  }
  float tail = 0.f;
  for (; b < blocks; ++b) {
    acc = accumulate(acc, block(b), half_to_float(scales[b]) * xs[b]);
    if constexpr (kHasMinimum) tail += half_to_float(minimums[b]) * xsum[b];
  }
  return accumulator_sum(acc) + horizontal_sum(minimum_acc) + tail;
}

void check_common(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x: float32 [M, K], contiguous");
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2, "codes: [N, bytes], contiguous");
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == codes.size(0) && scales.size(1) == blocks,
              "scales: float16 [N, ceil(K / 32)]");
}

// out[m, n] for every row m of x and n of W, threads splitting W's rows.
template <typename RowDot>
at::Tensor run_rows(const at::Tensor& x, int64_t N, RowDot row_dot_for) {
  const int64_t M = x.size(0), K = x.size(1);
  const QuantizedActivation q = quantize_activation(x.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = row_dot_for(n, q, m);
    }
  });
  return y;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const at::Tensor& minimums, int64_t K) {
  check_common(x, codes, scales, K);
  const int64_t blocks = (K + kBlock - 1) / kBlock, N = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(1) == blocks * kBlock / 2, "codes: uint8 [N, blocks*16]");
  TORCH_CHECK(minimums.sizes() == scales.sizes() && minimums.scalar_type() == at::kHalf && minimums.is_contiguous(),
              "minimums: like scales");
  const uint8_t* base = codes.data_ptr<uint8_t>();
  const uint16_t* d = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(minimums.data_ptr<at::Half>());
  return run_rows(x, N, [&](int64_t n, const QuantizedActivation& q, int64_t m) {
    const uint8_t* row = base + n * blocks * kBlock / 2;
    const int16_t* xq = q.codes.data() + m * blocks * kBlock;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return q4_row_dot(row, q.paired.data() + m * blocks * kBlock, xq, d + n * blocks, mins + n * blocks,
                      q.scales.data() + m * blocks, q.sums.data() + m * blocks, blocks);
#else
    auto block = [&](int64_t b) { return q4_block(row + b * kBlock / 2, xq + b * kBlock); };
    return row_dot<true>(block, d + n * blocks, mins + n * blocks, q.scales.data() + m * blocks,
                         q.sums.data() + m * blocks, blocks);
#endif
  });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t K) {
  check_common(x, codes, scales, K);
  const int64_t blocks = (K + kBlock - 1) / kBlock, N = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.size(1) == blocks * kBlock, "codes: int8 [N, blocks*32]");
  const int8_t* base = codes.data_ptr<int8_t>();
  const uint16_t* d = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return run_rows(x, N, [&](int64_t n, const QuantizedActivation& q, int64_t m) {
    const int8_t* row = base + n * blocks * kBlock;
    const int16_t* xq = q.codes.data() + m * blocks * kBlock;
    auto block = [&](int64_t b) { return q8_block(row + b * kBlock, xq + b * kBlock); };
    return row_dot<false>(block, d + n * blocks, nullptr, q.scales.data() + m * blocks, nullptr, blocks);
  });
}

// The float32 [N, K] weight the codes stand for: a long prompt's prefill multiplies it with BLAS.
at::Tensor unpack(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& minimums,
                  int64_t K) {
  const int64_t N = codes.size(0), blocks = (K + kBlock - 1) / kBlock;
  const bool q4 = minimums.has_value();
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) == blocks * kBlock / (q4 ? 2 : 1), "codes: [N, packed bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == N * blocks,
              "scales: float16 [N, blocks]");
  at::Tensor w = at::empty({N, K}, codes.options().dtype(at::kFloat));
  float* out = w.data_ptr<float>();
  const uint16_t* d = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mins = q4 ? reinterpret_cast<const uint16_t*>(minimums->data_ptr<at::Half>()) : nullptr;
  const uint8_t* bytes = static_cast<const uint8_t*>(codes.data_ptr());
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    float block[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float scale = half_to_float(d[n * blocks + b]);
        if (q4) {
          const float minimum = half_to_float(mins[n * blocks + b]);
          const uint8_t* packed = bytes + (n * blocks + b) * kBlock / 2;
          for (int64_t i = 0; i < kBlock / 2; ++i) {
            block[i] = scale * (packed[i] & 0x0F) + minimum;
            block[i + kBlock / 2] = scale * (packed[i] >> 4) + minimum;
          }
        } else {
          const int8_t* q = reinterpret_cast<const int8_t*>(bytes) + (n * blocks + b) * kBlock;
          for (int64_t i = 0; i < kBlock; ++i) block[i] = scale * q[i];
        }
        const int64_t first = b * kBlock, count = std::min(kBlock, K - first);
        std::copy(block, block + count, out + n * K + first);
      }
    }
  });
  return w;
}

}  // namespace

// Each build (AVX2, AVX-512 VNNI) registers its ops under a namespace of its own, so both can load at once.
#ifndef CPU_QUANT_NAMESPACE
#define CPU_QUANT_NAMESPACE cpu_quant_avx2
#endif
#define CPU_QUANT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands the namespace macro first
#define CPU_QUANT_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

CPU_QUANT_LIBRARY(CPU_QUANT_NAMESPACE, m) {
  m.def("unpack(Tensor codes, Tensor scales, Tensor? minimums, int K) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scales, Tensor minimums, int K) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scales, int K) -> Tensor");
}

CPU_QUANT_LIBRARY_IMPL(CPU_QUANT_NAMESPACE, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("unpack", &unpack);
}
