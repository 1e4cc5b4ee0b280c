// Linears on AMX tiles (Intel Xeon 4th generation and later): group-wise INT4 and INT8, exact for any number of
// rows, and bf16 (bf16_linear, at the end).
//
// The activations are split into int8 "planes" per row (x ~= s * (q1 + q2 / 254 + q3 / 254^2), the split of
// visualglm.quant.onednn_int8.split_planes, computed with the same fp32 operations), so every product is an
// int8 x uint4 (or int8) dot product summed exactly in int32 by TDPBSUD (TDPBSSD) (16 rows x 16 outputs x 64
// inputs per instruction); a row's planes sit in adjacent tile rows and are recombined in fp32 per group of
// inputs (INT4, then scaled by the group's scale) or once (INT8). With three planes the result equals the
// weight-only kernels' to fp32 rounding. Each 4-bit group is unpacked into L1 just before its products, and a
// group's sums are stored and scaled while the next group's products run (two sets of C tiles), so the weight
// is read from memory once per call and 8 rows cost ~1.3x one row (benchmarks/quant_linear.py).
//
// Weight layout (made by visualglm/quant/amx_int4.py): uint8 [N / 16, K / 64, 16, 32]: for 16 outputs and 64
// inputs, tile row j (inputs 4j .. 4j + 3 of each output, outputs side by side: the 64 bytes TDPBSUD takes as
// one row of B) in 32 bytes, byte b holding column b in its low nibble and column b + 32 in its high one.
// Scales: the portable bf16 [K / G, N, 2] (scale, zero) per group, W = (code - 8) * scale + zero.
// Compiled only on request (python -m visualglm.kernels.native build); never at load time.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kPlaneStep = 254.0f;
// plane p's weight relative to plane 0 (x ~= s * sum_p q_p * kFactor[p])
constexpr float kFactor[3] = {1.0f, 1.0f / kPlaneStep, 1.0f / (kPlaneStep * kPlaneStep)};

// 64-byte aligned storage for unpacked tiles (aligned stores).
struct AlignedBuffer {
  std::vector<uint8_t> bytes;
  uint8_t* data_;
  explicit AlignedBuffer(size_t size) : bytes(size + 64) {
    const auto address = reinterpret_cast<uintptr_t>(bytes.data());
    data_ = bytes.data() + ((64 - address % 64) % 64);
  }
  uint8_t* data() { return data_; }
};
constexpr int kRowTiles = 3;  // row tiles per pass at most (48 plane rows); the tile roles: configure_tiles

// fp32 rows [M, K] -> int8 planes [P * M, K] and their scales [P, M], as split_planes computes them. Plane p
// of row m is plane row p * M + m, or m * P + p when ``interleaved`` (each row's planes side by side).
void split_planes(const float* x, int64_t rows, int64_t k, int planes, int8_t* out, float* scales,
                  bool interleaved = false) {
  // AVX-512, 16 inputs at a time (k is a multiple of 64): the same IEEE operations as the scalar form
  // (division, round half to even, subtraction, multiplication), so the same planes.
  std::vector<float> t(k);
  const __m512 step = _mm512_set1_ps(kPlaneStep), top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * k;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
    const float amax = _mm512_reduce_max_ps(vmax);
    float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < k; i += 16) _mm512_storeu_ps(t.data() + i, _mm512_div_ps(_mm512_loadu_ps(row + i), vscale));
    for (int p = 0; p < planes; ++p) {
      int8_t* q = out + (interleaved ? m * planes + p : p * rows + m) * k;
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = _mm512_loadu_ps(t.data() + i);
        __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
        if (p == 0) r = _mm512_min_ps(top, _mm512_max_ps(bottom, r));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
        if (p + 1 < planes) _mm512_storeu_ps(t.data() + i, _mm512_mul_ps(_mm512_sub_ps(v, r), step));
      }
      scales[p * rows + m] = scale;
      scale = scale / kPlaneStep;
    }
  }
}

// xsum[m][grp] = sum over planes p of kFactor[p] * (the sum of plane p's int8 values in group grp), for planes
// interleaved by row ([M, P, K]).
void group_sums(const int8_t* q, int64_t rows, int planes, int64_t k, int64_t g, float* xsum) {
  const __m512i ones = _mm512_set1_epi16(1);
  const int64_t groups = k / g;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      float total = 0.0f;
      for (int p = 0; p < planes; ++p) {
        const int8_t* v = q + (m * planes + p) * k + grp * g;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = 0; i < g; i += 32) {
          const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i)));
          acc = _mm512_add_epi32(acc, _mm512_madd_epi16(wide, ones));
        }
        total += static_cast<float>(_mm512_reduce_add_epi32(acc)) * kFactor[p];
      }
      xsum[m * groups + grp] = total;
    }
  }
}

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC's _tile_loadconfig tells the compiler that it reads 8 bytes of the 64, so stores to the rest could be
// dropped as dead (they were: ldtilecfg faulted on a half-written config). The empty asm reads all 64.
inline void load_config(const TileConfig& cfg) {
  __asm__ volatile("" : : "m"(cfg));
  _tile_loadconfig(&cfg);
}

// Ask for ``bytes`` from ``p`` on into L1 (harmless past the end of the weight: prefetches do not fault).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Passes: up to 16 rows of x (48 plane rows, three tiles) each, every row's planes in one pass.
struct RowPass {
  int64_t m0;  // first row of x
  int rows;    // rows of x
  int tiles;   // row tiles of plane rows
};

std::vector<RowPass> make_row_passes(int64_t m, int planes) {
  std::vector<RowPass> passes;
  const int64_t per_pass = 16 * kRowTiles / planes;
  for (int64_t m0 = 0; m0 < m; m0 += per_pass) {
    const int rows = static_cast<int>(std::min<int64_t>(per_pass, m - m0));
    passes.push_back({m0, rows, (rows * planes + 15) / 16});
  }
  return passes;
}

// Tile layout of the INT4 and INT8 kernels, up to two row tiles (32 plane rows): A tiles 3-4 (plane rows), B tiles 6 and
// 7 (codes of even and odd chunks: the next chunk's load does not wait for this one's products), C tiles 0-1
// for even groups and 2, 5 for odd ones, so that a group's sums are stored and scaled while the next group's
// products run. Three row tiles (prefill passes of 11-16 rows): C 0-2, A 3-5, B 6-7, one group at a time.
void configure_tiles(int plane_rows, int tiles) {
  TileConfig cfg;
  auto set = [&](int tile, int rows) {
    cfg.rows[tile] = static_cast<uint8_t>(rows);
    cfg.colsb[tile] = 64;
  };
  for (int t = 0; t < tiles; ++t) {
    const int r = std::min(16, plane_rows - 16 * t);
    set(t, r);
    set(kRowTiles + t, r);
    if (tiles < 3) set(t == 0 ? 2 : 5, r);
  }
  set(6, 16);
  set(7, 16);
  load_config(cfg);
}

// Loads the tile configuration of a pass when its plane rows differ from the last pass's (a prefill's last
// pass is partial; every other pass has the same shape).
struct PassTiles {
  int plane_rows = -1;
  void ensure(const RowPass& pass, int planes) {
    if (pass.rows * planes == plane_rows) return;
    plane_rows = pass.rows * planes;
    configure_tiles(plane_rows, pass.tiles);
  }
};

// One row's planes' int32 sums (``planes`` adjacent rows of 16 in ``c``) recombined in fp32:
// sum_p kFactor[p] * c[p].
inline __m512 recombine_planes(const int32_t* c, int planes) {
  __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c));
  for (int p = 1; p < planes; ++p)
    dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + p * 16)), _mm512_set1_ps(kFactor[p]), dot);
  return dot;
}

// The codes of ``chunks`` consecutive 16 x 64 tiles, packed (512 bytes each) -> TDPBSUD's B layout (1024 bytes
// each): two tile rows per 64-byte load, low nibbles to columns 0-31 and high nibbles to columns 32-63.
inline void unpack_tiles(const uint8_t* packed, int64_t chunks, uint8_t* tiles) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < chunks * 8; ++i) {
    const __m512i bytes = _mm512_loadu_si512(packed + i * 64);
    const __m512i lo = _mm512_and_si512(bytes, low);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
    _mm512_store_si512(tiles + i * 128, _mm512_shuffle_i64x2(lo, hi, 0x44));       // row 2i: lo[0:32] hi[0:32]
    _mm512_store_si512(tiles + i * 128 + 64, _mm512_shuffle_i64x2(lo, hi, 0xEE));  // row 2i + 1
  }
}

// The products of one group into C tiles C0 (row tile 0), C1 (row tile 1) and C2 (row tile 2), and their store
// into ``c`` ([48, 16] int32). Tile numbers must be literals (the intrinsics paste them into the instruction),
// hence a macro for the two sets.
#define VISUALGLM_TILE_GROUP(SET, DOT, C0, C1, C2)                                                                \
  template <int T, bool kPrefetch = false>                                                                    \
  inline void group_dots_##SET(const int8_t* a, int64_t k, const uint8_t* b, int64_t per_group) {      \
    _tile_zero(C0);                                                                                           \
    if constexpr (T > 1) _tile_zero(C1);                                                                      \
    if constexpr (T > 2) _tile_zero(C2);                                                                      \
    for (int64_t i = 0; i < per_group; ++i, a += 64, b += 1024) {                                             \
      if constexpr (kPrefetch) prefetch(b + 4 * 1024, 1024);  /* weights straight from memory (INT8) */      \
      _tile_loadd(3, a, k);                                                                                   \
      if constexpr (T > 1) _tile_loadd(4, a + 16 * k, k);                                                     \
      if constexpr (T > 2) _tile_loadd(5, a + 32 * k, k);                                                     \
      if (i & 1) {                                                                                            \
        _tile_loadd(7, b, 64);                                                                                \
        DOT(C0, 3, 7);                                                                               \
        if constexpr (T > 1) DOT(C1, 4, 7);                                                          \
        if constexpr (T > 2) DOT(C2, 5, 7);                                                          \
      } else {                                                                                                \
        _tile_loadd(6, b, 64);                                                                                \
        DOT(C0, 3, 6);                                                                               \
        if constexpr (T > 1) DOT(C1, 4, 6);                                                          \
        if constexpr (T > 2) DOT(C2, 5, 6);                                                          \
      }                                                                                                       \
    }                                                                                                         \
  }                                                                                                           \
  template <int T>                                                                                            \
  inline void group_store_##SET(int32_t* c) {                                                            \
    _tile_stored(C0, c, 64);                                                                                  \
    if constexpr (T > 1) _tile_stored(C1, c + 16 * 16, 64);                                                   \
    if constexpr (T > 2) _tile_stored(C2, c + 32 * 16, 64);                                                   \
  }
VISUALGLM_TILE_GROUP(u4_even, _tile_dpbsud, 0, 1, 2)  // INT4: unsigned codes 0..15 (TDPBSUD)
VISUALGLM_TILE_GROUP(u4_odd, _tile_dpbsud, 2, 5, 0)
VISUALGLM_TILE_GROUP(s8, _tile_dpbssd, 0, 1, 2)  // INT8: signed weights (TDPBSSD)
#undef VISUALGLM_TILE_GROUP

// acc [rows, 16] += scale * (the planes' int32 sums in ``c``, recombined in fp32) + (zero - 8 scale) * (the
// planes' sums of x in the group, recombined: ``xsum`` [rows, groups]).
inline void int4_scale_group(const int32_t* ctile, const float* xsum, int64_t groups, int64_t grp, int planes,
                             const float* sv, const float* ov, int rows, float* acc) {
  const __m512 s = _mm512_loadu_ps(sv + grp * 16), o = _mm512_loadu_ps(ov + grp * 16);
  for (int r = 0; r < rows; ++r) {
    const __m512 dot = recombine_planes(ctile + r * planes * 16, planes);
    __m512 a = _mm512_fmadd_ps(dot, s, _mm512_loadu_ps(acc + r * 16));
    a = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * groups + grp]), o, a);
    _mm512_storeu_ps(acc + r * 16, a);
  }
}

// One output block (16 outputs), one pass of x rows: acc [rows, 16] = the sum over groups of
// int4_scale_group. ``tiles_of(grp)`` gives the group's unpacked codes (g / 64 tiles of 1024 bytes).
// ``ctile``: two buffers of 48 x 16 int32.
template <int T, typename TilesOf>
void int4_block_pass(const int8_t* a0, const float* xsum, int64_t k, int64_t g, int planes,
                     TilesOf tiles_of, const float* sv, const float* ov, int rows, int32_t* ctile, float* acc) {
  const int64_t groups = k / g, per_group = g / 64;
  int32_t* cbuf[2] = {ctile, ctile + kRowTiles * 16 * 16};
  std::fill(acc, acc + rows * 16, 0.0f);
  if constexpr (T == 3) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      group_dots_u4_even<3>(a0 + grp * g, k, tiles_of(grp), per_group);
      group_store_u4_even<3>(cbuf[0]);
      int4_scale_group(cbuf[0], xsum, groups, grp, planes, sv, ov, rows, acc);
    }
  } else {
    for (int64_t grp = 0; grp < groups; ++grp) {
      // this group's products, then the last group's sums out of the other C tiles
      if (grp & 1) {
        group_dots_u4_odd<T>(a0 + grp * g, k, tiles_of(grp), per_group);
        group_store_u4_even<T>(cbuf[0]);
        int4_scale_group(cbuf[0], xsum, groups, grp - 1, planes, sv, ov, rows, acc);
      } else {
        group_dots_u4_even<T>(a0 + grp * g, k, tiles_of(grp), per_group);
        if (grp > 0) {
          group_store_u4_odd<T>(cbuf[1]);
          int4_scale_group(cbuf[1], xsum, groups, grp - 1, planes, sv, ov, rows, acc);
        }
      }
    }
    const int64_t last = groups - 1;
    if (last & 1) group_store_u4_odd<T>(cbuf[1]); else group_store_u4_even<T>(cbuf[0]);
    int4_scale_group(cbuf[last & 1], xsum, groups, last, planes, sv, ov, rows, acc);
  }
}

// INT4 for output blocks [begin, end): y[m][n] (fp32, [M, N]) = s_m * sum over groups of scale * dot +
// (zero - 8 scale) * sum(x in group), with x's planes recombined (kFactor[p] = 254^-p). With one pass (up to
// 16 rows, every decode step) each group's codes are unpacked just before use into a small buffer that stays
// in L1; with more, the block's codes are unpacked once into L2 and every pass reads them from there.
void int4_blocks(const int8_t* xq, const float* xsum, const float* row_scale, int64_t k, int64_t g, int64_t n,
                 int planes, const std::vector<RowPass>& passes, const uint8_t* packed, const uint16_t* sz,
                 float* y, int64_t begin, int64_t end) {
  const int64_t chunks = k / 64, groups = k / g, per_group = g / 64;
  const bool fused = passes.size() == 1;
  AlignedBuffer btiles((fused ? 2 * per_group : chunks) * 1024);
  std::vector<float> sv(groups * 16), ov(groups * 16), acc(16 * kRowTiles * 16);  // a pass: up to 48 rows
  alignas(64) int32_t ctile[2 * kRowTiles * 16 * 16];
  PassTiles pass_tiles;
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* wb = packed + b * chunks * 512;
    if (!fused) unpack_tiles(wb, chunks, btiles.data());
    for (int64_t grp = 0; grp < groups; ++grp) {
      // (scale, zero) pairs of the 16 outputs: bf16 pairs read as 16 uint32 (scale in the low half).
      const __m512i pairs = _mm512_loadu_si512(sz + (grp * n + b * 16) * 2);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000u)));
      _mm512_storeu_ps(sv.data() + grp * 16, s);
      _mm512_storeu_ps(ov.data() + grp * 16, _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z));  // zero - 8 scale
    }
    uint8_t* buffer = btiles.data();
    // A group's unpacked codes. One pass: unpacked now into one of two small buffers (a group never waits for
    // the last), the codes 4 groups ahead prefetched while this group's products run. More passes: the
    // block's codes unpacked once above.
    auto tiles_of = [&](int64_t grp) -> const uint8_t* {
      if (!fused) return buffer + grp * per_group * 1024;
      uint8_t* tiles = buffer + (grp & 1) * per_group * 1024;
      unpack_tiles(wb + grp * per_group * 512, per_group, tiles);
      prefetch(wb + (grp + 4) * per_group * 512, per_group * 512);
      return tiles;
    };
    for (const RowPass& pass : passes) {
      pass_tiles.ensure(pass, planes);
      const int8_t* a0 = xq + pass.m0 * planes * k;
      const float* xs = xsum + pass.m0 * groups;
      if (pass.tiles == 1)
        int4_block_pass<1>(a0, xs, k, g, planes, tiles_of, sv.data(), ov.data(), pass.rows, ctile, acc.data());
      else if (pass.tiles == 2)
        int4_block_pass<2>(a0, xs, k, g, planes, tiles_of, sv.data(), ov.data(), pass.rows, ctile, acc.data());
      else
        int4_block_pass<3>(a0, xs, k, g, planes, tiles_of, sv.data(), ov.data(), pass.rows, ctile, acc.data());
      for (int r = 0; r < pass.rows; ++r)
        _mm512_storeu_ps(y + (pass.m0 + r) * n + b * 16,
                         _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * 16), _mm512_set1_ps(row_scale[pass.m0 + r])));
    }
  }
  _tile_release();
}

}  // namespace

// Ask Linux for the AMX tile state (once per process; PyTorch's oneDNN asks too). False when refused.
bool amx_enable() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// y [M, N] (fp32) = x [M, K] @ W.T (see the file comment for the layouts).
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales_and_zeros,
                          int64_t group_size, int64_t planes) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 32 &&
              packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(),
              "packed must be a contiguous uint8 [N/16, K/64, 16, 32]");
  TORCH_CHECK(planes >= 1 && planes <= 3, "planes must be 1..3");
  const int64_t n = packed.size(0) * 16, k = packed.size(1) * 64, g = group_size;
  TORCH_CHECK(x.size(-1) == k, "the input has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(g % 64 == 0 && k % g == 0, "the group size must be a multiple of 64 dividing the input features");
  TORCH_CHECK(scales_and_zeros.scalar_type() == torch::kBFloat16 && scales_and_zeros.is_contiguous() &&
              scales_and_zeros.size(0) == k / g && scales_and_zeros.size(1) == n && scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be a contiguous bf16 [K/g, N, 2]");
  auto xf = x.reshape({-1, k}).to(torch::kFloat32).contiguous();
  const int64_t m = xf.size(0), groups = k / g;
  // planes interleaved by row (row m's plane p is plane row m * planes + p), so a pass holds whole rows
  auto q = torch::empty({m, planes, k}, torch::kInt8);
  auto qscale = torch::empty({planes, m}, torch::kFloat32);
  split_planes(xf.data_ptr<float>(), m, k, static_cast<int>(planes), q.data_ptr<int8_t>(),
               qscale.data_ptr<float>(), /*interleaved=*/true);
  // each row's sums of x per group, its planes recombined in fp32 as the dot products are: [M, groups]
  auto xsum = torch::empty({m, groups}, torch::kFloat32);
  group_sums(q.data_ptr<int8_t>(), m, static_cast<int>(planes), k, g, xsum.data_ptr<float>());
  auto y = torch::empty({m, n}, torch::kFloat32);
  const int8_t* q_p = q.data_ptr<int8_t>();
  const float* xs_p = xsum.data_ptr<float>();
  const float* rs_p = qscale.data_ptr<float>();  // plane 0's scales: one per row
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  const uint16_t* sz_p = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* y_p = y.data_ptr<float>();
  const auto passes = make_row_passes(m, static_cast<int>(planes));
  at::parallel_for(0, n / 16, 8, [&](int64_t begin, int64_t end) {
    int4_blocks(q_p, xs_p, rs_p, k, g, n, static_cast<int>(planes), passes, w_p, sz_p, y_p, begin, end);
  });
  return y;
}

namespace {

// INT8 for output blocks [begin, end): y[m][n] = s_m * scale[n] * (the planes' int32 sums q . w_n over all
// inputs, recombined in fp32), the sums taken straight from the weight tiles (no unpacking, no groups). Every
// pass reads the block's weights (16 x K bytes) again, from L2 after the first.
void int8_blocks(const int8_t* xq, const float* row_scale, int64_t k, int64_t n, int planes,
                 const std::vector<RowPass>& passes, const int8_t* packed, const float* scale, float* y,
                 int64_t begin, int64_t end) {
  alignas(64) int32_t ctile[kRowTiles * 16 * 16];
  const int64_t chunks = k / 64;
  PassTiles pass_tiles;
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* wb = reinterpret_cast<const uint8_t*>(packed + b * chunks * 1024);
    const __m512 sv = _mm512_loadu_ps(scale + b * 16);
    for (const RowPass& pass : passes) {
      pass_tiles.ensure(pass, planes);
      const int8_t* a0 = xq + pass.m0 * planes * k;
      if (pass.tiles == 1) {
        group_dots_s8<1, true>(a0, k, wb, chunks);
        group_store_s8<1>(ctile);
      } else if (pass.tiles == 2) {
        group_dots_s8<2, true>(a0, k, wb, chunks);
        group_store_s8<2>(ctile);
      } else {
        group_dots_s8<3, true>(a0, k, wb, chunks);
        group_store_s8<3>(ctile);
      }
      for (int r = 0; r < pass.rows; ++r)
        _mm512_storeu_ps(y + (pass.m0 + r) * n + b * 16,
                         _mm512_mul_ps(recombine_planes(ctile + r * planes * 16, planes),
                                       _mm512_mul_ps(sv, _mm512_set1_ps(row_scale[pass.m0 + r]))));
    }
  }
  _tile_release();
}

}  // namespace

// y [M, N] (fp32) = x [M, K] @ (weight * scale[:, None]).T for an int8 weight in the tile layout
// [N / 16, K / 64, 16, 64] (row j of a tile: inputs 4j .. 4j + 3 of each of 16 outputs) and fp32 scale [N].
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t planes) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 64 &&
              packed.scalar_type() == torch::kInt8 && packed.is_contiguous(),
              "packed must be a contiguous int8 [N/16, K/64, 16, 64]");
  TORCH_CHECK(planes >= 1 && planes <= 3, "planes must be 1..3");
  const int64_t n = packed.size(0) * 16, k = packed.size(1) * 64;
  TORCH_CHECK(x.size(-1) == k, "the input has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == n,
              "scale must be a contiguous fp32 [N]");
  auto xf = x.reshape({-1, k}).to(torch::kFloat32).contiguous();
  const int64_t m = xf.size(0);
  auto q = torch::empty({m, planes, k}, torch::kInt8);  // planes interleaved by row, as int4_linear's
  auto qscale = torch::empty({planes, m}, torch::kFloat32);
  split_planes(xf.data_ptr<float>(), m, k, static_cast<int>(planes), q.data_ptr<int8_t>(),
               qscale.data_ptr<float>(), /*interleaved=*/true);
  auto y = torch::empty({m, n}, torch::kFloat32);
  const int8_t* q_p = q.data_ptr<int8_t>();
  const float* rs_p = qscale.data_ptr<float>();
  const int8_t* w_p = packed.data_ptr<int8_t>();
  const float* s_p = scale.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const auto passes = make_row_passes(m, static_cast<int>(planes));
  at::parallel_for(0, n / 16, 8, [&](int64_t begin, int64_t end) {
    int8_blocks(q_p, rs_p, k, n, static_cast<int>(planes), passes, w_p, s_p, y_p, begin, end);
  });
  return y;
}

namespace {

// bf16: tiles 0-3 accumulate (row tile rt, output block bt at rt * 2 + bt), 4-5 hold activations (16 rows x
// 32 inputs), 6-7 weights (32 inputs x 16 outputs, VNNI pairs). Two output blocks per pass: each activation
// tile load feeds two products.
constexpr int kBf16Chunk = 32;  // inputs per tile
constexpr int kBf16PassRows = 32;  // two row tiles

void configure_bf16(int rows) {
  TileConfig cfg;
  const int tile_rows[2] = {std::min(16, rows), std::max(0, rows - 16)};
  for (int rt = 0; rt < 2; ++rt) {
    if (tile_rows[rt] == 0) continue;
    for (int bt = 0; bt < 2; ++bt) {
      cfg.rows[rt * 2 + bt] = static_cast<uint8_t>(tile_rows[rt]);  // C: rows x 16 fp32
      cfg.colsb[rt * 2 + bt] = 64;
    }
    cfg.rows[4 + rt] = static_cast<uint8_t>(tile_rows[rt]);  // A: rows x 32 bf16
    cfg.colsb[4 + rt] = 64;
  }
  for (int t = 6; t < 8; ++t) {  // B: 16 pairs of inputs x 16 outputs
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  load_config(cfg);
}

// One pass: R row tiles (rows from ``a``, row stride lda) against B output blocks (weights ``w0``, ``w1``:
// K / 32 tiles of 512 bf16 each); fp32 results into ``ctile`` [32, 32] (row r, output 16 bt + j).
template <int R, int B>
void bf16_pass(const uint16_t* a, int64_t lda, int64_t k, const uint16_t* w0, const uint16_t* w1, float* ctile) {
  _tile_zero(0);
  if constexpr (B > 1) _tile_zero(1);
  if constexpr (R > 1) _tile_zero(2);
  if constexpr (R > 1 && B > 1) _tile_zero(3);
  const int64_t chunks = k / kBf16Chunk, stride = lda * 2;
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(6, w0 + c * 512, 64);
    if constexpr (B > 1) _tile_loadd(7, w1 + c * 512, 64);
    _tile_loadd(4, a + c * kBf16Chunk, stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (B > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R > 1) {
      _tile_loadd(5, a + 16 * lda + c * kBf16Chunk, stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (B > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, ctile, 128);
  if constexpr (B > 1) _tile_stored(1, ctile + 16, 128);
  if constexpr (R > 1) _tile_stored(2, ctile + 16 * 32, 128);
  if constexpr (R > 1 && B > 1) _tile_stored(3, ctile + 16 * 32 + 16, 128);
}

// bf16 for output block pairs [begin, end): out[r][n] (fp32, [M, N]) = x_r . w_n. Every pass of 32 rows reads
// the pair's weights (2 x 16 x K bf16) again, from L2 after the first.
void bf16_blocks(const uint16_t* x, int64_t lda, int64_t m, int64_t k, int64_t n, const uint16_t* packed,
                 float* out, int64_t begin, int64_t end) {
  alignas(64) float ctile[kBf16PassRows * 32];
  const int64_t blocks = n / 16, block_elems = (k / kBf16Chunk) * 512;
  int configured = -1;
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b0 = pair * 2;
    const int nb = static_cast<int>(std::min<int64_t>(2, blocks - b0));
    const uint16_t* w0 = packed + b0 * block_elems;
    const uint16_t* w1 = w0 + block_elems;  // unused when nb == 1
    for (int64_t r0 = 0; r0 < m; r0 += kBf16PassRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kBf16PassRows, m - r0));
      if (rows != configured) {
        configure_bf16(rows);
        configured = rows;
      }
      const uint16_t* a = x + r0 * lda;
      if (rows > 16)
        nb == 2 ? bf16_pass<2, 2>(a, lda, k, w0, w1, ctile) : bf16_pass<2, 1>(a, lda, k, w0, w1, ctile);
      else
        nb == 2 ? bf16_pass<1, 2>(a, lda, k, w0, w1, ctile) : bf16_pass<1, 1>(a, lda, k, w0, w1, ctile);
      for (int r = 0; r < rows; ++r)
        std::memcpy(out + (r0 + r) * n + b0 * 16, ctile + r * 32, nb * 16 * sizeof(float));
    }
  }
  _tile_release();
}

}  // namespace

// y [M, N] (fp32) = x [M, K] @ W.T for a bf16 weight in the tile layout [N / 16, K / 32, 16, 32] (row j of a
// tile: inputs 2j, 2j + 1 of each of 16 outputs, side by side); bf16 products summed in fp32.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 32 &&
              packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous(),
              "packed must be a contiguous bf16 [N/16, K/32, 16, 32]");
  const int64_t n = packed.size(0) * 16, k = packed.size(1) * kBf16Chunk;
  TORCH_CHECK(x.size(-1) == k, "the input has ", x.size(-1), " features, the weight ", k);
  auto xb = x.reshape({-1, k}).to(torch::kBFloat16).contiguous();
  const int64_t m = xb.size(0), lda = k;  // row stride of the activations
  auto out = torch::empty({m, n}, torch::kFloat32);
  const uint16_t* x_p = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  const uint16_t* w_p = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* out_p = out.data_ptr<float>();
  const int64_t pairs = (n / 16 + 1) / 2;
  at::parallel_for(0, pairs, 4, [&](int64_t begin, int64_t end) {
    bf16_blocks(x_p, lda, m, k, n, w_p, out_p, begin, end);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_enable", &amx_enable, "request the AMX tile state for this process");
  m.def("int4_linear", &int4_linear, "INT4 codes x int8 activation planes on AMX tiles, fp32 out");
  m.def("int8_linear", &int8_linear, "INT8 weight x int8 activation planes on AMX tiles, fp32 out");
  m.def("bf16_linear", &bf16_linear, "bf16 weight x bf16 activations on AMX tiles, fp32 out");
}
