"""Training data: samples of the caption CSV and its rewrite files (training/captions.py),
image augmentation, and the sampler.

Randomness is keyed, not drawn from global state: the crop and the caption picked for
sample i in epoch e come from a generator seeded with (seed, e, i). The sampler hands
(index, epoch) pairs to the dataset, so this holds in any worker process, for any
number of workers and ranks, and across a resume.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms

import models
from common.images import open_rgb
from training.captions import read_caption_csv, read_rewrites

log = logging.getLogger(__name__)
# Give up on a run of this many unreadable images in a row: the --root is wrong, not a file.
MAX_LOAD_ATTEMPTS = 50
# Per worker process and epoch, so one broken shard cannot flood the console.
MAX_LOGGED_FAILURES = 10


def usable_rewrite(original: str, rewrite: str) -> str:
    """A rewrite under two words (an empty or missing one included) falls back to the original.
    Words split at any white space (LaCLIP split at ' ', so "word " counted as two)."""
    return rewrite if len(rewrite.split()) >= 2 else original


def pick_caption(original: str, rewrites: Sequence[str], rng: random.Random,
                 weights: Sequence[float] | None = None) -> str:
    """LaCLIP's text augmentation: uniform over the original and its rewrites, one draw of rng;
    weights (--aug-text-weights: the original's, then each rewrite source's) make it a weighted pick."""
    if weights is None:
        choice = rng.randrange(1 + len(rewrites))
    else:
        choice = rng.choices(range(1 + len(rewrites)), weights=weights)[0]
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
    `notes`: one line per kind of CSV row or rewrite line not read as written.
    """

    def __init__(self, csv_path: str, root: str, transform: Callable, tokenizer: Callable,
                 rewrite_files: Sequence[str] = (), seed: int = 0, multi_text: bool = False,
                 text_weights: Sequence[float] | None = None):
        self.text_weights = text_weights  # --aug-text-weights, None: uniform
        self.multi_text = multi_text  # LaCLIP-MT: tokens [1 + rewrites, 77], every text of the sample
        table = read_caption_csv(csv_path)
        self.paths, self.captions = table.paths, table.captions
        self.notes = [f"--train-data {csv_path!r}: {line}" for line in table.notes]
        self.rewrites = []
        for path in rewrite_files:
            rewrites, notes = read_rewrites(path, len(self.paths), csv_path)
            self.rewrites.append(rewrites)
            self.notes += notes
        self.root = root
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self._logged = 0

    def __len__(self) -> int:
        return len(self.paths)

    def pick_caption(self, index: int, rng: random.Random) -> str:
        """Over the original and its rewrites (uniform or weighted); a pick under two words -> original."""
        return pick_caption(self.captions[index], [r[index] for r in self.rewrites], rng, self.text_weights)

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
        self.skip = 0  # this rank's indices already trained on in the epoch (a mid-epoch resume)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch  # fixed when iteration starts, as DistributedSampler's shuffle is
        return ((i, epoch) for i in itertools.islice(self.inner, self.skip, None))

    def __len__(self) -> int:
        return len(self.inner)
