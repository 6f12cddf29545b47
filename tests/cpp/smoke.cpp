// C++ smoke test of the fused CPU kernel (ctest): calls adello::flexda_fwd_cpu on small random
// tensors and checks what the math guarantees, against plain at:: ops where a check needs values:
//   - every gradient row sums to 0 (softmax - onehot, softmax(a/T) - q);
//   - mask is 0/1 and equals [max softmax(z_w) >= tau]; pseudo-labels are the first argmax;
//   - prior_batch sums to 1 and equals softmax(z_w).mean(0), or with the EM estimator
//     (hparams[kHpPriorEm] != 0) softmax(z_w + du).mean(0);
//   - L_s, L_u, L_d, the loss and both gradients equal a plain at:: computation;
//   - results do not depend on the thread count (bitwise), every compiled instruction set agrees
//     with the one in use, every dtype runs, and bad arguments are rejected.
// Exit status 0 when every check passes.
#include <cmath>
#include <cstdio>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "flexda_cpu.h"
#include "flexda_cpu_kernel.h"

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

double max_abs(const at::Tensor& x) { return x.abs().max().item<double>(); }

struct Inputs {
  at::Tensor zl, y, zw, zs, ds, du, hp;
};

// B labeled rows, N unlabeled pairs, C classes; half the weak rows get a dominant class so that
// both M = 1 and M = 0 rows occur. em: the EM prior estimator (hparams slot kHpPriorEm).
Inputs make_inputs(int64_t B, int64_t N, int64_t C, at::ScalarType dtype, double gate, double T,
                   uint64_t seed, double em = 0.0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.zl = (at::randn({B, C}, gen, f64) * 4).to(dtype);
  auto zw = at::randn({N, C}, gen, f64) * 4;
  auto boost = at::zeros({N, C}, f64);
  for (int64_t i = 0; i < N; i += 2) boost[i][(i * 7) % C] = 20.0;
  in.zw = (zw + boost).to(dtype);
  in.zs = (at::randn({N, C}, gen, f64) * 4).to(dtype);
  in.y = at::randint(0, C, {B}, gen, at::TensorOptions().dtype(at::kLong));
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.ds = at::randn({C}, gen, f64).to(acc);
  in.du = at::randn({C}, gen, f64).to(acc);
  in.hp = at::empty({adello::kNumHParams}, f64);
  in.hp[adello::kHpLambdaU] = 0.7;
  in.hp[adello::kHpLambdaD] = 1.3;
  in.hp[adello::kHpGate] = gate;
  in.hp[adello::kHpTemperature] = T;
  in.hp[adello::kHpPriorEm] = em;
  in.hp = in.hp.to(acc);
  return in;
}

using Outputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs run(const Inputs& in, double tau) {
  return adello::flexda_fwd_cpu(in.zl, in.y, in.zw, in.zs, in.ds, in.du, in.hp, tau);
}

// Every output against plain at:: ops in float64 (the inputs upcast exactly).
void check_against_aten(const Inputs& in, double tau, const std::string& tag, double loss_rtol,
                        double grad_tol) {
  auto [loss, terms, mask, yhat, prior, g_lb, g_s] = run(in, tau);
  const int64_t B = in.zl.size(0), N = in.zw.size(0), C = in.zl.size(1);
  const auto hp = in.hp.to(at::kDouble);
  const double lu = hp[0].item<double>(), ld = hp[1].item<double>();
  const bool gate = hp[2].item<double>() != 0.0;
  const double T = hp[3].item<double>();
  const bool em = hp[adello::kHpPriorEm].item<double>() != 0.0;

  auto x = in.zl.to(at::kDouble) + in.ds.to(at::kDouble);
  auto onehot_y = at::one_hot(in.y, C).to(at::kDouble);
  auto ls = (at::logsumexp(x, 1) - (x * onehot_y).sum(1)).mean();
  auto want_g_lb = (at::softmax(x, 1) - onehot_y) / B;

  auto w = in.zw.to(at::kDouble);
  auto pw = at::softmax(w, 1);
  auto [pmax, want_yhat] = pw.max(1);
  auto want_mask = (pmax >= tau).to(at::kDouble);
  auto a = in.zs.to(at::kDouble) + in.du.to(at::kDouble);
  auto onehot_yhat = at::one_hot(want_yhat, C).to(at::kDouble);
  auto ce = at::logsumexp(a, 1) - (a * onehot_yhat).sum(1);
  auto lu_want = (ce * want_mask).sum() / N;
  auto q = at::softmax(w / T, 1);
  auto logp_t = at::log_softmax(a / T, 1);
  auto h = -(q * logp_t).sum(1);
  auto ld_want = gate ? (h * (1 - want_mask)).sum() / N : at::zeros({}, at::kDouble);
  auto want_g_s = (lu * want_mask.unsqueeze(1) * (at::softmax(a, 1) - onehot_yhat) +
                   (gate ? ld * (1 - want_mask).unsqueeze(1) * (logp_t.exp() - q) / T
                         : at::zeros_like(a))) / N;
  auto loss_want = ls + lu * lu_want + (gate ? ld * ld_want : at::zeros({}, at::kDouble));

  auto rel = [](const at::Tensor& got, const at::Tensor& want) {
    return (got.to(at::kDouble) - want).abs().item<double>() /
           std::max(1e-3, want.abs().item<double>());
  };
  check(at::equal(mask.to(at::kDouble), want_mask), tag + ": mask differs from [max pw >= tau]");
  check(at::equal(yhat, want_yhat), tag + ": pseudo-labels differ from the first argmax");
  check(rel(terms[0], ls) <= loss_rtol, tag + ": L_s differs from at:: ops");
  check(rel(terms[1], lu_want) <= loss_rtol, tag + ": L_u differs from at:: ops");
  check(rel(terms[2], ld_want) <= loss_rtol, tag + ": L_d differs from at:: ops");
  check(rel(loss, loss_want) <= loss_rtol, tag + ": loss differs from at:: ops");
  auto want_prior = em ? at::softmax(w + in.du.to(at::kDouble), 1).mean(0) : pw.mean(0);
  check(max_abs(prior.to(at::kDouble) - want_prior) <= 1e-6,
        tag + (em ? ": prior_batch != mean softmax(z_w + du)" : ": prior_batch != mean pw"));
  check(std::abs(prior.to(at::kDouble).sum().item<double>() - 1.0) <= 1e-5,
        tag + ": prior_batch does not sum to 1");
  const double s_lb = max_abs(g_lb.to(at::kDouble).sum(1)), s_s = max_abs(g_s.to(at::kDouble).sum(1));
  check(s_lb <= grad_tol * 4 && s_s <= grad_tol * 4, tag + ": a gradient row does not sum to 0");
  check(max_abs(g_lb.to(at::kDouble) - want_g_lb) <= grad_tol, tag + ": grad_lb differs");
  check(max_abs(g_s.to(at::kDouble) - want_g_s) <= grad_tol, tag + ": grad_ulb_s differs");
}

bool same(const Outputs& a, const Outputs& b) {
  return at::equal(std::get<0>(a), std::get<0>(b)) && at::equal(std::get<1>(a), std::get<1>(b)) &&
         at::equal(std::get<2>(a), std::get<2>(b)) && at::equal(std::get<3>(a), std::get<3>(b)) &&
         at::equal(std::get<4>(a), std::get<4>(b)) && at::equal(std::get<5>(a), std::get<5>(b)) &&
         at::equal(std::get<6>(a), std::get<6>(b));
}

// Runs one compiled instruction set's kernel directly (bypassing the run-time choice).
// `weight` ([N] acc prior weights, or undefined) and `distill_all` as the op's last arguments.
Outputs run_table(const adello::flexda_cpu::KernelTable& table, const Inputs& in, double tau,
                  const at::Tensor& weight = at::Tensor(), bool distill_all = false) {
  const int64_t B = in.zl.size(0), N = in.zw.size(0), C = in.zl.size(1);
  const auto acc = in.ds.scalar_type();
  auto opts = in.zl.options().dtype(acc);
  Outputs out{at::empty({}, opts), at::empty({3}, opts), at::empty({N}, opts),
              at::empty({N}, in.y.options()), at::empty({C}, opts), at::empty({B, C}, in.zl.options()),
              at::empty({N, C}, in.zl.options())};
  const auto hp = in.hp.to(at::kDouble);
  adello::flexda_cpu::Args args{};
  args.logits_lb = in.zl.const_data_ptr();
  args.labels_lb = in.y.const_data_ptr<int64_t>();
  args.logits_ulb_w = in.zw.const_data_ptr();
  args.logits_ulb_s = in.zs.const_data_ptr();
  args.adj_lb = in.ds.const_data_ptr();
  args.adj_ulb = in.du.const_data_ptr();
  args.prior_weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  args.distill_all = distill_all;
  args.B = B;
  args.N = N;
  args.C = C;
  args.lambda_u = hp[0].item<double>();
  args.lambda_d = hp[1].item<double>();
  args.gate = hp[2].item<double>() != 0.0;
  args.temperature = hp[3].item<double>();
  args.prior_em = hp[adello::kHpPriorEm].item<double>() != 0.0;
  args.threshold = tau;
  args.loss = std::get<0>(out).data_ptr();
  args.terms = std::get<1>(out).data_ptr();
  args.mask = std::get<2>(out).data_ptr();
  args.pseudo_labels = std::get<3>(out).data_ptr<int64_t>();
  args.prior_batch = std::get<4>(out).data_ptr();
  args.grad_lb = std::get<5>(out).data_ptr();
  args.grad_ulb_s = std::get<6>(out).data_ptr();
  auto fn = in.zl.scalar_type() == at::kFloat    ? table.f32
            : in.zl.scalar_type() == at::kDouble ? table.f64
                                                 : nullptr;
  fn(args);
  return out;
}

template <typename F>
bool throws(F&& f) {
  try {
    f();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

}  // namespace

int main() {
  std::printf("flexda_cpu smoke test: kernel ISA %s, %d threads\n", adello::flexda_cpu_isa(),
              at::get_num_threads());
  const double tau = 0.95;

  // Values against at:: ops: class counts around the vector width and its tails, T = 1 and not,
  // the distillation gate on and off.
  for (int64_t C : {1, 2, 7, 16, 17, 100, 127, 1000, 4097}) {
    for (double T : {1.0, 2.0}) {
      for (double gate : {1.0, 0.0}) {
        const std::string tag = "fp32 C=" + std::to_string(C) + " T=" + std::to_string(T) +
                                " gate=" + std::to_string(gate);
        check_against_aten(make_inputs(5, 33, C, at::kFloat, gate, T, 7 + C), tau, tag, 1e-5,
                           1e-6);
      }
    }
  }
  check_against_aten(make_inputs(9, 21, 100, at::kDouble, 1.0, 0.5, 3), tau, "fp64", 1e-12, 1e-14);
  // The EM prior estimator, at vector tails and both accumulate dtypes.
  for (int64_t C : {1, 7, 17, 127, 4097}) {
    check_against_aten(make_inputs(5, 33, C, at::kFloat, 1.0, 2.0, 29 + C, 1.0), tau,
                       "fp32 em C=" + std::to_string(C), 1e-5, 1e-6);
  }
  check_against_aten(make_inputs(9, 21, 100, at::kDouble, 1.0, 0.5, 3, 1.0), tau, "fp64 em",
                     1e-12, 1e-14);
  check_against_aten(make_inputs(9, 21, 100, at::kBFloat16, 1.0, 1.0, 4), tau, "bf16", 1e-2, 2e-3);
  check_against_aten(make_inputs(9, 21, 100, at::kHalf, 1.0, 1.0, 5), tau, "fp16", 1e-2, 1e-3);

  // Same bits for 1 and 2 threads (fixed task partition, partial sums reduced in task order).
  {
    const auto in = make_inputs(300, 700, 257, at::kFloat, 1.0, 1.5, 11);
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const auto one = run(in, tau);
    at::set_num_threads(2);
    const auto two = run(in, tau);
    at::set_num_threads(threads);
    check(same(one, two), "1 and 2 threads give different results");
  }

  // Every compiled instruction set agrees with the generic build (fp32 and fp64; plain, and with
  // per-row prior weights and distillation on every row).
  for (int variant = 0; variant < 4; ++variant) {
    const auto dtype = variant % 2 == 0 ? at::kFloat : at::kDouble;
    const bool extras = variant >= 2;
    const auto in = make_inputs(40, 90, 131, dtype, 1.0, 2.0, 13, 1.0);  // the EM prior too
    const at::Tensor w = extras ? (at::arange(90, in.ds.options()).remainder(3) != 0).to(in.ds.scalar_type())
                                : at::Tensor();
    const auto ref = run_table(adello::flexda_cpu::kernels_generic(), in, tau, w, extras);
    const std::string cap = at::get_cpu_capability();
    std::vector<std::pair<std::string, adello::flexda_cpu::KernelTable>> isas;
    if (cap == "AVX2" || cap == "AVX512") isas.emplace_back("avx2", adello::flexda_cpu::kernels_avx2());
    if (cap == "AVX512") isas.emplace_back("avx512", adello::flexda_cpu::kernels_avx512());
    for (auto& [name, table] : isas) {
      if (table.f32 == nullptr) continue;  // not compiled in this build
      const auto got = run_table(table, in, tau, w, extras);
      const double tol = dtype == at::kFloat ? 1e-6 : 1e-13;
      check(at::equal(std::get<2>(got), std::get<2>(ref)) && at::equal(std::get<3>(got), std::get<3>(ref)),
            name + ": mask/pseudo-labels differ from the generic build");
      check(max_abs(std::get<1>(got).to(at::kDouble) - std::get<1>(ref).to(at::kDouble)) <= tol * 10,
            name + ": loss terms differ from the generic build");
      check(max_abs(std::get<4>(got).to(at::kDouble) - std::get<4>(ref).to(at::kDouble)) <= tol,
            name + ": prior_batch (EM) differs from the generic build");
      check(max_abs(std::get<5>(got).to(at::kDouble) - std::get<5>(ref).to(at::kDouble)) <= tol &&
                max_abs(std::get<6>(got).to(at::kDouble) - std::get<6>(ref).to(at::kDouble)) <= tol,
            name + ": gradients differ from the generic build");
    }
  }

  // Non-contiguous inputs give the same result as their contiguous copies.
  {
    auto in = make_inputs(8, 12, 50, at::kFloat, 1.0, 1.0, 17);
    Inputs strided = in;
    strided.zl = in.zl.t().contiguous().t();
    strided.zs = at::cat({in.zs, in.zs}, 1).narrow(1, 0, 50);
    check(same(run(in, tau), run(strided, tau)), "strided inputs change the result");
  }

  // A label outside [0, C) is not an error here (validation is the caller's): that row's
  // cross-entropy and gradient row are NaN, every other row is untouched, nothing is read out of
  // bounds (docs/contract.md).
  {
    auto in = make_inputs(4, 6, 10, at::kFloat, 1.0, 1.0, 19);
    auto bad = in;
    bad.y = in.y.clone();
    bad.y[0] = 10;
    bad.y[2] = -1;
    auto [loss, terms, mask, yhat, prior, g_lb, g_s] = run(bad, tau);
    auto good = run(in, tau);
    check(std::isnan(loss.item<double>()) && std::isnan(terms[0].item<double>()),
          "a bad label does not make the loss NaN");
    check(g_lb[0].isnan().all().item<bool>() && g_lb[2].isnan().all().item<bool>(),
          "a bad label's gradient row is not NaN");
    check(at::equal(g_lb[1], std::get<5>(good)[1]) && at::equal(g_lb[3], std::get<5>(good)[3]),
          "a bad label changes another row's gradient");
    check(at::equal(g_s, std::get<6>(good)) && at::equal(prior, std::get<4>(good)),
          "a bad label changes the unlabeled outputs");
  }

  // Bad arguments are rejected with c10::Error, not undefined behaviour.
  {
    auto in = make_inputs(4, 6, 10, at::kFloat, 1.0, 1.0, 19);
    auto bad = in;
    bad.zs = in.zs.to(at::kDouble);
    check(throws([&] { run(bad, tau); }), "mixed logits dtypes are accepted");
    bad = in;
    bad.ds = in.ds.narrow(0, 0, 9);
    check(throws([&] { run(bad, tau); }), "a wrong-sized adj_lb is accepted");
    check(throws([&] { run(in, 0.0); }), "threshold 0 is accepted");
  }

  if (g_failures == 0) std::printf("all checks passed\n");
  return g_failures == 0 ? 0 : 1;
}
