"""The plan of a rewriting run, on global rank 0 before any weight is loaded: the units of the
caption file or shards (rewrite/units_text.py, rewrite/units_shards.py), leftovers checked against
this run's settings (or removed by --overwrite), and whether anything is left for this run.

A look that needs no settings comes first. A run that finds every unit left held by another live
run ends there, having opened no weight file: its settings would hold the weights' identity
(rewrite/weights_identity.py), whose sampled blocks a machine that never read them has to read.
A finished output is vouched for against that identity before the run says it is complete.
Details: docs/rewriting.md."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from common.distributed import launched_as_rank0
from rewrite.cli_args import Config
from rewrite.shard_input import check_finished, check_overwrite_keeps_one_setting, expand_shards, is_shard_input, \
    shard_stem
from rewrite.units import DONE, FREE, HELD, RunTotals, Units
from rewrite.units_shards import ShardUnits, check_run_record, clear_for_overwrite, shard_output_path
from rewrite.units_text import TextUnits, scan_input

Settings = Callable[[], dict[str, dict]]  # each mode's settings (rewrite/runner.py's settings_fingerprint)


def make_output_folder(out: Path | str) -> None:
    """A local output folder is created; an object-storage prefix needs nothing (no folders there)."""
    if isinstance(out, Path):
        out.mkdir(exist_ok=True)


def plan_units(cfg: Config, modes: tuple[str, ...], make_settings: Settings, dp_size: int) -> tuple[Units, bool]:
    """On global rank 0: the units, with leftovers checked (and removed by --overwrite); False:
    nothing for this run to do. A look that needs no settings comes first: a run that finds every
    unit left held by another live run ends there, before make_settings reads the weights'
    sampled blocks (their identity); a finished output is vouched for against them."""
    if is_shard_input(cfg.prompt_filename):
        return plan_shards(cfg, modes, make_settings)
    info = scan_input(cfg.prompt_filename)
    look = DONE
    if not cfg.overwrite:
        seen = TextUnits(cfg.prompt_filename, cfg.output_filename, info, dict.fromkeys(modes, {}))
        look = seen.look(dp_size)
        if look == HELD:
            return seen, nothing_free(seen, weights_read=False)
    units = TextUnits(cfg.prompt_filename, cfg.output_filename, info,
                      {m: {"input": info.fingerprint(), "settings": s} for m, s in make_settings().items()})
    with units.plan_lock():
        units.plan(dp_size, cfg.overwrite)
    for m in set(units.outputs) - set(units.pending):
        log(f"{units.outputs[m]} is already complete ({info.lines} lines; record {units.outputs[m].name}"
            ".progress.json); nothing to do. Pass --overwrite to redo it.")
    return units, bool(units.pending) and (look == FREE or some_unit_free(units))


def plan_shards(cfg: Config, modes: tuple[str, ...], make_settings: Settings) -> tuple[Units, bool]:
    """plan_units for shard input."""
    shards = expand_shards(cfg.prompt_filename)
    make_output_folder(cfg.output_filename)
    look = None
    if not cfg.overwrite:
        seen = ShardUnits(shards, cfg.output_filename, cfg.text_key, modes, {}, cfg.claim_timeout)
        look = seen.look()
        if look == HELD:
            return seen, nothing_free(seen, weights_read=False)
    settings = make_settings()
    first = next(iter(settings.values()))
    combined = {**first, "sample_mode": list(settings), "examples": {m: s["examples"] for m, s in settings.items()},
                "text_key": cfg.text_key}
    pairs = [(p, shard_output_path(cfg.output_filename, shard_stem(p))) for p in shards]
    if cfg.overwrite:
        check_overwrite_keeps_one_setting(cfg.output_filename, [out for _, out in pairs], combined)
        removed = clear_for_overwrite(cfg.output_filename, [shard_stem(p) for p in shards])
        log(f"--overwrite: removed {removed} finished shards of this input from {cfg.output_filename}")
    check_run_record(cfg.output_filename, combined, cfg.overwrite)
    check_finished(cfg.output_filename, pairs, combined)  # finished only for this input and these settings
    units = ShardUnits(shards, cfg.output_filename, cfg.text_key, modes, combined, cfg.claim_timeout)
    if cfg.overwrite:
        return units, some_unit_free(units)
    return units, look == FREE or nothing_free(units, weights_read=True)  # DONE: every shard was finished


def some_unit_free(units: Units) -> bool:
    """On global rank 0, before any weight is loaded: False (with the summary) when no unit is
    free, each finished or held by another live run, so such a run ends now instead of after
    loading the model. A unit freed after this look is left to a rerun, as a walk that found it
    held would leave it; one found free is claimed by the walk (or by whoever came first)."""
    return units.any_free() or nothing_free(units, weights_read=True)


def nothing_free(units: Units, weights_read: bool) -> bool:
    """The summary of a run with nothing to do (False). weights_read=False: every unit left is
    held by another live run, found before this run read any weight bytes."""
    log("no unit is free (each is finished or held by another live run): nothing for this run to do; "
        "the model is not loaded" + ("" if weights_read else " and no weight file is opened"))
    log(units.conclude(RunTotals(), 0.0))  # also merges a caption file whose units all finished
    return False


def log(*args: object) -> None:
    """A line of the run's own output: printed once, by the launched rank 0."""
    if launched_as_rank0():
        print(*args, flush=True)
