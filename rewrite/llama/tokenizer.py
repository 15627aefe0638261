"""SentencePiece tokenizer as LLaMA-v1 uses it (BPE, byte fallback, bos 1, eos 2, pad -1)."""
from __future__ import annotations

import os
from typing import Optional

from sentencepiece import SentencePieceProcessor

from .errors import TokenizerError


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise TokenizerError(f"no SentencePiece model at {model_path}")
        self.model_path = model_path
        try:
            self.sp = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{model_path} is not a SentencePiece model "
                             f"(LLaMA's tokenizer.model): {err}") from err
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA: there is no pad piece
        # With byte fallback '\n' is always the byte piece <0x0A>; the rewrite ends there.
        nl = self.sp.piece_to_id("<0x0A>")
        self.newline_id: Optional[int] = nl if self.sp.id_to_piece(nl) == "<0x0A>" else None

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))
