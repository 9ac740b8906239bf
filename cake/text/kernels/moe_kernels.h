// Decode-step kernels of the mixture-of-experts and hybrid-attention families (Qwen3-MoE,
// Qwen3.5 dense and MoE), kept apart from the dense kernels of cpu_kernels.cpp, which
// includes this file at its end: it reuses that file's products (tiles), activation
// quantization, attention and thread pool, and registers its own ops.
//
// - moe_experts: all routed experts of a step in one call: the activations quantized once,
//   each expert's gate/up and down products over the rows routed to it, the work of every
//   expert in one parallel region (one share of all experts' weight groups per thread, so
//   both cores stream weights even when an expert has one row), and the weighted sum added
//   to the residual stream in a fixed order (the same result for any thread count).
// - decode_attention_block: the attention half of decode_layer (norm, q/k/v, q/k norm, rope,
//   cache write and attention, o, residual), with Qwen3.5's per-head output gate.
// - deltanet_decode_step: one token of the Gated DeltaNet recurrence for every row and head.

namespace {

// Groups g0..g1 of y[M, N] = x @ w^T on the calling thread (matmul's inner loop).
template <int64_t QT>
void moe_matmul_groups(const ActBlock* x, int64_t M, int64_t nb, const uint8_t* w, int64_t N,
                       float* y, int64_t ldy, int64_t g0, int64_t g1) {
  constexpr int64_t MC = 64;
  const int64_t gbytes = nb / (format_of(QT).values / QK) * format_of(QT).bytes();
  float tmp[8][2 * R];
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t m1 = std::min(M, m0 + MC);
    for (int64_t g = g0; g < g1;) {
      const uint8_t* group = w + g * gbytes;
#ifdef CAKE_ZMM
      if (g + 2 <= g1 && (g + 2) * R <= N) {
        tiles<Zmm, QT>(x, m0, m1, nb, group, gbytes, g, N, y, ldy, tmp);
        g += 2;
        continue;
      }
#endif
      tiles<Ymm, QT>(x, m0, m1, nb, group, gbytes, g, N, y, ldy, tmp);
      g += 1;
    }
  }
}

// One product per expert, all in one parallel region: expert u multiplies its M[u] rows of
// activations (x[u], nb[u] blocks each) by w[u] [N[u], nb[u] * QK] into y[u] (ldy N[u]).
struct ExpertProduct {
  const ActBlock* x;
  int64_t M, nb;
  const uint8_t* w;
  int64_t qtype, N;
  float* y;
};

void moe_products(const std::vector<ExpertProduct>& jobs) {
  std::vector<int64_t> first(jobs.size() + 1, 0);  // each job's first group in the flat range
  for (size_t u = 0; u < jobs.size(); ++u)
    first[u + 1] = first[u] + (jobs[u].M ? (jobs[u].N + R - 1) / R : 0);
  const int64_t total = first.back();
  if (!total) return;
  const int64_t threads = std::max(1, at::get_num_threads());
  parallel(total, (total + threads - 1) / threads, [&](int64_t a, int64_t b) {
    size_t u = std::upper_bound(first.begin(), first.end(), a) - first.begin() - 1;
    for (; u < jobs.size() && first[u] < b; ++u) {
      const ExpertProduct& j = jobs[u];
      const int64_t g0 = std::max(a, first[u]) - first[u], g1 = std::min(b, first[u + 1]) - first[u];
      if (g0 >= g1) continue;
      dispatch(j.qtype, [&](auto qt) {
        moe_matmul_groups<decltype(qt)::value>(j.x, j.M, j.nb, j.w, j.N, j.y, j.N, g0, g1);
      });
    }
  });
}

// x [B, D] + sum over pairs p of weights[p] * expert_{experts[p]}(h[rows[p]]): expert u is the
// SwiGLU MLP down_u(silu(gate) * up) with gate/up = gate_up_u(h) (one fused packed matrix,
// [2 F_u, D]) and down_u [D, F_u]; h is the normalized input the router saw. Pairs of one row
// are added in the order given.
at::Tensor moe_experts(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& rows_in,
                       const at::Tensor& experts_in, const at::Tensor& weights_in,
                       at::TensorList gate_up_w, at::IntArrayRef gate_up_types,
                       at::TensorList down_w, at::IntArrayRef down_types) {
  NoGil no_gil;
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && h_in.sizes() == x_in.sizes()
              && h_in.scalar_type() == at::kFloat, "x, h: float32 [B, dim]");
  const at::Tensor h = h_in.contiguous(), rows_t = rows_in.to(at::kLong).contiguous(),
                   experts_t = experts_in.to(at::kLong).contiguous(),
                   weights_t = weights_in.to(at::kFloat).contiguous();
  at::Tensor x = x_in.clone();
  const int64_t B = x.size(0), D = x.size(1), P = rows_t.numel(), U = gate_up_w.size();
  TORCH_CHECK(D % QK == 0, "dim must be a multiple of ", QK);
  TORCH_CHECK(experts_t.numel() == P && weights_t.numel() == P, "one expert and weight per pair");
  TORCH_CHECK(gate_up_types.size() == (size_t)U && down_w.size() == (size_t)U &&
              down_types.size() == (size_t)U, "one gate/up and down matrix (and type) per expert");
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  const int64_t* ex = experts_t.data_ptr<int64_t>();
  const float* wt = weights_t.data_ptr<float>();
  std::vector<int64_t> F(U);
  for (int64_t u = 0; u < U; ++u) {
    const Format f = format(down_types[u]);
    TORCH_CHECK(down_w[u].dim() == 2, "down: a packed matrix");
    F[u] = down_w[u].size(1) / f.bytes() * f.values;
    TORCH_CHECK(F[u] % QK == 0, "expert hidden size must be a multiple of ", QK);
    check_packed(gate_up_w[u], gate_up_types[u], 2 * F[u], D);
    check_packed(down_w[u], down_types[u], D, F[u]);
  }
  // Pairs sorted by expert (stable): an expert's rows are then one slice of each buffer.
  std::vector<int64_t> order(P), start(U + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(rows[p] >= 0 && rows[p] < B && ex[p] >= 0 && ex[p] < U, "pair ", p,
                " names row ", rows[p], " and expert ", ex[p]);
    ++start[ex[p] + 1];
  }
  for (int64_t u = 0; u < U; ++u) start[u + 1] += start[u];
  {
    std::vector<int64_t> at_(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p) order[at_[ex[p]]++] = p;
  }
  // Offsets (in floats and in blocks) of each sorted pair's gate/up and activation rows.
  std::vector<int64_t> gu_at(P + 1, 0), act_at(P + 1, 0);
  for (int64_t s = 0; s < P; ++s) {
    const int64_t u = ex[order[s]];
    gu_at[s + 1] = gu_at[s] + 2 * F[u];
    act_at[s + 1] = act_at[s] + F[u] / QK;
  }
  const int64_t nb = D / QK;
  std::vector<ActBlock> hq, xg(P * nb), aq(act_at[P]);
  quantize_rows(h.data_ptr<float>(), B, D, hq);
  for (int64_t s = 0; s < P; ++s)
    std::copy(&hq[rows[order[s]] * nb], &hq[rows[order[s]] * nb] + nb, &xg[s * nb]);
  std::vector<float> gu(gu_at[P]), act(act_at[P] * QK), out(P * D);
  std::vector<ExpertProduct> jobs(U);
  for (int64_t u = 0; u < U; ++u)
    jobs[u] = {&xg[start[u] * nb], start[u + 1] - start[u], nb, gate_up_w[u].data_ptr<uint8_t>(),
               gate_up_types[u], 2 * F[u], &gu[gu_at[start[u]]]};
  moe_products(jobs);
  parallel(P, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t f = F[ex[order[s]]];
      silu_mul_row(&gu[gu_at[s]], f, &act[act_at[s] * QK]);
      quantize_row(&act[act_at[s] * QK], f / QK, &aq[act_at[s]]);
    }
  });
  for (int64_t u = 0; u < U; ++u)
    jobs[u] = {&aq[act_at[start[u]]], start[u + 1] - start[u], F[u] / QK,
               down_w[u].data_ptr<uint8_t>(), down_types[u], D, &out[start[u] * D]};
  moe_products(jobs);
  std::vector<int64_t> sorted_at(P);
  for (int64_t s = 0; s < P; ++s) sorted_at[order[s]] = s;
  float* xp = x.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const float* o = &out[sorted_at[p] * D];
    float* xr = xp + rows[p] * D;
    for (int64_t i = 0; i < D; ++i) xr[i] += wt[p] * o[i];
  }
  return x;
}

// The attention half of decode_layer, x [B, dim] -> x + (post norm of) attention: the same
// arguments as there; with output_gate, q's projection is [heads, 2 * head_dim] (q, then a
// gate whose sigmoid scales that head's output before o).
at::Tensor decode_attention_block(
    const at::Tensor& x_in, const std::optional<at::Tensor>& attn_norm,
    const std::optional<at::Tensor>& post_attn_norm, at::TensorList qkv_w,
    at::IntArrayRef qkv_types, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
    const at::Tensor& o_w, int64_t o_type, const std::optional<at::Tensor>& o_bias,
    bool output_gate, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
    const at::Tensor& positions, const at::Tensor& inv_freq, double rope_factor,
    double q_scale, int64_t n_heads, int64_t window, double eps_in) {
  NoGil no_gil;
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be float32 [B, dim]");
  TORCH_CHECK(!qkv_w.empty(), "decode_attention_block: no q/k/v matrix");
  at::Tensor x = x_in.clone();
  const int64_t B = x.size(0), dim = x.size(1);
  const int64_t D = k_cache.size(-1);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
              2 * inv_freq.numel() <= D, "rope: float32 inv_freq of at most head_dim / 2");
  const bool rope_here = !(2 * inv_freq.numel() == D && rope_factor == 1.0);
  const at::Tensor table = rope_here ? at::zeros({D / 2}, inv_freq.options()) : inv_freq;
  const AttentionShape S = check_attention(k_cache, v_cache, slots, positions, table, B,
                                           n_heads);
  const int64_t n_q = S.H * S.D, n_kv = S.Hkv * S.D, n_qkv = n_q + 2 * n_kv;
  const int64_t q_width = output_gate ? 2 * n_q : n_q, n_raw = q_width + 2 * n_kv;
  const float eps = (float)eps_in;
  check_parts(qkv_w, qkv_types, {q_width, n_kv, n_kv}, dim, "q/k/v");
  check_packed(o_w, o_type, dim, n_q);
  check_bias(qkv_bias, n_raw);
  check_bias(o_bias, dim);
  const float* pre = weights_or_null(attn_norm, dim, "layer norm weights");
  const float* post = weights_or_null(post_attn_norm, dim, "layer norm weights");
  const QkNorms qk_norms(q_norm, k_norm, n_q, n_kv, S.D);

  float* xp = x.data_ptr<float>();
  std::vector<ActBlock> xq;
  std::vector<float> raw(B * n_raw), qkv(output_gate ? B * n_qkv : 0), gate(B * n_q),
      attn(B * n_q), y(B * dim);
  quantize_rows(xp, B, dim, xq, pre, eps);
  linear_parts(xq.data(), B, dim / QK, qkv_w, qkv_types, {q_width, n_kv, n_kv}, qkv_bias,
               raw.data());
  float* q = raw.data();
  if (output_gate) {  // [heads][q, gate] | k | v  ->  q | k | v, and the gates apart
    q = qkv.data();
    for (int64_t b = 0; b < B; ++b) {
      const float* r = &raw[b * n_raw];
      for (int64_t hd = 0; hd < S.H; ++hd) {
        std::copy(r + 2 * hd * S.D, r + (2 * hd + 1) * S.D, &qkv[b * n_qkv + hd * S.D]);
        std::copy(r + (2 * hd + 1) * S.D, r + (2 * hd + 2) * S.D, &gate[b * n_q + hd * S.D]);
      }
      std::copy(r + q_width, r + n_raw, &qkv[b * n_qkv + n_q]);
    }
  }
  for (int64_t b = 0; b < B; ++b) qk_norms.apply(q + b * n_qkv, n_q, n_kv, eps);
  if (rope_here && inv_freq.numel() > 0)
    rope_rows(q, B, n_qkv, S.H + S.Hkv, S.D, positions.data_ptr<int64_t>(), inv_freq,
              (float)rope_factor);
  if (q_scale != 1.0)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n_q; ++i) q[b * n_qkv + i] *= (float)q_scale;
  attend_any(S, q, k_cache, v_cache, slots, positions, table, window, attn.data());
  if (output_gate)
    for (int64_t i = 0; i < B * n_q; ++i) attn[i] /= 1.f + std::exp(-gate[i]);
  quantize_rows(attn.data(), B, n_q, xq);
  linear(xq.data(), B, n_q / QK, o_w, o_type, dim, o_bias, y.data());
  for (int64_t b = 0; b < B; ++b) {
    float* yr = &y[b * dim];
    if (post) rms_norm(yr, yr, dim, post, eps);
    for (int64_t i = 0; i < dim; ++i) xp[b * dim + i] += yr[i];
  }
  return x;
}

// One token of the Gated DeltaNet rule, in place on state [B, H, Dk, Dv] (float32): per row
// and head, S <- exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q. q, k [B, H, Dk] (q already
// scaled), v [B, H, Dv], g, beta [B, H] -> o [B, H, Dv]. One pass over S per step for the
// decay, the read and the update together (the PyTorch form makes five).
at::Tensor deltanet_decode_step(const at::Tensor& q_in, const at::Tensor& k_in,
                                const at::Tensor& v_in, const at::Tensor& g_in,
                                const at::Tensor& beta_in, at::Tensor state) {
  NoGil no_gil;
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 4,
              "state: contiguous float32 [B, H, Dk, Dv]");
  const int64_t B = state.size(0), H = state.size(1), Dk = state.size(2), Dv = state.size(3);
  const at::Tensor q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous(),
                   v = v_in.to(at::kFloat).contiguous(), g = g_in.to(at::kFloat).contiguous(),
                   beta = beta_in.to(at::kFloat).contiguous();
  TORCH_CHECK(q.numel() == B * H * Dk && k.numel() == B * H * Dk && v.numel() == B * H * Dv &&
              g.numel() == B * H && beta.numel() == B * H, "q, k [B, H, Dk], v [B, H, Dv], "
              "g, beta [B, H] for a state of ", state.sizes());
  at::Tensor out = at::empty({B, H, Dv}, v.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel(B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> delta(Dv);
    for (int64_t t = t0; t < t1; ++t) {
      float* S = sp + t * Dk * Dv;
      const float *qt = qp + t * Dk, *kt = kp + t * Dk, *vt = vp + t * Dv;
      const float decay = std::exp(gp[t]), b = bp[t];
      // S^T k of the decayed state, decaying S on the way
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t i = 0; i < Dk; ++i) {
        float* Si = S + i * Dv;
        const float ki = kt[i];
#pragma omp simd
        for (int64_t j = 0; j < Dv; ++j) {
          Si[j] *= decay;
          delta[j] += ki * Si[j];
        }
      }
      for (int64_t j = 0; j < Dv; ++j) delta[j] = (vt[j] - delta[j]) * b;
      float* o = op + t * Dv;
      std::fill(o, o + Dv, 0.f);
      for (int64_t i = 0; i < Dk; ++i) {
        float* Si = S + i * Dv;
        const float ki = kt[i], qi = qt[i];
#pragma omp simd
        for (int64_t j = 0; j < Dv; ++j) {
          Si[j] += ki * delta[j];
          o[j] += qi * Si[j];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cake, m) {
  m.def("moe_experts(Tensor x, Tensor h, Tensor rows, Tensor experts, Tensor weights, "
        "Tensor[] gate_up_w, int[] gate_up_types, Tensor[] down_w, int[] down_types) -> Tensor",
        &moe_experts);
  m.def("decode_attention_block(Tensor x, Tensor? attn_norm, Tensor? post_attn_norm, "
        "Tensor[] qkv_w, int[] qkv_types, Tensor? qkv_bias, Tensor? q_norm, Tensor? k_norm, "
        "Tensor o_w, int o_type, Tensor? o_bias, bool output_gate, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor positions, Tensor inv_freq, "
        "float rope_factor, float q_scale, int n_heads, int window, float eps) -> Tensor",
        &decode_attention_block);
  m.def("deltanet_decode_step(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, "
        "Tensor(a!) state) -> Tensor", &deltanet_decode_step);
}
