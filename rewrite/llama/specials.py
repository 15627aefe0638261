"""BOS and EOS as a checkpoint's config files state them.

Looked up in order, the first file that names one wins: generation_config.json and
config.json of the checkpoint folder (`bos_token_id`, `eos_token_id`: an id or, for
LLaMA-3 instruct models, a list), then tokenizer_config.json of the checkpoint or
tokenizer folder (`bos_token` / `eos_token`: a token string or {"content": ...}).
Meta's own folders have none of these files: the tokenizer's built-in ids apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .errors import TokenizerError

Special = Union[int, str]  # an id, or a token string the tokenizer still has to look up


@dataclass
class Specials:
    bos: Optional[Special] = None
    eos: list[Special] = field(default_factory=list)
    origin: Optional[str] = None  # the file(s) they came from, for error messages


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return data


def _ids(value: object, path: Path, key: str) -> list[Special]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out: list[Special] = []
    for v in values:
        if isinstance(v, dict):  # tokenizer_config.json's AddedToken form
            v = v.get("content")
        if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
            raise TokenizerError(f"{path}: {key} must be a token id or token string, got {value!r}")
        out.append(v)
    return out


def configured_specials(ckpt_dirs: list[Path], tokenizer_dir: Path) -> Specials:
    """BOS and EOS from the first config files that give them (see the module's docstring)."""
    files: list[tuple[Path, str, str]] = []
    for d in ckpt_dirs:
        for name in ("generation_config.json", "config.json"):
            files.append((d / name, "bos_token_id", "eos_token_id"))
    for d in [*ckpt_dirs, tokenizer_dir]:
        files.append((d / "tokenizer_config.json", "bos_token", "eos_token"))
    found = Specials()
    origins = []
    seen = set()
    for path, bos_key, eos_key in files:
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        data = _read(path)
        bos, eos = _ids(data.get(bos_key), path, bos_key), _ids(data.get(eos_key), path, eos_key)
        if found.bos is None and bos:
            found.bos = bos[0]
            origins.append(str(path))
        if not found.eos and eos:
            found.eos = eos
            origins.append(str(path))
    found.origin = " and ".join(dict.fromkeys(origins)) or None
    return found
