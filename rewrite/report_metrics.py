"""The metrics of `python -m rewrite.report`, accumulated batch by batch with bounded memory.
Every metric is defined in docs/report.md; the definitions here are the code of those words.

Distinct counts (distinct_2, repeated_rewrites) use a KMV sketch ("k minimum values",
Bar-Yossef et al. 2002) over 64-bit hashes of the strings (pandas.util.hash_array: SipHash
with a fixed key, so runs agree): the k smallest distinct hashes are kept; while fewer than k
distinct strings were seen the count is exact (up to 64-bit hash collisions, ~n^2/2^65), past
that it is estimated as (k - 1) / (k-th smallest hash / 2^64), relative standard error
1/sqrt(k - 2). Memory: 8 bytes x k per counter.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

import numpy as np

from rewrite.prompts import PROMPT_HEAD, one_line

WORD = re.compile(r"[a-z]+")
HIST_MAX = 80  # word-count histograms: the last bin counts rewrites of HIST_MAX words or more
LEAK_MARKS = ("=>", PROMPT_HEAD.strip(" ,\n").lower())  # the prompt's arrow and header


class _Letters(dict):
    """str.translate table: a-z kept, every other character a space, so that
    text.translate(LETTERS).split() == WORD.findall(text) (2-3x faster; a test checks it)."""

    def __missing__(self, code: int) -> int:
        self[code] = value = code if 97 <= code <= 122 else 32
        return value


LETTERS = _Letters()


def words(text: str) -> list[str]:
    """The issue's words: re.findall(r"[a-z]+", text.lower())."""
    return text.lower().translate(LETTERS).split()


def normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def fallback_text(caption: str) -> str:
    """What the rewriter writes when it falls back (rewrite/prompts.py finish_line)."""
    # every white-space character but ' ' is non-printable: such captions need no one_line
    return (caption if caption.isprintable() else one_line(caption)).strip()


def ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


@dataclass
class Column:
    """One batch of texts, tokenised once: lower-cased tokens, words, normalised text."""
    texts: list[str]
    tokens: list[list[str]]
    words: list[list[str]]
    norms: list[str]

    @staticmethod
    def of(texts: list[str]) -> "Column":
        lowered = [t.lower() for t in texts]
        tokens = [t.split() for t in lowered]
        return Column(texts, tokens, [t.translate(LETTERS).split() for t in lowered], [" ".join(t) for t in tokens])

    def bigram_hashes(self) -> np.ndarray:
        """64-bit hashes of every word bigram (hashes of the two tokens mixed; lines never joined)."""
        return self._bigrams()[0]

    def bigram_sets(self) -> tuple[np.ndarray, np.ndarray]:
        """(line, hash) of each line's distinct bigrams, sorted by line then hash."""
        hashes, lines = self._bigrams()
        order = np.lexsort((hashes, lines))
        lines, hashes = lines[order], hashes[order]
        first = np.ones(len(lines), dtype=bool)
        first[1:] = (lines[1:] != lines[:-1]) | (hashes[1:] != hashes[:-1])
        return lines[first], hashes[first]

    def _bigrams(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_cached", None) is None:
            from pandas.util import hash_array
            flat = [w for t in self.tokens for w in t]
            lengths = np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))
            if len(flat) < 2:
                self._cached = (np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64))
                return self._cached
            h = hash_array(np.asarray(flat, dtype=object))
            line_of = np.repeat(np.arange(len(lengths)), lengths)
            same_line = line_of[1:] == line_of[:-1]  # never the pair (last of a line, first of the next)
            with np.errstate(over="ignore"):
                mixed = _mix(h[:-1][same_line] * np.uint64(0x9E3779B97F4A7C15) ^ h[1:][same_line])
            self._cached = (mixed, line_of[:-1][same_line])
        return self._cached


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the combined hash over all 64 bits (KMV needs uniform values)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class DistinctCounter:
    """Distinct strings: exact below k, a KMV estimate above (see the module docstring)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.kept = np.empty(0, dtype=np.uint64)  # sorted, distinct, at most k
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, strings: list[str]) -> None:
        if strings:
            from pandas.util import hash_array
            self.add_hashes(hash_array(np.asarray(strings, dtype=object)))

    def add_hashes(self, hashes: np.ndarray) -> None:
        if len(self.kept) == self.k:  # full: only hashes below the k-th can enter
            hashes = hashes[hashes < self.kept[-1]]
        self.pending.append(hashes)
        self.n_pending += len(hashes)
        if self.n_pending >= max(self.k // 4, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        """kept := the k smallest distinct of kept and pending. Sorting kept (one sorted run) and the
        sorted pending (another) with timsort is a linear merge; np.unique (numpy 2.4 hashes uint64)
        was ~100x slower here."""
        if self.pending:
            merged = np.sort(np.concatenate([self.kept, np.sort(np.concatenate(self.pending))]), kind="stable")
            first = np.empty(len(merged), dtype=bool)
            first[:1] = True
            np.not_equal(merged[1:], merged[:-1], out=first[1:])
            self.kept = merged[first][:self.k]
            self.pending, self.n_pending = [], 0

    def count(self) -> tuple[float, bool]:
        """(distinct strings, exact?)."""
        self._merge()
        if len(self.kept) < self.k:
            return float(len(self.kept)), True
        return (self.k - 1) / ((float(self.kept[-1]) + 1.0) / 2.0 ** 64), False


def histogram(counts: list[int]) -> np.ndarray:
    return np.bincount(np.minimum(np.asarray(counts, dtype=np.int64), HIST_MAX), minlength=HIST_MAX + 1)


@dataclass
class TextStats:
    """Length, distinct bigrams and repeats of one column (the originals, or a mode's rewrites)."""
    k: int
    lines: int = 0
    words: int = 0
    bigrams: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_MAX + 1, dtype=np.int64))

    def __post_init__(self) -> None:
        self.distinct_bigrams = DistinctCounter(self.k)
        self.distinct_texts = DistinctCounter(self.k)

    def add(self, col: Column) -> None:
        self.lines += len(col.texts)
        lengths = [len(w) for w in col.words]
        self.words += sum(lengths)
        self.hist += histogram(lengths)
        grams = col.bigram_hashes()
        self.bigrams += len(grams)
        self.distinct_bigrams.add_hashes(grams)
        self.distinct_texts.add(col.norms)

    def summary(self) -> dict:
        d2, d2_exact = self.distinct_bigrams.count()
        texts, texts_exact = self.distinct_texts.count()
        return {"lines": self.lines, "mean_words": ratio(self.words, self.lines),
                "distinct_2": ratio(d2, self.bigrams), "distinct_2_exact": d2_exact,
                "repeated": ratio(self.lines - texts, self.lines), "repeated_exact": texts_exact,
                "word_count_histogram": self.hist.tolist()}


@dataclass
class ModeStats:
    """One mode's counts over the lines whose caption is not blank."""
    k: int
    targets: frozenset  # normalised targets of the mode's example pool
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("rewritten", "fallbacks", "identical", "empty", "example_copies", "leaked_prompt", "non_printable",
         "novel_words", "original_words", "rewrites_of_blank_captions"), 0))

    def __post_init__(self) -> None:
        self.text = TextStats(self.k)

    def add(self, captions: Column, fallbacks: list[str], col: Column) -> None:
        """Counts of a batch (captions not blank; fallbacks: what a fallback of each would be)."""
        c, targets = self.counts, self.targets
        for rewrite, norm, rw, fallback_of, cap_norm, cw in zip(col.texts, col.norms, col.words, fallbacks,
                                                                captions.norms, captions.words):
            fallback = rewrite == fallback_of
            blank = not norm
            c["rewritten"] += not fallback and not blank
            c["fallbacks"] += fallback
            c["empty"] += blank
            c["identical"] += norm == cap_norm
            c["example_copies"] += norm in targets
            c["leaked_prompt"] += not fallback and any(mark in norm for mark in LEAK_MARKS)
            c["non_printable"] += not rewrite.isprintable() or "\ufffd" in rewrite
            c["original_words"] += len(cw)
            if rw:
                c["novel_words"] += len(rw) - sum(map(set(cw).__contains__, rw))
        self.text.add(col)

    def summary(self, recorded: Optional[dict]) -> dict:
        c, text = self.counts, self.text.summary()
        n = text["lines"]
        return {"lines": n, "rewritten": c["rewritten"], "fallbacks": c["fallbacks"],
                "identical_to_original": ratio(c["identical"], n), "empty": ratio(c["empty"], n),
                "mean_words": text["mean_words"], "mean_words_original": ratio(c["original_words"], n),
                "distinct_2": text["distinct_2"], "distinct_2_exact": text["distinct_2_exact"],
                "example_copies": c["example_copies"],
                "novel_word_rate": ratio(c["novel_words"], self.text.words),
                "leaked_prompt": ratio(c["leaked_prompt"], n), "non_printable": ratio(c["non_printable"], n),
                "repeated_rewrites": text["repeated"], "repeated_rewrites_exact": text["repeated_exact"],
                "rewrites_of_blank_captions": c["rewrites_of_blank_captions"],
                "recorded": recorded, "word_count_histogram": text["word_count_histogram"]}


@dataclass
class BetweenModes:
    """Mean pairwise Jaccard overlap of the word-bigram sets of one caption's rewrites."""
    modes: tuple[str, ...]
    sums: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    no_bigrams: int = 0  # (line, pair) left out: neither rewrite has a bigram
    all_identical: int = 0
    lines: int = 0

    def add(self, columns: dict[str, Column]) -> None:
        """Per line and pair: |A & B| from the (line, hash) pairs the two sets share, vectorised."""
        n = len(columns[self.modes[0]].texts)
        self.lines += n
        self.all_identical += sum(len(set(row)) == 1 for row in zip(*(columns[m].norms for m in self.modes)))
        sets = {m: columns[m].bigram_sets() for m in self.modes}
        for a, b in combinations(self.modes, 2):
            (la, ha), (lb, hb) = sets[a], sets[b]
            lines, hashes = np.concatenate([la, lb]), np.concatenate([ha, hb])
            order = np.lexsort((hashes, lines))
            lines, hashes = lines[order], hashes[order]
            shared = (lines[1:] == lines[:-1]) & (hashes[1:] == hashes[:-1])
            inter = np.bincount(lines[1:][shared], minlength=n)
            union = np.bincount(la, minlength=n) + np.bincount(lb, minlength=n) - inter
            ok = union > 0
            key = f"{a}|{b}"
            self.no_bigrams += int(n - ok.sum())
            self.sums[key] = self.sums.get(key, 0.0) + float(np.sum(inter[ok] / union[ok]))
            self.pairs[key] = self.pairs.get(key, 0) + int(ok.sum())

    def summary(self) -> Optional[dict]:
        if len(self.modes) < 2:
            return None
        keys = [f"{a}|{b}" for a, b in combinations(self.modes, 2)]
        return {"lines": self.lines, "bigram_jaccard": ratio(sum(self.sums.values()), sum(self.pairs.values())),
                "bigram_jaccard_per_pair": {k: ratio(self.sums.get(k, 0.0), self.pairs.get(k, 0)) for k in keys},
                "pairs_without_bigrams": self.no_bigrams, "all_identical": ratio(self.all_identical, self.lines)}


class Reservoir:
    """A uniform random sample of rows (Algorithm R, seeded): the page's table, the images' lines."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng, self.seen, self.rows = size, random.Random(seed), 0, []

    def slot(self) -> Optional[int]:
        """Where the next row goes (rows[slot] = row), or None: it is not kept."""
        self.seen += 1
        if len(self.rows) < self.size:
            self.rows.append(None)
            return len(self.rows) - 1
        j = self.rng.randrange(self.seen)
        return j if j < self.size else None


def sketch_note(k: int) -> dict:
    return {"method": "KMV (k minimum values) over 64-bit hashes (texts: pandas.util.hash_array, SipHash; bigrams: "
                      "the two tokens' hashes mixed with splitmix64); exact while fewer than k distinct values are seen",
            "k": k, "relative_standard_error_when_estimated": 1 / math.sqrt(k - 2)}
