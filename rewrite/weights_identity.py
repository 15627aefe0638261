"""What identifies the LLaMA weights a rewrite was made with, so that a run is never resumed or
rerun onto other weights of the same shapes (a chat fine-tune beside its base model, a folder
converted again): the config's and tokenizer's content, the weight files' names and sizes, and
a content hash of every weight file made from sampled blocks.

Sampled blocks, not the whole file: hashing 13.5 GB at each start would take a minute or more.
Each file's hash covers its size, its first and last MiB (the format's header, the first and
last tensors) and one 64 KiB block per 64 MiB between them (16 to 1024 blocks, evenly spaced,
placed by the size alone). A fine-tune changes every tensor it trains, and a 64 KiB block of a
trained tensor holds 16-32 thousand of its values, so two full fine-tunes of one base differ in
every block and are told apart with certainty. A change confined to a few tensors (one edited
layer, a LoRA merged into some projections) is caught where a block lands in it: at 7B with
q/v merges, 1 - 0.84^200 of the time, i.e. all but certainly; one edited tensor of 7B's 291 can be
missed. The hash is remembered under the file's stat (common/stat_memo.py) in the user's cache,
so a repeat start reads no weight bytes at all.

A record written before content hashes existed has an identity without "content": it is
accepted when everything else matches, with one note that the content could not be compared
(`check_weights` here; every later comparison of records uses rewrite/units.py's
`same_fingerprint`); records written from then on hold the hashes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from common import storage
from common.stat_memo import StatMemo
from rewrite.shard_input import RUN_RECORD, is_shard_input
from rewrite.units import CONTENT, ResumeError, read_record, record_path, without_content
from rewrite.units_text import existing_parts, mode_output

EDGE = 1 << 20  # bytes hashed at each end of a file
BLOCK = 64 << 10  # bytes per sampled block
BLOCK_EVERY = 64 << 20  # one block per this many bytes of file ...
MIN_BLOCKS, MAX_BLOCKS = 16, 1024  # ... within these bounds
MEMO_NAME = "weight_blocks.jsonl"


def sampled_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes hashed in a file of `size` bytes: the whole of a small file;
    else the first and last MiB and evenly spaced blocks between them, chosen by the size alone."""
    blocks = min(MAX_BLOCKS, max(MIN_BLOCKS, size // BLOCK_EVERY))
    if size <= 2 * EDGE + blocks * BLOCK:
        return [(0, size)]
    room = size - 2 * EDGE - BLOCK
    middle = [(EDGE + room * i // (blocks - 1), BLOCK) for i in range(blocks)]
    return [(0, EDGE), *middle, (size - EDGE, EDGE)]


def sampled_digest(path: str | os.PathLike) -> str:
    """BLAKE2b of the file's size and its sampled spans."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset, length in sampled_spans(size):
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def memo_path() -> Path:
    """$LACLIP_CACHE/weight_blocks.jsonl, by default in $XDG_CACHE_HOME/laclip (~/.cache/laclip)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("LACLIP_CACHE") or os.path.join(base, "laclip")) / MEMO_NAME


def content_hashes(files: list[Path]) -> dict[str, str]:
    """{file name: sampled digest}, remembered by stat; computed afresh where the memo cannot be
    written (a read-only home)."""
    try:
        memo_path().parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # StatMemo then computes every value afresh
    memo = StatMemo(memo_path(), "blake2b_sampled")
    return {path.name: memo.value(path, lambda path=path: sampled_digest(path)) for path in files}


def differing(recorded: dict, now: dict) -> str:
    """What differs between two identities, in the folder's terms."""
    old, new = recorded.get(CONTENT) or {}, now.get(CONTENT) or {}
    names = [n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
    parts = [f"content of {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"] \
        if names and old else []
    what = {"shards": "weight file names or sizes", "weights": "weight file names or sizes", "params": "params.json",
            "config": "config.json", "specials": "generation_config.json / tokenizer_config.json",
            "tokenizer": "the tokenizer"}
    parts += list(dict.fromkeys(w for k, w in what.items() if recorded.get(k) != now.get(k)))
    return ", ".join(parts) or "the checkpoint's identity"


def check_weights(recorded: object, identity: dict, where: str, ckpt_dir: str) -> bool:
    """Refuse other weights than those `where` was made with (naming --ckpt_dir and the files);
    True: the record predates content hashes and matches otherwise (the caller notes it once)."""
    if not isinstance(recorded, dict) or recorded == identity:
        return False
    if CONTENT not in recorded and without_content({"checkpoint": identity})["checkpoint"] == recorded:
        return True
    raise ResumeError(f"--ckpt_dir {ckpt_dir}: its weights are not those {where} was made with (differing: "
                      f"{differing(recorded, identity)}); rerun with the --ckpt_dir it was made with, or pass "
                      "--overwrite to redo it with these")


def recorded_identities(output: Path | str, prompt: object, modes: tuple[str, ...]) -> list[tuple[str, object]]:
    """(where, identity) of what exists of this output: a shard folder's rewrite.json, or each
    mode file's record (or its first unit's). Damaged records are refused by read_record."""
    if is_shard_input(prompt):
        path = storage.join(str(output), RUN_RECORD)
        try:
            record = storage.read_json(path) if storage.exists(path) else {}
        except (storage.NotFound, ValueError):
            return []  # unreadable: check_run_record refuses it, naming the file
        return [(f"the output folder {output}", _identity(record, "settings"))]
    found = []
    for m in modes:
        out = mode_output(Path(output), m, modes)
        record = read_record(record_path(out))
        parts = existing_parts(out) if record is None else []
        record = read_record(record_path(parts[0][0])) if parts else record
        found.append((str(out), _identity(record, "fingerprint", "settings")))
    return found


def _identity(record: object, *keys: str) -> object:
    """record[keys...]["checkpoint"], or None where any level is missing or not an object."""
    for key in (*keys, "checkpoint"):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def check_output_weights(output: Path | str, prompt: object, modes: tuple[str, ...], identity: dict,
                         ckpt_dir: str) -> Optional[str]:
    """Before the plan: this output's existing records must be of these weights (refused naming
    --ckpt_dir otherwise); returns the note for records that predate content hashes, if any."""
    older = [where for where, recorded in recorded_identities(output, prompt, modes)
             if check_weights(recorded, identity, where, ckpt_dir)]
    if not older:
        return None
    return (f"note: {older[0]}{f' (and {len(older) - 1} more)' if len(older) > 1 else ''} was recorded before "
            f"weight contents were hashed: --ckpt_dir {ckpt_dir} has its config, tokenizer and weight file names "
            "and sizes, but the content could not be compared; records written from now on hold its hashes")
