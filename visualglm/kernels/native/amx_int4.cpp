// Linears on AMX tiles (Intel Xeon 4th generation and later): group-wise INT4 and INT8, exact for any number of
// rows, and bf16 (bf16_linear, at the end).
//
// The activations are split into int8 "planes" per row (x ~= s * (q1 + q2 / 254 + q3 / 254^2), the split of
// visualglm.quant.onednn_int8.split_planes, computed with the same fp32 operations), so every product is an
// int8 x uint4 dot product summed exactly in int32 by TDPBSUD (16 rows x 16 outputs x 64 inputs per
// instruction); per group of inputs the sums are scaled in fp32 and the planes recombined. With three planes
// the result equals the weight-only INT4 kernels' to fp32 rounding. The 4-bit codes are unpacked one 16 x 64
// tile at a time into L1, so the weight is read from memory once per call whatever the number of rows.
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
constexpr int kRowTiles = 3;  // C tiles 0-2 (accumulators), A tiles 3-5 (activations), B tile 6 (codes)

// fp32 rows [M, K] -> int8 planes [P * M, K] (plane p's rows are p * M .. p * M + M - 1) and their scales,
// as split_planes computes them.
void split_planes(const float* x, int64_t rows, int64_t k, int planes, int8_t* out, float* scales) {
  std::vector<float> t(k);
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (int64_t i = 0; i < k; ++i) t[i] = row[i] / scale;
    for (int p = 0; p < planes; ++p) {
      int8_t* q = out + (p * rows + m) * k;
      for (int64_t i = 0; i < k; ++i) {
        float r = std::nearbyint(t[i]);  // round half to even, as torch.round
        if (p == 0) r = std::min(127.0f, std::max(-127.0f, r));
        q[i] = static_cast<int8_t>(r);
        if (p + 1 < planes) t[i] = (t[i] - r) * kPlaneStep;
      }
      scales[p * rows + m] = scale;
      scale = scale / kPlaneStep;
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

void configure(const int* tile_rows, int tiles) {
  TileConfig cfg;
  for (int t = 0; t < tiles; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(tile_rows[t]);  // C: rows x 16 int32
    cfg.colsb[t] = 64;
    cfg.rows[kRowTiles + t] = static_cast<uint8_t>(tile_rows[t]);  // A: rows x 64 int8
    cfg.colsb[kRowTiles + t] = 64;
  }
  cfg.rows[6] = 16;  // B: 16 rows of 64 uint8
  cfg.colsb[6] = 64;
  _tile_loadconfig(&cfg);
}

// One 16 x 64 tile of codes, packed (512 bytes) -> TDPBSUD's B layout (1024 bytes).
inline void unpack_tile(const uint8_t* packed, uint8_t* tile) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int j = 0; j < 16; ++j) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + j * 32));
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + j * 64), _mm256_and_si256(bytes, low));
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + j * 64 + 32),
                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low));
  }
}

// One tile-row of A against weight tile 6: tile t += A rows 16t.. (64 inputs from ``a``) x B. The INT4
// weights are unsigned codes 0..15 (signed x unsigned: TDPBSUD), the INT8 ones signed (TDPBSSD).
template <bool kSignedWeights>
inline void dot_tile_0() { if constexpr (kSignedWeights) _tile_dpbssd(0, 3, 6); else _tile_dpbsud(0, 3, 6); }
template <bool kSignedWeights>
inline void dot_tile_1() { if constexpr (kSignedWeights) _tile_dpbssd(1, 4, 6); else _tile_dpbsud(1, 4, 6); }
template <bool kSignedWeights>
inline void dot_tile_2() { if constexpr (kSignedWeights) _tile_dpbssd(2, 5, 6); else _tile_dpbsud(2, 5, 6); }

template <int T, bool kSignedWeights = false>
inline void dot_chunk(const int8_t* a, int64_t lda) {
  // A tiles of this pass: rows 16t.. of the plane rows, 64 inputs from ``a``
  _tile_loadd(3, a, lda);
  dot_tile_0<kSignedWeights>();
  if constexpr (T > 1) {
    _tile_loadd(4, a + 16 * lda, lda);
    dot_tile_1<kSignedWeights>();
  }
  if constexpr (T > 2) {
    _tile_loadd(5, a + 32 * lda, lda);
    dot_tile_2<kSignedWeights>();
  }
}

template <int T>
inline void zero_tiles() {
  _tile_zero(0);
  if constexpr (T > 1) _tile_zero(1);
  if constexpr (T > 2) _tile_zero(2);
}

template <int T>
inline void store_tiles(int32_t* c) {
  _tile_stored(0, c, 64);
  if constexpr (T > 1) _tile_stored(1, c + 16 * 16, 64);
  if constexpr (T > 2) _tile_stored(2, c + 32 * 16, 64);
}

// The passes over plane rows: up to 48 rows (three tiles) each.
struct Pass {
  int64_t r0;
  int rows;
  int tiles;
};

std::vector<Pass> make_passes(int64_t rows) {
  std::vector<Pass> passes;
  for (int64_t r0 = 0; r0 < rows; r0 += 16 * kRowTiles) {
    const int pass_rows = static_cast<int>(std::min<int64_t>(16 * kRowTiles, rows - r0));
    passes.push_back({r0, pass_rows, (pass_rows + 15) / 16});
  }
  return passes;
}

// Tile configurations are loaded only when the pass shape changes (a prefill's last pass is partial).
struct Configured {
  int rows = -1;
  void ensure(const Pass& pass) {
    if (pass.rows == rows) return;
    int tile_rows[kRowTiles] = {0, 0, 0};
    for (int t = 0; t < pass.tiles; ++t) tile_rows[t] = std::min(16, pass.rows - 16 * t);
    configure(tile_rows, pass.tiles);
    rows = pass.rows;
  }
};

// INT4, one output block (16 outputs), one pass: the block's codes already unpacked into ``btiles``
// (K / 64 tiles of 1024 bytes); ``sv``/``ov`` the block's scales and zero offsets per group ([groups, 16]).
template <int T>
void int4_block_pass(const int8_t* a0, const int32_t* xsum, int64_t k, int64_t g, const uint8_t* btiles,
                     const float* sv, const float* ov, int rows, int32_t* ctile, float* facc) {
  const int64_t groups = k / g, per_group = g / 64;
  std::fill(facc, facc + rows * 16, 0.0f);
  for (int64_t grp = 0; grp < groups; ++grp) {
    zero_tiles<T>();
    for (int64_t c = grp * per_group; c < (grp + 1) * per_group; ++c) {
      _tile_loadd(6, btiles + c * 1024, 64);
      dot_chunk<T>(a0 + c * 64, k);
    }
    store_tiles<T>(ctile);
    const __m512 s = _mm512_loadu_ps(sv + grp * 16), o = _mm512_loadu_ps(ov + grp * 16);
    for (int r = 0; r < rows; ++r) {
      __m512 acc = _mm512_loadu_ps(facc + r * 16);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ctile + r * 16)), s, acc);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xsum[r * groups + grp])), o, acc);
      _mm512_storeu_ps(facc + r * 16, acc);
    }
  }
}

// INT4 for output blocks [begin, end): each block's codes are unpacked once (into L2) and every pass of
// plane rows reads them from there; part[r][n] (fp32, [R, N]) = sum over groups of scale * dot +
// (zero - 8 scale) * sum(x in group).
void int4_blocks(const int8_t* xq, const int32_t* xsum, int64_t k, int64_t g, int64_t n,
                 const std::vector<Pass>& passes, const uint8_t* packed, const uint16_t* sz, float* part,
                 int64_t begin, int64_t end) {
  const int64_t chunks = k / 64, groups = k / g;
  AlignedBuffer btiles(chunks * 1024);
  std::vector<float> sv(groups * 16), ov(groups * 16), facc(16 * kRowTiles * 16);
  alignas(64) int32_t ctile[kRowTiles * 16 * 16];
  Configured configured;
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* wb = packed + b * chunks * 512;
    for (int64_t c = 0; c < chunks; ++c) unpack_tile(wb + c * 512, btiles.data() + c * 1024);
    for (int64_t grp = 0; grp < groups; ++grp) {
      // (scale, zero) pairs of the 16 outputs: bf16 pairs read as 16 uint32 (scale in the low half).
      const __m512i pairs = _mm512_loadu_si512(sz + (grp * n + b * 16) * 2);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000u)));
      _mm512_storeu_ps(sv.data() + grp * 16, s);
      _mm512_storeu_ps(ov.data() + grp * 16, _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z));  // zero - 8 scale
    }
    for (const Pass& pass : passes) {
      configured.ensure(pass);
      const int8_t* a0 = xq + pass.r0 * k;
      const int32_t* xs = xsum + pass.r0 * groups;
      if (pass.tiles == 1)
        int4_block_pass<1>(a0, xs, k, g, btiles.data(), sv.data(), ov.data(), pass.rows, ctile, facc.data());
      else if (pass.tiles == 2)
        int4_block_pass<2>(a0, xs, k, g, btiles.data(), sv.data(), ov.data(), pass.rows, ctile, facc.data());
      else
        int4_block_pass<3>(a0, xs, k, g, btiles.data(), sv.data(), ov.data(), pass.rows, ctile, facc.data());
      for (int r = 0; r < pass.rows; ++r)
        std::memcpy(part + (pass.r0 + r) * n + b * 16, facc.data() + r * 16, 16 * sizeof(float));
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
  const int64_t m = xf.size(0), rows = planes * m, groups = k / g;
  auto q = torch::empty({rows, k}, torch::kInt8);
  auto qscale = torch::empty({planes, m, 1}, torch::kFloat32);
  split_planes(xf.data_ptr<float>(), m, k, static_cast<int>(planes), q.data_ptr<int8_t>(),
               qscale.data_ptr<float>());
  auto xsum = q.view({rows, groups, g}).sum(-1, /*keepdim=*/false, torch::kInt32).contiguous();
  auto part = torch::empty({rows, n}, torch::kFloat32);
  const int8_t* q_p = q.data_ptr<int8_t>();
  const int32_t* xs_p = xsum.data_ptr<int32_t>();
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  const uint16_t* sz_p = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* part_p = part.data_ptr<float>();
  const auto passes = make_passes(rows);
  at::parallel_for(0, n / 16, 8, [&](int64_t begin, int64_t end) {
    int4_blocks(q_p, xs_p, k, g, n, passes, w_p, sz_p, part_p, begin, end);
  });
  // The planes recombined in plane order: part[0] * s0 + part[1] * s1 + part[2] * s2.
  auto parts = part.view({planes, m, n});
  auto y = parts[0] * qscale[0];
  for (int64_t p = 1; p < planes; ++p) y.add_(parts[p] * qscale[p]);
  return y;
}

namespace {

// INT8 for output blocks [begin, end): part[r][n] = scale[n] * (q_r . w_n), the int32 sum over all inputs
// taken straight from the weight tiles (no unpacking, no groups). Every pass of plane rows reads the block's
// weights (16 x K bytes) again, from L2 after the first.
void int8_blocks(const int8_t* xq, int64_t k, int64_t n, const std::vector<Pass>& passes, const int8_t* packed,
                 const float* scale, float* part, int64_t begin, int64_t end) {
  alignas(64) int32_t ctile[kRowTiles * 16 * 16];
  const int64_t chunks = k / 64;
  Configured configured;
  for (int64_t b = begin; b < end; ++b) {
    const int8_t* wb = packed + b * chunks * 1024;
    const __m512 sv = _mm512_loadu_ps(scale + b * 16);
    for (const Pass& pass : passes) {
      configured.ensure(pass);
      const int8_t* a0 = xq + pass.r0 * k;
      if (pass.tiles == 1) {
        zero_tiles<1>();
        for (int64_t c = 0; c < chunks; ++c) { _tile_loadd(6, wb + c * 1024, 64); dot_chunk<1, true>(a0 + c * 64, k); }
        store_tiles<1>(ctile);
      } else if (pass.tiles == 2) {
        zero_tiles<2>();
        for (int64_t c = 0; c < chunks; ++c) { _tile_loadd(6, wb + c * 1024, 64); dot_chunk<2, true>(a0 + c * 64, k); }
        store_tiles<2>(ctile);
      } else {
        zero_tiles<3>();
        for (int64_t c = 0; c < chunks; ++c) { _tile_loadd(6, wb + c * 1024, 64); dot_chunk<3, true>(a0 + c * 64, k); }
        store_tiles<3>(ctile);
      }
      for (int r = 0; r < pass.rows; ++r)
        _mm512_storeu_ps(part + (pass.r0 + r) * n + b * 16,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ctile + r * 16)), sv));
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
  const int64_t m = xf.size(0), rows = planes * m;
  auto q = torch::empty({rows, k}, torch::kInt8);
  auto qscale = torch::empty({planes, m, 1}, torch::kFloat32);
  split_planes(xf.data_ptr<float>(), m, k, static_cast<int>(planes), q.data_ptr<int8_t>(),
               qscale.data_ptr<float>());
  auto part = torch::empty({rows, n}, torch::kFloat32);
  const int8_t* q_p = q.data_ptr<int8_t>();
  const int8_t* w_p = packed.data_ptr<int8_t>();
  const float* s_p = scale.data_ptr<float>();
  float* part_p = part.data_ptr<float>();
  const auto passes = make_passes(rows);
  at::parallel_for(0, n / 16, 8, [&](int64_t begin, int64_t end) {
    int8_blocks(q_p, k, n, passes, w_p, s_p, part_p, begin, end);
  });
  auto parts = part.view({planes, m, n});
  auto y = parts[0] * qscale[0];
  for (int64_t p = 1; p < planes; ++p) y.add_(parts[p] * qscale[p]);
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
  _tile_loadconfig(&cfg);
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
