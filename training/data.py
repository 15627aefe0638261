"""Training data: the released caption CSV, its aligned rewrite files, image augmentation.

Format (FORMATS.md section 5): `*_original.csv` rows `image_path,caption`; rows whose
first field is not a .png/.jpg/.jpeg file (a header, say) are not samples. Each
rewrite file holds one caption per line, line k belonging to sample k.

Randomness is keyed, not drawn from global state: the crop and the caption picked for
sample i in epoch e come from a generator seeded with (seed, e, i). The sampler hands
(index, epoch) pairs to the dataset, so this holds in any worker process, for any
number of workers and ranks, and across a resume.
"""
from __future__ import annotations

import csv
import logging
import os
import random
from array import array
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms

from common.images import open_rgb
import models

log = logging.getLogger(__name__)
# The released CSVs' rule: a row is a sample when its first field ends in one of these.
SAMPLE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Give up on a run of this many unreadable images in a row: the --root is wrong, not a file.
MAX_LOAD_ATTEMPTS = 50
# Per worker process and epoch, so one broken shard cannot flood the console.
MAX_LOGGED_FAILURES = 10


class StringTable:
    """Many strings in one utf-8 byte buffer plus end offsets, filled by `append`.

    CC12M has 12M rows x (1 + 4 rewrites) captions; as Python str objects that is
    several GB per process, and DataLoader workers would copy it page by page as
    reference counts change. A bytearray and an int64 array are compact, are filled
    without an intermediate list, and stay shared after fork.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, s: str) -> None:
        self._data += s.encode("utf-8", errors="replace")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._data[start:self._ends[i]].decode("utf-8")


def read_caption_csv(path: str) -> tuple[StringTable, StringTable]:
    """(image paths, captions) of the sample rows of a caption CSV."""
    paths, captions = StringTable(), StringTable()
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if not row or not row[0].lower().endswith(SAMPLE_EXTENSIONS):
                    continue  # header or blank line
                if len(row) < 2:
                    raise ValueError(f"--train-data {path!r}: line {reader.line_num} has an image "
                                     f"path but no caption: {row!r}")
                paths.append(row[0])
                # An unquoted comma splits a caption into several fields; rejoin them.
                captions.append(",".join(row[1:]))
        except csv.Error as err:
            raise ValueError(f"--train-data {path!r}: line {reader.line_num}: {err}") from err
    if not len(paths):
        raise ValueError(f"--train-data {path!r}: no rows whose first field ends in "
                         f"{'/'.join(SAMPLE_EXTENSIONS)}")
    return paths, captions


def read_rewrites(path: str, expected: int, csv_path: str) -> StringTable:
    """One rewrite per line, aligned with the CSV's samples; a count mismatch is an error."""
    table = StringTable()
    # newline="\n": only a line feed ends a line, so a stray carriage return inside a
    # rewrite cannot shift every later line out of alignment.
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            table.append(line.rstrip("\r\n"))
    if len(table) != expected:
        raise ValueError(
            f"--augmented_caption_filelist: {path!r} has {len(table)} lines but "
            f"--train-data {csv_path!r} has {expected} samples; line k must be the rewrite of sample k")
    return table


def usable_rewrite(original: str, rewrite: str) -> str:
    """A rewrite under two words (an empty or missing one included) falls back to the original.
    Words split at any white space (LaCLIP split at ' ', so "word " counted as two)."""
    return rewrite if len(rewrite.split()) >= 2 else original


def pick_caption(original: str, rewrites: Sequence[str], rng: random.Random) -> str:
    """LaCLIP's text augmentation: uniform over the original and its rewrites, one draw of rng."""
    choice = rng.randrange(1 + len(rewrites))
    return original if choice == 0 else usable_rewrite(original, rewrites[choice - 1])


def all_captions(original: str, rewrites: Sequence[str]) -> list[str]:
    """LaCLIP-MT: the original and every rewrite (each with the same fallback), in a fixed order."""
    return [original] + [usable_rewrite(original, r) for r in rewrites]


def keyed_transform(transform: Callable, image: Image.Image, seed: int) -> torch.Tensor:
    """transform(image) with torch's global CPU generator seeded for this call and restored
    after, so the random crop depends on `seed` alone (torchvision's random transforms draw
    from that generator). The CPU generator alone gives the same crop as torch.manual_seed,
    which also seeds every accelerator backend and costs ~0.1 ms a call (this: ~3 us)."""
    generator = torch.default_generator
    state = generator.get_state()
    try:
        generator.manual_seed(seed)
        return transform(image)
    finally:
        generator.set_state(state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one (seed, epoch, sample) triple; train.py also keys (seed, epoch, rank)."""
    # SeedSequence mixes the triple well, so neighbouring indices get unrelated streams.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def train_transform(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """LaCLIP/SLIP training augmentation: RGB PIL image -> [3, 224, 224] normalised."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0)),
        transforms.ToTensor(),
        transforms.Normalize(mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD),
    ])


class CaptionImageDataset(Dataset):
    """Items are (image [3,H,W], tokens [77], failed_loads) for a key (index, epoch).

    `failed_loads` counts the unreadable images skipped to produce this item; it
    travels with the batch so the count survives worker processes and ranks.
    """

    def __init__(self, csv_path: str, root: str, transform: Callable, tokenizer: Callable,
                 rewrite_files: Sequence[str] = (), seed: int = 0, multi_text: bool = False):
        self.multi_text = multi_text  # LaCLIP-MT: tokens [1 + rewrites, 77], every text of the sample
        self.paths, self.captions = read_caption_csv(csv_path)
        self.rewrites = [read_rewrites(p, len(self.paths), csv_path) for p in rewrite_files]
        self.root = root
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self._logged = 0

    def __len__(self) -> int:
        return len(self.paths)

    def pick_caption(self, index: int, rng: random.Random) -> str:
        """Uniform over the original and its rewrites; a pick under two words -> original."""
        return pick_caption(self.captions[index], [r[index] for r in self.rewrites], rng)

    def load_image(self, index: int) -> tuple[Image.Image, int, int]:
        """(RGB image, index actually used, failed loads); skips to the next sample on failure."""
        for attempt in range(min(MAX_LOAD_ATTEMPTS, len(self))):
            used = (index + attempt) % len(self)
            path = os.path.join(self.root, self.paths[used])
            try:
                return open_rgb(path), used, attempt
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # OSError covers missing, truncated and unidentified files.
                if self._logged < MAX_LOGGED_FAILURES:
                    self._logged += 1
                    log.warning("skipping unreadable image %s: %s", path, err)
        raise RuntimeError(f"{min(MAX_LOAD_ATTEMPTS, len(self))} images in a row failed to load, "
                           f"starting at {os.path.join(self.root, self.paths[index])!r}; "
                           f"is --root {self.root!r} right?")

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = random.Random(sample_seed(self.seed, epoch, index))
        image, used, failed = self.load_image(index)
        pixels = keyed_transform(self.transform, image, rng.getrandbits(63))
        # The caption comes from the sample whose image is used, so pairs stay matched.
        if self.multi_text:
            tokens = self.tokenizer(all_captions(self.captions[used], [r[used] for r in self.rewrites]))
        else:
            tokens = self.tokenizer(self.pick_caption(used, rng))
        return pixels, tokens, failed


def check_root(dataset: CaptionImageDataset, probes: int = 100) -> None:
    """Fail at start-up, naming --root, when none of `probes` spread-out image paths exists.

    A wrong --root would otherwise surface as a worker's RuntimeError inside a DataLoader
    traceback after the model is built. Some missing files are normal (dead links in
    CC3M/CC12M) and are skipped during training, so one existing file is enough here.
    """
    n = len(dataset)
    indices = sorted({i * n // min(n, probes) for i in range(min(n, probes))})
    for i in indices:
        if os.path.isfile(os.path.join(dataset.root, dataset.paths[i])):
            return
    example = os.path.join(dataset.root, dataset.paths[indices[0]])
    raise ValueError(f"--root {dataset.root!r}: none of {len(indices)} image paths of the CSV checked "
                     f"there exist (e.g. {example!r}); --root must be the folder the CSV's "
                     f"image paths are relative to")


class EpochSampler(Sampler):
    """DistributedSampler (also for one process) that yields (index, epoch) keys.

    Shuffled by (seed, epoch) like DistributedSampler, padded to a multiple of the
    world size; `set_epoch` must be called before each epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                        shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch  # fixed when iteration starts, as DistributedSampler's shuffle is
        return ((i, epoch) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)
