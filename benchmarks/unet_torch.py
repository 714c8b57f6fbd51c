"""fcn's default U-Net, written in PyTorch, for side-by-side speed measurements.

The same network as `fcn.model.UNet` with the default config (configs/default.py):
input centring, widths `features * 2**level` over `depth` 2x2 max-poolings,
blocks of (3x3 conv without bias -> batch norm -> ReLU) x 2, 2x2 stride-2
transposed-conv upsampling with bias, skip concatenation [upsampled, skip],
and a linear 1x1 head with bias. Batch norm matches nnx.BatchNorm (momentum
0.9 there is 0.1 here, eps 1e-5). `speed.py` asserts that both models have the
same parameter count.

The optimizer matches `fcn.state.make_optimizer` for the default config:
global-norm clipping at 1.0, then AdamW (b1 0.9, b2 0.999, eps 1e-8) with
weight decay on the weights of rank > 1 only, on a warmup-cosine schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class ConvBlock(nn.Sequential):
    """3x3 conv -> batch norm -> ReLU, twice."""

    def __init__(self, c_in: int, c_out: int):
        layers = []
        for c in (c_in, c_out):
            layers += [
                nn.Conv2d(c, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1),
                nn.ReLU(),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net FCN: images [B, C, H, W] in [0, 1] -> logits [B, K, H, W], any H, W (as fcn: reflect-padded)."""

    def __init__(self, num_classes: int, *, in_channels: int = 3, features: int = 32, depth: int = 4):
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN[:in_channels]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(_STD[:in_channels]).view(1, -1, 1, 1))
        widths = [features * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(ConvBlock(c, w))
            c = w
        self.bottom = ConvBlock(c, widths[-1])
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * w, w))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.multiple = 2**depth

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h, w = x_BCHW.shape[-2:]
        x_BCHW = (x_BCHW - self.mean) / self.std
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:  # as fcn.model.pad_to_multiple: after the last row and column, mirrored
            x_BCHW = F.pad(x_BCHW, (0, pw, 0, ph), mode="reflect")
        skips = []
        for block in self.down:
            x_BCHW = block(x_BCHW)
            skips.append(x_BCHW)
            x_BCHW = F.max_pool2d(x_BCHW, 2)
        x_BCHW = self.bottom(x_BCHW)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x_BCHW = block(torch.cat([up(x_BCHW), skip], dim=1))
        return self.head(x_BCHW).float()[:, :, :h, :w]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, *, lr=1e-3, weight_decay=1e-4, warmup_steps=100, num_steps=1000):
    """AdamW with decay on rank > 1 weights only, warmup then cosine decay (as optax's)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, num_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_train_step(model: nn.Module, opt, sched, *, ignore_label: int = 255, grad_clip: float = 1.0, autocast=None):
    """train_step(images, labels) -> loss: forward, cross-entropy, backward, clip, AdamW step."""

    def step(images_BCHW, labels_BHW):
        opt.zero_grad(set_to_none=True)
        if autocast is not None:
            with torch.autocast(images_BCHW.device.type, dtype=autocast):
                logits = model(images_BCHW)
        else:
            logits = model(images_BCHW)
        loss = F.cross_entropy(logits.float(), labels_BHW, ignore_index=ignore_label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        return loss.detach()

    return step
