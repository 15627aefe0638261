"""Checks that the tokenizer and the weights speak the same vocabulary, before any rewrite.

- A folder with both ``tokenizer.model`` and ``tokenizer.json`` (Hugging Face folders often
  ship both) is used only if the two agree: the same number of ids, BOS and EOS, and the same
  ids for a fixed probe text. Two files that disagree at the same size give garbage rewrites that
  end "done"; a smaller one fails mid-run on an id it cannot decode. The caller's explicit
  tokenizer path picks one and skips this check.
- The tokenizer's ids must be exactly the embedding rows, with one exception, the known padded
  cases: fine-tunes add a ``<pad>``/``[PAD]`` token after training (32001 rows for LLaMA's
  32000 SentencePiece pieces, the extra token declared only in ``tokenizer.json`` or
  ``added_tokens.json``), and Hugging Face's ``resize_token_embeddings(pad_to_multiple_of=m)``
  or Megatron's vocabulary padding round the rows up to a multiple of 64 or 128. Such rows were
  never trained to be written and no text exists for them: they are accepted with a warning,
  and their logits are set to -inf (a forward hook on the output projection, so no parameter
  changes name), so greedy and sampled decoding never pick one. Any other difference (rows of
  another tokenizer) is refused.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import CheckpointError, TokenizerError
from .sentencepiece_tokenizer import TokenizerBase

# ASCII words, case, digits, punctuation, runs of spaces, a newline, the caption arrow, accents,
# CJK and an emoji: byte fallback, normalisation and merges all show here if two files differ.
PROBE_TEXT = "A photo of 2 dogs,  running FAST => café über\nnaïve 東京 🙂 (x-ray) 'quoted' 3.14%"


def _signature(tok: TokenizerBase) -> tuple:
    return tok.n_words, tok.bos_id, tok.eos_id, tuple(tok.encode(PROBE_TEXT, bos=False, eos=False))


def check_tokenizer_pair(ckpt_dir: str, load: Callable[[str, Optional[str]], TokenizerBase]) -> None:
    """Refuse a folder whose tokenizer.model and tokenizer.json disagree (see the module note)."""
    d = Path(ckpt_dir)
    sp, hf = d / "tokenizer.model", d / "tokenizer.json"
    if not (sp.is_file() and hf.is_file()):
        return
    a, b = _signature(load(str(sp), ckpt_dir)), _signature(load(str(hf), ckpt_dir))
    if a == b:
        return
    if a[0] != b[0]:
        what = f"{a[0]} ids against {b[0]}"
    elif a[1:3] != b[1:3]:
        what = f"BOS/EOS {a[1]}/{a[2]} against {b[1]}/{b[2]}"
    else:
        first = next(i for i, (x, y) in enumerate(zip(a[3], b[3])) if x != y) if any(
            x != y for x, y in zip(a[3], b[3])) else min(len(a[3]), len(b[3]))
        what = (f"the probe text {PROBE_TEXT!r} encodes differently from token {first} on "
                f"({len(a[3])} ids against {len(b[3])})")
    raise TokenizerError(f"{sp} and {hf} disagree ({what}); give the path of the one the weights were "
                         f"trained with")


def _added_ids(folder: Path) -> dict[int, str]:
    """Added tokens declared beside the weights (tokenizer.json's added_tokens, added_tokens.json)."""
    found: dict[int, str] = {}
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        found.update({int(t["id"]): str(t["content"]) for t in data.get("added_tokens", [])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        data = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        found.update({int(i): str(t) for t, i in data.items()})
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return found


PAD_MULTIPLES = (64, 128)


def check_vocab_rows(tokenizer: TokenizerBase, rows: int, where: str, folder: Optional[str] = None) -> None:
    """The tokenizer's ids must be exactly the `rows` of the embedding (`where` names them),
    or a known padding of them (see the module note)."""
    n = tokenizer.n_words
    if n == rows:
        return
    if n > rows:
        raise CheckpointError(f"tokenizer {tokenizer.model_path} has {n} ids but {where} gives vocab_size {rows}")
    added = {i: t for i, t in _added_ids(Path(folder)).items() if i >= n} if folder else {}
    declared = set(added) == set(range(n, rows))
    rounded = any(rows == -(-n // m) * m for m in PAD_MULTIPLES)
    if declared or rounded:
        what = (f"tokens added after training ({', '.join(repr(added[i]) for i in sorted(added)[:3])})"
                if declared else f"padding to a multiple of {next(m for m in PAD_MULTIPLES if rows % m == 0)}")
        warnings.warn(f"{where} has {rows} embedding rows for the {n} ids of {tokenizer.model_path}: rows "
                      f"{n}..{rows - 1} are {what}; they are never generated", stacklevel=2)
        return
    raise CheckpointError(f"tokenizer {tokenizer.model_path} has {n} ids but {where} has {rows} embedding rows, "
                          f"which is no known padding of them (tokens declared added beside the weights, or a "
                          f"multiple of {' or '.join(map(str, PAD_MULTIPLES))}): the weights belong to another "
                          f"tokenizer")


def mask_padded_rows(model: torch.nn.Module, n_words: int) -> None:
    """Logits of ids >= n_words become -inf (no-op when the output has exactly n_words rows)."""
    rows = model.output.weight.shape[0] * getattr(model, "model_parallel_size", 1)
    if rows <= n_words:
        return

    def hook(module, inputs, logits):
        return logits.index_fill(-1, torch.arange(n_words, logits.shape[-1], device=logits.device), float("-inf"))
    model.output.register_forward_hook(hook)
