"""CLIP loss, lr schedule, parameter groups, and a few optimisation steps (training/loss.py, engine.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import models
from tokenizer import SimpleTokenizer
from training.engine import CosineSchedule, build_optimizer, param_groups
from training.loss import LOGIT_SCALE_MAX, clip_loss


def test_loss_matches_direct_formula():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(10.0)
    out = clip_loss(img, txt, scale)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    expected_acc = (logits.argmax(1) == labels).float().mean().item() * 100
    assert abs(out["clip_acc"].item() - expected_acc) < 1e-4
    # Matching pairs give high accuracy.
    assert clip_loss(img, img, scale)["clip_acc"].item() == 100.0


def test_cosine_schedule_follows_slip_values():
    s = CosineSchedule(base_lr=3e-3, final_lr=1e-5, start_lr=1e-6, total_steps=100, warmup_steps=10)
    assert s(0) == 1e-6
    assert math.isclose(s(9), 3e-3)  # linspace: the last warmup step reaches the peak
    assert math.isclose(s(5), 1e-6 + (3e-3 - 1e-6) * 5 / 9)
    assert math.isclose(s(10), 3e-3)  # cosine starts at the peak
    assert math.isclose(s(55), 1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)))
    assert s(99) > 1e-5 and s(100) == 1e-5 and s(10 ** 6) == 1e-5
    values = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_biases_norms_and_1d():
    model = models.get_model("CLIP_TINY")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "logit_scale" in no_decay_names and "ln_final.weight" in no_decay_names
    assert all(n.endswith("bias") or model.get_parameter(n).ndim < 2 for n in no_decay_names)
    assert {"image_projection", "text_projection", "token_embedding.weight"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY")
    tok = SimpleTokenizer()
    images = torch.randn(4, 3, 224, 224)
    tokens = tok(["a red square", "a small dog", "two green birds", "the night sky"])
    opt = build_optimizer(model, lr=1e-4, wd=0.1, betas=(0.9, 0.98), eps=1e-8)
    losses = []
    for _ in range(6):
        out = model(images, tokens)
        loss = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(loss.item())
    # Adam at a small lr on 4 pairs: the loss falls to about a quarter in 6 steps.
    assert losses[-1] < 0.5 * losses[0] and min(losses[1:]) < losses[0], losses


def test_loss_stays_float32_under_autocast():
    """CPU bf16 autocast stands in for CUDA fp16: without switching autocast off inside the
    loss, the logit matmuls run in low precision (a logit near 100 then moves by ~0.5)."""
    torch.manual_seed(0)
    img = torch.randn(16, 32, requires_grad=True)
    txt = torch.randn(16, 32)
    scale = torch.tensor(100.0)
    reference = clip_loss(img, txt, scale)["loss"]
    (grad_ref,) = torch.autograd.grad(reference, img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = clip_loss(img.bfloat16(), txt.bfloat16(), scale)["loss"]
    # bf16 *inputs* are still rounded, so compare with float32 on the same rounded inputs.
    rounded = clip_loss(img.bfloat16(), txt.bfloat16(), scale)["loss"]
    assert under_amp.dtype == torch.float32
    assert torch.equal(under_amp, rounded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(img, txt, scale)["loss"]
    (grad_amp,) = torch.autograd.grad(loss, img)  # backward outside autocast, as in engine.py
    assert torch.equal(loss, reference) and torch.equal(grad_amp, grad_ref)
