"""Tiny LLaMA checkpoints in the formats users hold, made with `transformers` (test-only):
Hugging Face folders of LLaMA-1/2/3/3.1-style models (safetensors, sharded or not, or
pytorch_model-*.bin with an index), the same weights as Meta LLaMA-2/3 folders, and
tokenizers: LLaMA-2's SentencePiece conversion as tokenizer.json, a LLaMA-3-like
byte-level BPE tokenizer.json, and that BPE as Meta's LLaMA-3 tiktoken tokenizer.model.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from rewrite.llama.bpe_tokenizer import LLAMA3_SPECIALS, N_LLAMA3_SPECIALS
from rewrite.llama.meta import split_state_dict
from rewrite.llama.rope import interleave_heads

# LLaMA-3.1's RoPE scaling as Meta's code fixes it (what params.json's use_scaled_rope means).
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
STYLES = {  # config differences between the generations, at toy size
    "llama1": {"num_key_value_heads": 4, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "llama2": {"num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5},
    "llama3": {"num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
    "llama31": {"num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                "rope_scaling": LLAMA31_SCALING},
}
# Meta's FFN rule for dim 64, multiple_of 32, ffn_dim_multiplier 1.3: int(1.3 * int(2 * 4 * 64 / 3)) -> 224
META_FFN = {"multiple_of": 32, "ffn_dim_multiplier": 1.3}


def llama_config(style: str, vocab_size: int, bos: int, eos: int, tie: bool = False):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16384, initializer_range=0.15,
                       bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tie, **STYLES[style])


def random_llama(config, seed: int = 0):
    """A LlamaForCausalLM with seeded random weights (norm weights randomised too), eval mode."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def old_style_config(path: Path) -> None:
    """Rewrite config.json as transformers 4 wrote it: rope_theta / rope_scaling at the top level,
    torch_dtype instead of dtype."""
    c = json.loads(path.read_text())
    rope = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rope.pop("rope_theta", 10000.0)
    c["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    c["torch_dtype"] = c.pop("dtype", "float32")
    path.write_text(json.dumps(c, indent=2))


def save_bin_shards(model, out: Path, n_files: int, with_inv_freq: bool = True) -> None:
    """pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json, as transformers 4 saved
    by default; with the rotary inv_freq buffers early LLaMA conversions carried."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if with_inv_freq:
        hd = model.config.hidden_size // model.config.num_attention_heads
        for i in range(model.config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(hd // 2)
    keys = list(state)
    weight_map = {}
    for k in range(n_files):
        name = f"pytorch_model-{k + 1:05d}-of-{n_files:05d}.bin"
        part = {key: state[key] for key in keys[k::n_files]}
        torch.save(part, out / name)
        weight_map.update(dict.fromkeys(part, name))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_hf(model, out: Path, tokenizer_files: Sequence[Path], weights: str = "safetensors",
             max_shard_size: Optional[str] = None, old_config: bool = False) -> Path:
    """save_pretrained (weights 'safetensors') or .bin shards ('bin'), plus the tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size or "5GB")
    if weights == "bin":
        for p in out.glob("model*.safetensors*"):
            p.unlink()
        save_bin_shards(model, out, 3)
    if old_config:
        old_style_config(out / "config.json")
    for f in tokenizer_files:
        (out / f.name).write_bytes(f.read_bytes())
    return out


def meta_state(model) -> dict[str, torch.Tensor]:
    """The weights under Meta's names, q/k rows in Meta's interleaved rotary layout."""
    from rewrite.llama.hf import meta_name
    hd = model.config.hidden_size // model.config.num_attention_heads
    state = {}
    for key, t in model.state_dict().items():
        name = meta_name(key)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = interleave_heads(t, hd)
        state[name] = t.detach().clone()
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return state


def write_meta(model, out: Path, mp: int, params: dict, tokenizer_file: Path, vocab_parallel: bool = False,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """params.json + consolidated.*.pth in mp shards (vocab_parallel: embedding split by rows, LLaMA-3)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    state = {k: v.to(dtype) for k, v in meta_state(model).items()}
    for s, shard in enumerate(split_state_dict(state, mp, vocab_parallel)):
        torch.save(shard, out / f"consolidated.{s:02d}.pth")
    (out / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return out


def sp_tokenizer_json(sp_model: Path, out: Path) -> Path:
    """LLaMA-2's tokenizer.json for a SentencePiece BPE model (the layout of Hugging Face's
    legacy LlamaTokenizerFast conversion: '▁' prepended, byte fallback, merges from the
    vocabulary as transformers derives them), and a tokenizer_config.json naming <s> and </s>."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    tok = Tokenizer(BPE(vocab, generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out / "tokenizer.json"


# LLaMA-3's pre-tokenizer split, as Meta's tokenizer code and Hugging Face's tokenizer.json state it.
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_bpe_tokenizer_json(texts: Sequence[str], vocab_size: int, out: Path) -> Path:
    """A byte-level BPE tokenizer.json laid out like LLaMA-3's (split regex, byte-level, merges
    ignored for whole tokens), trained on texts, with LLaMA-3's 256 special tokens after it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    tok = Tokenizer(BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CL100K_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                               for i in range(2, 2 + N_LLAMA3_SPECIALS - len(LLAMA3_SPECIALS))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def tiktoken_file(tokenizer_json: Path, out: Path) -> Path:
    """Meta's LLaMA-3 tokenizer.model for a byte-level BPE tokenizer.json: each token's bytes in
    base64 and its id as rank (special tokens are not in the file)."""
    from rewrite.llama.bpe_tokenizer import byte_chars
    data = json.loads(tokenizer_json.read_text())
    unbyte = {c: b for b, c in byte_chars().items()}
    lines = [f"{base64.b64encode(bytes(unbyte[c] for c in tok)).decode()} {i}"
             for tok, i in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return out / "tokenizer.model"
