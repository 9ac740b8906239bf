// CPU kernels for quantized decoding: matrix products over llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, Q4_K, Q5_K and Q6_K weights, and single-token attention over the slot KV cache.
//
// Weights are repacked once at load time from GGUF rows into groups of R rows, so that one
// vector instruction multiplies R rows at once and each block needs one scale step for all R
// rows instead of a horizontal sum per row (the same bits as the GGUF blocks; the K-quants'
// 6-bit scales take a byte each, 4 bytes per 256 values more).
//
// Activations are quantized per block of 32 to int16, not to int8 as in llama.cpp's
// vec_dot_q4_1_q8_1: int8 activations shrink the default model's top-2 logit gap on its first
// answer token from 0.08 to 0.001; int16 keeps logits within ~1e-4 (relative) of fp32 math on
// the dequantized weights. Products run in int32 (vpmaddwd / vpdpwssd) and are scaled per block.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "thread_pool.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CAKE_AVX2 1
#endif

namespace {

// Let other Python threads (the HTTP server's) run while a kernel computes: ops called
// through torch.ops hold the GIL otherwise.
class NoGil {
 public:
  NoGil() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~NoGil() {
    if (state_) PyEval_RestoreThread(state_);
  }

 private:
  PyThreadState* state_;
};

template <typename F>
void parallel(int64_t n, int64_t grain, const F& f) {
  cake::Pool::get().run(n, grain, at::get_num_threads(), f);
}

constexpr int QK = 32;  // values per activation block, and per slice of a weight block
constexpr int R = 8;    // weight rows per packed group: one int32 lane of a 256-bit vector each
enum QType : int64_t {  // ggml's type numbers
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14
};

// A packed group-block holds one GGUF block (32 values; 256 for the K-quants) of R rows, the
// same bits regrouped: a header of scales, then, per slice of 32 values, their integers.
//
// Header, R entries per field in row order: d (fp16) for every type; then m (fp16, Q4_1 and
// Q5_1) or dmin (fp16, Q4_K and Q5_K); Q4_K/Q5_K then hold their 6-bit slice scales and mins
// one byte each ([8 slices][R] each), Q6_K its int8 scales ([16 half-slices][R]).
//
// Integers of a slice, as 16-bit words: for 4- to 6-bit types, word w = 2 * row + kk of chunk
// c (4 chunks) holds in nibble t the low 4 bits of value k = 8c + 2t + kk; 5-bit types add one
// chunk whose word w has in bit j bit 4 of value 2j + kk; Q6_K two chunks whose word w has in
// bits 2t, 2t + 1 bits 4-5 of value 2(8c + t) + kk. Q8_0: byte t of word w of chunk c (8
// chunks) is value k = 4c + 2t + kk. Unpacking by shifts and masks gives vectors V_j
// (j = 0..15) whose 16-bit lane 2 * row + kk is value k = 2j + kk of that row: vpmaddwd with
// the activation pair (2j, 2j + 1) broadcast to every lane then adds one pair of products per
// row into its lane.
struct Format {
  int values;  // per GGUF block
  int file;    // bytes of one GGUF block
  int header;  // bytes of a group-block's scales
  int slice;   // bytes of a group-block's integers, per 32 values
  int hbits;   // value bits above the low 4 (Q8_0: none, it has its own 8-bit chunks)
  constexpr int64_t bytes() const { return header + values / QK * slice; }
};

constexpr Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {32, 18, 2 * R, 16 * R, 0};
    case Q4_1: return {32, 20, 4 * R, 16 * R, 0};
    case Q5_0: return {32, 22, 2 * R, 20 * R, 1};
    case Q5_1: return {32, 24, 4 * R, 20 * R, 1};
    case Q8_0: return {32, 34, 2 * R, 32 * R, 0};
    case Q4_K: return {256, 144, 20 * R, 16 * R, 0};
    case Q5_K: return {256, 176, 20 * R, 20 * R, 1};
    case Q6_K: return {256, 210, 18 * R, 24 * R, 2};
  }
  return {0, 0, 0, 0, 0};
}

Format format(int64_t qtype) {
  const Format f = format_of(qtype);
  TORCH_CHECK(f.values, "unsupported quant type ", qtype, " (have Q4_0=2, Q4_1=3, Q5_0=6, "
              "Q5_1=7, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14)");
  return f;
}

// f(std::integral_constant<int64_t, type>) for a runtime type: one compiled kernel per type.
template <typename F>
void dispatch(int64_t qtype, F&& f) {
  switch (qtype) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int64_t, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int64_t, Q5_0>{});
    case Q5_1: return f(std::integral_constant<int64_t, Q5_1>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
  }
  format(qtype);
}

// One block of an activation row: x ~= d * q; sum is the exact sum of the block's values (for
// offsets: Q4_1's m, the K-quants' mins), qsum the sum of q and qsum_lo that of its first 16
// (for the zero points of Q4_0, Q5_0 and Q6_K's half-slices).
struct alignas(32) ActBlock { int16_t q[QK]; float d; float sum; int32_t qsum, qsum_lo; };

inline float f16(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

void quantize_row(const float* x, int64_t nb, ActBlock* out) {
#ifdef CAKE_AVX2
  // The same rounding as the portable code (to nearest, ties to even); the sum's order
  // differs (a tree, not a chain), deterministically.
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  auto hmax = [](__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  };
  auto hsum_ps = [](__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  };
  auto hsum_epi32 = [](__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
  };
  for (int64_t b = 0; b < nb; ++b) {
    const float* v = x + b * QK;
    __m256 f[4];
    for (int i = 0; i < 4; ++i) f[i] = _mm256_loadu_ps(v + 8 * i);
    const float amax = hmax(_mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(f[0], abs_mask), _mm256_and_ps(f[1], abs_mask)),
        _mm256_max_ps(_mm256_and_ps(f[2], abs_mask), _mm256_and_ps(f[3], abs_mask))));
    const float d = amax / 32767.f, id = amax > 0.f ? 1.f / d : 0.f;
    const __m256 scale = _mm256_set1_ps(id);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(f[i], scale));
    // packs interleaves 128-bit lanes: permute them back into order
    _mm256_store_si256((__m256i*)out[b].q,
                       _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
    _mm256_store_si256((__m256i*)(out[b].q + 16),
                       _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
    out[b].d = d;
    out[b].sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(f[0], f[1]), _mm256_add_ps(f[2], f[3])));
    out[b].qsum_lo = hsum_epi32(_mm256_add_epi32(q[0], q[1]));
    out[b].qsum = out[b].qsum_lo + hsum_epi32(_mm256_add_epi32(q[2], q[3]));
  }
#else
  for (int64_t b = 0; b < nb; ++b) {
    const float* v = x + b * QK;
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < QK; ++i) { amax = std::max(amax, std::fabs(v[i])); sum += v[i]; }
    const float d = amax / 32767.f, id = amax > 0.f ? 1.f / d : 0.f;
    int32_t qsum = 0;
    for (int i = 0; i < QK; ++i) {
      out[b].q[i] = (int16_t)std::nearbyint(v[i] * id);
      qsum += out[b].q[i];
      if (i == QK / 2 - 1) out[b].qsum_lo = qsum;
    }
    out[b].d = d;
    out[b].sum = sum;
    out[b].qsum = qsum;
  }
#endif
}

// One GGUF block of one row, decoded: its integers as stored (unsigned, before any zero
// point; Q8_0's bytes) and the scale fields the packed header keeps.
struct Block { int q[256]; uint16_t d, m; uint8_t sc[16], mn[8]; };

template <int64_t qtype>  // a constant: each type's decoding compiles on its own
void read_block(const uint8_t* p, Block& o) {
  auto half = [&](int at) { uint16_t h; std::memcpy(&h, p + at, 2); return h; };
  switch (qtype) {
    case Q8_0:
      o.d = half(0);
      for (int k = 0; k < QK; ++k) o.q[k] = p[2 + k];
      return;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
      const bool has_m = qtype == Q4_1 || qtype == Q5_1, five = qtype == Q5_0 || qtype == Q5_1;
      o.d = half(0);
      o.m = has_m ? half(2) : 0;
      const uint8_t* qh = p + (has_m ? 4 : 2);
      const uint8_t* qs = qh + (five ? 4 : 0);
      uint32_t hb = 0;
      if (five) std::memcpy(&hb, qh, 4);
      for (int i = 0; i < 16; ++i) {
        o.q[i] = (qs[i] & 15) | ((hb >> i) & 1) << 4;
        o.q[i + 16] = (qs[i] >> 4) | ((hb >> (i + 16)) & 1) << 4;
      }
      return;
    }
    case Q4_K: case Q5_K: {  // d, dmin, 12 bytes of 6-bit scales and mins, [qh,] qs
      o.d = half(0);
      o.m = half(2);
      const uint8_t* s = p + 4;
      for (int j = 0; j < 8; ++j) {
        o.sc[j] = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        o.mn[j] = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | (s[j] >> 6) << 4;
      }
      const uint8_t* qh = p + 16;
      const uint8_t* qs = p + (qtype == Q5_K ? 48 : 16);
      for (int k = 0; k < 256; ++k) {
        const int slice = k / QK, l = k % QK;
        o.q[k] = (qs[32 * (slice / 2) + l] >> (4 * (slice % 2))) & 15;
        if (qtype == Q5_K) o.q[k] |= ((qh[l] >> slice) & 1) << 4;
      }
      return;
    }
    case Q6_K: {  // ql[128], qh[64], int8 scales[16], d
      std::memcpy(o.sc, p + 192, 16);
      o.d = half(208);
      for (int k = 0; k < 256; ++k) {
        const int n = k / 128, w = k % 128;
        const int lo = (p[64 * n + w % 64] >> (4 * (w / 64))) & 15;
        const int hi = (p[128 + 32 * n + w % 32] >> (2 * (w / 32))) & 3;
        o.q[k] = lo | hi << 4;
      }
      return;
    }
  }
  format(qtype);
}

inline bool has_m(int64_t qtype) {
  return qtype == Q4_1 || qtype == Q5_1 || qtype == Q4_K || qtype == Q5_K;
}

// Row r of a packed group-block <- one decoded GGUF block (the group-block starts zeroed).
template <int64_t qtype>
void pack_row(const Block& blk, int r, uint8_t* gb) {
  constexpr Format F = format_of(qtype);
  uint16_t* h = (uint16_t*)gb;
  h[r] = blk.d;
  if (has_m(qtype)) h[R + r] = blk.m;
  if (qtype == Q4_K || qtype == Q5_K)
    for (int s = 0; s < 8; ++s) {
      gb[4 * R + s * R + r] = blk.sc[s];
      gb[12 * R + s * R + r] = blk.mn[s];
    }
  if (qtype == Q6_K)
    for (int s = 0; s < 16; ++s) gb[2 * R + s * R + r] = blk.sc[s];
  for (int k = 0; k < F.values; ++k) {
    uint16_t* words = (uint16_t*)(gb + F.header + (k / QK) * F.slice);
    const int j = (k % QK) / 2, kk = k % 2, q = blk.q[k];
    if constexpr (qtype == Q8_0) {
      words[(j / 2) * 2 * R + 2 * r + kk] |= q << (8 * (j % 2));
      continue;
    }
    words[(j / 4) * 2 * R + 2 * r + kk] |= (q & 15) << (4 * (j % 4));
    uint16_t* high = words + 8 * R;  // after the 4 chunks of low nibbles
    if constexpr (F.hbits == 1) high[2 * r + kk] |= ((q >> 4) & 1) << j;
    if constexpr (F.hbits == 2) high[(j / 8) * 2 * R + 2 * r + kk] |= ((q >> 4) & 3) << (2 * (j % 8));
  }
}

// Integer k (0 <= k < F.values) of row r of a packed group-block, as stored.
inline int raw_value(const uint8_t* gb, const Format& F, int64_t qtype, int r, int k) {
  const uint16_t* words = (const uint16_t*)(gb + F.header + (k / QK) * F.slice);
  const int j = (k % QK) / 2, kk = k % 2;
  if (qtype == Q8_0) {
    const uint16_t w = words[(j / 2) * 2 * R + 2 * r + kk];
    return (int8_t)(j % 2 ? w >> 8 : w & 0xFF);
  }
  int q = (words[(j / 4) * 2 * R + 2 * r + kk] >> (4 * (j % 4))) & 15;
  const uint16_t* high = words + 8 * R;
  if (F.hbits == 1) q |= ((high[2 * r + kk] >> j) & 1) << 4;
  if (F.hbits == 2) q |= ((high[(j / 8) * 2 * R + 2 * r + kk] >> (2 * (j % 8))) & 3) << 4;
  return q;
}

// Value k of row r is scale * (q_k - zero) + offset; scale holds for 16 values (a Q6_K
// scale's reach), offset for a slice of 32. Computed as the gguf package dequantizes.
struct Scales { float scale, offset; int zero; };
inline Scales scales_at(const uint8_t* gb, int64_t qtype, int r, int k) {
  const uint16_t* h = (const uint16_t*)gb;
  const float d = f16(h[r]);
  const int s = k / QK;
  switch (qtype) {
    case Q4_0: return {d, 0.f, 8};
    case Q5_0: return {d, 0.f, 16};
    case Q4_1: case Q5_1: return {d, f16(h[R + r]), 0};
    case Q4_K: case Q5_K:
      return {d * gb[4 * R + s * R + r], -(f16(h[R + r]) * gb[12 * R + s * R + r]), 0};
    case Q6_K: return {d * (int8_t)gb[2 * R + (k / 16) * R + r], 0.f, 32};
  }
  return {d, 0.f, 0};  // Q8_0
}

// GGUF rows [N, nb * block] -> packed groups [ceil(N / R), nb * group-block]; padding rows are
// zero (scale 0), so they contribute nothing and are never written out.
at::Tensor repack(const at::Tensor& w_in, int64_t qtype) {
  NoGil no_gil;
  const at::Tensor w = w_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "repack takes uint8 [rows, bytes]");
  const Format F = format(qtype);
  const int64_t N = w.size(0), nb = w.size(1) / F.file, G = (N + R - 1) / R;
  TORCH_CHECK(w.size(1) == nb * F.file, "row bytes ", w.size(1), " are not whole blocks");
  at::Tensor out = at::zeros({G, nb * F.bytes()}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  dispatch(qtype, [&](auto qt) {
    constexpr int64_t QT = decltype(qt)::value;
    parallel(G, 16, [&](int64_t g0, int64_t g1) {
      Block blk;
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t b = 0; b < nb; ++b)
          for (int r = 0; r < R && g * R + r < N; ++r) {
            read_block<QT>(src + (g * R + r) * w.size(1) + b * F.file, blk);
            pack_row<QT>(blk, r, dst + (g * nb + b) * F.bytes());
          }
    });
  });
  return out;
}

#ifdef CAKE_AVX2
// 8 bytes (unsigned or signed) as 8 floats.
inline __m256 u8_to_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline __m256 i8_to_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// The vector width the products run at, as traits: Ymm takes one packed group (R = 8 rows,
// a 32-bit lane each); Zmm two adjacent groups at once (16 rows, their outputs adjacent),
// the same integer arithmetic per lane, so each output gets the same sums in the same order.
// Loads take the group's address and the distance to the next group.
struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int groups = 1;
  static I load(const uint8_t* p, int64_t) { return _mm256_loadu_si256((const __m256i*)p); }
  static F halves(const uint8_t* p, int64_t) {  // R fp16 values
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
  static F u8s(const uint8_t* p, int64_t) { return u8_to_ps(p); }
  static F i8s(const uint8_t* p, int64_t) { return i8_to_ps(p); }
  static I set16(int v) { return _mm256_set1_epi16((short)v); }
  static I set32(int32_t v) { return _mm256_set1_epi32(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  template <int S> static I shl(I v) { return _mm256_slli_epi16(v, S); }
  template <int S> static I shr(I v) { return _mm256_srli_epi16(v, S); }
  template <int S> static I sar(I v) { return _mm256_srai_epi16(v, S); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I dot(I acc, I w, I x) {  // acc += pairwise products of int16 lanes
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, w, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F set(float v) { return _mm256_set1_ps(v); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static void store(float* y, F v) { _mm256_storeu_ps(y, v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define CAKE_ZMM 1
struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int groups = 2;
  static I load(const uint8_t* p, int64_t next) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p)),
                              _mm256_loadu_si256((const __m256i*)(p + next)), 1);
  }
  static F halves(const uint8_t* p, int64_t next) {
    const __m256i h = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)p)),
        _mm_loadu_si128((const __m128i*)(p + next)), 1);
    return _mm512_cvtph_ps(h);
  }
  static __m128i bytes(const uint8_t* p, int64_t next) {  // 8 bytes of each group
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)p),
                              _mm_loadl_epi64((const __m128i*)(p + next)));
  }
  static F u8s(const uint8_t* p, int64_t next) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(p, next)));
  }
  static F i8s(const uint8_t* p, int64_t next) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes(p, next)));
  }
  static I set16(int v) { return _mm512_set1_epi16((short)v); }
  static I set32(int32_t v) { return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  template <int S> static I shl(I v) { return _mm512_slli_epi16(v, S); }
  template <int S> static I shr(I v) { return _mm512_srli_epi16(v, S); }
  template <int S> static I sar(I v) { return _mm512_srai_epi16(v, S); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I dot(I acc, I w, I x) { return _mm512_dpwssd_epi32(acc, w, x); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F set(float v) { return _mm512_set1_ps(v); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static void store(float* y, F v) { _mm512_storeu_ps(y, v); }
};
#endif

template <int... J, typename F>
inline void unroll(std::integer_sequence<int, J...>, F&& f) {
  (f(std::integral_constant<int, J>{}), ...);
}

template <typename V, int S>  // S > 0: left, S < 0: right
inline typename V::I shift16(typename V::I v) {
  if constexpr (S >= 0) return V::template shl<S>(v);
  else return V::template shr<-S>(v);
}

// The 16 vectors V_j of a slice's integers, handed in order to f(j, V_j), j a constant;
// `next`: the distance to the same slice of the next group (Zmm).
template <typename V, int64_t QT, typename F>
inline void for_each_vector(const uint8_t* words, int64_t next, F&& f) {
  constexpr Format Fm = format_of(QT);
  using I = typename V::I;
  if constexpr (QT == Q8_0) {
    unroll(std::make_integer_sequence<int, 8>{}, [&](auto c) {
      const I raw = V::load(words + 32 * c, next);
      f(std::integral_constant<int, 2 * c>{}, V::template sar<8>(V::template shl<8>(raw)));
      f(std::integral_constant<int, 2 * c + 1>{}, V::template sar<8>(raw));
    });
  } else {
    const I m4 = V::set16(15), bit4 = V::set16(16), bits45 = V::set16(48);
    I raw[4], high[2];
    for (int c = 0; c < 4; ++c) raw[c] = V::load(words + 32 * c, next);
    for (int c = 0; c < Fm.hbits; ++c) high[c] = V::load(words + 128 + 32 * c, next);
    unroll(std::make_integer_sequence<int, 16>{}, [&](auto jc) {
      constexpr int j = decltype(jc)::value, t = j % 4;
      I v = raw[j / 4];
      v = t == 3 ? V::template shr<12>(v) : V::and_(shift16<V, -4 * t>(v), m4);
      if constexpr (Fm.hbits == 1)
        v = V::or_(v, V::and_(shift16<V, 4 - j>(high[0]), bit4));
      if constexpr (Fm.hbits == 2)
        v = V::or_(v, V::and_(shift16<V, 4 - 2 * (j % 8)>(high[j / 8]), bits45));
      f(jc, v);
    });
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp of 8 floats (Cephes' expf polynomial, ~1e-7 relative error): softmax calls it for every
// cached position of every head, where scalar exp costs more than the dot products.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37f)), _mm256_set1_ps(-87.33f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                   _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, x), x, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}


constexpr int64_t PREFETCH = 32768;  // bytes ahead (16-64 KiB measured alike)

// y[r][0..R * V::groups) = group rows . activation rows x[r], for MR activation rows; with
// Zmm the group at group + next too.
template <typename V, int64_t QT, int MR>
inline void group_dot(const uint8_t* group, int64_t next, int64_t nb, const ActBlock* const* x,
                      float* const* y) {
  using I = typename V::I;
  using Fv = typename V::F;
  constexpr Format F = format_of(QT);
  constexpr int SUBS = F.values / QK;
  constexpr bool kmin = QT == Q4_K || QT == Q5_K, offset = QT == Q4_1 || QT == Q5_1;
  constexpr int JG = QT == Q6_K ? 8 : 16;  // consecutive V_j under one weight scale
  constexpr int ZERO = QT == Q4_0 ? 8 : QT == Q5_0 ? 16 : QT == Q6_K ? 32 : 0;
  // NA independent sums per row hide the latency of the multiply-add chain.
  constexpr int NA = MR >= 4 ? 1 : 4 / MR;
  Fv acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = V::fzero();
  for (int64_t b = 0; b < nb / SUBS; ++b) {
    const uint8_t* gb = group + b * F.bytes();
    const Fv d = V::halves(gb, next);
    Fv m = d;  // Q4_1/Q5_1's m, the K-quants' dmin
    if constexpr (kmin || offset) m = V::halves(gb + 2 * R, next);
    for (int s = 0; s < SUBS; ++s) {
      // Ask for the bytes PREFETCH ahead of this slice (of each group): the hardware
      // prefetchers alone keep too few lines in flight per core to stream memory at its rate
      // (16 layers of a 1B Q4_K, 2 threads, one row: 17.5 -> 22.7 GB/s; eight rows 14.0 vs
      // 10.5 GB/s).
      const uint8_t* ahead = gb + PREFETCH + s * (F.bytes() / SUBS);
      for (int l = 0; l < (F.bytes() / SUBS + 63) / 64; ++l) {
        _mm_prefetch((const char*)ahead + 64 * l, _MM_HINT_T0);
        if constexpr (V::groups == 2)
          _mm_prefetch((const char*)ahead + next + 64 * l, _MM_HINT_T0);
      }
      const ActBlock* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = &x[r][b * SUBS + s];
      I part[MR][NA];
      for (int r = 0; r < MR; ++r)
        for (int i = 0; i < NA; ++i) part[r][i] = V::zero();
      for_each_vector<V, QT>(gb + F.header + s * F.slice, next, [&](auto jc, I v) {
        constexpr int j = decltype(jc)::value;
        for (int r = 0; r < MR; ++r)
          part[r][j % NA] = V::dot(part[r][j % NA], v,
                                   V::set32(*(const int32_t*)&a[r]->q[2 * j]));
        if constexpr (j % JG == JG - 1) {  // the values under this scale are summed: apply it
          Fv scale = d;
          if constexpr (kmin) scale = V::mul(d, V::u8s(gb + 4 * R + s * R, next));
          if constexpr (QT == Q6_K)
            scale = V::mul(d, V::i8s(gb + 2 * R + (2 * s + j / 8) * R, next));
          for (int r = 0; r < MR; ++r) {
            I p = part[r][0];
            for (int i = 1; i < NA; ++i) p = V::add32(p, part[r][i]);
            for (int i = 0; i < NA; ++i) part[r][i] = V::zero();
            if constexpr (ZERO != 0) {
              const int32_t qs = QT != Q6_K ? a[r]->qsum : j < 8 ? a[r]->qsum_lo
                                                                 : a[r]->qsum - a[r]->qsum_lo;
              p = V::sub32(p, V::set32(ZERO * qs));
            }
            acc[r] = V::fmadd(V::cvt(p), V::mul(scale, V::set(a[r]->d)), acc[r]);
          }
        }
      });
      if constexpr (offset)
        for (int r = 0; r < MR; ++r) acc[r] = V::fmadd(m, V::set(a[r]->sum), acc[r]);
      if constexpr (kmin) {
        const Fv mins = V::mul(m, V::u8s(gb + 12 * R + s * R, next));
        for (int r = 0; r < MR; ++r) acc[r] = V::fnmadd(mins, V::set(a[r]->sum), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) V::store(y[r], acc[r]);
}
#else
// Portable fallback: the same integer arithmetic, one value at a time.
struct Ymm { static constexpr int groups = 1; };  // one group at a time

template <typename V, int64_t QT, int MR>
inline void group_dot(const uint8_t* group, int64_t, int64_t nb, const ActBlock* const* x,
                      float* const* y) {
  constexpr Format F = format_of(QT);
  constexpr int SUBS = F.values / QK;
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < R; ++i) y[r][i] = 0.f;
  for (int64_t b = 0; b < nb / SUBS; ++b) {
    const uint8_t* gb = group + b * F.bytes();
    for (int i = 0; i < R; ++i)
      for (int k0 = 0; k0 < F.values; k0 += 16) {
        const Scales S = scales_at(gb, QT, i, k0);
        int q[16];
        for (int t = 0; t < 16; ++t) q[t] = raw_value(gb, F, QT, i, k0 + t) - S.zero;
        for (int r = 0; r < MR; ++r) {
          const ActBlock& a = x[r][b * SUBS + k0 / QK];
          int32_t s = 0;
          for (int t = 0; t < 16; ++t) s += q[t] * a.q[k0 % QK + t];
          y[r][i] += S.scale * a.d * (float)s + (k0 % QK == 0 ? S.offset * a.sum : 0.f);
        }
      }
  }
}
#endif

// MR activation rows m.. against V::groups weight groups from g (their stride: gbytes); a
// partial last group goes through tmp.
template <typename V, int64_t QT, int MR>
inline void tile(const ActBlock* x, int64_t m, int64_t nb, const uint8_t* group, int64_t gbytes,
                 int64_t g, int64_t N, float* y, int64_t ldy, float (*tmp)[2 * R]) {
  const bool full = (g + V::groups) * R <= N;
  const ActBlock* rows[MR];
  float* ys[MR];
  for (int r = 0; r < MR; ++r) {
    rows[r] = x + (m + r) * nb;
    ys[r] = full ? y + (m + r) * ldy + g * R : tmp[r];
  }
  group_dot<V, QT, MR>(group, gbytes, nb, rows, ys);
  if (!full)
    for (int r = 0; r < MR; ++r)
      for (int64_t n = g * R; n < N; ++n) y[(m + r) * ldy + n] = tmp[r][n - g * R];
}

// Rows m0..m1 of activations against V::groups groups from g: tiles of 8, 4, then one tile
// of the last 1-3 rows, each group unpacked once per tile (a decode step with a few draft
// rows of one sequence unpacks its weights once).
template <typename V, int64_t QT>
inline void tiles(const ActBlock* x, int64_t m0, int64_t m1, int64_t nb, const uint8_t* group,
                  int64_t gbytes, int64_t g, int64_t N, float* y, int64_t ldy,
                  float (*tmp)[2 * R]) {
  int64_t m = m0;
  for (; m + 8 <= m1; m += 8) tile<V, QT, 8>(x, m, nb, group, gbytes, g, N, y, ldy, tmp);
  for (; m + 4 <= m1; m += 4) tile<V, QT, 4>(x, m, nb, group, gbytes, g, N, y, ldy, tmp);
  switch (m1 - m) {
    case 3: tile<V, QT, 3>(x, m, nb, group, gbytes, g, N, y, ldy, tmp); break;
    case 2: tile<V, QT, 2>(x, m, nb, group, gbytes, g, N, y, ldy, tmp); break;
    case 1: tile<V, QT, 1>(x, m, nb, group, gbytes, g, N, y, ldy, tmp); break;
  }
}

template <int64_t QT>
void matmul(const ActBlock* x, int64_t M, int64_t nb, const uint8_t* w, int64_t N, float* y,
            int64_t ldy) {
  constexpr int64_t MC = 64;  // activation rows kept in cache while the weights stream by
  const int64_t G = (N + R - 1) / R, gbytes = nb / (format_of(QT).values / QK) * format_of(QT).bytes();
  // One contiguous share per thread (the prefetchers stream it best); a thread that has not
  // woken up yet leaves its share to the others.
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t grain = (G + threads - 1) / threads;
  parallel(G, grain, [&](int64_t g0, int64_t g1) {
    float tmp[8][2 * R];
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t m1 = std::min(M, m0 + MC);
      for (int64_t g = g0; g < g1;) {
        const uint8_t* group = w + g * gbytes;
#ifdef CAKE_ZMM
        if (g + 2 <= g1 && (g + 2) * R <= N) {  // two whole groups at once
          tiles<Zmm, QT>(x, m0, m1, nb, group, gbytes, g, N, y, ldy, tmp);
          g += 2;
          continue;
        }
#endif
        tiles<Ymm, QT>(x, m0, m1, nb, group, gbytes, g, N, y, ldy, tmp);
        g += 1;
      }
    }
  });
}

void check_packed(const at::Tensor& w, int64_t qtype, int64_t N, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 &&
              w.is_contiguous(), "packed weight must be a contiguous CPU uint8 tensor");
  const Format F = format(qtype);
  TORCH_CHECK(K % F.values == 0, "in_features must be a multiple of ", F.values, ", got ", K);
  TORCH_CHECK(w.size(0) == (N + R - 1) / R && w.size(1) == K / F.values * F.bytes(),
              "packed weight of shape ", w.sizes(), " does not hold ", N, " x ", K,
              " values of type ", qtype);
}

// y[M, N] = xq @ dequantize(w)^T (+ bias), xq already quantized; rows of y are ldy apart
// (default N: the columns of a wider output can be filled a matrix at a time).
void linear(const ActBlock* xq, int64_t M, int64_t nb, const at::Tensor& w, int64_t qtype,
            int64_t N, const std::optional<at::Tensor>& bias, float* y, int64_t ldy = 0) {
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (ldy == 0) ldy = N;
  dispatch(qtype, [&](auto qt) { matmul<decltype(qt)::value>(xq, M, nb, wp, N, y, ldy); });
  if (bias.has_value()) {
    const float* b = bias->data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * ldy + n] += b[n];
  }
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                                    bias->numel() == N), "bias must be float32 [", N, "]");
}

// 1 / RMS of in[0..n)
float rms_scale(const float* in, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += in[i] * in[i];
  return 1.f / std::sqrt(ss / n + eps);
}

// out[0..n) = RMS-normalized in times w (out may be in).
void rms_norm(const float* in, float* out, int64_t n, const float* w, float eps) {
  const float r = rms_scale(in, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] * r * w[i];
}

// Quantize M rows of K values; with `norm`, RMS-normalize each row (times norm) first. Rows
// are cut into pieces of up to PIECE blocks, so that a few rows (a batch of decode steps)
// spread over the threads too; one row of a decode step stays on the calling thread.
void quantize_rows(const float* x, int64_t M, int64_t K, std::vector<ActBlock>& out,
                   const float* norm = nullptr, float eps = 0.f) {
  constexpr int64_t PIECE = 256;  // blocks (8192 values: a few microseconds)
  const int64_t nb = K / QK, pieces = (nb + PIECE - 1) / PIECE;
  out.resize(M * nb);
  std::vector<float> r(norm ? M : 0);
  for (int64_t m = 0; m < (norm ? M : 0); ++m) r[m] = rms_scale(x + m * K, K, eps);
  parallel(M * pieces, 1, [&](int64_t i0, int64_t i1) {
    float tmp[PIECE * QK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / pieces, b0 = i % pieces * PIECE, b1 = std::min(nb, b0 + PIECE);
      const float* piece = x + m * K + b0 * QK;
      if (norm) {  // as rms_norm computes it
        const float* w = norm + b0 * QK;
        for (int64_t k = 0; k < (b1 - b0) * QK; ++k) tmp[k] = piece[k] * r[m] * w[k];
        piece = tmp;
      }
      quantize_row(piece, b1 - b0, &out[m * nb + b0]);
    }
  });
}

#ifdef CAKE_AVX2
// 16 floats -> 16 bfloat16 (rounded to nearest even), lo's 8 then hi's 8.
inline __m256i to_bf16(__m256 lo, __m256 hi) {
  auto round = [](__m256 f) {
    const __m256i b = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(lo), round(hi)), 0xD8);
}

// v[0..8) as the rows of an 8x8 matrix of 32-bit elements <- its columns.
inline void transpose8(__m256i* v) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// The first `rows` rows of one packed group-block, dequantized to bfloat16 rows K apart:
// each vector V_j (value pairs 2j, 2j + 1 of the 8 rows) is scaled and rounded, and 8x8
// transposes of the value pairs turn them into 16 consecutive values per row.
template <int64_t QT>
inline void dequantize_group_bf16(const uint8_t* gb, int rows, int64_t K, c10::BFloat16* out) {
  constexpr Format F = format_of(QT);
  constexpr bool kmin = QT == Q4_K || QT == Q5_K, offset = QT == Q4_1 || QT == Q5_1;
  constexpr int ZERO = QT == Q4_0 ? 8 : QT == Q5_0 ? 16 : QT == Q6_K ? 32 : 0;
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)gb));
  __m256 m = _mm256_setzero_ps();
  if constexpr (kmin || offset) m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 2 * R)));
  const __m256i lo_rows = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                hi_rows = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  for (int s = 0; s < F.values / QK; ++s) {
    __m256 scale[2] = {d, d}, off[2] = {m, m};  // per half-slice, per row
    if constexpr (kmin) {
      scale[0] = scale[1] = _mm256_mul_ps(d, u8_to_ps(gb + 4 * R + s * R));
      off[0] = off[1] = _mm256_sub_ps(_mm256_setzero_ps(),
                                      _mm256_mul_ps(m, u8_to_ps(gb + 12 * R + s * R)));
    }
    if constexpr (QT == Q6_K)
      for (int h = 0; h < 2; ++h) scale[h] = _mm256_mul_ps(d, i8_to_ps(gb + 2 * R + (2 * s + h) * R));
    __m256 lane_scale[2][2], lane_off[2][2];  // [half][rows 0-3, 4-7], one per value lane
    for (int h = 0; h < 2; ++h) {
      lane_scale[h][0] = _mm256_permutevar8x32_ps(scale[h], lo_rows);
      lane_scale[h][1] = _mm256_permutevar8x32_ps(scale[h], hi_rows);
      lane_off[h][0] = _mm256_permutevar8x32_ps(off[h], lo_rows);
      lane_off[h][1] = _mm256_permutevar8x32_ps(off[h], hi_rows);
    }
    __m256i pairs[16];
    for_each_vector<Ymm, QT>(gb + F.header + s * F.slice, 0, [&](auto jc, __m256i v) {
      constexpr int j = decltype(jc)::value, h = QT == Q6_K ? j / 8 : 0;
      if constexpr (ZERO != 0) v = _mm256_sub_epi16(v, _mm256_set1_epi16(ZERO));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
      pairs[j] = to_bf16(_mm256_fmadd_ps(lo, lane_scale[h][0], lane_off[h][0]),
                         _mm256_fmadd_ps(hi, lane_scale[h][1], lane_off[h][1]));
    });
    transpose8(pairs);
    transpose8(pairs + 8);
    for (int r = 0; r < rows; ++r) {
      _mm256_storeu_si256((__m256i*)(out + r * K + s * QK), pairs[r]);
      _mm256_storeu_si256((__m256i*)(out + r * K + s * QK + 16), pairs[8 + r]);
    }
  }
}
#endif

// Rows n0..n1 of dequantize(w) as bfloat16, into out [n1 - n0, K]; n0 is a multiple of R.
template <int64_t QT>
void dequantize_bf16(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, c10::BFloat16* out) {
  constexpr Format F = format_of(QT);
  const int64_t nbw = K / F.values, gbytes = nbw * F.bytes();
  parallel((n1 - n0 + R - 1) / R, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = n0 / R + i;
      const int rows = (int)std::min<int64_t>(R, n1 - g * R);
      for (int64_t b = 0; b < nbw; ++b) {
        const uint8_t* gb = w + g * gbytes + b * F.bytes();
        c10::BFloat16* o = out + i * R * K + b * F.values;
#ifdef CAKE_AVX2
        dequantize_group_bf16<QT>(gb, rows, K, o);
#else
        for (int r = 0; r < rows; ++r)
          for (int k0 = 0; k0 < F.values; k0 += 16) {
            const Scales S = scales_at(gb, QT, r, k0);
            for (int t = 0; t < 16; ++t)
              o[r * K + k0 + t] = c10::BFloat16(
                  S.scale * (float)(raw_value(gb, F, QT, r, k0 + t) - S.zero) + S.offset);
          }
#endif
      }
    }
  });
}

// From this many rows on (0: never), qlinear dequantizes the weights to bfloat16, a slice at a
// time, and multiplies with torch's own GEMM: on CPUs with AMX (set by cake.text.kernels) that
// runs ~7x the int16 products' multiply-adds per cycle, for prompts. bfloat16 rounds inputs
// and outputs to 8 bits of mantissa (relative error 2^-9 each) instead of int16's per-block
// 2^-16 of the block's largest value.
std::atomic<int64_t> dense_rows{0};

int64_t set_dense_rows(int64_t rows) { return dense_rows.exchange(rows); }

void dense_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t N,
                  at::Tensor& y) {
  const int64_t K = x.size(1);
  constexpr int64_t SLICE = 1024;  // weight rows dequantized at a time (4 MiB at K = 2048)
  const at::Tensor xb = x.to(at::kBFloat16);
  at::Tensor wb = at::empty({std::min(N, SLICE), K}, x.options().dtype(at::kBFloat16));
  for (int64_t n0 = 0; n0 < N; n0 += SLICE) {
    const int64_t n1 = std::min(N, n0 + SLICE);
    dispatch(qtype, [&](auto qt) {
      dequantize_bf16<decltype(qt)::value>(w.data_ptr<uint8_t>(), K, n0, n1,
                                            wb.data_ptr<c10::BFloat16>());
    });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xb, wb.narrow(0, 0, n1 - n0).t()));
  }
}

// y[..., N] = x[..., K] @ dequantize(w)[N, K]^T (+ bias)
at::Tensor qlinear(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t N,
                   const std::optional<at::Tensor>& bias) {
  NoGil no_gil;
  const int64_t K = x_in.size(-1), nb = K / QK;
  check_packed(w, qtype, N, K);
  check_bias(bias, N);
  TORCH_CHECK(x_in.device().is_cpu(), "qlinear runs on CPU tensors");
  const at::Tensor x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t dense = dense_rows.load();
  if (dense > 0 && M >= dense) {
    dense_linear(x, w, qtype, N, y);
    if (bias.has_value()) y.add_(*bias);
  } else {
    std::vector<ActBlock> xq;
    quantize_rows(x.data_ptr<float>(), M, K, xq);
    linear(xq.data(), M, nb, w, qtype, N, bias, y.data_ptr<float>());
  }
  return y.view(out_shape).to(x_in.scalar_type());
}

// Rows of dequantize(w) as float32 [..., K]: embedding lookups and reference checks.
at::Tensor dequantize_rows(const at::Tensor& w, int64_t qtype, int64_t N, int64_t K,
                           const at::Tensor& rows) {
  check_packed(w, qtype, N, K);
  const at::Tensor idx = rows.reshape({-1}).to(at::kLong).contiguous();
  const Format F = format(qtype);
  const int64_t n = idx.size(0), nb = K / F.values, bytes = F.bytes();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "row ", ip[i], " out of range");
  at::Tensor out = at::empty({n, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  parallel(n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = ip[i] / R;
      const int r = ip[i] % R;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* gb = wp + (g * nb + b) * bytes;
        for (int k = 0; k < F.values; ++k) {
          const Scales S = scales_at(gb, qtype, r, k);
          op[i * K + b * F.values + k] = S.scale * (float)(raw_value(gb, F, qtype, r, k) - S.zero)
                                         + S.offset;
        }
      }
    }
  });
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(K);
  return out.view(shape);
}

// KV cache elements: float32, or float16 held as raw bits (half the memory, as llama.cpp).
using Half = uint16_t;
inline float to_float(float x) { return x; }
inline float to_float(Half x) { return f16(x); }
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline Half from_float<Half>(float x) { return c10::Half(x).x; }
#ifdef CAKE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif

template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef CAKE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// out[0..n) (+)= sum_p w[p] * v[p * stride + (0..n)], accumulated in registers 32 values at a
// time; add: onto what out holds (the next block of a paged cache).
template <typename T>
void weighted_sum(const float* w, const T* v, int64_t stride, int64_t L, int64_t n,
                  float* out, bool add) {
  int64_t i = 0;
#ifdef CAKE_AVX2
  for (; i + 32 <= n; i += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (add) {
      a0 = _mm256_loadu_ps(out + i);
      a1 = _mm256_loadu_ps(out + i + 8);
      a2 = _mm256_loadu_ps(out + i + 16);
      a3 = _mm256_loadu_ps(out + i + 24);
    }
    for (int64_t p = 0; p < L; ++p) {
      const __m256 wp = _mm256_set1_ps(w[p]);
      const T* vp = v + p * stride + i;
      a0 = _mm256_fmadd_ps(wp, load8(vp), a0);
      a1 = _mm256_fmadd_ps(wp, load8(vp + 8), a1);
      a2 = _mm256_fmadd_ps(wp, load8(vp + 16), a2);
      a3 = _mm256_fmadd_ps(wp, load8(vp + 24), a3);
    }
    _mm256_storeu_ps(out + i, a0);
    _mm256_storeu_ps(out + i + 8, a1);
    _mm256_storeu_ps(out + i + 16, a2);
    _mm256_storeu_ps(out + i + 24, a3);
  }
#endif
  for (; i < n; ++i) {
    float acc = add ? out[i] : 0.f;
    for (int64_t p = 0; p < L; ++p) acc += w[p] * to_float(v[p * stride + i]);
    out[i] = acc;
  }
}

// out[i] = silu(gu[i]) * gu[F + i]: the activation of a fused gate/up row.
void silu_mul_row(const float* gu, int64_t F, float* out) {
  int64_t i = 0;
#ifdef CAKE_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= F; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(gu + F + i)));
  }
#endif
  for (; i < F; ++i) out[i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[F + i];
}

// sc[0..L) <- softmax(sc), given its maximum.
void softmax_tail(float* sc, int64_t L, float mx) {
  float denom = 0.f;
  int64_t p = 0;
#ifdef CAKE_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; p + 8 <= L; p += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + p), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(sc + p, e);
    sum = _mm256_add_ps(sum, e);
  }
  denom = hsum(sum);
#endif
  for (; p < L; ++p) { sc[p] = std::exp(sc[p] - mx); denom += sc[p]; }
  const float inv = 1.f / denom;
  for (p = 0; p < L; ++p) sc[p] *= inv;
}

// One new token per row: rotate q and k (rotate-half convention, inv_freq per pair), store
// k and v at the row's position in the cache, and attend over the row's cached positions
// (the last `window` of them when window > 0). qkv rows: [(H + 2 * Hkv) * D]; caches: a pool
// of blocks [blocks, block size, Hkv, D]; each row's block table ([B, W] int64, or [B]: one
// block each) says which block holds its positions p * bs .. p * bs + bs - 1, so rows read
// the pool in place, with no gather. A slot cache is the same with one block per sequence of
// the whole context. Rows may share blocks (a prefix, or several positions of one sequence:
// every row's key and value are stored before any row attends). out rows: [H * D].
struct AttentionShape { int64_t B, H, Hkv, D, bs, W; };

template <typename T>
void attend(const AttentionShape& S, const float* qkv, T* kc, T* vc, const int64_t* tp,
            const int64_t* pp, const float* inv_freq, int64_t window, float* out) {
  const int64_t H = S.H, Hkv = S.Hkv, D = S.D, bs = S.bs, W = S.W, half = D / 2,
                group = H / Hkv;
  const int64_t row = (H + 2 * Hkv) * D;
  // the pool row (block * bs + offset) of row b's position p
  auto at = [&](int64_t b, int64_t p) { return tp[b * W + p / bs] * bs + p % bs; };
  std::vector<float> q(S.B * H * D), cs(2 * half);
  for (int64_t b = 0; b < S.B; ++b) {
    for (int64_t i = 0; i < half; ++i) {  // fp32 angles, as the PyTorch path computes them
      const float a = (float)pp[b] * inv_freq[i];
      cs[i] = std::cos(a);
      cs[half + i] = std::sin(a);
    }
    auto rotate = [&](const float* in, float* o) {
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = in[i], x1 = in[i + half], c = cs[i], s = cs[half + i];
        o[i] = x0 * c - x1 * s;
        o[i + half] = x1 * c + x0 * s;
      }
    };
    const float* r = qkv + b * row;
    for (int64_t h = 0; h < H; ++h) rotate(r + h * D, &q[(b * H + h) * D]);
    T* kdst = kc + at(b, pp[b]) * Hkv * D;
    T* vdst = vc + at(b, pp[b]) * Hkv * D;
    std::vector<float> k(D);
    for (int64_t g = 0; g < Hkv; ++g) {
      rotate(r + (H + g) * D, k.data());
      for (int64_t i = 0; i < D; ++i) kdst[g * D + i] = from_float<T>(k[i]);
    }
    for (int64_t i = 0; i < Hkv * D; ++i) vdst[i] = from_float<T>(r[(H + Hkv) * D + i]);
  }
  const float scale = 1.f / std::sqrt((float)D);
  // One task per (row, kv head): its `group` query heads share every key and value read.
  parallel(S.B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      const int64_t end = pp[b] + 1, start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int64_t L = end - start;
      scores.resize(group * L);
      // runs of consecutive positions within one block: [p, next) at pool row at(b, p)
      auto run_end = [&](int64_t p) { return std::min(end, (p / bs + 1) * bs); };
      for (int64_t h = 0; h < group; ++h) {
        const float* qv = &q[(b * H + g * group + h) * D];
        float* sc = &scores[h * L];
        float mx = -INFINITY;
        for (int64_t p = start; p < end;) {
          const int64_t next = run_end(p);
          const T* kbase = kc + (at(b, p) * Hkv + g) * D;
          for (int64_t j = 0; j < next - p; ++j) {
            float& v = sc[p - start + j];
            v = dot(qv, kbase + j * Hkv * D, D) * scale;
            mx = std::max(mx, v);
          }
          p = next;
        }
        softmax_tail(sc, L, mx);
      }
      for (int64_t h = 0; h < group; ++h) {
        float* o = out + b * H * D + (g * group + h) * D;
        for (int64_t p = start; p < end;) {
          const int64_t next = run_end(p);
          weighted_sum(&scores[h * L + p - start], vc + (at(b, p) * Hkv + g) * D, Hkv * D,
                       next - p, D, o, p != start);
          p = next;
        }
      }
    }
  });
}

AttentionShape check_attention(const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& tables, const at::Tensor& positions,
                               const at::Tensor& inv_freq, int64_t B, int64_t H) {
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
              v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4,
              "attention needs contiguous float32 or float16 caches "
              "[blocks, block size, kv heads, head dim]");
  TORCH_CHECK(tables.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
              tables.is_contiguous() && positions.is_contiguous() && tables.dim() <= 2 &&
              tables.size(0) == B && positions.numel() == B,
              "block tables [B] or [B, W] and positions [B]: int64, one row each");
  const int64_t W = tables.dim() == 2 ? tables.size(1) : 1;
  const AttentionShape S{B, H, k_cache.size(2), k_cache.size(3), k_cache.size(1), W};
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == S.D / 2 &&
              H % S.Hkv == 0, "attention: inconsistent rope table or head counts");
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S.bs * W, "position ", pp[b], " outside the row's blocks");
    for (int64_t j = 0; j <= pp[b] / S.bs; ++j)
      TORCH_CHECK(tp[b * W + j] >= 0 && tp[b * W + j] < k_cache.size(0),
                  "block ", tp[b * W + j], " outside the cache");
  }
  return S;
}

void attend_any(const AttentionShape& S, const float* qkv, at::Tensor& k_cache,
                at::Tensor& v_cache, const at::Tensor& tables, const at::Tensor& positions,
                const at::Tensor& inv_freq, int64_t window, float* out) {
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  if (k_cache.scalar_type() == at::kHalf)
    attend(S, qkv, (Half*)k_cache.data_ptr(), (Half*)v_cache.data_ptr(), tp, pp,
           inv_freq.data_ptr<float>(), window, out);
  else
    attend(S, qkv, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tp, pp,
           inv_freq.data_ptr<float>(), window, out);
}

// qkv: [B, (H + 2 * Hkv) * D] -> [B, H * D]; see attend().
at::Tensor decode_attention(const at::Tensor& qkv_in, at::Tensor k_cache, at::Tensor v_cache,
                            const at::Tensor& slots, const at::Tensor& positions,
                            const at::Tensor& inv_freq, int64_t n_heads, int64_t window) {
  NoGil no_gil;
  const at::Tensor qkv = qkv_in.reshape({qkv_in.size(0), -1}).to(at::kFloat).contiguous();
  const AttentionShape S = check_attention(k_cache, v_cache, slots, positions, inv_freq,
                                           qkv.size(0), n_heads);
  TORCH_CHECK(qkv.size(1) == (S.H + 2 * S.Hkv) * S.D, "qkv has ", qkv.size(1), " columns");
  at::Tensor out = at::empty({S.B, S.H * S.D}, qkv.options());
  attend_any(S, qkv.data_ptr<float>(), k_cache, v_cache, slots, positions, inv_freq, window,
             out.data_ptr<float>());
  return out.to(qkv_in.scalar_type());
}

// out[i] = gelu_tanh(gu[i]) * gu[F + i] (GeGLU): 0.5 x (1 + tanh(u)) is x * sigmoid(2u).
void gelu_mul_row(const float* gu, int64_t F, float* out) {
  constexpr float c = 0.7978845608028654f, c3 = 0.7978845608028654f * 0.044715f;
  int64_t i = 0;
#ifdef CAKE_AVX2
  const __m256 one = _mm256_set1_ps(1.f), m2c = _mm256_set1_ps(-2.f * c),
               m2c3 = _mm256_set1_ps(-2.f * c3);
  for (; i + 8 <= F; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 m2u = _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_mul_ps(g, g), m2c3, m2c));
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(m2u)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(gu + F + i)));
  }
#endif
  for (; i < F; ++i) {
    const float g = gu[i], u = g * (c + c3 * g * g);
    out[i] = g / (1.f + std::exp(-2.f * u)) * gu[F + i];
  }
}

// v[0..n) <- RMS-normalized v times w, in groups of wn values (a head, or all of v) that
// all take w[0..wn).
void rms_norm_groups(float* v, int64_t n, const float* w, int64_t wn, float eps) {
  for (int64_t g = 0; g < n; g += wn) rms_norm(v + g, v + g, wn, w, eps);
}

// The matrices that make up one wide product (q/k/v, or gate/up): one fused matrix, or
// several whose outputs lie side by side (llama.cpp's K-quant mixes give v, or down, a type
// of its own, so they cannot be joined). Each checked against its share of the columns.
void check_parts(at::TensorList w, at::IntArrayRef types, const std::vector<int64_t>& sizes,
                 int64_t K, const char* what) {
  TORCH_CHECK(w.size() == types.size(), what, ": one type per matrix");
  if (w.size() == 1) {
    int64_t n = 0;
    for (int64_t s : sizes) n += s;
    return check_packed(w[0], types[0], n, K);
  }
  TORCH_CHECK(w.size() == sizes.size(), what, ": ", sizes.size(), " matrices or one fused");
  for (size_t i = 0; i < w.size(); ++i) check_packed(w[i], types[i], sizes[i], K);
}

// y[B, sum(sizes)] = xq @ [w_0; w_1; ...]^T (+ bias)
void linear_parts(const ActBlock* xq, int64_t B, int64_t nb, at::TensorList w,
                  at::IntArrayRef types, const std::vector<int64_t>& sizes,
                  const std::optional<at::Tensor>& bias, float* y) {
  int64_t n = 0, at_col = 0;
  for (int64_t s : sizes) n += s;
  if (w.size() == 1) return linear(xq, B, nb, w[0], types[0], n, bias, y);
  for (size_t i = 0; i < w.size(); ++i) {
    linear(xq, B, nb, w[i], types[i], sizes[i], std::nullopt, y + at_col, n);
    at_col += sizes[i];
  }
  if (bias.has_value()) {
    const float* bp = bias->data_ptr<float>();
    for (int64_t m = 0; m < B; ++m)
      for (int64_t j = 0; j < n; ++j) y[m * n + j] += bp[j];
  }
}

// q and k of one row [(H + Hkv) * D] rotated over their first 2 * inv_freq.numel() channels
// (rotate-half within those), cos and sin scaled by factor: the rope variants the attention
// kernel does not apply itself (partial rotary, YaRN's or longrope's attention factor).
void rope_rows(float* qkv, int64_t B, int64_t row, int64_t heads, int64_t D,
               const int64_t* positions, const at::Tensor& inv_freq, float factor) {
  const int64_t half = inv_freq.numel();
  const float* f = inv_freq.data_ptr<float>();
  std::vector<float> cs(2 * half);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < half; ++i) {  // fp32 angles, as the PyTorch path computes them
      const float a = (float)positions[b] * f[i];
      cs[i] = std::cos(a) * factor;
      cs[half + i] = std::sin(a) * factor;
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = qkv + b * row + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = v[i], x1 = v[i + half], c = cs[i], s = cs[half + i];
        v[i] = x0 * c - x1 * s;
        v[i + half] = x1 * c + x0 * s;
      }
    }
  }
}

const float* weights_or_null(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
              what, ": float32 [", n, "]");
  return t->data_ptr<float>();
}

// A layer's q/k norms (Qwen3, Gemma 3, OLMo 2, ...), checked once: each weight [head dim] or
// [the whole projection], both or neither; apply normalizes one row's q and k in place.
struct QkNorms {
  const float *q = nullptr, *k = nullptr;
  int64_t qn = 0, kn = 0;

  QkNorms(const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
          int64_t n_q, int64_t n_kv, int64_t head_dim) {
    qn = q_norm.has_value() ? q_norm->numel() : 0;
    kn = k_norm.has_value() ? k_norm->numel() : 0;
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value() &&
                (!qn || (n_q % qn == 0 && qn % head_dim == 0)) &&
                (!kn || (n_kv % kn == 0 && kn % head_dim == 0)),
                "q/k norm weights: [head dim] or [the whole projection], both or neither");
    q = weights_or_null(q_norm, qn, "q norm weights");
    k = weights_or_null(k_norm, kn, "k norm weights");
  }

  // row: q [n_q] then k [n_kv]
  void apply(float* row, int64_t n_q, int64_t n_kv, float eps) const {
    if (!q) return;
    rms_norm_groups(row, n_q, q, qn, eps);
    rms_norm_groups(row + n_q, n_kv, k, kn, eps);
  }
};

// A whole decoder layer for one new token per row, x [B, dim] -> x after the layer, with
// quantized q/k/v, o, gate/up and down matrices. One call instead of a dozen PyTorch ops: the
// Python per token stays flat as layers grow. What the families differ in is an argument:
// - RMS norms before and after attention and the MLP, each optional (Llama: pre; OLMo 2,
//   EXAONE 4: post; Gemma 3: both, its (1 + w) already added to w when loaded);
// - q/k norms over groups of their weight's length: a head (Qwen3, Gemma 3, EXAONE 4) or the
//   whole projection (OLMo 2);
// - rope: inv_freq [rotary_dim / 2] and factor; the attention kernel rotates when it covers
//   the whole head with factor 1 (zeros there: NoPE), else it is applied here first;
// - q_scale: scores scaled by q_scale / sqrt(head_dim) (Gemma's query_pre_attn_scalar);
// - gelu: GeGLU (tanh gelu) instead of SwiGLU; window: sliding-window attention.
at::Tensor decode_layer(const at::Tensor& x_in, const std::optional<at::Tensor>& attn_norm,
                        const std::optional<at::Tensor>& post_attn_norm,
                        const std::optional<at::Tensor>& ffn_norm,
                        const std::optional<at::Tensor>& post_ffn_norm, at::TensorList qkv_w,
                        at::IntArrayRef qkv_types, const std::optional<at::Tensor>& qkv_bias,
                        const std::optional<at::Tensor>& q_norm,
                        const std::optional<at::Tensor>& k_norm, const at::Tensor& o_w,
                        int64_t o_type, const std::optional<at::Tensor>& o_bias,
                        at::TensorList gate_up_w, at::IntArrayRef gate_up_types,
                        const std::optional<at::Tensor>& gate_up_bias, bool gelu,
                        const at::Tensor& down_w, int64_t down_type,
                        const std::optional<at::Tensor>& down_bias, at::Tensor k_cache,
                        at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& positions,
                        const at::Tensor& inv_freq, double rope_factor, double q_scale,
                        int64_t n_heads, int64_t window, double eps_in) {
  NoGil no_gil;
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be float32 [B, dim]");
  at::Tensor x = x_in.clone();
  const int64_t B = x.size(0), dim = x.size(1);
  TORCH_CHECK(!qkv_w.empty() && !gate_up_w.empty(), "decode_layer: no q/k/v or gate/up matrix");
  TORCH_CHECK(down_w.dim() == 2, "down: a packed matrix");
  const int64_t D = k_cache.size(-1);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
              2 * inv_freq.numel() <= D, "rope: float32 inv_freq of at most head_dim / 2");
  // The attention kernel's rotation covers whole heads with factor 1; others happen here.
  const bool rope_here = !(2 * inv_freq.numel() == D && rope_factor == 1.0);
  const at::Tensor table = rope_here ? at::zeros({D / 2}, inv_freq.options()) : inv_freq;
  const AttentionShape S = check_attention(k_cache, v_cache, slots, positions, table, B,
                                           n_heads);
  const int64_t n_q = S.H * S.D, n_kv = S.Hkv * S.D, n_qkv = n_q + 2 * n_kv, n_attn = n_q;
  const int64_t hidden = down_w.size(1) / format(down_type).bytes() * format(down_type).values;
  const float eps = (float)eps_in;
  check_parts(qkv_w, qkv_types, {n_q, n_kv, n_kv}, dim, "q/k/v");
  check_packed(o_w, o_type, dim, n_attn);
  check_parts(gate_up_w, gate_up_types, {hidden, hidden}, dim, "gate/up");
  check_packed(down_w, down_type, dim, hidden);
  check_bias(qkv_bias, n_qkv);
  check_bias(o_bias, dim);
  check_bias(gate_up_bias, 2 * hidden);
  check_bias(down_bias, dim);
  const float* norm[4];
  const std::optional<at::Tensor>* norms[4] = {&attn_norm, &post_attn_norm, &ffn_norm,
                                               &post_ffn_norm};
  for (int i = 0; i < 4; ++i) norm[i] = weights_or_null(*norms[i], dim, "layer norm weights");
  const QkNorms qk_norms(q_norm, k_norm, n_q, n_kv, S.D);

  float* xp = x.data_ptr<float>();
  std::vector<ActBlock> xq;
  std::vector<float> qkv(B * n_qkv), attn(B * n_attn), y(B * dim), gu(B * 2 * hidden),
      act(B * hidden);
  // x += f(y): the residual add, after the optional norm of the sublayer's output
  auto add_residual = [&](const float* post) {
    for (int64_t b = 0; b < B; ++b) {
      float* yr = &y[b * dim];
      if (post) rms_norm(yr, yr, dim, post, eps);
      for (int64_t i = 0; i < dim; ++i) xp[b * dim + i] += yr[i];
    }
  };
  quantize_rows(xp, B, dim, xq, norm[0], eps);
  linear_parts(xq.data(), B, dim / QK, qkv_w, qkv_types, {n_q, n_kv, n_kv}, qkv_bias,
               qkv.data());
  for (int64_t b = 0; b < B; ++b) qk_norms.apply(&qkv[b * n_qkv], n_q, n_kv, eps);
  if (rope_here && inv_freq.numel() > 0)
    rope_rows(qkv.data(), B, n_qkv, S.H + S.Hkv, S.D, positions.data_ptr<int64_t>(), inv_freq,
              (float)rope_factor);
  if (q_scale != 1.0)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n_q; ++i) qkv[b * n_qkv + i] *= (float)q_scale;
  attend_any(S, qkv.data(), k_cache, v_cache, slots, positions, table, window, attn.data());
  quantize_rows(attn.data(), B, n_attn, xq);
  linear(xq.data(), B, n_attn / QK, o_w, o_type, dim, o_bias, y.data());
  add_residual(norm[1]);
  quantize_rows(xp, B, dim, xq, norm[2], eps);
  linear_parts(xq.data(), B, dim / QK, gate_up_w, gate_up_types, {hidden, hidden},
               gate_up_bias, gu.data());
  parallel(B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      (gelu ? gelu_mul_row : silu_mul_row)(&gu[b * 2 * hidden], hidden, &act[b * hidden]);
  });
  quantize_rows(act.data(), B, hidden, xq);
  linear(xq.data(), B, hidden / QK, down_w, down_type, dim, down_bias, y.data());
  add_residual(norm[3]);
  return x;
}

// silu(x[..., :F]) * x[..., F:], the activation of a fused gate/up projection.
at::Tensor silu_mul(const at::Tensor& x_in) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t F = x.size(-1) / 2, M = x.numel() / (2 * F);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel(M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) silu_mul_row(xp + m * 2 * F, F, yp + m * F);
  });
  return y.to(x_in.scalar_type());
}

}  // namespace

int64_t rows_per_group() { return R; }

// Which vector path this build of the products took.
std::string isa() {
#if defined(CAKE_AVX2) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
  return "avx2+vnni";
#elif defined(CAKE_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

TORCH_LIBRARY(cake, m) {
  m.def("rows_per_group() -> int", &rows_per_group);
  m.def("isa() -> str", &isa);
  m.def("set_dense_rows(int rows) -> int", &set_dense_rows);
  m.def("repack(Tensor w, int qtype) -> Tensor", &repack);
  m.def("qlinear(Tensor x, Tensor w, int qtype, int n, Tensor? bias) -> Tensor", &qlinear);
  m.def("dequantize_rows(Tensor w, int qtype, int n, int k, Tensor rows) -> Tensor",
        &dequantize_rows);
  m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "Tensor positions, Tensor inv_freq, int n_heads, int window) -> Tensor",
        &decode_attention);
  m.def("decode_layer(Tensor x, Tensor? attn_norm, Tensor? post_attn_norm, Tensor? ffn_norm, "
        "Tensor? post_ffn_norm, Tensor[] qkv_w, int[] qkv_types, Tensor? qkv_bias, "
        "Tensor? q_norm, Tensor? k_norm, Tensor o_w, int o_type, Tensor? o_bias, "
        "Tensor[] gate_up_w, int[] gate_up_types, Tensor? gate_up_bias, bool gelu, "
        "Tensor down_w, int down_type, Tensor? down_bias, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor positions, Tensor inv_freq, "
        "float rope_factor, float q_scale, int n_heads, int window, float eps) -> Tensor",
        &decode_layer);
  m.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
}

// The mixture-of-experts and hybrid-attention families' decode kernels (their own file).
#include "moe_kernels.h"
