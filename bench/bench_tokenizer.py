"""Throughput of our CLIP tokenizer against open_clip's SimpleTokenizer.

    python -m bench.bench_tokenizer            # 100k captions
    python -m bench.bench_tokenizer --n 20000 --repeats 1

Both tokenizers get the same seeded synthetic alt-text captions and are called
the same way, in two modes:
  single: `tok(caption)` once per caption, as a training Dataset does;
  batch:  `tok(list_of_captions)` in lists of --batch, as zero-shot eval does.
Each repeat builds fresh tokenizers, so both start with empty caches (the
first epoch's cost); the best repeat counts. Time is this process's CPU time
(both tokenizers are single-threaded), so other jobs on shared cores skew the
ratio less than wall-clock time would. Outputs are compared id for id.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Callable

import torch

from tokenizer import SimpleTokenizer

NOUNS = (
    "dog cat puppy kitten horse bird eagle owl fish shark whale bear lion tiger "
    "woman man girl boy child baby family couple bride groom chef doctor student "
    "house building church castle bridge tower skyline street road highway car "
    "truck bicycle motorcycle train airplane boat ship beach ocean lake river "
    "mountain forest tree flower rose garden park field desert sunset sunrise sky "
    "cloud rain snow winter summer autumn spring kitchen bedroom bathroom sofa "
    "table chair lamp window door wall floor roof fence pizza burger salad cake "
    "coffee tea wine beer bottle glass cup plate bowl phone laptop camera guitar "
    "piano book map flag logo icon pattern texture background portrait landscape "
    "dress shirt jacket shoes hat sunglasses necklace ring watch bag wedding "
    "party concert festival stadium football basketball soccer player team fans"
).split()
ADJECTIVES = (
    "red blue green yellow orange purple pink black white gray brown golden "
    "silver old new small large tiny huge beautiful cute happy young elderly "
    "modern vintage rustic abstract colorful bright dark sunny foggy snowy wet "
    "wooden metal glass plastic handmade traditional famous empty crowded quiet "
    "seamless isolated aerial close-up panoramic smiling funny elegant luxury"
).split()
VERBS = (
    "sitting standing walking running playing eating drinking holding wearing "
    "looking smiling jumping swimming flying driving riding reading cooking "
    "posing dancing singing sleeping waiting climbing painting"
).split()
PREPS = "on in at near under over behind beside with against across along".split()
CITIES = "Paris,London,Tokyo,New York,Berlin,Sydney,Chicago,Rome,Toronto,Seattle".split(",")
MONTHS = "January February March April May June July August September October".split()
SUFFIXES = [
    " - stock photo", " | Getty Images", " stock vector", " - royalty free image",
    " : Stock Photo", " (1920x1080)", "...", "!", "?", ";-)",
]
# Non-ASCII and HTML-escaped pieces real alt text carries; they route captions
# through ftfy (the slow path), so their share matters to the result.
EXOTIC = [
    "café", "José", "München", "naïve", "Ångström", "São Paulo", "Zürich",
    "\u201cquoted\u201d", "it\u2019s", "\u2014", "\u00a9 2019", "\U0001f60d",
    "\U0001f436\U0001f431", "\u6771\u4eac\u30bf\u30ef\u30fc", "\uc11c\uc6b8",
    "&amp;", "&quot;hello&quot;", "&amp;amp;", "&#39;s", "\ufb01sh",
]
SYLLABLES = "ka lo mi ra ten shi vor ble an qu ix zel dor pra ment ico lux ber".split()


def _names(rng: random.Random, count: int) -> list[str]:
    """Made-up brand and person names: rare words that force real BPE work."""
    return [
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
        for _ in range(count)
    ]


def _caption(rng: random.Random, names: list[str]) -> str:
    a, n, v, p = rng.choice, NOUNS, VERBS, PREPS
    kind = rng.random()
    if kind < 0.35:
        text = f"a {a(ADJECTIVES)} {a(n)} {a(v)} {a(p)} the {a(ADJECTIVES)} {a(n)}"
    elif kind < 0.5:
        text = f"{a(names)} {a(names)} attends the {a(names)} {a(n)} at {a(CITIES)} on " \
               f"{a(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2023)} in {a(CITIES)}."
    elif kind < 0.62:
        text = f"{a(ADJECTIVES)} {a(n)} isolated on white background"
    elif kind < 0.72:
        text = f"vector illustration of {a(ADJECTIVES)} {a(n)}s and {a(n)}s, {a(names)} style"
    elif kind < 0.8:
        text = f"{rng.randint(2, 12)} {a(n)}s {a(p)} a {a(n)}'s {a(n)} - they're {a(v)}"
    elif kind < 0.86:
        text = f"IMG_{rng.randint(1000, 9999)}.JPG {a(n)} {a(names)}"
    elif kind < 0.93:
        text = f"close-up of {a(ADJECTIVES)} {a(n)} {a(v)}, {a(ADJECTIVES)} {a(n)} in the {a(n)}"
    else:
        text = " ".join(_caption(rng, names) for _ in range(rng.randint(3, 6)))
    if rng.random() < 0.3:
        text = text.title()
    if rng.random() < 0.08:
        text = f"{text} {a(EXOTIC)}"
    if rng.random() < 0.01:
        text = text.replace(" ", "\t", 1) + "\n"
    return text + (a(SUFFIXES) if rng.random() < 0.3 else "")


def make_captions(n: int, seed: int = 0) -> list[str]:
    """`n` seeded alt-text style captions; the same list for the same (n, seed)."""
    rng = random.Random(seed)
    names = _names(rng, 3000)
    return [_caption(rng, names) for _ in range(n)]


def _time(run: Callable[[], list[torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    start = time.process_time()
    out = run()
    return time.process_time() - start, out


def _modes(tok: Callable, captions: list[str], batch: int) -> dict[str, Callable]:
    return {
        "single": lambda: [tok(c) for c in captions],
        "batch": lambda: [tok(captions[i : i + batch]) for i in range(0, len(captions), batch)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of captions")
    parser.add_argument("--batch", type=int, default=1000, help="captions per call in batch mode")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many cold runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.repeats < 1:
        parser.error("--n, --batch and --repeats must be >= 1")

    from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

    captions = make_captions(args.n, args.seed)
    non_ascii = sum(not c.isascii() for c in captions)
    print(f"{args.n} captions (seed {args.seed}), {non_ascii} non-ASCII, "
          f"{sum(len(c) for c in captions) / args.n:.0f} chars on average; "
          f"torch threads {torch.get_num_threads()}")
    for mode in ("single", "batch"):
        best = {"ours": float("inf"), "open_clip": float("inf")}
        outputs = {}
        for _ in range(args.repeats):
            for name, cls in (("open_clip", OpenClipTokenizer), ("ours", SimpleTokenizer)):
                seconds, outputs[name] = _time(_modes(cls(), captions, args.batch)[mode])
                best[name] = min(best[name], seconds)
        # open_clip gives [1, 77] for one str; ours gives [77].
        same = all(torch.equal(a.reshape(b.shape), b)
                   for a, b in zip(outputs["open_clip"], outputs["ours"]))
        rate = {k: args.n / v for k, v in best.items()}
        print(f"{mode:6s}: ours {rate['ours']:10,.0f} captions/s | open_clip "
              f"{rate['open_clip']:9,.0f} captions/s | ratio {rate['ours'] / rate['open_clip']:5.1f}x"
              f" | ids equal: {same}")


if __name__ == "__main__":
    main()
