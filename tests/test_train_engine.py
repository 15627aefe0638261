"""The epoch loop's precision paths, run on the CPU (training/engine.py, train.precision).

No GPU is available to these tests, so the CUDA mechanics are checked through their CPU
equivalents: a CPU GradScaler for fp16's scale -> backward -> unscale/step -> update order,
CPU bf16 autocast for the bf16 path, and a stand-in for DDP's `no_sync`.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import models
import train
from training.engine import CosineSchedule, Trainer, build_optimizer, train_one_epoch
from training.loss import LOGIT_SCALE_MAX, clip_loss

STEPS, UPDATE_FREQ, MICRO_BATCH = 2, 2, 2


@pytest.fixture(scope="module")
def batches() -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS * UPDATE_FREQ):
        images = torch.randn(MICRO_BATCH, 3, 224, 224, generator=g)
        tokens = torch.randint(1, 49000, (MICRO_BATCH, 12), generator=g)
        tokens[:, -1] = 49407  # <|endoftext|>: the highest id ends every caption
        out.append((images, tokens))
    return out


class ListLoader(list):
    """Fixed batches as a training/loaders.py TrainLoader: nothing skipped."""

    def report(self) -> dict[str, int]:
        return {}


class NoSyncRecorder(nn.Module):
    """Stands in for DDP: records whether each forward ran inside `no_sync()`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.inside = False
        self.calls: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, *args):
        self.calls.append(self.inside)
        return self.module(*args)


def run_epoch(batches, scaler=None, amp_dtype=None, eps=1e-3, wrap=False):
    """One epoch of STEPS optimizer steps of UPDATE_FREQ micro-batches; returns (model, trainer)."""
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY")
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), eps)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    forward = NoSyncRecorder(model) if wrap else model
    tr = Trainer(model=forward, raw_model=model, optimizer=optimizer, scaler=scaler, loader=ListLoader(batches),
                 schedule=CosineSchedule(1e-3, 1e-5, 1e-6, STEPS, 0), steps_per_epoch=STEPS,
                 update_freq=UPDATE_FREQ, device=torch.device("cpu"), amp_dtype=amp_dtype, is_main=False)
    train_one_epoch(tr, 0)
    return model, tr


def reference_epoch(batches, eps=1e-3):
    """SLIP's loop written out: loss / update_freq backward per micro-batch, then step,
    zero_grad and the logit-scale clamp once per optimizer step."""
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY")
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), eps)
    schedule = CosineSchedule(1e-3, 1e-5, 1e-6, STEPS, 0)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        for images, tokens in batches[step * UPDATE_FREQ:(step + 1) * UPDATE_FREQ]:
            out = model(images, tokens)
            loss = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])["loss"]
            (loss / UPDATE_FREQ).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return model


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=0, atol=atol), (name, (x - y).abs().max())


def test_accumulation_equals_slip_loop(batches):
    model, _ = run_epoch(batches)
    assert_same_weights(model, reference_epoch(batches), atol=1e-6)


def test_grad_scaler_unscales_before_the_step(batches):
    """fp16's GradScaler path with a power-of-two scale is exact in float32, so it must give the
    unscaled run's weights. The large AdamW eps makes a missing unscale visible (Adam is
    otherwise nearly invariant to the gradient's scale)."""
    plain, _ = run_epoch(batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    scaled, tr = run_epoch(batches, scaler=scaler)
    assert_same_weights(plain, scaled, atol=1e-6)
    # update() ran once per optimizer step (growth_interval 1: the scale doubles each time).
    assert tr.scaler.get_scale() == 2.0 ** (10 + STEPS)


def test_no_sync_on_all_but_the_last_micro_batch(batches):
    _, tr = run_epoch(batches, wrap=True)
    assert tr.model.calls == [True, False] * STEPS


def test_bf16_autocast_path_keeps_float32_weights(batches):
    model, tr = run_epoch(batches, amp_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 0 <= model.logit_scale.item() <= LOGIT_SCALE_MAX
    plain, _ = run_epoch(batches)
    # bf16 matmuls in the towers, float32 loss: close to, not equal to, the float32 run.
    assert_same_weights(plain, model, atol=5e-3)


def test_precision_choices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    dtype, scaler = train.precision("amp", cpu)
    assert dtype is None and not scaler.is_enabled()
    assert train.precision("fp32", cuda)[0] is None
    with warnings.catch_warnings():  # a CUDA GradScaler on a CPU-only build warns and disables itself
        warnings.simplefilter("ignore")
        assert train.precision("amp", cuda)[0] == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    dtype, scaler = train.precision("amp_bf16", cuda)
    assert dtype == torch.bfloat16 and not scaler.is_enabled()  # bf16 needs no loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match="--precision amp_bf16: Tesla V100.*--precision amp"):
        train.precision("amp_bf16", cuda)
