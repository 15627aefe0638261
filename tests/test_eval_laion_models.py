"""eval_zeroshot_imagenet_laion.py (through models/open_clip_arch.py) builds the three LAION architectures of LaCLIP's released
checkpoints (ViT-B/32, ViT-B/16, ViT-L/14 with QuickGELU) with the keys and shapes of
OpenAI's CLIP layout, which open_clip's training saves; checked on the meta device (no weights),
against shapes written here from the architecture, not taken from open_clip."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU

from models import open_clip_arch as laion

# (image width, layers, patch, embed dim, text width, text layers): CLIP paper, Table 20
ARCHITECTURES = {"ViT-B-32": (768, 12, 32, 512, 512, 12), "ViT-B-16": (768, 12, 16, 512, 512, 12),
                 "ViT-L-14": (1024, 24, 14, 768, 768, 12)}


def blocks(prefix: str, width: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                       p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                       p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                       p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (4 * width, width),
                       p + "mlp.c_fc.bias": (4 * width,), p + "mlp.c_proj.weight": (width, 4 * width),
                       p + "mlp.c_proj.bias": (width,)})
    return shapes


def clip_vit_shapes(width, layers, patch, embed, text_width, text_layers, image=224, vocab=49408, context=77):
    grid = (image // patch) ** 2
    return {"visual.class_embedding": (width,), "visual.positional_embedding": (grid + 1, width),
            "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
            "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,),
            "visual.ln_post.bias": (width,), **blocks("visual.transformer", width, layers),
            "token_embedding.weight": (vocab, text_width), "positional_embedding": (context, text_width),
            **blocks("transformer", text_width, text_layers), "ln_final.weight": (text_width,),
            "ln_final.bias": (text_width,), "text_projection": (text_width, embed), "logit_scale": ()}


@pytest.mark.parametrize("name, quickgelu", [("ViT-B-32", False), ("ViT-B-16", False), ("ViT-L-14", True)])
def test_released_architectures_have_the_checkpoint_layout(name, quickgelu):
    model = laion.create(name, quickgelu, device="meta").model
    assert next(model.parameters()).device.type == "meta"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == clip_vit_shapes(*ARCHITECTURES[name])
    activations = {type(m.mlp[1]) for m in model.visual.transformer.resblocks} | \
                  {type(m.mlp[1]) for m in model.transformer.resblocks}
    assert (activations == {QuickGELU}) == quickgelu


def test_vit_l_14_without_quickgelu_is_noted_and_mismatches_are_named():
    assert "--quickgelu" in laion.quickgelu_note("ViT-L-14", False)
    assert laion.quickgelu_note("ViT-L-14", True) is None
    assert laion.quickgelu_note("ViT-L-14-quickgelu", False) is None
    assert laion.quickgelu_note("ViT-B-16", False) is None
    b16 = laion.create("ViT-B-16", False, device="meta").model
    l14_file = {"visual.conv1.weight": torch.empty(1024, 3, 14, 14, device="meta")}
    assert "fits ViT-L-14: try --model ViT-L-14 --quickgelu" in laion.patch_size_hint(b16, l14_file)
    b32_file = {"visual.conv1.weight": torch.empty(768, 3, 32, 32, device="meta")}
    assert "fits ViT-B-32: try --model ViT-B-32" in laion.patch_size_hint(b16, b32_file)
