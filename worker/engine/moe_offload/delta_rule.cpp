// One decode token through a Gated DeltaNet layer's recurrence, its float32 state [heads, Dk, Dv] updated in
// place: per head, L2-normalize q and k (q also scaled by 1/sqrt(Dk)), decay the state by exp(g), then the
// delta rule S += k (beta (v - S^T k))^T and out = S^T q. Each head's state (64 KB at 128 x 128) is read once
// from memory into the cache and written once: transformers' reference builds four full-state temporaries
// a step. Heads run in parallel. The arithmetic is the reference's in float32, in another summation order.
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
  const float query_scale = 1.f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qn(dk), kn(dk), delta(dv), out_row(dv);
    for (int64_t h = begin; h < end; ++h) {
      normalize(qp + (h / group) * dk, qn.data(), dk, query_scale);
      normalize(kp + (h / group) * dk, kn.data(), dk, 1.f);
      const float decay = std::exp(gp[h]), b = bp[h];
      float* s = sp + h * dk * dv;
      const float* vh = vp + h * dv;
      // delta = beta (v - (decay S)^T k)
      for (int64_t j = 0; j < dv; ++j) delta[j] = 0.f;
      for (int64_t i = 0; i < dk; ++i) {
        const float ki = kn[i] * decay;
        const float* row = s + i * dv;
        for (int64_t j = 0; j < dv; ++j) delta[j] += row[j] * ki;
      }
      for (int64_t j = 0; j < dv; ++j) delta[j] = (vh[j] - delta[j]) * b;
      // S = decay S + k delta^T; out = S^T q
      for (int64_t j = 0; j < dv; ++j) out_row[j] = 0.f;
      for (int64_t i = 0; i < dk; ++i) {
        const float ki = kn[i], qi = qn[i];
        float* row = s + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          row[j] = row[j] * decay + ki * delta[j];
          out_row[j] += row[j] * qi;
        }
      }
      for (int64_t j = 0; j < dv; ++j) op[h * dv + j] = out_row[j];
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
}

DELTA_LIBRARY_IMPL(DELTA_RULE_NAMESPACE, m) { m.impl("gated_delta_step", &gated_delta_step); }
