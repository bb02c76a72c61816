// One decode token through a Gated DeltaNet layer's recurrence, its float32 state [heads, Dk, Dv] updated in
// place: per head, L2-normalize q and k (q also scaled by 1/sqrt(Dk)), decay the state by exp(g), then the
// delta rule S += k (beta (v - S^T k))^T and out = S^T q. Each head's state (64 KB at 128 x 128) is read once
// from memory into the cache and written once: transformers' reference builds four full-state temporaries
// a step. Heads run in parallel. The arithmetic is the reference's in float32, in another summation order.
//
// `gated_delta_decode` takes a whole DeltaNet layer's decode token from its two input projections to the
// input of its output projection: the short convolution over q, k and v (its state updated in place) with
// SiLU, the decay and beta from the a and b projections, the step above, and the gated RMSNorm by z, so that
// nothing between the layer's matrix products is a torch call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace {

void normalize(const float* in, float* out, int64_t n, float extra_scale) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += in[i] * in[i];
  const float scale = extra_scale / std::sqrt(sum + 1e-6f);
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] * scale;
}

// One value head's step: decay its state [Dk, Dv] by exp(g), then S += k (beta (v - S^T k))^T and
// out = S^T q, with q and k L2-normalized (q also scaled by 1/sqrt(Dk)). `scratch`: 2 Dk + Dv floats.
void head_step(const float* q, const float* k, const float* v, float g, float beta, float* s, float* out, int64_t dk,
               int64_t dv, float* scratch) {
  float *qn = scratch, *kn = scratch + dk, *delta = scratch + 2 * dk;
  normalize(q, qn, dk, 1.f / std::sqrt(static_cast<float>(dk)));
  normalize(k, kn, dk, 1.f);
  const float decay = std::exp(g);
  // delta = beta (v - (decay S)^T k)
  for (int64_t j = 0; j < dv; ++j) delta[j] = 0.f;
  for (int64_t i = 0; i < dk; ++i) {
    const float ki = kn[i] * decay;
    const float* row = s + i * dv;
    for (int64_t j = 0; j < dv; ++j) delta[j] += row[j] * ki;
  }
  for (int64_t j = 0; j < dv; ++j) delta[j] = (v[j] - delta[j]) * beta;
  // S = decay S + k delta^T; out = S^T q
  for (int64_t j = 0; j < dv; ++j) out[j] = 0.f;
  for (int64_t i = 0; i < dk; ++i) {
    const float ki = kn[i], qi = qn[i];
    float* row = s + i * dv;
    for (int64_t j = 0; j < dv; ++j) {
      row[j] = row[j] * decay + ki * delta[j];
      out[j] += row[j] * qi;
    }
  }
}

// q, k: [Hk, Dk]; v: [H, Dv]; g, beta: [H] (H a multiple of Hk: each q/k head serves H / Hk value heads);
// state: [H, Dk, Dv] float32, updated in place. Returns out [H, Dv].
at::Tensor gated_delta_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor state) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &g, &beta, &state})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "float32 contiguous tensors only");
  TORCH_CHECK(q.dim() == 2 && k.sizes() == q.sizes() && v.dim() == 2 && state.dim() == 3, "shapes");
  const int64_t key_heads = q.size(0), dk = q.size(1), heads = v.size(0), dv = v.size(1);
  TORCH_CHECK(heads % key_heads == 0 && g.numel() == heads && beta.numel() == heads, "heads");
  TORCH_CHECK(state.size(0) == heads && state.size(1) == dk && state.size(2) == dv, "state: [H, Dk, Dv]");
  at::Tensor out = at::empty({heads, dv}, v.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  const int64_t group = heads / key_heads;
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * dk + dv);
    for (int64_t h = begin; h < end; ++h) {
      head_step(qp + (h / group) * dk, kp + (h / group) * dk, vp + h * dv, gp[h], bp[h], sp + h * dk * dv,
                op + h * dv, dk, dv, scratch.data());
    }
  });
  return out;
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold

// qkvz [1, Hk (2 Dk + 2 r Dv)] and ba [1, Hk 2 r] as the layer's projections lay them out (per key head: q, k,
// r value heads' v, their z; then per key head r b's and r a's; r = H / Hk); conv_state [1, C, S] with
// C = 2 Hk Dk + H Dv channels (q, k, v) and S >= taps - 1, updated in place; conv_weight [C, taps]; A_log,
// dt_bias [H]; state [1, H, Dk, Dv] updated in place; norm_weight [Dv]. Returns the gated-normed output
// [1, H Dv], the output projection's input.
at::Tensor gated_delta_decode(const at::Tensor& qkvz, const at::Tensor& ba, at::Tensor conv_state,
                              const at::Tensor& conv_weight, const at::Tensor& A_log, const at::Tensor& dt_bias,
                              at::Tensor state, const at::Tensor& norm_weight, double eps, int64_t key_heads) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qkvz, &ba, &conv_state, &conv_weight, &A_log,
                                                                      &dt_bias, &state, &norm_weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "float32 contiguous tensors only");
  TORCH_CHECK(state.dim() == 4 && state.size(0) == 1, "state: [1, H, Dk, Dv]");
  const int64_t heads = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(key_heads > 0 && heads % key_heads == 0, "value heads: a multiple of key heads");
  const int64_t group = heads / key_heads, per_key_head = 2 * dk + 2 * group * dv;
  const int64_t channels = 2 * key_heads * dk + heads * dv;
  TORCH_CHECK(qkvz.numel() == key_heads * per_key_head && ba.numel() == 2 * heads, "qkvz, ba: the projections' sizes");
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(0) == 1 && conv_state.size(1) == channels, "conv_state");
  const int64_t taps = conv_weight.size(1), kept = conv_state.size(2);
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == channels && kept >= taps - 1 && taps >= 1, "conv");
  TORCH_CHECK(A_log.numel() == heads && dt_bias.numel() == heads && norm_weight.numel() == dv, "per-head parameters");
  const float *proj = qkvz.data_ptr<float>(), *gates = ba.data_ptr<float>(), *w = conv_weight.data_ptr<float>();
  float *window_state = conv_state.data_ptr<float>(), *sp = state.data_ptr<float>();

  // The convolution's input channel c: where the projection put it.
  auto source = [&](int64_t c) -> float {
    if (c < 2 * key_heads * dk) {  // q (first Hk Dk channels), then k
      const int64_t part = c / (key_heads * dk), h = (c % (key_heads * dk)) / dk, i = c % dk;
      return proj[h * per_key_head + part * dk + i];
    }
    const int64_t value = c - 2 * key_heads * dk, h = value / (group * dv);
    return proj[h * per_key_head + 2 * dk + value % (group * dv)];
  };
  std::vector<float> mixed(channels);
  at::parallel_for(0, channels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* kept_inputs = window_state + c * kept;  // the last `kept` inputs, oldest first
      const float x = source(c);
      float sum = w[c * taps + taps - 1] * x;
      for (int64_t j = 0; j < taps - 1; ++j) sum += w[c * taps + j] * kept_inputs[kept - (taps - 1) + j];
      for (int64_t j = 0; j + 1 < kept; ++j) kept_inputs[j] = kept_inputs[j + 1];
      kept_inputs[kept - 1] = x;
      mixed[c] = silu(sum);
    }
  });

  at::Tensor out = at::empty({1, heads * dv}, qkvz.options());
  float* op = out.data_ptr<float>();
  const float *a_log = A_log.data_ptr<float>(), *bias = dt_bias.data_ptr<float>();
  const float* gamma = norm_weight.data_ptr<float>();
  const float* q_all = mixed.data();
  const float* k_all = q_all + key_heads * dk;
  const float* v_all = k_all + key_heads * dk;
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * dk + dv);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t key_head = h / group, within = h % group;
      const float b = gates[key_head * 2 * group + within], a = gates[key_head * 2 * group + group + within];
      const float beta = 1.f / (1.f + std::exp(-b));
      const float g = -std::exp(a_log[h]) * softplus(a + bias[h]);
      float* o = op + h * dv;
      head_step(q_all + key_head * dk, k_all + key_head * dk, v_all + h * dv, g, beta, sp + h * dk * dv, o, dk, dv,
                scratch.data());
      // gated RMSNorm: o / rms(o) * weight * silu(z)
      const float* z = proj + key_head * per_key_head + 2 * dk + group * dv + within * dv;
      float squares = 0.f;
      for (int64_t j = 0; j < dv; ++j) squares += o[j] * o[j];
      const float inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(dv) + static_cast<float>(eps));
      for (int64_t j = 0; j < dv; ++j) o[j] = gamma[j] * (o[j] * inverse_rms) * silu(z[j]);
    }
  });
  return out;
}

}  // namespace

#ifndef DELTA_RULE_NAMESPACE
#define DELTA_RULE_NAMESPACE moe_cpu_delta_rule
#endif
#define DELTA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands the namespace macro first
#define DELTA_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

DELTA_LIBRARY(DELTA_RULE_NAMESPACE, m) {
  m.def("gated_delta_step(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state) -> Tensor");
  m.def("gated_delta_decode(Tensor qkvz, Tensor ba, Tensor(a!) conv_state, Tensor conv_weight, Tensor A_log, "
        "Tensor dt_bias, Tensor(b!) state, Tensor norm_weight, float eps, int key_heads) -> Tensor");
}

DELTA_LIBRARY_IMPL(DELTA_RULE_NAMESPACE, m) {
  m.impl("gated_delta_step", &gated_delta_step);
  m.impl("gated_delta_decode", &gated_delta_decode);
}
