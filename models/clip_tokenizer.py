"""CLIP byte-pair-encoding tokenizer, id for id the same as OpenAI CLIP's.

The vocabulary is the merge list OpenAI ships (`bpe_simple_vocab_16e6.txt.gz`):
256 byte symbols, the same 256 with the end-of-word marker `</w>`, 48894 merges,
then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408 ids in all.

Pipeline for one caption (as in OpenAI's `clip/simple_tokenizer.py`):
  ftfy.fix_text -> html.unescape twice -> fold white space -> lower case
  -> split with `WORD_PATTERN` -> utf-8 bytes as printable symbols -> BPE -> ids.

Rewritten for speed, not behaviour: plain ASCII captions skip ftfy (it provably
leaves them alone, see `clean_text`), and every space-separated chunk of a
cleaned caption is cached with its final ids, so a repeated word costs one dict
lookup instead of a regex scan, a byte translation, BPE and a vocabulary lookup.
"""

from __future__ import annotations

import gzip
import html
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence, Union

import ftfy
import numpy as np
import regex
import torch

# The merge list stays at the repository root, where the original LaCLIP layout keeps it.
DEFAULT_BPE_PATH = Path(__file__).resolve().parents[1] / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header).
NUM_MERGES = 49152 - 256 - 2

# OpenAI's word splitter. The two special tokens come first, so a caption that
# literally contains "<|endoftext|>" gets the real end-of-text id (open_clip
# instead lists "<start_of_text>"/"<end_of_text>" here; we follow OpenAI).
WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)

# Bound on each cache so a long training run cannot grow memory without limit;
# on overflow the cache is emptied and refills with the words seen next.
MAX_CACHE_ENTRIES = 1 << 18

TextInput = Union[str, Sequence[str]]


def byte_symbols() -> dict[int, str]:
    """The printable character that stands for each byte value 0..255.

    Bytes that are already visible, non-space Latin-1 characters stand for
    themselves; the other 68 bytes take the code points 256, 257, ... in byte
    order, so no BPE symbol is white space or a control character. The dict's
    order (visible bytes first, then the others) is the vocabulary's order.
    """
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = sorted(set(range(256)) - set(visible))
    table = {b: chr(b) for b in visible}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _fold(text: str) -> str:
    # str.split() and OpenAI's regex `\s+` disagree only on U+001C..U+001F:
    # not printable (so never on the ASCII shortcut), removed by ftfy, and
    # never produced by html.unescape (it maps &#28; etc. to ''), so this
    # equals OpenAI's re.sub(r"\s+", " ") + strip.
    return " ".join(text.split()).lower()


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ftfy, double HTML unescape, white space fold, lower.

    Shortcut: for text made only of printable ASCII (U+0020..U+007E) without
    '&', every ftfy step is the identity (entities need '&', mojibake and
    quote/width/ligature fixes need non-ASCII, terminal escapes and control
    characters need bytes below 0x20 or 0x7F, NFC leaves ASCII alone), and
    html.unescape returns text without '&' unchanged. Tabs and newlines take
    the full path. tests/test_tokenizer.py checks both paths against open_clip.
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return _fold(text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _fold(text)


class _Cache(dict):
    """dict that computes a missing entry with `fill`, bounded in size.

    `dict.__getitem__` calls `__missing__` from C, so a hit costs no Python frame.
    """

    def __init__(self, fill: Callable[[str], tuple[int, ...]], seed: dict) -> None:
        super().__init__(seed)
        self._fill = fill
        self._seed = dict(seed)

    def __missing__(self, key: str) -> tuple[int, ...]:
        if len(self) >= MAX_CACHE_ENTRIES:
            self.clear()
            self.update(self._seed)
        value = self._fill(key)
        self[key] = value
        return value


class SimpleTokenizer:
    """CLIP's BPE tokenizer: `tokenizer(text)` -> LongTensor [77],
    `tokenizer(list_of_texts)` -> LongTensor [N, 77]."""

    def __init__(
        self,
        bpe_path: Union[str, Path, None] = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: expected {NUM_MERGES} merge lines 'a b'")

        to_symbol = byte_symbols()
        symbols = list(to_symbol.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols]
        vocab += [a + b for a, b in merges]
        vocab += [SOT_TEXT, EOT_TEXT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}

        self.vocab_size = len(vocab)
        self.sot_token = self.encoder[SOT_TEXT]
        self.eot_token = self.encoder[EOT_TEXT]
        self.context_length = context_length

        # Byte -> symbol via latin-1 (code point == byte value) and str.translate.
        self._to_symbols = to_symbol
        self._from_symbols = {ord(s): b for b, s in to_symbol.items()}

        # Special tokens are pre-seeded like OpenAI's BPE cache, so they map to
        # their own id instead of being split into byte symbols.
        specials = {SOT_TEXT: (self.sot_token,), EOT_TEXT: (self.eot_token,)}
        self._word_ids = _Cache(self._bpe_ids, specials)
        self._chunk_ids = _Cache(self._split_chunk, {})

    # -- encoding ---------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one word, lowest merge rank first."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(parts) > 1:
            best_rank, best = NUM_MERGES, -1
            for i in range(len(parts) - 1):
                rank = ranks.get((parts[i], parts[i + 1]), NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, i
            if best < 0:
                break
            first, second = parts[best], parts[best + 1]
            merged, i = [], 0
            # Merge every occurrence of the pair, left to right, non-overlapping.
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        symbols = word.encode("utf-8").decode("latin-1").translate(self._to_symbols)
        return tuple(self.encoder[p] for p in self.bpe(symbols))

    def _split_chunk(self, chunk: str) -> tuple[int, ...]:
        # Regex matches never contain white space, so splitting a cleaned
        # caption at spaces first and scanning each chunk on its own finds
        # exactly the words that scanning the whole caption would.
        words = WORD_PATTERN.findall(chunk)
        return tuple(chain.from_iterable(map(self._word_ids.__getitem__, words)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens."""
        cleaned = clean_text(text)
        if not cleaned:
            return []
        chunks = cleaned.split(" ")
        return list(chain.from_iterable(map(self._chunk_ids.__getitem__, chunks)))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; an end of word becomes a space (OpenAI's convention)."""
        symbols = "".join([self.decoder[int(i)] for i in ids])
        raw = symbols.translate(self._from_symbols).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    # -- batching ---------------------------------------------------------

    def _fill(self, row: np.ndarray, text: str) -> None:
        """Write [sot] + ids + [eot] into a zeroed row; when too long, cut it
        to the row's length and keep eot as the last token."""
        length = row.shape[0]
        ids = [self.sot_token, *self.encode(text), self.eot_token]
        if len(ids) > length:
            ids = ids[:length]
            ids[-1] = self.eot_token
        row[: len(ids)] = ids

    def __call__(self, texts: TextInput, context_length: int | None = None) -> torch.Tensor:
        """A str gives a LongTensor [context_length]; a sequence of str gives
        [N, context_length] (N = 1 included), zero padded."""
        length = self.context_length if context_length is None else context_length
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")
        # One numpy buffer, then a zero-copy tensor: cheaper than torch.tensor
        # per row (about 1 us against 5 us for a 77-id row).
        if isinstance(texts, str):
            out = np.zeros(length, dtype=np.int64)
            self._fill(out, texts)
        else:
            out = np.zeros((len(texts), length), dtype=np.int64)
            for row, text in zip(out, texts):
                self._fill(row, text)
        return torch.from_numpy(out)
