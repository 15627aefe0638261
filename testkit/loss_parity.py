"""The project's CLIP loss against open_clip.loss.ClipLoss (local loss, features gathered with grad) on
the same features: the largest differences of the loss and of its gradients. Shared by the test
(tests/test_train_open_clip.py) and the bench (bench/bench_open_clip.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.loss import clip_loss

ROWS, DIM = 8, 16  # per process


def features(rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's image and text features [ROWS, DIM] and the logit-scale parameter (float64 draws
    cast to float32, so both losses see the same bits)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    image, text = torch.randn(ROWS, DIM, generator=g), torch.randn(ROWS, DIM, generator=g)
    return image, text, torch.tensor(2.659)


def _loss_and_grads(fn, rank: int, seed: int) -> tuple[float, list[torch.Tensor]]:
    image, text, scale = (t.clone().requires_grad_(True) for t in features(rank, seed))
    # open_clip's model normalises before its loss; the project's loss normalises inside (twice is the same)
    loss = fn(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp())
    loss.backward()
    return loss.item(), [image.grad, text.grad, scale.grad]


def parity(rank: int = 0, world_size: int = 1, seed: int = 0) -> dict[str, float]:
    """{'loss': |ours - open_clip's|, 'grad': largest |difference| of d loss / d (image, text, scale)}."""
    from open_clip.loss import ClipLoss
    theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    ours_loss, ours_grads = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s)["loss"], rank, seed)
    ref_loss, ref_grads = _loss_and_grads(lambda i, t, s: theirs(i, t, s), rank, seed)
    grad = max((a - b).abs().max().item() for a, b in zip(ours_grads, ref_grads))
    return {"loss": abs(ours_loss - ref_loss), "grad": grad, "value": ours_loss}
