"""LLaMA model: checkpoint shapes (LLaMA-1/2/3), RoPE / RMSNorm conventions, cache and padding paths."""
from __future__ import annotations

import math

import pytest
import torch

from rewrite.llama.meta import args_from_params
from rewrite.llama.model import ModelArgs, RMSNorm, Transformer, apply_rope, rope_table
from testkit.tiny_llama import random_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab: int = 97, dtype=torch.float64) -> Transformer:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab, multiple_of=16)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3))
    return model.to(dtype).eval()


def test_7b_shapes_match_meta_keys():
    args = args_from_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                             "norm_eps": 1e-06, "vocab_size": -1}, "params.json")
    args.vocab_size = 32000
    assert args.ffn_hidden == 11008
    with torch.device("meta"):  # no memory: shapes only
        sd = Transformer(args).state_dict()
    assert len(sd) == 3 + 9 * 32
    assert sd["tok_embeddings.weight"].shape == (32000, 4096)
    assert sd["output.weight"].shape == (32000, 4096)
    assert sd["layers.31.feed_forward.w1.weight"].shape == (11008, 4096)
    assert sd["layers.31.feed_forward.w2.weight"].shape == (4096, 11008)
    assert sd["layers.0.attention.wo.weight"].shape == (4096, 4096)
    assert sd["layers.0.ffn_norm.weight"].shape == (4096,)
    n = sum(t.numel() for t in sd.values())
    assert abs(n / 1e9 - 6.74) < 0.01


@pytest.mark.parametrize("params, hidden, billions", [
    # LLaMA-2 70B and LLaMA-3(.1) 8B, as Meta's params.json state them
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
      "n_layers": 80, "norm_eps": 1e-05, "vocab_size": 32000}, 28672, 68.98),
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 14336, 8.03),
])
def test_grouped_query_shapes_from_meta_params(params, hidden, billions):
    args = args_from_params(params, "params.json")
    assert args.ffn_hidden == hidden and args.kv_heads == 8
    with torch.device("meta"):
        sd = Transformer(args).state_dict()
    kv = 8 * args.head_dim
    assert sd["layers.0.attention.wk.weight"].shape == sd["layers.0.attention.wv.weight"].shape == (kv, args.dim)
    assert abs(sum(t.numel() for t in sd.values()) / 1e9 - billions) < 0.01
    with torch.device("meta"):
        half = Transformer(args, model_parallel_size=8).state_dict()  # one key/value head per rank
    assert half["layers.0.attention.wk.weight"].shape == (args.head_dim, args.dim)


def test_model_parallel_shapes_follow_fairscale_split():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=50, multiple_of=32)
    with torch.device("meta"):  # builds without any process group
        full = Transformer(args).state_dict()
        half = Transformer(args, model_parallel_size=2).state_dict()
    assert full.keys() == half.keys()
    for key in ["layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight", "output.weight"]:
        assert half[key].shape == (full[key].shape[0] // 2, full[key].shape[1])
    for key in ["layers.0.attention.wo.weight", "layers.0.feed_forward.w2.weight", "tok_embeddings.weight"]:
        assert half[key].shape == (full[key].shape[0], full[key].shape[1] // 2)
    assert half["norm.weight"].shape == full["norm.weight"].shape


def test_rope_rotates_interleaved_pairs():
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H, D)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got = apply_rope(x, rope_table(12, D, torch.device("cpu"))[pos][:, :, None])
    # Pair j = (x[2j], x[2j+1]) turns by angle pos * 10000^(-2j/D), written out as a 2-d rotation.
    ang = (pos[..., None].float() / 10000.0 ** (torch.arange(0, D, 2).float() / D))[:, :, None]  # [B, T, 1, D/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    want = torch.stack((x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()), -1).flatten(3)
    torch.testing.assert_close(got, want)


def test_rmsnorm_computes_in_float32():
    norm = RMSNorm(16, 1e-6).half()
    x = (torch.randn(3, 16) * 300).half()  # squares overflow fp16
    y = norm(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    torch.testing.assert_close(y, ref)


def test_incremental_cache_matches_full_forward():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        full = model(tokens)  # [B, T, V]
        cache = model.new_cache(2, 12, tokens.device, torch.float64)
        part = [model(tokens[:, :5], cache=cache, start=0)]
        for c in range(5, 9):
            part.append(model(tokens[:, c:c + 1], cache=cache, start=c))
    torch.testing.assert_close(torch.cat(part, dim=1), full)


def test_left_padded_prefill_matches_each_prompt_alone():
    model = tiny_model()
    prompts = [[1, 5, 9, 4, 22, 7], [1, 30], [1, 8, 8, 3]]
    P = max(map(len, prompts))
    tokens = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
    pad = torch.tensor([P - len(p) for p in prompts])
    col = torch.arange(P + 1)
    positions = (col[None] - pad[:, None]).clamp(min=0)
    valid = col[None] >= pad[:, None]
    nxt = torch.tensor([[11], [12], [13]])
    with torch.inference_mode():
        cache = model.new_cache(3, P + 1, tokens.device, torch.float64)
        last = model(tokens, positions[:, :P], valid[:, :P], cache, 0, last_only=True)
        step = model(nxt, positions[:, P:], valid, cache, P, last_only=True)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [11 + i]]))[0]
            assert torch.isfinite(last).all() and torch.isfinite(step).all()
            torch.testing.assert_close(last[i], alone[-2])
            torch.testing.assert_close(step[i], alone[-1])


def test_training_forward_has_gradients():
    model = tiny_model(dtype=torch.float32).train()
    logits = model(torch.randint(0, 97, (2, 6)))
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and math.isfinite(p.grad.norm().item()) for p in model.parameters())
