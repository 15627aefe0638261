"""A tiny open_clip model config (open_clip's own JSON format: 32 px images, width 32, one layer) and
helpers to run open_clip_train with it, for the tests of train.py's open_clip models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import conftest


def tiny_config(patch: int = 16, width: int = 32) -> dict:
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 16, "patch_size": patch},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def write_tiny_config(folder: Path, name: str = "laclip-tiny-oc", **kwargs) -> str:
    """The config as a JSON file named <name>.json (open_clip registers it under <name>)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(tiny_config(**kwargs)))
    return str(path)


# open_clip_train knows only the configs it ships; this runs its main() after registering ours, as a
# user with a custom config does (open_clip.add_model_config). open_clip_train 3.3.0's shard reader
# (group_by_keys_nothrow) fails on the end-of-shard marker {} that webdataset 1.0 yields (KeyError
# 'fname'); the marker is switched off for it, which is what the webdataset it was written for did.
OPEN_CLIP_TRAIN = ("import sys, functools, open_clip, open_clip_train.data as d, webdataset.tariterators as t; "
                   "d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None); "
                   "open_clip.add_model_config(sys.argv[1]); "
                   "from open_clip_train.main import main; main(sys.argv[2:])")


def run_open_clip_train(config: str, argv: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**conftest.clean_dist_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", OPEN_CLIP_TRAIN, config, *argv], capture_output=True,
                          text=True, env=env, cwd=cwd or os.getcwd(), timeout=600)
