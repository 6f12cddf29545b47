"""Backbones of the training driver, written from their papers (no torchvision):

    wrn28_2    WRN-28-2 (Zagoruyko & Komodakis 2016), the CIFAR/STL backbone of FixMatch, USB and
               ADELLO: pre-activation blocks, LeakyReLU 0.1, BatchNorm momentum 0.001, 1.47M params
    resnet50   ResNet-50 (He et al. 2016) with a 3x3 stride-1 stem and no max-pool, for 32 or
               64 px inputs (final feature map 4x4 or 8x8), as used for Small-ImageNet-127
    cnn        a 5-layer CNN for 28x28 Fashion-MNIST, small enough to train on two CPU cores

Every model maps [N, C_in, H, W] float images to [N, num_classes] logits and is built with
`build_model(name, num_classes, in_channels, bn_momentum, width)`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_LRELU = 0.1


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Backward: every rank's x feeds every rank's y, so the gradient
    is the sum over ranks of dL/dy (DDP then averages the parameter gradients)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are taken over the batch of every rank.

    torch.nn.SyncBatchNorm runs on CUDA only; this one also runs on CPU (gloo), so a K-process
    run sees exactly the statistics of a one-process run with the same global batch. In one
    process it computes the same statistics with the same formula (no all-reduce), which is
    what lets the DDP test compare the two runs to 1e-5.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        n_local = x.numel() // c
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), float(n_local))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = _AllReduceSum.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1.0))
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def _bn(channels: int, momentum: float, sync: bool, eps: float = 1e-5) -> nn.BatchNorm2d:
    cls = SyncBatchNorm2d if sync else nn.BatchNorm2d
    return cls(channels, momentum=momentum, eps=eps)


def _init_weights(model: nn.Module, nonlinearity: str) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity,
                                    a=_LRELU if nonlinearity == "leaky_relu" else 0.0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------
# WRN-28-2
# ------------------------------------------------------------------------------------------

class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3-BN-act-conv3x3 plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float, sync_bn: bool,
                 activate_before_residual: bool):
        super().__init__()
        self.bn1 = _bn(cin, bn_momentum, sync_bn, eps=1e-3)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = _bn(cout, bn_momentum, sync_bn, eps=1e-3)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else \
            nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        # The first block sees the stem output, which has not been normalised yet: its
        # shortcut takes the activated input too (FixMatch's `activate_before_residual`).
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        o = F.leaky_relu(self.bn1(x), _LRELU)
        out = self.conv1(o)
        out = self.conv2(F.leaky_relu(self.bn2(out), _LRELU))
        if self.shortcut is None:
            return x + out
        return self.shortcut(o if self.activate_before_residual else x) + out


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 28, widen: int = 2,
                 bn_momentum: float = 0.001, sync_bn: bool = False):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"model: WRN depth must be 6k+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        cin = widths[0]
        for g, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, bn_momentum,
                                         sync_bn, activate_before_residual=(g == 0 and i == 0)))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(cin, bn_momentum, sync_bn, eps=1e-3)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self, "leaky_relu")

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.leaky_relu(self.bn(x), _LRELU)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------
# ResNet-50 for 32 / 64 px
# ------------------------------------------------------------------------------------------

class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, bn_momentum: float, sync_bn: bool):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes, bn_momentum, sync_bn)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes, bn_momentum, sync_bn)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = _bn(cout, bn_momentum, sync_bn)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      _bn(cout, bn_momentum, sync_bn))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, bn_momentum: float = 0.1,
                 sync_bn: bool = False):
        super().__init__()
        # Small inputs: a 3x3 stride-1 stem and no max-pool keep 32 px at 4x4 after layer4.
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  _bn(64, bn_momentum, sync_bn), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for planes, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(count):
                layers.append(_Bottleneck(cin, planes, stride if i == 0 else 1, bn_momentum,
                                          sync_bn))
                cin = planes * _Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self, "relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------
# Small CNN for Fashion-MNIST
# ------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """conv3x3(w, /2) - conv3x3(2w) - conv3x3(4w, /2) - conv3x3(4w) - conv3x3(4w) - GAP - fc,
    each conv followed by BatchNorm and LeakyReLU 0.1. Width w = 16 (default): 98k parameters,
    5.4M multiply-adds per 28x28 image. The stride-2 stem keeps the activations (what the CPU
    time goes to: BatchNorm and LeakyReLU are memory-bound) at 19k values per image."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16,
                 bn_momentum: float = 0.01, sync_bn: bool = False):
        super().__init__()
        w = width
        plan = [(in_channels, w, 2), (w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1),
                (4 * w, 4 * w, 1)]
        layers = []
        for cin, cout, stride in plan:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                       _bn(cout, bn_momentum, sync_bn), nn.LeakyReLU(_LRELU, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w, num_classes)
        _init_weights(self, "leaky_relu")

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


MODELS = ("cnn", "wrn28_2", "resnet50")


def build_model(name: str, num_classes: int, in_channels: int, *, bn_momentum: float,
                width: int = 0, sync_bn: bool = False) -> nn.Module:
    """The backbone `name` ('cnn', 'wrn28_2' or 'resnet50') in channels_last memory format.
    `width` overrides the CNN width (0: default 16); `sync_bn` uses `SyncBatchNorm2d`."""
    if name == "cnn":
        model = SmallCNN(num_classes, in_channels, width or 16, bn_momentum, sync_bn)
    elif name == "wrn28_2":
        model = WideResNet(num_classes, in_channels, 28, 2, bn_momentum, sync_bn)
    elif name == "resnet50":
        model = ResNet50(num_classes, in_channels, bn_momentum, sync_bn)
    else:
        raise ValueError(f"model: unknown model {name!r}; expected one of {MODELS}")
    return model.to(memory_format=torch.channels_last)
