"""The PyTorch side of benchmarks/speed.py: one variant (eager or torch.compile, memory format) of train and predict."""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from benchmarks import common, unet_torch


class Variant:
    """`name`: "eager" or "compile", with "+cl" for channels_last. bfloat16 autocast when args.dtype is bfloat16."""

    def __init__(self, args, name: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        base, _, fmt = name.partition("+")
        if base not in ("eager", "compile") or fmt not in ("", "cl"):
            raise ValueError(f"torch variant {name!r}: expected eager or compile, optionally with +cl")
        self.memory_format = torch.channels_last if fmt == "cl" else torch.contiguous_format
        self.autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
        torch.manual_seed(0)
        model = unet_torch.UNet(args.classes, features=args.features, depth=args.depth)
        model = model.to(self.device, memory_format=self.memory_format)
        self.num_params = unet_torch.num_params(model)
        self.eval_model = copy.deepcopy(model).eval()
        images, labels, _ = common.synthetic_batch(args)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
        self.x = x.to(self.device).contiguous(memory_format=self.memory_format)
        self.y = torch.from_numpy(labels).long().to(self.device)
        self.opt, self.sched = unet_torch.make_optimizer(model)
        self.model = model

        def loss_fn(x, y):
            with torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
                logits = model(x)
            return F.cross_entropy(logits.float(), y, ignore_index=255)

        def predict_fn(x):
            with torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
                return self.eval_model(x).argmax(1)

        if base == "compile":
            loss_fn, predict_fn = torch.compile(loss_fn), torch.compile(predict_fn)
        self.loss_fn, self.predict_fn = loss_fn, predict_fn
        self.out = None

    def train(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.out = loss

    def predict(self):
        with torch.inference_mode():
            self.out = self.predict_fn(self.x)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        elif self.out is not None:
            self.out.cpu()
