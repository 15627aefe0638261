"""One training epoch, the learning-rate schedule and the optimizer's parameter groups."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from common.distributed import all_reduce_sum

from .loss import LOGIT_SCALE_MAX, clip_loss, multi_text_loss


@dataclass
class CosineSchedule:
    """Per optimizer step: linear warmup start_lr -> base_lr, then cosine to final_lr.

    Same values as SLIP's `cosine_scheduler`: warmup is `linspace(start, base, warmup)`
    (its last step already reaches base), then `final + (base - final)/2 * (1 + cos(pi*i/n))`
    for i = 0 .. n-1 over the remaining n steps. Steps past the end stay at final_lr.
    """
    base_lr: float
    final_lr: float
    start_lr: float
    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.start_lr
            return self.start_lr + (self.base_lr - self.start_lr) * step / (self.warmup_steps - 1)
        n = self.total_steps - self.warmup_steps
        i = step - self.warmup_steps
        if n <= 0 or i >= n:
            return self.final_lr
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * i / n))


def param_groups(model: nn.Module, weight_decay: float, no_decay_first: bool = False) -> list[dict[str, Any]]:
    """SLIP's rule, which open_clip_train's is too: no decay for 0/1-D tensors (biases, norm weights,
    logit_scale, open_clip's class embedding) and any name containing 'bias', 'ln', 'bn' or
    'logit_scale'. Positional and token embeddings and the presets' class token are 2-D/3-D and
    decayed, as in the released models' training. Groups in SLIP's order (decay first), or in
    open_clip_train's (no_decay_first), so each one's optimizer state loads."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups[::-1] if no_decay_first else groups


def build_optimizer(model: nn.Module, lr: float, wd: float, betas: tuple[float, float],
                    eps: float, no_decay_first: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, wd, no_decay_first), lr=lr, betas=tuple(betas), eps=eps)


@dataclass(kw_only=True)
class Trainer:
    """What one epoch needs; `model` is what forward runs on (DDP or bare), `raw_model` the CLIP."""
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any  # a training/loaders.py TrainLoader: batches (images, tokens), report()
    schedule: CosineSchedule
    steps_per_epoch: int
    update_freq: int
    device: torch.device
    amp_dtype: torch.dtype | None  # None: float32
    print_freq: int = 10
    is_main: bool = True
    world_size: int = 1
    writer: Any = None  # TensorBoard SummaryWriter or None
    logit_scale_max: float = LOGIT_SCALE_MAX  # the clamp of the logit-scale parameter after each step
    save_every: int = 0  # --save-every-steps: call on_save after every N optimizer steps inside an epoch
    on_save: Callable[[int, "EpochProgress"], None] | None = None  # (epoch, progress so far); on every rank


@dataclass
class EpochProgress:
    """An epoch part-way: optimizer steps done, this rank's running sums and the seconds spent
    (saved by a mid-epoch checkpoint, so the resumed epoch's log line is the uninterrupted one's)."""
    steps: int
    sums: dict[str, float]  # loss, acc (weighted by samples) and samples
    seconds: float


class MicroStep(NamedTuple):
    loss: torch.Tensor  # scalar, on the device (read at sync points only: no device sync per step)
    acc: torch.Tensor  # in-batch image->text accuracy, percent
    samples: int  # rows of the micro-batch


def micro_step(tr: Trainer, batch, sync: bool, step: int) -> MicroStep:
    """Forward + backward of one micro-batch.
    tokens [b, 77], or [b, T, 77] for LaCLIP-MT (each image with its T texts)."""
    images, tokens = batch
    images = images.to(tr.device, non_blocking=True)  # [b, 3, 224, 224]
    tokens = tokens.to(tr.device, non_blocking=True)  # [b, 77] or [b, T, 77]
    rows, texts = images.shape[0], tokens.shape[1] if tokens.ndim == 3 else 0
    # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation.
    no_sync = getattr(tr.model, "no_sync", None)
    ctx = no_sync() if (no_sync is not None and not sync) else nullcontext()
    with ctx:
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32,
                            enabled=tr.amp_dtype is not None):
            # LaCLIP-MT: one forward encodes every text ([b*T, 77]); each image is encoded once.
            out = embeddings(tr.model(images, tokens.flatten(0, 1) if texts else tokens))
            if texts:
                metrics = multi_text_loss(out["image_embed"], out["text_embed"].unflatten(0, (rows, texts)),
                                          out["logit_scale"])
            else:
                metrics = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])
        tr.scaler.scale(metrics["loss"] / tr.update_freq).backward()
    return MicroStep(metrics["loss"].detach(), metrics["clip_acc"].detach(), rows)


def embeddings(out: dict) -> dict:
    """open_clip models name their outputs image_features/text_features (already normalised; the
    loss normalises again, which leaves them as they are)."""
    if "image_features" in out:
        return {"image_embed": out["image_features"], "text_embed": out["text_features"],
                "logit_scale": out["logit_scale"]}
    return out


def optimizer_step(tr: Trainer) -> None:
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        tr.raw_model.logit_scale.clamp_(0, tr.logit_scale_max)


def train_one_epoch(tr: Trainer, epoch: int, resumed: EpochProgress | None = None) -> dict[str, float]:
    """Run `steps_per_epoch` optimizer steps of `update_freq` micro-batches each (from
    `resumed.steps` on for a mid-epoch resume, whose loader skips the batches already used).

    Batches past steps_per_epoch * update_freq are not used, so no gradient leaks
    into the next epoch. Returns the epoch's statistics, summed over all ranks, with the
    loader's counts of skipped inputs (tr.loader: a training/loaders.py TrainLoader).
    Loss and accuracy are summed on the device and read every --print-freq steps (as open_clip_train
    reads them every --log-every-n-steps), at mid-epoch saves and at the end: a non-finite loss stops
    the run there, before any checkpoint holds its weights.
    """
    tr.model.train()
    first = resumed.steps if resumed else 0
    sums = dict(resumed.sums) if resumed else {"loss": 0.0, "acc": 0.0, "samples": 0.0}
    # Summed in float64 in the order the host summed them, so the epoch's figures are the same.
    running = torch.tensor([sums["loss"], sums["acc"]], dtype=torch.float64, device=tr.device)
    start = time.time() - (resumed.seconds if resumed else 0.0)
    bar = tqdm(total=tr.steps_per_epoch, initial=first, desc=f"epoch {epoch}", disable=not tr.is_main,
               dynamic_ncols=True)
    batches, checked = iter(tr.loader), epoch * tr.steps_per_epoch + first  # first step not yet checked
    for micro in range(first * tr.update_freq, tr.steps_per_epoch * tr.update_freq):
        local_step, sub = divmod(micro, tr.update_freq)
        step = epoch * tr.steps_per_epoch + local_step  # global optimizer step
        if sub == 0:
            for group in tr.optimizer.param_groups:
                group["lr"] = tr.schedule(step)
        last = sub == tr.update_freq - 1
        ms = micro_step(tr, next(batches), last, step)
        running += torch.stack((ms.loss, ms.acc)).double() * ms.samples
        sums["samples"] += ms.samples
        if not last:
            continue
        optimizer_step(tr)
        done = local_step + 1
        save = tr.save_every and tr.on_save and done % tr.save_every == 0 and done < tr.steps_per_epoch
        if save or local_step % tr.print_freq == 0 or done == tr.steps_per_epoch:
            sums["loss"], sums["acc"], loss, acc = torch.cat((running, torch.stack((ms.loss, ms.acc)).double())).tolist()
            _check_finite(sums["loss"], checked, step)
            checked = step + 1
            bar.update(done - bar.n)  # the bar moves at sync points only: a refresh costs ~2 ms
            _show_progress(tr, bar, step, loss, acc, sums["samples"], start)
        if save:
            tr.on_save(epoch, EpochProgress(done, dict(sums), time.time() - start))
    bar.close()
    return _epoch_stats(tr, sums, tr.loader.report(), time.time() - start)


def _check_finite(loss_sum: float, first: int, step: int) -> None:
    if not math.isfinite(loss_sum):
        where = f"at optimizer step {step}" if first == step else f"in optimizer steps {first}..{step}"
        raise FloatingPointError(f"loss is {loss_sum} {where}; stopping. Lower --lr, try --precision amp_bf16 "
                                 "or fp32, or resume from the last checkpoint.")


def _show_progress(tr: Trainer, bar, step: int, loss: float, acc: float, samples: float, start: float) -> None:
    """The progress bar and TensorBoard at a sync point (the last micro-batch's loss and accuracy)."""
    lr = tr.optimizer.param_groups[0]["lr"]
    if tr.writer is not None:
        for key, value in (("train/loss", loss), ("train/clip_acc", acc), ("train/lr", lr),
                           ("train/logit_scale", tr.raw_model.logit_scale.exp().item()),
                           ("train/amp_scale", tr.scaler.get_scale())):
            tr.writer.add_scalar(key, value, step)
    rate = samples * tr.world_size / max(time.time() - start, 1e-9)  # global samples/s
    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.1f}", lr=f"{lr:.2e}", samples_per_s=f"{rate:.1f}")


def _epoch_stats(tr: Trainer, sums: dict[str, float], counts: dict[str, int], seconds: float) -> dict:
    """Summed over ranks; every rank has the same count keys (one data path, same step count)."""
    keys = sorted(counts)
    loss, acc, samples, *totals = all_reduce_sum(
        [sums["loss"], sums["acc"], sums["samples"], *(counts[k] for k in keys)], tr.device)
    return {
        "loss": loss / max(samples, 1),
        "clip_acc": acc / max(samples, 1),
        "lr": tr.optimizer.param_groups[0]["lr"],
        "logit_scale": tr.raw_model.logit_scale.exp().item(),
        "samples": int(samples),
        "samples_per_s": samples / max(seconds, 1e-9),
        "counts": {k: int(v) for k, v in zip(keys, totals)},
    }
