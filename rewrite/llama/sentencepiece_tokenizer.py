"""LLaMA tokenizers behind one interface: SentencePiece `tokenizer.model` (LLaMA-1/2) here, and
through the `tokenizers` library a Hugging Face `tokenizer.json` or Meta's LLaMA-3
`tokenizer.model` (a tiktoken rank file) in bpe_tokenizer.py; formats.load_tokenizer picks one.

Every tokenizer exposes: n_words, bos_id, eos_id (the one `encode(eos=True)` appends),
eos_ids (every id that ends a text: LLaMA-3 has several), newline_ids (every token
whose text holds a '\\n', found by decoding each id: byte-level BPE merges '\\n' with
other characters, as in '.\\n') and newline_kept (those of them with text before the
newline, which a rewrite must keep). BOS/EOS come from the checkpoint's config
(generation_config.json, config.json, tokenizer_config.json) where it has one.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from sentencepiece import SentencePieceProcessor

from .errors import TokenizerError
from .specials import Special, Specials

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+")


class TokenizerBase:
    """What the engine and the prompts use; subclasses set the ids and implement the codec."""
    model_path: str
    n_words: int
    bos_id: int
    eos_id: int
    eos_ids: frozenset[int]
    pad_id: int = -1
    newline_ids: frozenset[int] = frozenset()
    newline_kept: frozenset[int] = frozenset()

    def _ids(self, s: str) -> list[int]:
        raise NotImplementedError

    def _texts(self) -> list[str]:
        """The text of each id decoded alone."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = self._ids(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _find_newlines(self) -> None:
        texts = self._texts()
        self.newline_ids = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        self.newline_kept = frozenset(i for i in self.newline_ids if texts[i].split("\n", 1)[0])

    def _token_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def _set_specials(self, specials: Specials, default_bos: int, default_eos: list[int]) -> None:
        bos = default_bos if specials.bos is None else self._resolve(specials.bos, specials)
        eos = [self._resolve(e, specials) for e in specials.eos] or default_eos
        self.bos_id, self.eos_id, self.eos_ids = bos, eos[0], frozenset(eos)

    def _resolve(self, value: Special, specials: Specials) -> int:
        i = self._token_id(value) if isinstance(value, str) else value
        if i is None:
            raise TokenizerError(f"{specials.origin} names the token {value!r}, which {self.model_path} lacks")
        if not 0 <= i < self.n_words:
            raise TokenizerError(f"{specials.origin} gives special id {i}, outside the "
                                 f"{self.n_words} ids of {self.model_path}")
        return i


class Tokenizer(TokenizerBase):
    """SentencePiece as LLaMA-1/2 use it (BPE, byte fallback, bos 1, eos 2, no pad)."""

    def __init__(self, model_path: str, specials: Optional[Specials] = None):
        if not os.path.isfile(model_path):
            raise TokenizerError(f"no SentencePiece model at {model_path}")
        self.model_path = model_path
        try:
            self.sp = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{model_path} is not a SentencePiece model "
                                 f"(LLaMA's tokenizer.model): {err}") from err
        self.n_words: int = self.sp.vocab_size()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA: there is no pad piece
        specials = specials or Specials()
        self._set_specials(specials, self.sp.bos_id(), [self.sp.eos_id()])
        for i in (self.bos_id, *self.eos_ids):
            if not self.sp.is_control(i):  # e.g. an early conversion's config naming <unk> as BOS
                raise TokenizerError(f"{specials.origin} gives special id {i}, which is "
                                     f"{self.sp.id_to_piece(i)!r} in {model_path}, not a control piece")
        self._find_newlines()  # with byte fallback: the byte piece <0x0A> alone

    def _ids(self, s: str) -> list[int]:
        return self.sp.encode(s)

    def _texts(self) -> list[str]:
        return self.sp.decode([[i] for i in range(self.n_words)])

    def _token_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def is_tiktoken_file(path: str) -> bool:
    """Meta's LLaMA-3 tokenizer.model: text lines '<base64 token> <rank>' (SentencePiece is binary)."""
    with open(path, "rb") as f:
        first = f.readline().strip()
    return bool(_TIKTOKEN_LINE.fullmatch(first))
