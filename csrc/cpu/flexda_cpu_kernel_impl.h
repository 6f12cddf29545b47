// The fused CPU kernel of adello::flexda_fwd, written once over at::vec::Vectorized and compiled
// once per instruction set (see flexda_cpu_kernel.h). Include only from an ISA translation unit,
// after defining FLEXDA_CPU_ISA (the namespace name) and including <ATen/cpu/vec/vec.h>.
//
// What one call computes (docs/method.md; acc = float, or double for double logits):
//
//   labeled row b, x = z_l[b] + ds:
//     L_s += lse(x) - x[y_b]                                     (divided by B at the end)
//     grad_lb[b] = (softmax(x) - onehot(y_b)) / B
//   unlabeled pair i (weak row w = z_w[i] and strong row z = z_s[i] read together), a = z + du:
//     pw = softmax(w), M = [max pw >= tau] = [1 / sum_c exp(w_c - max w) >= tau],
//     yhat = first index of max w, prior_batch += pw / N (every row, no mask; with prior
//       weights w_i: += w_i pw / W, W = sum_i w_i, and a row with w_i <= 0 adds nothing)
//       (EM estimator: += pe / N, pe_c = ew_c r_c / sum_c ew_c r_c = softmax(w + du)_c, with
//       ew_c = exp(w_c - max w) the weak pass's stored exps and r_c = exp(du_c) once per call:
//       one multiply-and-sum pass over the stored row, no exp per element)
//     M = 1:          L_u += lse(a) - a[yhat];      grad = lambda_u (softmax(a) - onehot(yhat)) / N
//     M = 0, gate:    L_d += H(q, softmax(a / T));  grad = lambda_d (softmax(a / T) - q) / (T N)
//                     q = softmax(w / T)  (= pw when T = 1: the weak pass is reused)
//     M = 0, no gate: nothing (the distillation term is skipped, not multiplied by 0)
//     distill_all, gate: every row distils, so an M = 1 row has both terms (both_row):
//                     grad = lambda_u (softmax(a) - onehot(yhat)) / N
//                            + lambda_d (softmax(a / T) - q) / (T N)
//   Otherwise a row needs softmax(a) or softmax(a / T), never both, so an unlabeled pair costs
//   one exp per element of each view (two on the weak row when T != 1 and the row distils; with
//   distill_all an M = 1 row at T != 1 takes two exp passes over its strong row).
//
// Every gradient normaliser is static (1/B, 1/N), so the gradients are final here; the autograd
// backward only scales them by the incoming grad (adello_kernels/ops/flexda.py).
//
// Per row: a max-and-argmax pass, an exp-and-sum pass that stores each exp once into a per-thread row (one
// exp per element, never recomputed), and one pass that scales the stored exps into the gradient
// row. Everything but the first read of a logit and the final gradient store stays in L1/L2, so
// main-memory traffic is the compulsory one: the logits read once, the gradients written once
// (with streaming stores when they are too large to be re-read from cache by the backward).
#ifndef FLEXDA_CPU_ISA
#error "flexda_cpu_kernel_impl.h: define FLEXDA_CPU_ISA and include <ATen/cpu/vec/vec.h> first"
#endif

namespace adello::flexda_cpu::FLEXDA_CPU_ISA {

using at::vec::Vectorized;

template <typename T>
inline T nan_value() {
  return std::numeric_limits<T>::quiet_NaN();
}

// ---------------------------------------------------------------------------------------------
// Vector primitives. Everything is at::vec::Vectorized arithmetic; the few operations at::vec
// does not offer at the cost we need (a short exp, tails loaded with a fill value, streaming
// stores) get AVX-512 / AVX2 versions for fp32, with portable at::vec fallbacks.
// ---------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define ADELLO_X86_FLOAT_PRIMS 1
#else
#define ADELLO_X86_FLOAT_PRIMS 0
#endif

template <typename acc_t>
struct Prim {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t L = Vec::size();

  // Lanes >= n hold `fill`; never reads past p + n.
  static Vec load_fill(const acc_t* p, int64_t n, acc_t fill) {
    return Vec::set(Vec(fill), Vec::loadu(p, n), n);
  }
  static void store_n(acc_t* p, const Vec& v, int64_t n) { v.store(p, n); }
  static void stream(acc_t* p, const Vec& v) { v.store(p); }
  static void stream_fence() {}
  static bool aligned(const void*) { return true; }
  // max that may drop NaN (a NaN row is caught by its sum of exps, see exp below).
  static Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static acc_t hmax(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>(
        [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, v);
  }
  static acc_t hsum(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, v);
  }
  // Per lane: where x > m, take (x, cur). Keeps each lane's max and the index of its first
  // occurrence (a NaN is never taken).
  static void argmax_step(Vec& m, Vec& idx, const Vec& x, const Vec& cur) {
    const Vec gt = x > m;
    m = Vec::blendv(m, x, gt);
    idx = Vec::blendv(idx, cur, gt);
  }
  // The smallest idx over the lanes where m == mx.
  static acc_t first_index(const Vec& m, const Vec& idx, acc_t mx) {
    return at::vec::vec_reduce_all<acc_t>(
        [](const Vec& x, const Vec& y) { return at::vec::minimum(x, y); },
        Vec::blendv(Vec(std::numeric_limits<acc_t>::infinity()), idx, m == Vec(mx)));
  }
  // exp(d) for d <= ~0: 0 below the smallest normal, NaN for NaN. at::vec's exp_u20 (map of
  // std::exp in the portable build; Sleef's 1-ulp exp for double).
  static Vec exp(const Vec& d) { return d.exp_u20(); }
  // s + e on the lanes whose index idx differs from k.
  static Vec add_except(const Vec& s, const Vec& e, const Vec& idx, const Vec& k) {
    return s + Vec::blendv(e, Vec(acc_t(0)), idx == k);
  }
};

#if ADELLO_X86_FLOAT_PRIMS
#if defined(CPU_CAPABILITY_AVX512)
using RawF = __m512;
#define ADELLO_PS(op) _mm512_##op##_ps
#else
using RawF = __m256;
#define ADELLO_PS(op) _mm256_##op##_ps
#endif

template <>
struct Prim<float> {
  using Vec = Vectorized<float>;
  static constexpr int64_t L = Vec::size();

  static Vec load_fill(const float* p, int64_t n, float fill) {
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
#else
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m),
                            _mm256_castsi256_ps(m));
#endif
  }
  static void store_n(float* p, const Vec& v, int64_t n) { v.store(p, n); }
  static void stream(float* p, const Vec& v) { ADELLO_PS(stream)(p, v); }
  // Streaming stores are weakly ordered: fence before the data is handed to another thread.
  static void stream_fence() { _mm_sfence(); }
  static bool aligned(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) % sizeof(RawF)) == 0;
  }
  static Vec vmax(const Vec& a, const Vec& b) { return ADELLO_PS(max)(a, b); }
  static float hmax(const Vec& v) {
    return at::vec::vec_reduce_all<float>(
        [](const Vec& x, const Vec& y) -> Vec { return ADELLO_PS(max)(x, y); }, v);
  }
  static float hsum(const Vec& v) {
    return at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, v);
  }
  // Usually one lane holds the max: read its index directly; only ties across lanes reduce.
  static float first_index(const Vec& m, const Vec& idx, float mx) {
#if defined(CPU_CAPABILITY_AVX512)
    const unsigned hit = _mm512_cmp_ps_mask(m, _mm512_set1_ps(mx), _CMP_EQ_OQ);
#else
    const unsigned hit = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(m, _mm256_set1_ps(mx), _CMP_EQ_OQ)));
#endif
    __at_align__ float lanes[L];
    idx.store(lanes);
    if ((hit & (hit - 1)) == 0) return lanes[hit == 0 ? 0 : __builtin_ctz(hit)];
    float k = std::numeric_limits<float>::infinity();
    for (unsigned h = hit; h != 0; h &= h - 1) k = std::min(k, lanes[__builtin_ctz(h)]);
    return k;
  }
  static Vec add_except(const Vec& s, const Vec& e, const Vec& idx, const Vec& k) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_mask_add_ps(s, _mm512_cmp_ps_mask(idx, k, _CMP_NEQ_UQ), s, e);
#else
    return _mm256_add_ps(s, _mm256_andnot_ps(_mm256_cmp_ps(idx, k, _CMP_EQ_OQ), e));
#endif
  }
  static void argmax_step(Vec& m, Vec& idx, const Vec& x, const Vec& cur) {
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 gt = _mm512_cmp_ps_mask(x, m, _CMP_GT_OQ);
    m = _mm512_mask_mov_ps(m, gt, x);
    idx = _mm512_mask_mov_ps(idx, gt, cur);
#else
    const __m256 gt = _mm256_cmp_ps(x, m, _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, x, gt);
    idx = _mm256_blendv_ps(idx, cur, gt);
#endif
  }

  // exp(d), about 11 vector instructions (exp_u20 takes ~19 and is ~20 ulp):
  //   d = n ln2 + r, n = round(d / ln2), |r| <= ln2 / 2, r formed with a two-part ln2 (FMA)
  //   exp(r) = sum_{j<=6} r^j / j!   (Taylor; truncation < 2e-7 relative on |r| <= 0.347)
  //   exp(d) = 2^n exp(r)            (scalef on AVX-512, exponent bits on AVX2)
  // Relative error ~3e-7, i.e. a few ulp: far inside the 1e-6 gradient tolerance, and exp(0) = 1
  // exactly (exp_sum leaves e_k = 1 out of its sum). d is clamped at -104 first (so -inf gives
  // 0, and 2^n cannot wrap); max(lo, d) returns d when d is NaN, so a NaN propagates into the sum
  // and marks the row non-finite.
  static Vec exp(const Vec& d_in) {
    const RawF lo = ADELLO_PS(set1)(-104.0f);
    const RawF d = ADELLO_PS(max)(lo, d_in);
    const RawF log2e = ADELLO_PS(set1)(1.44269504088896341f);
    const RawF ln2_hi = ADELLO_PS(set1)(0.693145751953125f);      // 12 significant bits
    const RawF ln2_lo = ADELLO_PS(set1)(1.42860682030941723e-6f); // ln2 - ln2_hi
#if defined(CPU_CAPABILITY_AVX512)
    const RawF n = _mm512_roundscale_ps(_mm512_mul_ps(d, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const RawF n = _mm256_round_ps(_mm256_mul_ps(d, log2e),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    RawF r = ADELLO_PS(fnmadd)(n, ln2_hi, d);  // exact: n has <= 8 bits, ln2_hi 12
    r = ADELLO_PS(fnmadd)(n, ln2_lo, r);
    // Estrin's scheme: a chain of three dependent FMAs instead of Horner's six, for the short
    // rows where there is little independent work to overlap with it (~4% at C = 127).
    const RawF one = ADELLO_PS(set1)(1.0f);
    const RawF r2 = ADELLO_PS(mul)(r, r);
    const RawF a = ADELLO_PS(add)(one, r);                                             // 1 + r
    const RawF b = ADELLO_PS(fmadd)(r, ADELLO_PS(set1)(1.0f / 6.0f), ADELLO_PS(set1)(0.5f));
    RawF c = ADELLO_PS(fmadd)(r, ADELLO_PS(set1)(1.0f / 120.0f), ADELLO_PS(set1)(1.0f / 24.0f));
    c = ADELLO_PS(fmadd)(r2, ADELLO_PS(set1)(1.0f / 720.0f), c);    // 1/24 + r/120 + r^2/720
    const RawF head = ADELLO_PS(fmadd)(r2, b, a);                    // 1 + r + r^2/2 + r^3/6
    const RawF p = ADELLO_PS(fmadd)(ADELLO_PS(mul)(r2, r2), c, head);
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_scalef_ps(p, n);  // p 2^n, gradual underflow to 0
#else
    // 2^n from the exponent bits; n >= -150 after the clamp: below -126 the bits would wrap, so
    // those lanes (exp < 1.2e-38, irrelevant next to a sum >= 1) are flushed to 0.
    const __m256i ni = _mm256_cvtps_epi32(n);
    const RawF scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
    const RawF ok = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    // NaN lanes: keep p (NaN) so that the NaN survives the mask.
    const RawF nan_lanes = _mm256_cmp_ps(d, d, _CMP_UNORD_Q);
    return _mm256_and_ps(_mm256_or_ps(ok, nan_lanes), _mm256_mul_ps(p, scale));
#endif
  }
};
#undef ADELLO_PS
#endif  // ADELLO_X86_FLOAT_PRIMS

// ---------------------------------------------------------------------------------------------
// Row passes on acc_t rows. With kAdj the row is x = z + adj (the logit adjustment ds or du),
// formed on the fly, so the adjusted logits are never stored.
// ---------------------------------------------------------------------------------------------

// (max_c x_c, first c attaining it) in one branch-free pass: per lane a running max and the index
// (held as acc_t, exact below 2^24) of its first occurrence, merged across lanes at the end.
// Lanes past the row hold the lowest finite value and are never taken; a NaN is never taken
// either (the exp pass catches it). A row of only -inf/NaN returns (lowest, 0).
struct ArgMax {
  double m;
  int64_t k;
};

template <bool kAdj, typename acc_t>
inline ArgMax row_argmax(const acc_t* z, const acc_t* adj, int64_t C) {
  using P = Prim<acc_t>;
  using Vec = typename P::Vec;
  constexpr int64_t L = P::L;
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  auto x = [&](int64_t c) {
    if constexpr (kAdj) return Vec::loadu(z + c) + Vec::loadu(adj + c);
    else return Vec::loadu(z + c);
  };
  Vec m0(lowest), m1(lowest), i0(acc_t(0)), i1(acc_t(0));  // 2 chains hide the latency
  Vec cur0 = Vec::arange(acc_t(0), acc_t(1));
  Vec cur1 = cur0 + Vec(static_cast<acc_t>(L));
  const Vec step2(static_cast<acc_t>(2 * L)), step1(static_cast<acc_t>(L));
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {
    P::argmax_step(m0, i0, x(c), cur0);
    P::argmax_step(m1, i1, x(c + L), cur1);
    cur0 = cur0 + step2;
    cur1 = cur1 + step2;
  }
  for (; c < C; c += L) {  // cur0 = c + lane here
    const int64_t n = std::min<int64_t>(L, C - c);
    Vec t = P::load_fill(z + c, n, lowest);
    if constexpr (kAdj) t = t + P::load_fill(adj + c, n, acc_t(0));
    P::argmax_step(m0, i0, t, cur0);
    cur0 = cur0 + step1;
  }
  // Merge the chains lane by lane (larger max; on a tie the smaller index), then the lanes.
  const Vec gt = m1 > m0, eq = m1 == m0;
  const Vec m = Vec::blendv(m0, m1, gt);
  Vec idx = Vec::blendv(i0, i1, gt);
  idx = Vec::blendv(idx, at::vec::minimum(i0, i1), eq);
  const acc_t mx = P::hmax(m);
  return {static_cast<double>(mx), static_cast<int64_t>(P::first_index(m, idx, mx))};
}

// The exp pass. With k the index of the max (x_k = max x):
//   d_c = x_c - x_k, formed as (z_c - z_k) + (adj_c - adj_k): the logit difference is exact when
//         the two are close (Sterbenz), so logits of magnitude 1e4 lose nothing to the rounding
//         of z + adj (which would cost ~5e-4 absolute per entry);
//   e_c = exp(d_c * scale)   (kScale; else exp(d_c)), stored to e[c] (e_k = exp(0) = 1 exactly);
//   returns t = sum_{c != k} e_c, so that the row's sum of exps is s = 1 + t and its log is
//   log1p(t): a confident row (t << 1) keeps its small loss to full relative precision, which
//   log(1 + t) rounded would not (up to 6e-8 absolute);
//   kDot: *dot = sum_c q_c d_c, the cross term of the soft-target cross-entropy.
// Class indices are carried as acc_t lanes (exact below 2^24 classes).
template <bool kAdj, bool kScale, bool kDot, typename acc_t>
inline acc_t exp_sum(const acc_t* z, const acc_t* adj, int64_t k, acc_t scale, const acc_t* q,
                     acc_t* e, int64_t C, acc_t* dot) {
  using P = Prim<acc_t>;
  using Vec = typename P::Vec;
  constexpr int64_t L = P::L;
  const Vec vzk(z[k]), vadjk(kAdj ? adj[k] : acc_t(0)), vscale(scale), zero(acc_t(0));
  const Vec vk(static_cast<acc_t>(k)), step2(static_cast<acc_t>(2 * L));
  Vec i0 = Vec::arange(acc_t(0), acc_t(1));
  Vec i1 = i0 + Vec(static_cast<acc_t>(L));
  Vec s0 = zero, s1 = zero, t0 = zero, t1 = zero;
  auto diff = [&](const Vec& zv, const Vec& av) {
    if constexpr (kAdj) return (zv - vzk) + (av - vadjk);
    else return zv - vzk;
  };
  auto expo = [&](const Vec& d) {
    if constexpr (kScale) return P::exp(d * vscale);
    else return P::exp(d);
  };
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {
    const Vec d0 = diff(Vec::loadu(z + c), kAdj ? Vec::loadu(adj + c) : zero);
    const Vec d1 = diff(Vec::loadu(z + c + L), kAdj ? Vec::loadu(adj + c + L) : zero);
    const Vec e0 = expo(d0), e1 = expo(d1);
    e0.store(e + c);
    e1.store(e + c + L);
    s0 = P::add_except(s0, e0, i0, vk);
    s1 = P::add_except(s1, e1, i1, vk);
    i0 = i0 + step2;
    i1 = i1 + step2;
    if constexpr (kDot) {
      t0 = at::vec::fmadd(Vec::loadu(q + c), d0, t0);
      t1 = at::vec::fmadd(Vec::loadu(q + c + L), d1, t1);
    }
  }
  for (; c < C; c += L) {  // i0 = c + lane here
    const int64_t n = std::min<int64_t>(L, C - c);
    // Lanes past the row: z = lowest, so d is hugely negative (or -inf) and exp gives 0; the dot
    // reads q = 0 there and multiplies a d forced to 0 (0 * -inf would be NaN).
    const Vec zv = P::load_fill(z + c, n, std::numeric_limits<acc_t>::lowest());
    const Vec d = diff(zv, kAdj ? P::load_fill(adj + c, n, acc_t(0)) : zero);
    const Vec ex = expo(d);
    P::store_n(e + c, ex, n);
    s0 = P::add_except(s0, ex, i0, vk);
    i0 = i0 + Vec(static_cast<acc_t>(L));
    if constexpr (kDot) {
      t0 = at::vec::fmadd(P::load_fill(q + c, n, acc_t(0)), Vec::set(zero, d, n), t0);
    }
  }
  if constexpr (kDot) *dot = P::hsum(t0 + t1);
  return P::hsum(s0 + s1);
}

// The log terms of a task's rows. Every valid row's loss is (a part formed in the row) +
// log(s) = ... + log1p(t); the log1p's are taken together, vectorised, when the task ends (one
// scalar log per row cost ~15% of the kernel at C ~ 100). Each row's t goes with the loss term it
// belongs to: 0 for L_s / L_u, 1 for L_d.
template <typename acc_t>
struct RowLogs {
  acc_t* t = nullptr;     // [rows per task]
  int8_t* term = nullptr; // [rows per task]
  int64_t n = 0;

  void push(acc_t v, int8_t which) {
    t[n] = v;
    term[n++] = which;
  }
  // sums[j] += sum of log1p(t) over the pushed rows of term j, in push order; then empties.
  void flush(double* sums) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vec::size();
    int64_t j = 0;
    for (; j + L <= n; j += L) Vec::loadu(t + j).log1p().store(t + j);
    if (j < n) Vec::loadu(t + j, n - j).log1p().store(t + j, n - j);
    for (j = 0; j < n; ++j) sums[term[j]] += static_cast<double>(t[j]);
    n = 0;
  }
};

// The gradient pass: g_c = k1 e_c - k2 q_c (kQ) or k1 e_c, written to `out` (the gradient row,
// for fp32/fp64) or back into e (bf16/fp16, narrowed afterwards); with kPrior also the task's
// batch-prior partial prior_c += kp ew_c (ew = exp(w - max w), kp = 1 / sum ew: the weak softmax).
// Streaming stores (kStream) skip the read-for-ownership of the gradient's cache lines.
template <bool kQ, bool kPrior, bool kStream, typename acc_t>
inline void finish_row(acc_t* out, const acc_t* e, acc_t k1, const acc_t* q, acc_t k2,
                       acc_t* prior, const acc_t* ew, acc_t kp, int64_t C) {
  using P = Prim<acc_t>;
  using Vec = typename P::Vec;
  constexpr int64_t L = P::L;
  const Vec vk1(k1), vk2(k2), vkp(kp);
  auto body = [&](int64_t c, int64_t n, bool full, bool stream) {
    Vec g = (full ? Vec::loadu(e + c) : Vec::loadu(e + c, n)) * vk1;
    if constexpr (kQ) g = at::vec::fnmadd(full ? Vec::loadu(q + c) : Vec::loadu(q + c, n), vk2, g);
    if (!full) {
      P::store_n(out + c, g, n);
    } else if (stream) {
      P::stream(out + c, g);
    } else {
      g.store(out + c);
    }
    if constexpr (kPrior) {
      if (full) {
        at::vec::fmadd(Vec::loadu(ew + c), vkp, Vec::loadu(prior + c)).store(prior + c);
      } else {
        P::store_n(prior + c, at::vec::fmadd(Vec::loadu(ew + c, n), vkp, Vec::loadu(prior + c, n)), n);
      }
    }
  };
  int64_t c = 0;
  if constexpr (kStream) {
    // Partial vector up to the first vector-aligned address, then aligned streaming stores.
    const int64_t head = static_cast<int64_t>(
        ((sizeof(Vec) - reinterpret_cast<uintptr_t>(out) % sizeof(Vec)) % sizeof(Vec)) /
        sizeof(acc_t));
    if (head > 0 && head < C) {
      body(0, head, false, false);
      c = head;
    }
    const bool ok = P::aligned(out + c);
    for (; c + L <= C; c += L) body(c, L, true, ok);
  } else {
    for (; c + L <= C; c += L) body(c, L, true, false);
  }
  if (c < C) body(c, C - c, false, false);
}

template <typename acc_t>
inline void prior_add(acc_t* prior, const acc_t* ew, acc_t kp, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  const Vec vkp(kp);
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    at::vec::fmadd(Vec::loadu(ew + c), vkp, Vec::loadu(prior + c)).store(prior + c);
  }
  if (c < C) {
    const int64_t n = C - c;
    at::vec::fmadd(Vec::loadu(ew + c, n), vkp, Vec::loadu(prior + c, n)).store(prior + c, n);
  }
}

// bf16/fp16 rows are widened to fp32 once into a per-thread scratch row, and their gradients are
// computed in fp32 scratch and narrowed once (round to nearest even) into the output.
template <typename scalar_t>
inline void to_acc(const scalar_t* src, float* dst, int64_t C) {
  using VecS = Vectorized<scalar_t>;
  using VecF = Vectorized<float>;
  int64_t c = 0;
  for (; c + VecS::size() <= C; c += VecS::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + c));
    lo.store(dst + c);
    hi.store(dst + c + VecF::size());
  }
  for (; c < C; ++c) dst[c] = static_cast<float>(src[c]);
}

template <typename scalar_t>
inline void from_acc(const float* src, scalar_t* dst, int64_t C) {
  using VecS = Vectorized<scalar_t>;
  using VecF = Vectorized<float>;
  int64_t c = 0;
  for (; c + VecS::size() <= C; c += VecS::size()) {
    at::vec::convert_from_float<scalar_t>(VecF::loadu(src + c), VecF::loadu(src + c + VecF::size()))
        .store(dst + c);
  }
  for (; c < C; ++c) dst[c] = static_cast<scalar_t>(src[c]);
}

// A row's sum of exps is >= 1 (its max contributes exp(0) = 1) and finite; anything else comes
// from NaN/inf logits (NaN propagates through the exps; a row of only -inf sums to 0 or NaN).
template <typename acc_t>
inline bool valid_sum(acc_t s) {
  return s >= acc_t(1) && s <= std::numeric_limits<acc_t>::max();
}

template <typename scalar_t>
inline void fill_row(scalar_t* dst, int64_t C, bool nan) {
  if (nan) {
    std::fill(dst, dst + C, nan_value<scalar_t>());
  } else {
    std::memset(static_cast<void*>(dst), 0, sizeof(scalar_t) * C);  // +0.0 in every dtype
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, bool kStream>
struct Kernel {
  // acc dtype: fp64 for fp64 logits, fp32 for fp32/bf16/fp16 (docs/contract.md, Dtypes).
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // fp32/fp64 rows are read in place and gradients written straight from the registers;
  // bf16/fp16 go through fp32 scratch rows.
  static constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;

  const Args& a;
  int64_t B, N, C;
  const scalar_t *zl, *zw, *zs;
  const int64_t* labels;
  const acc_t *ds, *du;
  const acc_t* weight;  // [N] prior weights, or nullptr
  scalar_t *grad_lb, *grad_s;
  acc_t* mask;
  int64_t* yhat;
  acc_t lambda_u, lambda_d, inv_t, tau, inv_b, inv_n;
  bool gate, t_one, prior_em, distill_all;
  std::vector<acc_t> r;  // EM estimator: r_c = exp(du_c) = (Q_c + eps) / (Qa_c + eps), [C]

  explicit Kernel(const Args& args) : a(args) {
    B = a.B;
    N = a.N;
    C = a.C;
    zl = static_cast<const scalar_t*>(a.logits_lb);
    zw = static_cast<const scalar_t*>(a.logits_ulb_w);
    zs = static_cast<const scalar_t*>(a.logits_ulb_s);
    labels = a.labels_lb;
    ds = static_cast<const acc_t*>(a.adj_lb);
    du = static_cast<const acc_t*>(a.adj_ulb);
    weight = static_cast<const acc_t*>(a.prior_weight);
    grad_lb = static_cast<scalar_t*>(a.grad_lb);
    grad_s = static_cast<scalar_t*>(a.grad_ulb_s);
    mask = static_cast<acc_t*>(a.mask);
    yhat = a.pseudo_labels;
    lambda_u = static_cast<acc_t>(a.lambda_u);
    lambda_d = static_cast<acc_t>(a.lambda_d);
    const acc_t t = static_cast<acc_t>(a.temperature);
    inv_t = acc_t(1) / t;
    t_one = (t == acc_t(1));
    tau = static_cast<acc_t>(a.threshold);  // M compares the probability in acc dtype
    inv_b = acc_t(1) / static_cast<acc_t>(B);
    inv_n = acc_t(1) / static_cast<acc_t>(N);
    gate = a.gate;
    distill_all = a.distill_all;
    prior_em = a.prior_em;
    if (prior_em) {
      r.resize(C);
      for (int64_t c = 0; c < C; ++c) r[c] = std::exp(du[c]);
    }
  }

  // Per-worker scratch rows (acc dtype, C each): e, the exps of the row being processed; ew,
  // exp(w - max w); eq, exp((w - max w) / T); er, ew * r (EM estimator); e2, the second exp
  // pass of a distill_all row with M = 1 at T != 1; for bf16/fp16 also the widened weak and
  // strong/labeled rows.
  // Also the log terms of the task being processed (RowLogs: one per row, two with distill_all).
  struct Scratch {
    std::unique_ptr<acc_t[]> buf;
    std::unique_ptr<int8_t[]> terms;
    acc_t *e, *ew, *eq, *er, *e2, *zin_w, *zin;
    RowLogs<acc_t> logs;
  };

  Scratch make_scratch(int64_t task_rows) const {
    Scratch s;
    const int64_t rows = 5 + (kDirect ? 0 : 2);
    const int64_t logs = (distill_all ? 2 : 1) * task_rows;
    s.buf.reset(new acc_t[rows * C + logs]);
    s.terms.reset(new int8_t[logs]);
    s.e = s.buf.get();
    s.ew = s.e + C;
    s.eq = s.e + 2 * C;
    s.er = s.e + 3 * C;
    s.e2 = s.e + 4 * C;
    s.zin_w = kDirect ? nullptr : s.e + 5 * C;
    s.zin = kDirect ? nullptr : s.e + 6 * C;
    s.logs.t = s.e + rows * C;
    s.logs.term = s.terms.get();
    return s;
  }

  // The gradient pass of one row into the output row `grow` (see finish_row).
  template <bool kQ, bool kPrior>
  void write_grad(scalar_t* grow, acc_t* e, acc_t k1, const acc_t* q, acc_t k2, acc_t* prior,
                  const acc_t* ew, acc_t kp) const {
    if constexpr (kDirect) {
      finish_row<kQ, kPrior, kStream>(grow, e, k1, q, k2, prior, ew, kp, C);
    } else {
      finish_row<kQ, kPrior, false>(e, e, k1, q, k2, prior, ew, kp, C);
      from_acc(e, grow, C);
    }
  }

  // Labeled row b: writes grad_lb[b]; its loss lse(x) - x[y] is the returned part plus the
  // log1p(t) pushed to sc.logs (NaN and nothing pushed for a non-finite row).
  acc_t labeled_row(int64_t b, Scratch& sc) const {
    const scalar_t* zrow = zl + b * C;
    scalar_t* grow = grad_lb + b * C;
    const acc_t* z;
    if constexpr (kDirect) {
      z = zrow;
    } else {
      to_acc(zrow, sc.zin, C);
      z = sc.zin;
    }
    const int64_t y = labels[b];
    if (y < 0 || y >= C) {  // unvalidated bad label: a NaN row on every backend (docs/contract.md)
      fill_row(grow, C, true);
      return nan_value<acc_t>();
    }
    const ArgMax am = row_argmax<true>(z, ds, C);
    const int64_t k = am.k;
    acc_t t = nan_value<acc_t>();
    if (std::isfinite(am.m)) {
      t = exp_sum<true, false, false, acc_t>(z, ds, k, acc_t(1), nullptr, sc.e, C, nullptr);
    }
    const acc_t s = acc_t(1) + t;
    if (!valid_sum(s)) {  // NaN/inf logits: the reference's row is NaN
      fill_row(grow, C, true);
      return nan_value<acc_t>();
    }
    // lse(x) - x[y] = (x_k - x_y) + log1p(t), x_k - x_y formed without the rounding of z + ds.
    sc.logs.push(t, 0);
    // dL/dz_l[b] = (e / s - onehot(y)) / B: the one-hot is folded into the scaling pass,
    // (e_y - s) (1 / sB) = e_y / sB - 1 / B.
    sc.e[y] -= s;
    write_grad<false, false>(grow, sc.e, inv_b / s, nullptr, acc_t(0), nullptr, nullptr, acc_t(0));
    return (z[k] - z[y]) + (ds[k] - ds[y]);
  }

  // Unlabeled pair i: writes mask[i], yhat[i], grad_s[i], adds pw to `prior`, and its L_u and
  // L_d contributions to lu, ld. M = 1 and M = 0 rows share one exp pass and one gradient pass
  // (with per-row coefficients), so that a hard-to-predict M costs no pipeline flush.
  void unlabeled_row(int64_t i, Scratch& sc, acc_t* prior, double& lu, double& ld) const {
    const scalar_t* wrow = zw + i * C;
    const scalar_t* srow = zs + i * C;
    scalar_t* grow = grad_s + i * C;
    const acc_t *w, *z;
    if constexpr (kDirect) {
      w = wrow;
      z = srow;
    } else {
      to_acc(wrow, sc.zin_w, C);
      to_acc(srow, sc.zin, C);
      w = sc.zin_w;
      z = sc.zin;
    }
    const acc_t* no_adj = nullptr;
    // The row's weight in the batch prior (a row of weight <= 0 is left out: its kp is 0 on the
    // finite paths, and its NaN is not written on the non-finite one).
    const bool in_prior = weight == nullptr || weight[i] > acc_t(0);

    // ---- weak view: max and pseudo-label, sum of exps -> M = [1 / sum >= tau], pw.
    const ArgMax aw = row_argmax<false>(w, no_adj, C);
    const int64_t k_w = aw.k;
    acc_t sw = nan_value<acc_t>();
    if (std::isfinite(aw.m)) {
      sw = acc_t(1) +
           exp_sum<false, false, false, acc_t>(w, no_adj, k_w, acc_t(1), nullptr, sc.ew, C,
                                               nullptr);
    }
    if (!valid_sum(sw)) {
      // NaN/inf weak logits: pw is NaN and so is the batch prior (ADELLOLoss then skips its
      // update); M = 0 (NaN >= tau is false); yhat = the first NaN (as torch.max) or the max.
      int64_t k = -1;
      for (int64_t c = 0; c < C && k < 0; ++c) {
        if (std::isnan(w[c])) k = c;
      }
      if (k < 0) k = k_w;
      mask[i] = acc_t(0);
      yhat[i] = k;
      if (in_prior) std::fill(prior, prior + C, nan_value<acc_t>());
      if (gate) {  // q is NaN, so is the distillation row
        fill_row(grow, C, true);
        ld += std::numeric_limits<double>::quiet_NaN();
      } else {
        skipped_row(z, k, grow, lu);
      }
      return;
    }
    const acc_t inv_sw = acc_t(1) / sw;  // = max_c pw_c, since exp(max - max) = 1
    const bool confident = inv_sw >= tau;
    mask[i] = confident ? acc_t(1) : acc_t(0);
    yhat[i] = k_w;
    // The row's batch-prior contribution pe_row * kp: pw = ew / sw, or (EM) ew r / sum(ew r).
    const acc_t* pe = sc.ew;
    acc_t kp = inv_sw;
    if (prior_em) {
      kp = acc_t(1) / weighted_exps(sc.ew, sc.er);
      pe = sc.er;
    }
    if (weight != nullptr) kp = in_prior ? kp * weight[i] : acc_t(0);  // adds +0 when left out

    if (!confident && !gate) {  // contributes nothing but its pw
      skipped_row(z, k_w, grow, lu);
      prior_add(prior, pe, kp, C);
      return;
    }

    // ---- strong view, a = z + du, d_c = a_c - max a.
    //   M = 1: L_u row = lse(a) - a[yhat] = (a_k - a_yhat) + log s,   s = sum_c exp(d_c);
    //          grad = lambda_u (e / s - onehot(yhat)) / N.
    //   M = 0: distillation, q = softmax(w / T) (no gradient), p = softmax(a / T):
    //          log p_c = d_c / T - log s',  s' = sum_c exp(d_c / T), so
    //          H(q, p) = -sum_c q_c log p_c = log s' - (1/T) sum_c q_c d_c      (sum_c q_c = 1)
    //          (per-element differences d_c: no cancellation between lse and the dot at logits
    //          ~1e4); dH/da = (p - q) / T, grad = lambda_d (p - q) / (T N).
    // Both are one exp pass (scale 1 or 1/T) with the dot taken along, and one gradient pass
    // k1 e - k2 q (k2 = 0 when M = 1) with the one-hot folded into e[yhat] when M = 1.
    const ArgMax aa = row_argmax<true>(z, du, C);
    const int64_t k = aa.k;
    const acc_t* qe = sc.ew;  // unnormalised q: pw's exps when T = 1 or M = 1 (unused then)
    acc_t inv_sq = inv_sw;
    const bool both = confident && gate && distill_all;  // an M = 1 row that also distils
    if ((!confident || both) && !t_one) {
      const acc_t sq = acc_t(1) + exp_sum<false, true, false, acc_t>(w, no_adj, k_w, inv_t,
                                                                    nullptr, sc.eq, C, nullptr);
      qe = sc.eq;
      inv_sq = acc_t(1) / sq;
    }
    if (both) return both_row(z, k, k_w, std::isfinite(aa.m), qe, inv_sq, grow, prior, pe, kp, sc,
                              lu, ld);
    acc_t dot = 0;
    acc_t t = nan_value<acc_t>();
    if (std::isfinite(aa.m)) {
      t = t_one ? exp_sum<true, false, true, acc_t>(z, du, k, acc_t(1), qe, sc.e, C, &dot)
                : exp_sum<true, true, true, acc_t>(z, du, k, confident ? acc_t(1) : inv_t, qe,
                                                   sc.e, C, &dot);
    }
    const acc_t s = acc_t(1) + t;
    if (!valid_sum(s)) return nan_strong_row(grow, prior, pe, kp, confident ? lu : ld);
    // ce = (a_k - a_yhat) + log1p(t),  h = log1p(t) - (1/T) dot / sq: the parts besides the log
    // here, the log with the task's others (sc.logs).
    lu += confident ? static_cast<double>((z[k] - z[k_w]) + (du[k] - du[k_w])) : 0.0;
    ld += confident ? 0.0 : -static_cast<double>(inv_t * inv_sq * dot);
    sc.logs.push(t, confident ? 0 : 1);
    const acc_t cu = lambda_u * inv_n, cd = lambda_d * inv_n * inv_t;
    sc.e[k_w] -= confident ? s : acc_t(0);
    write_grad<true, true>(grow, sc.e, (confident ? cu : cd) / s, qe,
                           confident ? acc_t(0) : cd * inv_sq, prior, pe, kp);
  }

  // A distill_all row with M = 1 (the gate on): both terms on one strong row a = z + du,
  //   L_u row = (a_k - a_yhat) + log s,         s  = sum_c exp(d_c)
  //   L_d row = log s' - (1/T) sum_c q_c d_c,   s' = sum_c exp(d_c / T)
  //   grad    = (lambda_u (e / s - onehot(yhat)) + lambda_d (e' / s' - q) / T) / N.
  // T = 1: e' = e and s' = s, one exp pass gives both (gradient k1 e - k2 q with
  // k1 = (cu + cd) / s and the one-hot folded as e[yhat] -= s cu / (cu + cd)). T != 1: a second
  // exp pass into e2, the two combined into e before the gradient pass.
  void both_row(const acc_t* z, int64_t k, int64_t k_w, bool finite_max, const acc_t* qe,
                acc_t inv_sq, scalar_t* grow, acc_t* prior, const acc_t* pe, acc_t kp,
                Scratch& sc, double& lu, double& ld) const {
    acc_t dot = 0, dot2 = 0;
    acc_t t1 = nan_value<acc_t>(), t2 = nan_value<acc_t>();
    if (finite_max) {
      if (t_one) {
        t1 = t2 = exp_sum<true, false, true, acc_t>(z, du, k, acc_t(1), qe, sc.e, C, &dot);
        dot2 = dot;
      } else {
        t1 = exp_sum<true, false, false, acc_t>(z, du, k, acc_t(1), nullptr, sc.e, C, nullptr);
        t2 = exp_sum<true, true, true, acc_t>(z, du, k, inv_t, qe, sc.e2, C, &dot2);
      }
    }
    const acc_t s1 = acc_t(1) + t1, s2 = acc_t(1) + t2;
    if (!valid_sum(s1) || !valid_sum(s2)) {
      ld += std::numeric_limits<double>::quiet_NaN();
      return nan_strong_row(grow, prior, pe, kp, lu);
    }
    lu += static_cast<double>((z[k] - z[k_w]) + (du[k] - du[k_w]));
    ld += -static_cast<double>(inv_t * inv_sq * dot2);
    sc.logs.push(t1, 0);
    sc.logs.push(t2, 1);
    const acc_t cu = lambda_u * inv_n, cd = lambda_d * inv_n * inv_t;
    if (t_one) {
      const acc_t cs = cu + cd;
      sc.e[k_w] -= cs > acc_t(0) ? s1 * (cu / cs) : acc_t(0);
      write_grad<true, true>(grow, sc.e, cs / s1, qe, cd * inv_sq, prior, pe, kp);
      return;
    }
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vec::size();
    const Vec v1(cu / s1), v2(cd / s2);
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      at::vec::fmadd(Vec::loadu(sc.e2 + c), v2, Vec::loadu(sc.e + c) * v1).store(sc.e + c);
    }
    for (; c < C; ++c) sc.e[c] = sc.e2[c] * (cd / s2) + sc.e[c] * (cu / s1);
    sc.e[k_w] -= cu;
    write_grad<true, true>(grow, sc.e, acc_t(1), qe, cd * inv_sq, prior, pe, kp);
  }

  // EM estimator: er_c = ew_c r_c into `er`, returns sum_c er_c (> 0: the max's ew is 1 and
  // r_c >= eps / (1 + eps); at most C (1 + eps) / eps, finite).
  acc_t weighted_exps(const acc_t* ew, acc_t* er) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vec::size();
    const acc_t* rr = r.data();
    Vec acc(acc_t(0));
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const Vec x = Vec::loadu(ew + c) * Vec::loadu(rr + c);
      x.store(er + c);
      acc = acc + x;
    }
    __at_align__ acc_t lanes[L];
    acc.store(lanes);
    acc_t sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += lanes[l];
    for (; c < C; ++c) {
      er[c] = ew[c] * rr[c];
      sum += er[c];
    }
    return sum;
  }

  // A NaN/inf strong row (finite weak row): NaN gradient and loss term, its prior row still
  // counted (pe * kp, see unlabeled_row).
  void nan_strong_row(scalar_t* grow, acc_t* prior, const acc_t* pe, acc_t kp,
                      double& term) const {
    fill_row(grow, C, true);
    term += std::numeric_limits<double>::quiet_NaN();
    prior_add(prior, pe, kp, C);
  }

  // A row with M = 0 and the distillation off: gradient 0 and no loss, except that the reference
  // multiplies a non-finite CE by M = 0 and gets NaN, which is kept (a NaN in the strong logits
  // is not hidden): NaN iff a has a NaN or +inf, or a[yhat] is not finite.
  void skipped_row(const acc_t* z, int64_t k_w, scalar_t* grow, double& lu) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vec::size();
    // One NaN-propagating max pass: m is NaN or +inf exactly when the reference's CE is not
    // finite for a reason other than a[yhat] (checked separately).
    Vec m(-std::numeric_limits<acc_t>::infinity());
    int64_t c = 0;
    for (; c + L <= C; c += L) m = at::vec::maximum(m, Vec::loadu(z + c) + Vec::loadu(du + c));
    __at_align__ acc_t lanes[L];
    m.store(lanes);
    acc_t mx = lanes[0];
    for (int64_t l = 1; l < L; ++l) {
      if (lanes[l] > mx || std::isnan(lanes[l])) mx = lanes[l];
    }
    for (; c < C; ++c) {
      const acc_t x = z[c] + du[c];
      if (x > mx || std::isnan(x)) mx = x;
    }
    const acc_t ay = z[k_w] + du[k_w];
    const bool bad = std::isnan(mx) || mx == std::numeric_limits<acc_t>::infinity() ||
                     !std::isfinite(ay);
    // -inf entries elsewhere are fine: exp(-inf) = 0 in the reference too.
    fill_row(grow, C, bad);
    if (bad) lu += std::numeric_limits<double>::quiet_NaN();
  }

  void run() const {
    const Plan plan = make_plan(B, N, C, gate && !t_one);
    const int64_t n_tasks = plan.tasks_lb + plan.tasks_ulb;
    // Per-task partial sums, reduced below in task order (deterministic for any thread count):
    // loss_part[2t] = L_s (labeled task) or L_u (unlabeled task), loss_part[2t + 1] = L_d;
    // prior_part[u] = sum over the rows of unlabeled task u of pw.
    std::vector<double> loss_part(2 * n_tasks, 0.0);
    std::unique_ptr<acc_t[]> prior_part(new acc_t[plan.tasks_ulb * C]);

    auto run_task = [&](int64_t t, Scratch& sc) {
      if (t < plan.tasks_lb) {
        const int64_t b0 = t * plan.rows_lb, b1 = std::min(B, b0 + plan.rows_lb);
        double ls[2] = {0, 0};
        for (int64_t b = b0; b < b1; ++b) ls[0] += static_cast<double>(labeled_row(b, sc));
        sc.logs.flush(ls);
        loss_part[2 * t] = ls[0];
      } else {
        const int64_t u = t - plan.tasks_lb;
        const int64_t i0 = u * plan.rows_ulb, i1 = std::min(N, i0 + plan.rows_ulb);
        acc_t* prior = prior_part.get() + u * C;
        std::fill(prior, prior + C, acc_t(0));
        double terms[2] = {0, 0};  // L_u, L_d
        for (int64_t i = i0; i < i1; ++i) unlabeled_row(i, sc, prior, terms[0], terms[1]);
        sc.logs.flush(terms);
        loss_part[2 * t] = terms[0];
        loss_part[2 * t + 1] = terms[1];
      }
    };

    // Tasks are handed out dynamically (the machine may be shared: a busy core just takes fewer
    // tasks); which thread runs a task never changes its result.
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      DenormalsAreZero daz;
      Scratch sc = make_scratch(std::max(plan.rows_lb, plan.rows_ulb));
      for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) run_task(t, sc);
      if constexpr (kStream) Prim<acc_t>::stream_fence();
    });

    // Batch prior: column-wise sum of the task partials in task order, then / N, or with prior
    // weights / W (W = sum of the positive weights in row order; W = 0 gives 0 * inf = NaN).
    acc_t inv_w = inv_n;
    if (weight != nullptr) {
      double w_sum = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        if (weight[i] > acc_t(0)) w_sum += static_cast<double>(weight[i]);
      }
      inv_w = acc_t(1) / static_cast<acc_t>(w_sum);
    }
    acc_t* prior_batch = static_cast<acc_t*>(a.prior_batch);
    const acc_t* part = prior_part.get();
    const int64_t n_u = plan.tasks_ulb;
    const int64_t grain = std::max<int64_t>(1024, (int64_t(1) << 16) / n_u);
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      using Vec = Vectorized<acc_t>;
      constexpr int64_t L = Vec::size();
      const Vec vinv_n(inv_w);
      for (int64_t c = c0; c < c1; c += L) {
        const int64_t n = std::min<int64_t>(L, c1 - c);
        Vec acc = Vec::loadu(part + c, n);
        for (int64_t u = 1; u < n_u; ++u) acc = acc + Vec::loadu(part + u * C + c, n);
        (acc * vinv_n).store(prior_batch + c, n);
      }
    });

    // Loss terms, summed in double in task order.
    double ls = 0, lu = 0, ld = 0;
    for (int64_t t = 0; t < plan.tasks_lb; ++t) ls += loss_part[2 * t];
    for (int64_t t = plan.tasks_lb; t < n_tasks; ++t) {
      lu += loss_part[2 * t];
      ld += loss_part[2 * t + 1];
    }
    ls /= static_cast<double>(B);
    lu /= static_cast<double>(N);
    ld = gate ? ld / static_cast<double>(N) : 0.0;
    const double loss = ls + a.lambda_u * lu + (gate ? a.lambda_d * ld : 0.0);
    acc_t* terms = static_cast<acc_t*>(a.terms);
    terms[0] = static_cast<acc_t>(ls);
    terms[1] = static_cast<acc_t>(lu);
    terms[2] = static_cast<acc_t>(ld);
    *static_cast<acc_t*>(a.loss) = static_cast<acc_t>(loss);
  }
};

// Gradients larger than this are written with streaming stores: they cannot stay in cache until
// the backward reads them, so reading their lines first (write-allocate) would only add traffic.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename scalar_t>
void run_kernel(const Args& args) {
  const int64_t bytes = (args.B + args.N) * args.C * static_cast<int64_t>(sizeof(scalar_t));
  if (bytes > kStreamBytes) {
    Kernel<scalar_t, true>(args).run();
  } else {
    Kernel<scalar_t, false>(args).run();
  }
}

// ---------------------------------------------------------------------------------------------
// The logit adjustments of a step (docs/method.md, Per-step adjustments), in double:
//   qa_c = R_c ** alpha / sum_j R_j ** alpha      (0 ** 0 = 1, as torch.pow)
//   ds_c = log(P_L,c + eps) - log(qa_c + eps),    du_c = log(Q_c + eps) - log(qa_c + eps)
// with R = `r` the prior the target is flattened from: Q itself, or a fixed target prior.
// Vectorised with at::vec (Sleef's 1-ulp pow and log in the AVX2/AVX-512 builds): one pow and
// three logs per class in scalar libm cost ~60 ns a class here, a tenth of a CIFAR-size step.
// ---------------------------------------------------------------------------------------------
inline void adjustments(const double* p_l, const double* q, const double* r, int64_t C,
                        double alpha, double eps, double* q_alpha, double* ds, double* du) {
  using Vec = Vectorized<double>;
  constexpr int64_t L = Vec::size();
  const Vec va(alpha), ve(eps), zero(0.0);
  Vec sum = zero;
  for (int64_t c = 0; c < C; c += L) {
    const int64_t n = std::min<int64_t>(L, C - c);
    const Vec qa = Vec::loadu(r + c, n).pow(va);
    qa.store(q_alpha + c, n);
    sum = sum + Vec::set(zero, qa, n);  // lanes past the row (pow(0, 0) = 1 there) left out
  }
  const Vec z(at::vec::vec_reduce_all<double>([](const Vec& x, const Vec& y) { return x + y; },
                                              sum));
  for (int64_t c = 0; c < C; c += L) {
    const int64_t n = std::min<int64_t>(L, C - c);
    const Vec log_qa = (Vec::loadu(q_alpha + c, n) / z + ve).log();
    ((Vec::loadu(p_l + c, n) + ve).log() - log_qa).store(ds + c, n);
    ((Vec::loadu(q + c, n) + ve).log() - log_qa).store(du + c, n);
  }
}

inline KernelTable table() {
  KernelTable t;
  t.adjust = &adjustments;
  t.f32 = &run_kernel<float>;
  t.f64 = &run_kernel<double>;
  t.bf16 = &run_kernel<c10::BFloat16>;
  t.f16 = &run_kernel<c10::Half>;
  return t;
}

}  // namespace adello::flexda_cpu::FLEXDA_CPU_ISA
