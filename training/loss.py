"""Symmetric InfoNCE (CLIP loss) over the global batch.

Each rank holds b image/text pairs. The embeddings of all W ranks are gathered with
gradients, so every local image is contrasted with all W*b texts and vice versa. Rank r
computes the loss of its own b rows; the labels of those rows are r*b + arange(b).
DDP averages parameter gradients over ranks, which makes the result the gradient of
the mean loss over the global batch, i.e. exactly what one process with the whole
batch would compute (tests/test_train_distributed.py checks this).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.distributed import get_rank, get_world_size

# SLIP/LaCLIP clamp the logit-scale *parameter* to [0, ln 100] after every step, so the
# temperature exp(logit_scale) never exceeds 100: SLIP writes ln 100 out as 4.6052 (the presets
# keep it, as the released models were trained), open_clip_train uses math.log(100).
LOGIT_SCALE_MAX = 4.6052
OPEN_CLIP_LOGIT_SCALE_MAX = math.log(100)


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 that lets gradients flow back to every rank.

    forward:  x [b, E] on each rank -> [W*b, E], rank r's rows at r*b .. (r+1)*b.
    backward: rank s's loss depends on every rank's rows, so the gradient for the
    local rows is the sum over ranks of d loss_s / d x_r: all-reduce, then slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, E] -> [W*b, E]; the identity without a process group."""
    if get_world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


def clip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor,
              logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and in-batch accuracy for local embeddings [b, E] and logit_scale = exp(param).

    Returns {'loss', 'clip_loss', 'clip_acc'}; accuracy (in percent) is image -> text
    over the local rows. Computed in float32 even under autocast: normalisation and
    the softmax over W*b columns are where fp16 loses precision, and a logit near 100
    has an fp16 resolution of 0.06. Casting the inputs is not enough: autocast would
    run the two matrix products in fp16/bf16 again, so it is switched off here.
    """
    with torch.autocast(image_embed.device.type, enabled=False):
        return _clip_loss_fp32(image_embed.float(), text_embed.float(), logit_scale.float())


def _clip_loss_fp32(image_embed: torch.Tensor, text_embed: torch.Tensor,
                    scale: torch.Tensor) -> dict[str, torch.Tensor]:
    image = F.normalize(image_embed, dim=-1)  # [b, E]
    text = F.normalize(text_embed, dim=-1)    # [b, E]
    rows = image.shape[0]
    labels = get_rank() * rows + torch.arange(rows, device=image.device)  # [b]
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)  # [W*b, E]
    logits_per_image = scale * image @ all_text.t()  # [b, W*b]
    logits_per_text = scale * text @ all_image.t()   # [b, W*b]
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        acc = (logits_per_image.argmax(dim=-1) == labels).float().mean() * 100
    return {"loss": loss, "clip_loss": loss.detach(), "clip_acc": acc}


def multi_text_loss(image_embed: torch.Tensor, text_embeds: torch.Tensor,
                    logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """LaCLIP-MT: image_embed [b, E] and the texts of each image text_embeds [b, T, E]
    (original first, then the rewrites). Text slot j of every image forms one CLIP batch:
    clip_loss(images, texts[:, j]), so each image meets its own j-th text against the other
    images' j-th texts; the loss (and accuracy) is the mean over the T slots. T = 1 is clip_loss."""
    parts = [clip_loss(image_embed, text_embeds[:, j], logit_scale) for j in range(text_embeds.shape[1])]
    return {key: torch.stack([p[key] for p in parts]).mean() for key in parts[0]}
