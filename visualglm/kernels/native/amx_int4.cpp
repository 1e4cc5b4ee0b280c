// Group-wise INT4 linear on AMX tiles (Intel Xeon 4th generation and later), exact, for any number of rows.
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

template <int T>
inline void dot_chunk(const int8_t* a, int64_t lda) {
  // A tiles of this pass: rows 16t.. of the plane rows, 64 inputs from ``a``
  _tile_loadd(3, a, lda);
  _tile_dpbsud(0, 3, 6);
  if constexpr (T > 1) {
    _tile_loadd(4, a + 16 * lda, lda);
    _tile_dpbsud(1, 4, 6);
  }
  if constexpr (T > 2) {
    _tile_loadd(5, a + 32 * lda, lda);
    _tile_dpbsud(2, 5, 6);
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

// Output blocks [begin, end) (16 outputs each) for plane rows [r0, r0 + rows) (rows <= 48, T tiles):
// part[r][n] (fp32, [R, N]) = sum over groups of scale * dot + (zero - 8 scale) * sum(x in group).
template <int T>
void run_pass(const int8_t* xq, const int32_t* xsum, int64_t k, int64_t g, int64_t n, int64_t r0, int rows,
              const uint8_t* packed, const uint16_t* sz, float* part, int64_t begin, int64_t end) {
  int tile_rows[kRowTiles] = {0, 0, 0};
  for (int t = 0; t < T; ++t) tile_rows[t] = std::min(16, rows - 16 * t);
  configure(tile_rows, T);
  alignas(64) uint8_t btile[16 * 64];
  alignas(64) int32_t ctile[kRowTiles * 16 * 16];
  std::vector<float> facc(static_cast<size_t>(rows) * 16);
  const int64_t groups = k / g, chunks = k / 64, per_group = g / 64;
  const int8_t* a0 = xq + r0 * k;
  for (int64_t b = begin; b < end; ++b) {
    std::fill(facc.begin(), facc.end(), 0.0f);
    const uint8_t* wb = packed + b * chunks * 512;
    for (int64_t grp = 0; grp < groups; ++grp) {
      zero_tiles<T>();
      for (int64_t c = grp * per_group; c < (grp + 1) * per_group; ++c) {
        unpack_tile(wb + c * 512, btile);
        _tile_loadd(6, btile, 64);
        dot_chunk<T>(a0 + c * 64, k);
      }
      store_tiles<T>(ctile);
      // (scale, zero) pairs of the 16 outputs: bf16 pairs read as 16 uint32 (scale in the low half).
      const __m512i pairs = _mm512_loadu_si512(sz + (grp * n + b * 16) * 2);
      const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zv = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000u)));
      const __m512 ov = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, zv);  // zero - 8 * scale
      for (int r = 0; r < rows; ++r) {
        __m512 acc = _mm512_loadu_ps(facc.data() + r * 16);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ctile + r * 16)), sv, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xsum[(r0 + r) * groups + grp])), ov, acc);
        _mm512_storeu_ps(facc.data() + r * 16, acc);
      }
    }
    for (int r = 0; r < rows; ++r)
      std::memcpy(part + (r0 + r) * n + b * 16, facc.data() + r * 16, 16 * sizeof(float));
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
  for (int64_t r0 = 0; r0 < rows; r0 += 16 * kRowTiles) {
    const int pass_rows = static_cast<int>(std::min<int64_t>(16 * kRowTiles, rows - r0));
    const int tiles = (pass_rows + 15) / 16;
    at::parallel_for(0, n / 16, 8, [&](int64_t begin, int64_t end) {
      if (tiles == 1) run_pass<1>(q_p, xs_p, k, g, n, r0, pass_rows, w_p, sz_p, part_p, begin, end);
      else if (tiles == 2) run_pass<2>(q_p, xs_p, k, g, n, r0, pass_rows, w_p, sz_p, part_p, begin, end);
      else run_pass<3>(q_p, xs_p, k, g, n, r0, pass_rows, w_p, sz_p, part_p, begin, end);
    });
  }
  // The planes recombined in plane order: part[0] * s0 + part[1] * s1 + part[2] * s2.
  auto parts = part.view({planes, m, n});
  auto y = parts[0] * qscale[0];
  for (int64_t p = 1; p < planes; ++p) y.add_(parts[p] * qscale[p]);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_enable", &amx_enable, "request the AMX tile state for this process");
  m.def("int4_linear", &int4_linear, "INT4 codes x int8 activation planes on AMX tiles, fp32 out");
}
