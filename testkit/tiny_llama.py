"""Tiny LLaMA-v1 directories in Meta's on-disk format, for tests, the benchmark and the demo.

`make_tiny_llama` writes tokenizer.model (SentencePiece BPE with byte fallback,
trained on the given texts), params.json and random fp16 weights split into
model-parallel shards exactly like Meta's. `train_tiny_llama` additionally
trains the model for a few hundred CPU steps on in-context rewriting prompts,
so its completions look like a rewrite followed by a newline.
"""
from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import sentencepiece as spm
import torch
import torch.nn.functional as F

from rewrite.llama.meta import split_state_dict
from rewrite.llama.model import ModelArgs, Transformer
from rewrite.llama.rope import rope_frequencies
from rewrite.prompts import build_prompt

PromptFn = Callable[[Sequence[tuple[str, str]], str], str]

# A few alt-text style captions: enough to train a tokenizer for random-weight tests.
TINY_TEXTS = [
    "a photo of a dog running on the beach at sunset",
    "two cats sleeping on a red sofa in the living room",
    "aerial view of the city at night, 2019",
    "person holding a cup of coffee in the morning",
    "old wooden boat tied to the pier",
    "colorful umbrellas hanging over a narrow street",
    "write image captions differently,",
    "            homemade lemon bars => Lemon bars dusted with powdered sugar.",
]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece model set up like LLaMA's: BPE, byte fallback (so '\\n'
    is <0x0A>), identity normalisation, digits split, unk 0 / bos 1 / eos 2, no pad."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    if not lines:
        raise ValueError("make_tiny_llama needs some non-empty texts to train a tokenizer")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return buf.getvalue()


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsplit) float32 weights, scaled so logits are O(1) and greedy choices clear."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.startswith("tok_embeddings"):
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if key.endswith(("wo.weight", "w2.weight")):  # keep the residual stream O(1)
                t /= math.sqrt(2 * args.n_layers)
        state[key] = t
    return state


def write_checkpoint(out_dir: Path, args: ModelArgs, state: dict[str, torch.Tensor], mp: int = 1,
                     dtype: torch.dtype = torch.float16) -> None:
    """params.json (vocab_size -1, as Meta's) and consolidated.00.pth ... split into mp shards."""
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
              "n_layers": args.n_layers, "norm_eps": args.norm_eps, "vocab_size": -1}
    (out_dir / "params.json").write_text(json.dumps(params))
    full = {k: v.detach().to(dtype) for k, v in state.items()}
    full["rope.freqs"] = rope_frequencies(args.head_dim).to(dtype)  # present in Meta's files, unused at inference
    for s, shard in enumerate(split_state_dict(full, mp)):
        torch.save(shard, out_dir / f"consolidated.{s:02d}.pth")


def make_tiny_llama(out_dir: str | Path, texts: Sequence[str], dim: int = 64, n_layers: int = 2,
                    n_heads: int = 4, vocab_size: int = 512, mp: int = 1, seed: int = 0,
                    multiple_of: int = 32, norm_eps: float = 1e-6,
                    state_dict: Optional[dict[str, torch.Tensor]] = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write a LLaMA-v1 directory (tokenizer.model inside it) and return its path.

    state_dict: full float weights to write instead of random ones (their
    vocabulary rows must match the tokenizer trained on `texts`).
    """
    out, args = _start_dir(out_dir, texts, vocab_size, mp, dim=dim, n_layers=n_layers, n_heads=n_heads,
                           multiple_of=multiple_of, norm_eps=norm_eps)
    if state_dict is None:
        state_dict = random_state_dict(args, seed)
    write_checkpoint(out, args, state_dict, mp, dtype)
    return out


def _start_dir(out_dir: str | Path, texts: Sequence[str], vocab_size: int, mp: int,
               **arch: object) -> tuple[Path, ModelArgs]:
    """Create the directory and its tokenizer.model; the model's args with that vocabulary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = train_tokenizer(texts, vocab_size)
    n_words = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    if n_words % mp:  # few texts give fewer pieces than asked; `output` rows must split over mp
        proto = train_tokenizer(texts, n_words - n_words % mp)
        n_words = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    (out / "tokenizer.model").write_bytes(proto)
    return out, ModelArgs(vocab_size=n_words, **arch)


def _documents(pairs: Sequence[tuple[str, str]], n: int, prompt_fn: PromptFn, rng: random.Random) -> list[str]:
    """In-context prompts with 3 examples, each completed by its target and a newline."""
    docs = []
    for _ in range(n):
        *examples, (src, tgt) = rng.sample(list(pairs), 4)
        docs.append(prompt_fn(examples, src) + " " + tgt + "\n")
    return docs


def _next_token_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, T] right-padded with 0 and targets [B, T] shifted by one, -100 where there is none."""
    T = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    return x, y


def train_tiny_llama(out_dir: str | Path, pairs: Sequence[tuple[str, str]], prompt_fn: Optional[PromptFn] = None,
                     dim: int = 64, n_layers: int = 2, n_heads: int = 4, vocab_size: int = 512,
                     steps: int = 300, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                     mp: int = 1, max_len: int = 384, log: Optional[Callable[[str], None]] = None) -> Path:
    """Write a tiny LLaMA directory trained to complete rewriting prompts.

    Next-token training on documents `prompt_fn(3 example pairs, source) + " " + target + "\\n"`
    (prompt_fn defaults to rewrite.prompts.build_prompt, LaCLIP's template), so after ' =>' the model writes a target-like line and then '\\n'.
    Needs >= 4 pairs. With the defaults, ~20 s at one torch thread on a 2-core CPU
    (on a shared machine, torch.set_num_threads(1) avoids multi-thread stalls).
    """
    if len(pairs) < 4:
        raise ValueError(f"train_tiny_llama needs at least 4 (source, target) pairs, got {len(pairs)}")
    prompt_fn = prompt_fn or build_prompt
    rng = random.Random(seed)
    torch.manual_seed(seed)
    out, args = _start_dir(out_dir, _documents(pairs, 64, prompt_fn, rng), vocab_size, mp, dim=dim,
                           n_layers=n_layers, n_heads=n_heads, multiple_of=32)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for step in range(steps):
        seqs = [[sp.bos_id()] + sp.encode(d)[: max_len - 1] for d in _documents(pairs, batch_size, prompt_fn, rng)]
        x, y = _next_token_batch(seqs)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"train_tiny_llama step {step}: loss {loss.item():.3f}")
    write_checkpoint(out, args, model.state_dict(), mp)
    return out
