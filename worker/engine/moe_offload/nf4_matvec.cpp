// One token through several experts' 4-bit matrices, read straight from their bitsandbytes rows (AVX2; two
// blocks at a time with AVX-512 VNNI where the build enables it).
//
// A row holds each matrix as packed 4-bit codes (two a byte, the first element in the high nibble) and one
// float32 absmax per block of 64 codes of the flattened matrix. The 16 codes map to int16 through a lookup
// table (the codebook times 2047, as a low-byte and a high-byte table, each one vpshufb), and the activation
// is quantized to int16 the same way (times 2047 per block of 64), so vpmaddwd does the products in integers
// with 12-bit precision on both sides: int8 codebook values flipped the tiny test model's greedy tokens.
// One step reads one block (32 bytes): its high nibbles are the block's even elements, its low nibbles the
// odd ones; the activation is stored in the order the unpacking leaves the weights, so nothing is shuffled
// back. Matrix rows must be whole blocks (a multiple of 64 long), which the caller checks.
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

constexpr int64_t kBlock = 64;   // bitsandbytes' absmax block, the activation's quantization block, one step
constexpr int64_t kPrefetchBytes = 1024;  // the codes this far ahead are asked for early: the loop is bound by reads
constexpr float kLevels = 2047.f;  // both sides' integer scale: 8 products of 2^22 at most fit an int32 lane

// Where element i of a block goes in the activation's stored order. Evens (high nibbles) come first, odds
// second; within each, vpunpck{l,h}bw of the 32 looked-up values gives positions 0-7 and 16-23 in its first
// vector and 8-15 and 24-31 in its second.
inline int64_t stored_position(int64_t i) {
  const int64_t half = i % 2, p = i / 2;  // p: position among the evens (or odds), 0..31
  const int64_t second = (p / 8) % 2, lane = p / 16, within = p % 8;
  return half * 32 + second * 16 + lane * 8 + within;
}

// x [rows, K] float -> int16 codes [rows, K] in stored order and one scale a block [rows, K / 64].
void quantize_rows(const float* x, int64_t rows, int64_t K, int16_t* codes, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float* v = x + r * K + b * kBlock;
      float amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float scale = amax / kLevels;
      const float inverse = scale > 0.f ? 1.f / scale : 0.f;
      int16_t* out = codes + r * K + b * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) out[stored_position(i)] = static_cast<int16_t>(std::nearbyint(v[i] * inverse));
      scales[r * (K / kBlock) + b] = scale;
    }
  }
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kPairs = true;
// AVX-512 takes two blocks (b, b + 1) a step: their 16-value quarters of the stored order interleaved,
// [b 0-15, b+1 0-15, b 16-31, b+1 16-31, ...], to match the 128-bit lanes of one 64-byte load.
void pair_blocks(const int16_t* stored, int64_t rows, int64_t K, int16_t* paired) {
  std::copy(stored, stored + rows * K, paired);  // a last unpaired block stays as stored
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b + 1 < K / kBlock; b += 2) {
      const int16_t* first = stored + r * K + b * kBlock;
      int16_t* out = paired + r * K + b * kBlock;
      for (int64_t quarter = 0; quarter < 4; ++quarter) {
        std::copy(first + quarter * 16, first + quarter * 16 + 16, out + quarter * 32);
        std::copy(first + kBlock + quarter * 16, first + kBlock + quarter * 16 + 16, out + quarter * 32 + 16);
      }
    }
  }
}
#else
constexpr bool kPairs = false;
#endif

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Table {
  __m256i low, high;  // the int16 codebook's low and high bytes, in both lanes
};

// 32 codes (bytes 0-15 in each lane) times 32 stored activations, as 8 int32 partial sums.
inline __m256i dot_codes(__m256i index, const Table& table, const int16_t* x) {
  const __m256i low = _mm256_shuffle_epi8(table.low, index);
  const __m256i high = _mm256_shuffle_epi8(table.high, index);
  const __m256i first = _mm256_unpacklo_epi8(low, high);
  const __m256i second = _mm256_unpackhi_epi8(low, high);
  const __m256i a = _mm256_madd_epi16(first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  const __m256i b = _mm256_madd_epi16(second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)));
  return _mm256_add_epi32(a, b);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// Two blocks' 64 codes (bytes 0-15 of each lane) times their paired activations: lanes 0-7 of the result sum
// block b's products, lanes 8-15 block b + 1's.
inline __m512i dot_codes_pair(__m512i index, __m512i table_low, __m512i table_high, const int16_t* x, __m512i acc) {
  const __m512i low = _mm512_shuffle_epi8(table_low, index);
  const __m512i high = _mm512_shuffle_epi8(table_high, index);
  acc = _mm512_dpwssd_epi32(acc, _mm512_unpacklo_epi8(low, high), _mm512_loadu_si512(x));
  return _mm512_dpwssd_epi32(acc, _mm512_unpackhi_epi8(low, high), _mm512_loadu_si512(x + 32));
}

// The blocks of a row two at a time; returns the number of blocks done (a last odd one is left over).
inline int64_t row_dot_pairs(const uint8_t* bytes, const float* block_absmax, int64_t blocks, const int16_t* paired,
                             const float* xs, const Table& table, float* sum) {
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  const __m512i table_low = _mm512_broadcast_i64x4(table.low), table_high = _mm512_broadcast_i64x4(table.high);
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(bytes + b * kBlock / 2 + kPrefetchBytes), _MM_HINT_T0);
    const __m512i codes = _mm512_loadu_si512(bytes + b * kBlock / 2);
    const __m512i evens = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low_mask);
    const __m512i odds = _mm512_and_si512(codes, low_mask);
    const int16_t* x = paired + b * kBlock;  // a pair's evens (64 values), then its odds
    __m512i sums = dot_codes_pair(evens, table_low, table_high, x, _mm512_setzero_si512());
    sums = dot_codes_pair(odds, table_low, table_high, x + 64, sums);
    const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(block_absmax[b] * xs[b]),
                                              _mm512_set1_ps(block_absmax[b + 1] * xs[b + 1]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
  }
  *sum = _mm512_reduce_add_ps(acc);
  return b;
}
#endif

// One weight row (K codes from flat element `first`, a multiple of 64) against one quantized activation row
// (`paired`: the same in AVX-512's pair order, where the build has it).
inline float row_dot(const uint8_t* packed, const float* absmax, int64_t first, int64_t K, const int16_t* xq,
                     const int16_t* paired, const float* xs, const Table& table) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  const uint8_t* bytes = packed + first / 2;
  const float* block_absmax = absmax + first / kBlock;
  int64_t b = 0;
  float pairs_sum = 0.f;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  b = row_dot_pairs(bytes, block_absmax, K / kBlock, paired, xs, table, &pairs_sum);
#else
  (void)paired;
#endif
  for (; b < K / kBlock; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(bytes + b * kBlock / 2 + kPrefetchBytes), _MM_HINT_T0);
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + b * kBlock / 2));
    const __m256i evens = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low_mask);
    const __m256i odds = _mm256_and_si256(codes, low_mask);
    const int16_t* x = xq + b * kBlock;
    const __m256i sums = _mm256_add_epi32(dot_codes(evens, table, x), dot_codes(odds, table, x + 32));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(block_absmax[b] * xs[b]), acc);
  }
  return pairs_sum + horizontal_sum(acc);
}

// y[e, n] = sum_k W_e[n, k] * x[e or 0, k] for the experts `ids` of `rows` [experts, row_bytes]; W_e is the
// [N, K] matrix whose codes start at byte `packed_offset` of its row and whose absmax (float32) at
// `absmax_offset`. `lut` [16] int16: the codebook times 2047. x [1 or k, K] float32; returns [k, N] float32.
at::Tensor nf4_matvec(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& ids, const at::Tensor& lut,
                      int64_t packed_offset, int64_t absmax_offset, int64_t N, int64_t K) {
  TORCH_CHECK(K % kBlock == 0, "row length must be a multiple of 64");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K, "x: [1|k, K]");
  TORCH_CHECK(rows.scalar_type() == at::kByte && rows.is_contiguous() && rows.dim() == 2, "rows: uint8 [E, bytes]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids: int64");
  TORCH_CHECK(lut.scalar_type() == at::kShort && lut.numel() == 16, "lut: 16 int16");
  TORCH_CHECK(packed_offset + N * K / 2 <= rows.size(1) && absmax_offset + N * K / kBlock * 4 <= rows.size(1),
              "sections past the row");
  const int64_t experts = ids.numel();
  const int64_t x_rows = x.size(0);
  TORCH_CHECK(x_rows == 1 || x_rows == experts, "x: one row, or one per expert");
  const int64_t row_bytes = rows.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t e = 0; e < experts; ++e) TORCH_CHECK(id[e] >= 0 && id[e] < rows.size(0), "expert id out of range");

  std::vector<int16_t> xq(x_rows * K);
  std::vector<float> xs(x_rows * (K / kBlock));
  quantize_rows(x.data_ptr<float>(), x_rows, K, xq.data(), xs.data());
  std::vector<int16_t> paired;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  paired.resize(xq.size());
  pair_blocks(xq.data(), x_rows, K, paired.data());
#endif

  const int16_t* values = lut.data_ptr<int16_t>();
  alignas(16) uint8_t low_bytes[16], high_bytes[16];
  for (int i = 0; i < 16; ++i) {
    low_bytes[i] = static_cast<uint8_t>(values[i] & 0xFF);
    high_bytes[i] = static_cast<uint8_t>((values[i] >> 8) & 0xFF);
  }
  const __m128i low = _mm_load_si128(reinterpret_cast<const __m128i*>(low_bytes));
  const __m128i high = _mm_load_si128(reinterpret_cast<const __m128i*>(high_bytes));
  const Table table{_mm256_set_m128i(low, low), _mm256_set_m128i(high, high)};
  at::Tensor y = at::empty({experts, N}, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* base = rows.data_ptr<uint8_t>();
  const float unit = 1.f / kLevels;  // the table's scale
  // One parallel region over every expert's rows: a region per expert would wake the threads k times.
  at::parallel_for(0, experts * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e = r / N, n = r % N;
      const uint8_t* row = base + id[e] * row_bytes;
      const int64_t xr = x_rows == 1 ? 0 : e;
      out[r] = unit * row_dot(row + packed_offset, reinterpret_cast<const float*>(row + absmax_offset), n * K, K,
                              xq.data() + xr * K, kPairs ? paired.data() + xr * K : nullptr,
                              xs.data() + xr * (K / kBlock), table);
    }
  });
  return y;
}

}  // namespace

// Each build (AVX2, AVX-512 VNNI) registers its op under a namespace of its own, so both can load at once.
#ifndef NF4_NAMESPACE
#define NF4_NAMESPACE moe_cpu_int4
#endif
#define NF4_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands the namespace macro first
#define NF4_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

NF4_LIBRARY(NF4_NAMESPACE, m) {
  m.def("nf4_matvec(Tensor x, Tensor rows, Tensor ids, Tensor lut, int packed_offset, int absmax_offset, int N, "
        "int K) -> Tensor");
}

NF4_LIBRARY_IMPL(NF4_NAMESPACE, m) { m.impl("nf4_matvec", &nf4_matvec); }
