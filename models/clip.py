"""CLIP as trained by LaCLIP (SLIP lineage): a timm ViT image tower and OpenAI's text tower.

Parameter names are a contract with the released checkpoints (every key and shape is listed in
``tests/data/clip_checkpoint_keys.json``; docs/formats.md, "CLIP checkpoints"): never rename one.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; the released text towers were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block with OpenAI CLIP's names (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class CLIP(nn.Module):
    """Image tower ``visual`` (any module mapping [B,3,H,W] -> [B,vision_width]) plus OpenAI's text tower."""

    def __init__(
        self,
        embed_dim: int,
        vision_width: int,
        vision_model: nn.Module,
        context_length: int = 77,
        vocab_size: int = 49408,
        transformer_width: int = 512,
        transformer_heads: int = 8,
        transformer_layers: int = 12,
        **kwargs,
    ):
        super().__init__()
        # The original presets take extra flags (rand_embed=...) that do not change the model.
        kwargs.pop("rand_embed", None)
        if kwargs:
            raise TypeError(f"CLIP got unexpected arguments: {sorted(kwargs)}")
        self.context_length = context_length
        self.vision_width = vision_width
        self.visual = vision_model
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.image_projection = nn.Parameter(torch.empty(vision_width, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        # OpenAI CLIP's text-tower initialisation, as SLIP/LaCLIP use it.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, embed_dim] (not normalised)."""
        x = self.visual(image)  # [B, vision_width]: class token after the final norm
        return x @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (L <= context_length, <|endoftext|> = highest id) -> [B, embed_dim]."""
        eot = text.argmax(dim=-1)  # [B]
        # With the causal mask no position after <|endoftext|> can reach its feature, so the
        # batch only needs to run up to its longest caption; this is exact, and 2-5x cheaper
        # for typical captions than all 77 positions.
        length = int(eot.max().item()) + 1
        text = text[:, :length]
        x = self.token_embedding(text) + self.positional_embedding[:length]  # [B, T, W]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, W]
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        # Unnormalised embeddings, SLIP's convention: the loss normalises them.
        return {
            "image_embed": self.encode_image(image),
            "text_embed": self.encode_text(text),
            "logit_scale": self.logit_scale.exp(),
        }


def vit(width: int, depth: int, heads: int, image_size: int = 224, patch_size: int = 16) -> VisionTransformer:
    """timm ViT as in the released checkpoints: qkv bias, per-head q/k LayerNorm, eps 1e-6, no head."""
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        qkv_bias=True,
        qk_norm=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def _place(model: CLIP, device, dtype) -> CLIP:
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def CLIP_VITS16(device=None, dtype=None, **kwargs) -> CLIP:
    # Width 384 with 12 heads (head dim 32), as the released S/16 was trained (sic).
    return _place(CLIP(512, 384, vit(384, 12, 12), **kwargs), device, dtype)


def CLIP_VITB16(device=None, dtype=None, **kwargs) -> CLIP:
    return _place(CLIP(512, 768, vit(768, 12, 12), **kwargs), device, dtype)


def CLIP_VITL16(device=None, dtype=None, **kwargs) -> CLIP:
    return _place(CLIP(512, 1024, vit(1024, 24, 16), **kwargs), device, dtype)


def CLIP_TINY(device=None, dtype=None, **kwargs) -> CLIP:
    """A few-MB model with the same structure, for tests, demos and benchmarks."""
    kwargs.setdefault("transformer_width", 64)
    kwargs.setdefault("transformer_heads", 2)
    kwargs.setdefault("transformer_layers", 2)
    return _place(CLIP(32, 64, vit(64, 2, 2), **kwargs), device, dtype)


PRESETS = {
    "CLIP_TINY": CLIP_TINY,
    "CLIP_VITS16": CLIP_VITS16,
    "CLIP_VITB16": CLIP_VITB16,
    "CLIP_VITL16": CLIP_VITL16,
}


def check_preset(name: str) -> None:
    """``--model`` must name a preset; checked by the scripts before any data or checkpoint is read."""
    if name not in PRESETS:
        raise ValueError(f"--model {name!r} is not a CLIP preset; choose one of {', '.join(PRESETS)}")


def get_model(name: str, **kwargs) -> CLIP:
    check_preset(name)
    return PRESETS[name](**kwargs)

