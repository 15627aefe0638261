"""Shared fixtures: everything a test needs is made here, offline, on the CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Two cores are shared by the whole suite; more threads only thrash.
torch.set_num_threads(min(2, torch.get_num_threads()))


def write_image(path: str, seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> str:
    """A random image file in the given PIL mode (format from the extension)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_imagenet(root, folders, per_class: int) -> str:
    """``<root>/val/<folder>/img_<i>.png`` random images; returns the root."""
    for c, folder in enumerate(folders):
        d = os.path.join(root, "val", folder)
        os.makedirs(d)
        for i in range(per_class):
            write_image(os.path.join(d, f"img_{i}.png"), seed=100 * c + i)
    return str(root)


@pytest.fixture
def make_imagenet(tmp_path):
    """Build ``<root>/val/<folder>/*.png``; returns the root. Folders are WordNet IDs unless given."""

    def make(folders=("n01440764", "n02102040", "n03000684"), per_class: int = 3, name: str = "imagenet"):
        return write_imagenet(tmp_path / name, folders, per_class)

    return make


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_open_clip(tmp_path):
    """A tiny open_clip model registered as 'LaCLIP-test-tiny' and its checkpoint as open_clip's
    training writes it: (path, model, preprocess)."""
    import open_clip
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "LaCLIP-test-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("LaCLIP-test-tiny", pretrained=None)
    path = tmp_path / "laion_tiny.pt"
    torch.save({"epoch": 32, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path), model.eval(), preprocess


def unwritable_dir(tmp_path) -> Path:
    """A folder this process cannot create files in: a read-only one, or for root (whom
    permissions do not stop) /sys/kernel, where nobody can create a file."""
    folder = Path(tmp_path) / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        if candidate.is_dir() and not _can_create(candidate):
            return candidate
    pytest.skip("no folder here refuses writes to this user")


def _can_create(folder: Path) -> bool:
    try:
        (folder / "laclip-probe").touch()
    except OSError:
        return False
    (folder / "laclip-probe").unlink()
    return True


class Payload:
    """Unpickling this calls os.mkdir(marker): what a checkpoint built to run code can do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_payload_checkpoint(path, state: dict, marker, legacy: bool = False) -> str:
    """A released-style checkpoint (state_dict with `module.`) that also carries a Payload."""
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}, "note": Payload(marker)},
               path, _use_new_zipfile_serialization=not legacy)
    return str(path)


# torchrun's variables: a subprocess without them runs as one process.
DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    """An in-process entry point runs as one process: no torchrun variables, no webdataset worker split."""
    for key in (*DIST_ENV_KEYS, "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(key, raising=False)


def clean_dist_env() -> dict[str, str]:
    """The environment without torchrun's variables (so an entry point runs as one process)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: a second thread gains nothing on
    such sizes, and on two shared cores it can stall the whole run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A small (source, target) pool shared by the rewrite tests.
REWRITE_PAIRS = [["a dog on grass", "A dog lies on the grass."], ["red car", "A red car parks."],
                 ["city at night", "The city glows at night."], ["a cat", "A cat sleeps."]]


def make_sharded_tiny_llamas(root, seed: int) -> dict:
    """The same tiny LLaMA weights in Meta's format as 1, 2 and 4 shards: {1: <root>/mp1, 2: ..., 4: ...}."""
    from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama
    one = make_tiny_llama(root / "mp1", TINY_TEXTS, dim=32, n_heads=4, seed=seed)
    state = {k: v.float() for k, v in torch.load(one / "consolidated.00.pth").items() if k != "rope.freqs"}
    return {1: one, **{mp: make_tiny_llama(root / f"mp{mp}", TINY_TEXTS, dim=32, n_heads=4, mp=mp, state_dict=state)
                       for mp in (2, 4)}}


def make_tiny_rewrite_setup(root, captions, pairs) -> dict:
    """A tiny LLaMA whose tokenizer knows the test's captions and pool, plus the pool as JSON:
    the flags a rewrite test passes (--ckpt_dir, --tokenizer_path, --examples)."""
    import json

    from testkit.tiny_llama import make_tiny_llama
    texts = list(captions) + [s for p in pairs for s in p] + ["write image captions differently, =>"]
    ckpt = make_tiny_llama(root / "tiny", texts, dim=32, n_layers=1, n_heads=2, vocab_size=300)
    examples = root / "pool.json"
    examples.write_text(json.dumps({"pairs": pairs}))
    return {"ckpt_dir": str(ckpt), "tokenizer_path": str(ckpt / "tokenizer.model"), "examples": str(examples)}


def one_line_error(capsys) -> str:
    """The one line a rewriting run wrote besides its progress bar (tqdm's updates end in '\r' or '\n')."""
    import re
    err = capsys.readouterr().err
    lines = [part for part in re.split(r"[\r\n]", err) if part.strip() and not re.search(r"\d+%\|", part)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def interrupt_at_window(monkeypatch, windows: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """`error` (Ctrl-C by default) when the rewriting engine is asked for window number `windows`
    (counted from 0, over modes)."""
    from rewrite import runner
    real, calls = runner.rewrite_window, {"n": 0}

    def wrapped(*args, **kwargs):
        if calls["n"] == windows:
            raise error()
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "rewrite_window", wrapped)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session, the environment pointed at it
    (AWS_ENDPOINT_URL, fake credentials), so s3:// URLs work in-process and in child processes."""
    from testkit.s3server import running_s3_server
    with running_s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new empty bucket on the session's S3 server; returns its name."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The rewriter remembers weight hashes in $LACLIP_CACHE (default ~/.cache/laclip): a folder
    of the session's here (child processes inherit it), not the user's cache."""
    old = os.environ.get("LACLIP_CACHE")
    os.environ["LACLIP_CACHE"] = str(tmp_path_factory.mktemp("laclip_cache"))
    yield
    if old is None:
        os.environ.pop("LACLIP_CACHE", None)
    else:
        os.environ["LACLIP_CACHE"] = old
