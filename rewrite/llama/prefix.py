"""Prefix sharing in the prefill: the keys and values of a token prefix that several prompts of a
micro-batch start with are computed once and copied to every row that shares it.

LaCLIP's prompts are a fixed header, three example pairs drawn from a pool of 16, then the
caption: about 85% of each prompt is the example block, so rows whose examples start with
the same pair share the header and that pair. Sharing is decided on token ids (a text
boundary need not be a token boundary), with a prefix tree over the micro-batch's prompts:

- `plan` finds the tree's nodes (a span of tokens that a group of rows shares after its
  parent's span) and keeps those that save at least `min_gain` token computations.
- Nodes are computed level by level, each level in one or a few forward passes: a node's
  parent prefix is copied in, its own span fed. Keys hold RoPE at positions 0, 1, ... of
  the prefix, the same in every row that shares it, so copying them to other columns
  changes nothing.
- Each row then gets its deepest node's keys and values copied to its own columns (rows
  are right-aligned to end at column P), and only the rest of its prompt is prefilled;
  rows are sorted by that rest and fed in chunks of similar length, so padding stays small.

The same tokens at the same positions give the same keys and values whichever way they are
batched, up to floating-point rounding (exact texts in float64, see the tests).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .model import KVCache, Transformer

# What one more forward pass costs, in rows x columns fed: a level of the tree or a chunk of
# rows is worth a pass of its own only when it saves more. For LLaMA-7B on a GPU a pass reads
# the 13.5 GB of weights (~3 ms, about 150 columns of compute) plus ~500 kernel launches.
OVERHEAD = 256


@dataclass(eq=False)
class Node:
    """Tokens [start, end) shared by `rows`, after the parent's [0, start)."""
    start: int
    end: int
    rows: list[int]
    parent: Optional["Node"]
    level: int
    slot: int = -1  # its row in the level's cache, once computed
    offset: int = -1  # the cache column of its token 0
    cache: Optional[KVCache] = field(default=None, repr=False)


@dataclass
class Plan:
    levels: list[list[Node]]  # nodes by depth in the tree
    deepest: list[Optional[Node]]  # per row: the longest shared prefix it can copy

    def shared(self, i: int) -> int:
        node = self.deepest[i]
        return 0 if node is None else node.end

    def permuted(self, order: list[int]) -> "Plan":
        """The plan for the rows reordered as prompts[order[0]], prompts[order[1]], ..."""
        where = {old: new for new, old in enumerate(order)}
        for level in self.levels:
            for n in level:
                n.rows = sorted(where[r] for r in n.rows)
        return Plan(self.levels, [self.deepest[i] for i in order])


def plan(prompts: list[list[int]], min_gain: int = 16, overhead: int = OVERHEAD) -> Plan:
    """The prefix tree's nodes worth computing once. A row shares at most all but its last
    token (its logits need one column of its own). A node is kept when (rows - 1) x span >=
    min_gain (a dropped node's span goes to its children), a level of nodes when together
    they save more than `overhead` (the pass that computes them)."""
    levels: list[list[Node]] = []
    deepest: list[Optional[Node]] = [None] * len(prompts)
    stack: list[tuple[list[int], int, Optional[Node]]] = [(list(range(len(prompts))), 0, None)]
    while stack:
        rows, start, parent = stack.pop()
        first, cap = prompts[rows[0]], min(len(prompts[r]) for r in rows) - 1
        end = start
        while end < cap and all(prompts[r][end] == first[end] for r in rows):
            end += 1
        node = parent
        if len(rows) > 1 and (len(rows) - 1) * (end - start) >= min_gain:
            level = 0 if parent is None else parent.level + 1
            node = Node(start, end, rows, parent, level)
            levels.extend([] for _ in range(level + 1 - len(levels)))
            levels[level].append(node)
            for r in rows:
                deepest[r] = node
            start = end
        groups: dict[int, list[int]] = defaultdict(list)
        for r in rows:
            if len(prompts[r]) - 1 > end:
                groups[prompts[r][end]].append(r)
        stack.extend((g, start, node) for g in groups.values() if len(g) > 1)
    while levels and sum((len(n.rows) - 1) * (n.end - n.start) for n in levels[-1]) <= overhead:
        for n in levels.pop():  # its rows fall back to the parent's prefix
            for r in n.rows:
                deepest[r] = n.parent
    return Plan(levels, deepest)


def chunks(lengths: list[int], overhead: int = OVERHEAD) -> list[tuple[int, int]]:
    """Contiguous chunks [a, b) of rows sorted by length, longest first, each fed as one forward
    pass padded to its first row: the split that minimises the columns fed plus `overhead`
    columns per pass (dynamic programming over the split points)."""
    n = len(lengths)
    best, cut = [0] + [0] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        best[i], cut[i] = min((best[j] + (i - j) * lengths[j] + overhead, j) for j in range(i))
    out, i = [], n
    while i > 0:
        out.append((cut[i], i))
        i = cut[i]
    return out[::-1]


def compute_nodes(model: Transformer, prompts: list[list[int]], p: Plan, device: torch.device,
                  dtype: torch.dtype) -> int:
    """Keys and values of every node, level by level; returns the columns fed (rows x width)."""
    fed = 0
    for level in p.levels:
        level.sort(key=lambda n: n.end - n.start, reverse=True)
        c0 = max(n.start for n in level)
        spans = [n.end - n.start for n in level]
        cache = model.new_cache(len(level), c0 + spans[0], device, dtype)
        pad = torch.tensor([c0 - n.start for n in level], device=device)
        col = torch.arange(c0 + spans[0], device=device)
        positions = (col[None] - pad[:, None]).clamp(min=0)
        key_valid = col[None] >= pad[:, None] if int(pad.max()) > 0 else None
        tokens = torch.zeros(len(level), spans[0], dtype=torch.long)
        for slot, n in enumerate(level):
            n.slot, n.offset, n.cache = slot, c0 - n.start, cache
            tokens[slot, :spans[slot]] = torch.tensor(prompts[n.rows[0]][n.start:n.end])
        _copy_prefixes(cache, [(n.slot, n.offset, n.parent, n.start) for n in level if n.parent], device)
        tokens = tokens.to(device)
        for a, b in chunks(spans):
            view = [(k[a:b], v[a:b]) for k, v in cache]
            model(tokens[a:b, :spans[a]], positions[a:b, c0:c0 + spans[a]],
                  None if key_valid is None else key_valid[a:b, :c0 + spans[a]], view, c0, last_only=True)
            fed += (b - a) * spans[a]
    return fed


def _copy_prefixes(dest: KVCache, items: list[tuple[int, int, Node, int]], device: torch.device) -> None:
    """For each (row, column, node, n): dest[row, :, column:column+n] = node's first n prefix
    columns. One indexed copy per layer and source level cache."""
    by_source: dict[int, list[tuple[int, int, Node, int]]] = defaultdict(list)
    for item in items:
        by_source[id(item[2].cache)].append(item)
    for group in by_source.values():
        rows, cols, slots, src_cols = [], [], [], []
        for row, col, node, n in group:
            rows += [row] * n
            cols += range(col, col + n)
            slots += [node.slot] * n
            src_cols += range(node.offset, node.offset + n)
        r, c, s, sc = (torch.tensor(x, device=device) for x in (rows, cols, slots, src_cols))
        for (k, v), (sk, sv) in zip(dest, group[0][2].cache):
            k[r, :, c] = sk[s, :, sc]
            v[r, :, c] = sv[s, :, sc]


def prefill_shared(model: Transformer, view: KVCache, prompts: list[list[int]], p: Plan, P: int,
                   positions: torch.Tensor, key_valid: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Fill cache columns [0, P) of rows whose prompts end at column P and are sorted by their
    unshared rest, longest first: copy each row's shared prefix, feed the rest in chunks.
    positions / key_valid: the rows' layout. Returns next-token logits [B, V] and columns fed."""
    device, dtype = positions.device, view[0][0].dtype
    fed = compute_nodes(model, prompts, p, device, dtype)
    _copy_prefixes(view, [(i, P - len(q), p.deepest[i], p.shared(i)) for i, q in enumerate(prompts)
                          if p.deepest[i] is not None], device)
    rest = [len(q) - p.shared(i) for i, q in enumerate(prompts)]
    logits = []
    for a, b in chunks(rest):
        w = rest[a]  # the chunk's columns [P - w, P); shorter rests recompute part of their prefix
        tokens = torch.zeros(b - a, w, dtype=torch.long)
        for j, q in enumerate(prompts[a:b]):
            part = q[-w:]
            tokens[j, w - len(part):] = torch.tensor(part)
        sub = [(k[a:b], v[a:b]) for k, v in view]
        logits.append(model(tokens.to(device), positions[a:b, P - w:P],
                            None if key_valid is None else key_valid[a:b, :P], sub, P - w, last_only=True))
        fed += (b - a) * w
    for level in p.levels:  # drop the level caches
        for n in level:
            n.cache = None
    return torch.cat(logits), fed
