// One query row per head against a continuous batch's cached keys/values, read where they lie.
//
// A decode step attends over a slice of each slot's cache ([rows, groups, context, dim][:, :, :longest]), a
// strided view. PyTorch's 16-bit batched matmul takes a slow path on such views, and copying them first
// reads and writes every key and value once more than the attention itself needs. These two loops read
// each visible key/value slot once, in place, skipping the slots a row's bias blocks (a shorter row's
// padding), and accumulate in fp32; the softmax between them stays in PyTorch.
//
// Built twice from this source: with AVX-512F (16 floats a vector) and, for CPUs without it, with AVX2 and FMA
// (8 floats a vector). Compiled only on request (python -m visualglm.kernels.native build); never at load time.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
// kWidth bf16 values -> fp32 (a bf16 is the upper half of an fp32).
inline Vec load_bf16(const at::BFloat16* p) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec broadcast(float x) { return _mm512_set1_ps(x); }
inline float sum(Vec x) { return _mm512_reduce_add_ps(x); }
#else
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec load_bf16(const at::BFloat16* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec broadcast(float x) { return _mm256_set1_ps(x); }
inline float sum(Vec x) {
  __m128 pair = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
#endif

constexpr float kBlocked = -5000.0f;           // a bias at or below this blocks the slot (MASK_FILL is -10000)
constexpr int64_t kMaxVectors = 256 / kWidth;  // head_dim up to 256

void check_inputs(const torch::Tensor& other, const torch::Tensor& cache, const char* what) {
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == at::kBFloat16 && cache.stride(3) == 1,
              "strided_attention: ", what, " must be bf16 [B, G, S, D] with contiguous rows");
  TORCH_CHECK(cache.size(3) % 16 == 0 && cache.size(3) <= kWidth * kMaxVectors,
              "strided_attention: head_dim must be a multiple of 16 up to 256");
  TORCH_CHECK(other.dim() == 4 && other.size(0) == cache.size(0) && other.size(1) == cache.size(1),
              "strided_attention: batch/groups of the queries and the cache differ");
}

// bias: None or fp32 [B, S] (contiguous), added to a row's scores; slots at or below kBlocked are skipped.
const float* bias_rows(const c10::optional<torch::Tensor>& bias, int64_t batch, int64_t slots) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 2 &&
              bias->size(0) == batch && bias->size(1) == slots,
              "strided_attention: bias must be contiguous fp32 [B, S]");
  return bias->data_ptr<float>();
}

}  // namespace

// scores[b, g, r, s] = scale * q[b, g, r] . k[b, g, s] + bias[b, s]; a blocked slot gets its bias alone.
// q: bf16 [B, G, R, D] contiguous; k: bf16 [B, G, S, D] (any batch/group/slot strides).
torch::Tensor scores(const torch::Tensor& q, const torch::Tensor& k, const c10::optional<torch::Tensor>& bias,
                     double scale) {
  check_inputs(q, k, "keys");
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kBFloat16 && q.size(3) == k.size(3),
              "strided_attention: queries must be contiguous bf16 [B, G, R, D]");
  const int64_t B = k.size(0), G = k.size(1), S = k.size(2), D = k.size(3), R = q.size(2), V = D / kWidth;
  auto out = torch::empty({B, G, R, S}, q.options().dtype(at::kFloat));
  const float* bias_ptr = bias_rows(bias, B, S);
  const at::BFloat16* q_ptr = q.data_ptr<at::BFloat16>();
  const at::BFloat16* k_ptr = k.data_ptr<at::BFloat16>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kg = k.stride(1), ks = k.stride(2);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(R * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      for (int64_t i = 0; i < R * D; i += kWidth) store(query.data() + i, load_bf16(q_ptr + task * R * D + i));
      const at::BFloat16* keys = k_ptr + b * kb + g * kg;
      const float* row_bias = bias_ptr ? bias_ptr + b * S : nullptr;
      float* row_out = out_ptr + task * R * S;
      for (int64_t s = 0; s < S; ++s) {
        const float add = row_bias ? row_bias[s] : 0.0f;
        if (add <= kBlocked) {
          for (int64_t r = 0; r < R; ++r) row_out[r * S + s] = add;
          continue;
        }
        Vec key[kMaxVectors];
        for (int64_t j = 0; j < V; ++j) key[j] = load_bf16(keys + s * ks + j * kWidth);
        for (int64_t r = 0; r < R; ++r) {
          const float* qr = query.data() + r * D;
          Vec acc = mul(key[0], load(qr));
          for (int64_t j = 1; j < V; ++j) acc = fmadd(key[j], load(qr + j * kWidth), acc);
          row_out[r * S + s] = sum(acc) * fscale + add;
        }
      }
    }
  });
  return out;
}

// out[b, g, r] = sum over visible s of p[b, g, r, s] * v[b, g, s] (fp32 [B, G, R, D]).
// p: fp32 [B, G, R, S] contiguous; v: bf16 [B, G, S, D] (any batch/group/slot strides).
torch::Tensor weighted_values(const torch::Tensor& p, const torch::Tensor& v,
                              const c10::optional<torch::Tensor>& bias) {
  check_inputs(p, v, "values");
  TORCH_CHECK(p.is_contiguous() && p.scalar_type() == at::kFloat && p.size(3) == v.size(2),
              "strided_attention: weights must be contiguous fp32 [B, G, R, S]");
  const int64_t B = v.size(0), G = v.size(1), S = v.size(2), D = v.size(3), R = p.size(2), V = D / kWidth;
  auto out = torch::zeros({B, G, R, D}, p.options());
  const float* bias_ptr = bias_rows(bias, B, S);
  const float* p_ptr = p.data_ptr<float>();
  const at::BFloat16* v_ptr = v.data_ptr<at::BFloat16>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t vb = v.stride(0), vg = v.stride(1), vs = v.stride(2);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      const at::BFloat16* values = v_ptr + b * vb + g * vg;
      const float* row_bias = bias_ptr ? bias_ptr + b * S : nullptr;
      const float* weights = p_ptr + task * R * S;
      float* acc = out_ptr + task * R * D;
      for (int64_t s = 0; s < S; ++s) {
        if (row_bias && row_bias[s] <= kBlocked) continue;
        Vec value[kMaxVectors];
        for (int64_t j = 0; j < V; ++j) value[j] = load_bf16(values + s * vs + j * kWidth);
        for (int64_t r = 0; r < R; ++r) {
          const Vec w = broadcast(weights[r * S + s]);
          float* ar = acc + r * D;
          for (int64_t j = 0; j < V; ++j) store(ar + j * kWidth, fmadd(w, value[j], load(ar + j * kWidth)));
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "scale * q.k + bias over a strided bf16 key cache (fp32 [B, G, R, S])");
  m.def("weighted_values", &weighted_values, "p @ v over a strided bf16 value cache (fp32 [B, G, R, D])");
}
