"""In-context rewriting prompts (docs/formats.md, "The rewriting prompt"): example pools, the per-line
seeded choice of examples, the prompt text, its truncation, and how a rewrite is cut
from a completion.

Everything here is pure (no model, no torch) so every model-parallel rank builds the
same prompt for the same line, and tests need no checkpoint.
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

SAMPLE_MODES = ("chatgpt", "bard", "mscoco", "human")
MODE_ALIASES = {"coco": "mscoco"}  # the original code spelled the mode 'coco'
POOL_DIR = Path(__file__).resolve().parent / "pools"
EXAMPLES_PER_PROMPT = 3

# Variable names of the original repository's rewrite/utils.py, read as data.
UTILS_PY_NAMES = {
    "chatgpt": ("chatgpt_source_caption_list", "chatgpt_target_caption_list"),
    "bard": ("bard_source_caption_list", "bard_target_caption_list"),
    "human": ("human_source_caption_list", "human_target_caption_list"),
    "mscoco": ("coco_caption_list",),
}

# The template of docs/formats.md ("The rewriting prompt"); the 12 spaces are part of the format (the
# original indented a triple-quoted string inside a function).
PROMPT_INDENT = " " * 12
PROMPT_HEAD = "write image captions differently,\n\n"
PROMPT_ARROW = " =>"


class TokenizerLike(Protocol):
    bos_id: int

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def normalize_sample_mode(sample_mode: object) -> str:
    mode = str(sample_mode).strip().lower()
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in SAMPLE_MODES:
        choices = ", ".join(SAMPLE_MODES) + " (or coco, an alias of mscoco)"
        raise ValueError(f"--sample_mode {sample_mode!r} is not supported; choose one of: {choices}")
    return mode


def normalize_sample_modes(value: object) -> tuple[str, ...]:
    """'chatgpt,bard' (or the tuple fire makes of it) -> ('chatgpt', 'bard'): each mode once, in the given order."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    modes = tuple(normalize_sample_mode(m) for m in items if str(m).strip())
    if not modes:
        raise ValueError(f"--sample_mode {value!r}: give at least one of {', '.join(SAMPLE_MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--sample_mode {value!r} names a mode twice")
    return modes


@dataclass(frozen=True)
class Pool:
    """Either (source, target) pairs, or groups of captions of one image (the
    MSCOCO way: source and target are two distinct captions of a group)."""
    pairs: tuple[tuple[str, str], ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.pairs) or len(self.groups)

    def digest(self) -> str:
        """Content hash, so a resumed run can tell that the examples changed."""
        body = json.dumps({"pairs": self.pairs, "groups": self.groups}, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def _check_text(value: object, where: str, origin: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{origin}: {where} must be a non-empty string, got {value!r}")
    if "\n" in value or "\r" in value:
        # a line break would shift the prompt's line structure the model imitates
        raise ValueError(f"{origin}: {where} contains a line break: {value!r}")
    return value


def make_pool(pairs: object = None, groups: object = None, origin: str = "pool") -> Pool:
    """Validate raw lists (from JSON or utils.py) into a Pool; `origin` names the
    flag and file in every error."""
    if (pairs is None) == (groups is None):
        raise ValueError(f"{origin}: give exactly one of 'pairs' or 'groups'")
    items = pairs if pairs is not None else groups
    kind = "pairs" if pairs is not None else "groups"
    if not isinstance(items, (list, tuple)) or len(items) < EXAMPLES_PER_PROMPT:
        n = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
        raise ValueError(f"{origin}: '{kind}' needs a list of at least {EXAMPLES_PER_PROMPT} entries, got {n}")
    checked = []
    for k, item in enumerate(items):
        if not isinstance(item, (list, tuple)):
            raise ValueError(f"{origin}: {kind}[{k}] must be a list, got {item!r}")
        if pairs is not None and len(item) != 2:
            raise ValueError(f"{origin}: pairs[{k}] must be [source, target], got {len(item)} items")
        if groups is not None and len(item) < 2:
            raise ValueError(f"{origin}: groups[{k}] needs at least 2 captions, got {len(item)}")
        checked.append(tuple(_check_text(v, f"{kind}[{k}][{j}]", origin) for j, v in enumerate(item)))
    return Pool(pairs=tuple(checked)) if pairs is not None else Pool(groups=tuple(checked))


def _load_json_pool(path: Path, origin: str) -> Pool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{origin}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict) or not ({"pairs", "groups"} & data.keys()):
        raise ValueError(f"{origin}: expected a JSON object with a 'pairs' or a 'groups' list")
    return make_pool(data.get("pairs"), data.get("groups"), origin)


def read_utils_py(path: Path, origin: str) -> dict[str, object]:
    """Top-level `name = <literal>` assignments of a Python file, evaluated with
    ast.literal_eval only: the file is data, never imported or executed."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ValueError(f"{origin}: cannot parse as Python ({e})") from None
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # not a literal: not one of the lists we read
    return found


def _pool_from_utils_py(path: Path, mode: str, origin: str) -> Pool:
    names = UTILS_PY_NAMES[mode]
    found = read_utils_py(path, origin)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{origin}: no literal list named {', '.join(missing)} for --sample_mode {mode}")
    if mode == "mscoco":
        return make_pool(groups=found[names[0]], origin=f"{origin} ({names[0]})")
    sources, targets = found[names[0]], found[names[1]]
    if not isinstance(sources, list) or not isinstance(targets, list) or len(sources) != len(targets):
        raise ValueError(f"{origin}: {names[0]} and {names[1]} must be lists of the same length")
    return make_pool(pairs=[list(p) for p in zip(sources, targets)], origin=f"{origin} ({names[0]})")


def load_pool(sample_mode: str, examples: str | None = None) -> Pool:
    """The shipped pool of a mode, or the user's `--examples` file: JSON
    ({"pairs": ...} or {"groups": ...}, used whatever the mode) or the original
    repository's utils.py (the lists of the chosen mode)."""
    mode = normalize_sample_mode(sample_mode)
    if examples is None:
        path = POOL_DIR / f"{mode}.json"
        return _load_json_pool(path, f"shipped pool {path}")
    path = Path(examples)
    origin = f"--examples {examples}"
    if not path.is_file():
        raise ValueError(f"{origin}: file not found")
    if path.suffix == ".py":
        return _pool_from_utils_py(path, mode, origin)
    return _load_json_pool(path, origin)


class HashDraws:
    """A stream of 64-bit draws from SHA-256 of a key and a counter: stable across
    Python versions, platforms and processes (unlike hash() or random's internals)."""

    def __init__(self, *key: object) -> None:
        self._key = "\x1f".join(str(k) for k in key).encode("utf-8")
        self._counter = 0

    def next_u64(self) -> int:
        digest = hashlib.sha256(self._key + self._counter.to_bytes(8, "little")).digest()
        self._counter += 1
        return int.from_bytes(digest[:8], "little")

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct indices of range(n) (partial Fisher-Yates; the modulo bias of
        a 64-bit draw over a few dozen items is negligible)."""
        order = list(range(n))
        for i in range(k):
            j = i + self.next_u64() % (n - i)
            order[i], order[j] = order[j], order[i]
        return order[:k]


def choose_examples(pool: Pool, seed: int, mode: str, index: int | str) -> list[tuple[str, str]]:
    """The 3 (source, target) examples of input line `index` (a line number of a text
    file, or the sample key of a shard): a function of (seed, mode, index) only, so
    batch size, process count, shard order and resume point do not change them."""
    draws = HashDraws("laclip-rewrite/examples", seed, mode, index)
    chosen = draws.sample(len(pool), EXAMPLES_PER_PROMPT)
    if pool.pairs:
        return [pool.pairs[c] for c in chosen]
    examples = []
    for c in chosen:
        a, b = draws.sample(len(pool.groups[c]), 2)
        examples.append((pool.groups[c][a], pool.groups[c][b]))
    return examples


def sampling_seed(seed: int, mode: str, index: int | str) -> int:
    """The generator seed of input line `index` (line number or sample key; 63 bits: fits torch.manual_seed)."""
    return HashDraws("laclip-rewrite/sampling", seed, mode, index).next_u64() >> 1


def one_line(text: str) -> str:
    """Every white-space character other than ' ' (newline, tab, '\\r', '\\x85',
    '\\u2028', ...) becomes a space: readers that split on any line break keep
    the output aligned with the input."""
    return "".join(" " if c.isspace() and c != " " else c for c in text)


def build_prompt(examples: Sequence[tuple[str, str]], caption: str) -> str:
    body = "".join(f"{PROMPT_INDENT}{s} => {t}\n\n" for s, t in examples)
    return f"{PROMPT_HEAD}{body}{PROMPT_INDENT}{caption}{PROMPT_ARROW}"


def fit_prompt(prompt: str, tokenizer: TokenizerLike, max_seq_len: int) -> tuple[list[int], str, bool]:
    """(tokens with BOS, prompt text, truncated?). A prompt longer than
    max_seq_len - 5 tokens is cut to its first max_seq_len - 10 tokens, decoded,
    and ' =>' appended, as the original did.

    Fixed where that rule broke: with byte fallback a character the vocabulary lacks
    is 2-4 byte pieces, and a cut between them decodes to U+FFFD, which re-encodes
    longer; the original then cut the re-encoded tokens again and lost the ' =>'
    (the model continued the caption instead of rewriting it). Here the cut steps
    back, a token at a time, to the first point whose tokens decode and re-encode to
    themselves (a whole character; every clean cut keeps the original's prompt), and
    the result is checked to fit, so the prompt always ends in the arrow.
    """
    tokens = tokenizer.encode(prompt, bos=True, eos=False)
    if len(tokens) <= max_seq_len - 5:
        return tokens, prompt, False
    kept = tokens[: max_seq_len - 10]
    if kept and kept[0] == tokenizer.bos_id:
        kept = kept[1:]  # SentencePiece drops control ids when decoding anyway
    for n in range(len(kept), -1, -1):
        head = tokenizer.decode(kept[:n])
        if tokenizer.encode(head, bos=False, eos=False) != kept[:n]:
            continue  # a cut inside a character (or a piece that re-encodes otherwise)
        text = head + PROMPT_ARROW
        tokens = tokenizer.encode(text, bos=True, eos=False)
        if len(tokens) <= max_seq_len - 5:
            return tokens, text, True
    raise ValueError(f"max_seq_len {max_seq_len} leaves no room for a prompt")  # unreachable past MIN_ROOM


def longest_prefix_tokens(pool: Pool, tokenizer: TokenizerLike) -> int:
    """Token count of a prompt made of the pool's 3 longest examples and an empty
    caption: the most room examples can take, to check --max_seq_len up front."""
    def n(s: str) -> int:
        return len(tokenizer.encode(s, bos=False, eos=False))

    if pool.pairs:
        best = sorted(pool.pairs, key=lambda p: n(p[0]) + n(p[1]), reverse=True)
    else:
        best = [tuple(sorted(g, key=n, reverse=True)[:2]) for g in pool.groups]
        best.sort(key=lambda p: n(p[0]) + n(p[1]), reverse=True)
    prompt = build_prompt(best[:EXAMPLES_PER_PROMPT], "")
    return len(tokenizer.encode(prompt, bos=True, eos=False))


def cut_rewrite(completion: str) -> str:
    """The rewrite: the completion up to its first newline, cut at any further
    '=>', on one line, stripped."""
    text = completion.split("\n", 1)[0].split("=>", 1)[0]
    return one_line(text).strip()


def is_degenerate(text: str) -> bool:
    """Nothing, or only punctuation, symbols and spaces: no letter or digit."""
    return not any(c.isalnum() for c in text)


def finish_line(caption: str, completion: str) -> tuple[str, bool]:
    """(output line without its newline, fell back to the caption?)."""
    rewrite = cut_rewrite(completion)
    if is_degenerate(rewrite):
        return one_line(caption).strip(), True
    return rewrite, False
