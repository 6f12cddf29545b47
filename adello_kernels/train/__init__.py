"""Training driver for ADELLO and its ablations on long-tailed semi-supervised splits.

    python -m adello_kernels.train [--preset fmnist-lt] [--algorithm adello] [flags]
    torchrun --nproc_per_node K -m adello_kernels.train ...
    python -m adello_kernels.train.prepare imagenet127 --src DIR --dst DIR

Modules: cli (flags), config (defaults < preset < flags), data (readers, splits, device data),
augment (batched weak/strong views), models, trainer (the loop), metrics, report, checkpoint,
rundir (claiming a run directory),
prepare (dataset preparation).
"""
