"""Tokenizers run by the `tokenizers` library: a Hugging Face tokenizer.json (LLaMA-2's
SentencePiece conversion, LLaMA-3's byte-level BPE) or Meta's LLaMA-3 tokenizer.model.

Meta ships LLaMA-3's tokenizer as a tiktoken rank file: one line per token, its bytes
in base64 and its rank, 128000 lines; the 256 special tokens (<|begin_of_text|> =
128000, ...) and the pre-tokenizer pattern live in Meta's code, not in the file. It is
read here without tiktoken: tiktoken's BPE merges, at each step, the adjacent pair whose
concatenation has the lowest rank, which is a byte-level BPE whose merges are every
split (a, b) of every token into two tokens, in the order of the token's rank.
"""
from __future__ import annotations

import base64
from typing import Optional

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from .errors import TokenizerError
from .specials import Specials
from .sentencepiece_tokenizer import TokenizerBase, is_tiktoken_file

# LLaMA-3's pre-tokenizer split (the cl100k pattern), from Meta's tokenizer code.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# LLaMA-3.1's names for the ids after the 128000 ranks (3.0 names some of them reserved_*).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
N_LLAMA3_SPECIALS = 256
# Built-in BOS / EOS when no config file names them: LLaMA-3's, then SentencePiece's names.
DEFAULT_BOS = ("<|begin_of_text|>", "<s>")
DEFAULT_EOS = (("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), ("</s>",))


def byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (byte-level BPE vocabularies
    spell tokens in it: '\\n' is 'Ċ', ' ' is 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_tiktoken(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as err:
                raise TokenizerError(f"{path} line {n} is not '<base64 token> <rank>': {err}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def tiktoken_tokenizer(path: str) -> HFTokenizer:
    """Meta's LLaMA-3 tokenizer.model as a `tokenizers` byte-level BPE (see the module docstring)."""
    ranks = read_tiktoken(path)
    chars = byte_chars()
    spell = {t: "".join(chars[b] for b in t) for t in ranks}
    merges = sorted((ranks[t], ranks[t[:i]], ranks[t[i:]], spell[t[:i]], spell[t[i:]])
                    for t in ranks for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    # ignore_merges: a piece that is a token is taken whole, as tiktoken does
    tok = HFTokenizer(BPE({spell[t]: r for t, r in ranks.items()}, [(a, b) for *_, a, b in merges],
                          ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in
                               range(2, 2 + N_LLAMA3_SPECIALS - len(LLAMA3_SPECIALS))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return tok


class BPETokenizer(TokenizerBase):
    def __init__(self, path: str, specials: Optional[Specials] = None):
        self.model_path = path
        try:
            self.tok = tiktoken_tokenizer(path) if is_tiktoken_file(path) else HFTokenizer.from_file(path)
        except TokenizerError:
            raise
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise TokenizerError(f"{path} is not a tokenizer.json or a LLaMA-3 tokenizer.model: {err}") from err
        self.n_words = self.tok.get_vocab_size(with_added_tokens=True)
        bos = next((i for i in map(self._token_id, DEFAULT_BOS) if i is not None), None)
        eos = next(([i for i in map(self._token_id, names) if i is not None] for names in DEFAULT_EOS
                    if self._token_id(names[0]) is not None), [])
        specials = specials or Specials()
        if (specials.bos is None and bos is None) or (not specials.eos and not eos):
            raise TokenizerError(f"cannot tell the BOS and EOS tokens of {path}: no config file beside it names "
                                 "them (tokenizer_config.json, config.json) and it has neither <s> / </s> nor "
                                 "<|begin_of_text|> / <|end_of_text|>")
        self._set_specials(specials, bos if bos is not None else -1, eos)
        self._find_newlines()

    def _ids(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids

    def _texts(self) -> list[str]:
        return self.tok.decode_batch([[i] for i in range(self.n_words)], skip_special_tokens=False)

    def _token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
