// The layout of the fused op's hyperparameter vector `hparams` (adello::flexda_fwd and the
// prologue of adello::flexda_step), in one place for every C++ and CUDA kernel. The Python side
// (adello_kernels/ops/flexda.py: HPARAM_SLOTS) names the same slots; tests/test_ops.py checks
// that both agree.
#pragma once

namespace adello {

enum HParam : int {
  kHpLambdaU = 0,      // weight of the consistency term L_u
  kHpLambdaD = 1,      // weight of the distillation term L_d
  kHpGate = 2,         // 1 when the distillation term counts this step (t >= t0), else 0
  kHpTemperature = 3,  // distillation temperature T > 0
  kHpPriorEm = 4,      // != 0: prior_batch is mean_i softmax(z_w[i] + du) (EM estimator), else
                       // mean_i softmax(z_w[i]) (raw, the released method)
  kNumHParams = 5,
};

}  // namespace adello
