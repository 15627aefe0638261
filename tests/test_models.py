"""CLIP presets match the released checkpoints' keys and shapes, load the released way, and run."""
from __future__ import annotations

import json
import os

import pytest
import torch

import models
from conftest import write_payload_checkpoint

# Every key and shape of the released files (docs/formats.md, "CLIP checkpoints").
MANIFEST = os.path.join(os.path.dirname(__file__), "data", "clip_checkpoint_keys.json")


def manifest() -> dict:
    with open(MANIFEST) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["CLIP_VITS16", "CLIP_VITB16", "CLIP_VITL16"])
def test_preset_keys_and_shapes_equal_manifest(name):
    expected = {k: tuple(v) for k, v in manifest()[name].items()}
    assert models.preset_shapes(name) == expected


def test_released_style_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    src = models.get_model("CLIP_TINY")
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()},
                "best_acc1": 1.0, "args": __import__("argparse").Namespace(model="CLIP_TINY")}, path)
    dst = models.get_model("CLIP_TINY", rand_embed=False)
    models.load_into(dst, models.load_checkpoint_state(str(path)), "CLIP_TINY", str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    bare = tmp_path / "bare.pt"
    torch.save(src.state_dict(), bare)
    assert set(models.load_checkpoint_state(str(bare))) == set(src.state_dict())


def test_mismatched_checkpoint_names_keys_and_preset(tmp_path):
    src = models.get_model("CLIP_TINY").state_dict()
    state = dict(src)
    del state["visual.norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        models.load_into(models.get_model("CLIP_TINY"), state, "CLIP_TINY", path)
    msg = str(err.value)
    assert "visual.norm.weight" in msg and "extra.weight" in msg and path in msg
    with pytest.raises(ValueError, match="try --model CLIP_TINY"):
        with torch.device("meta"):
            target = models.get_model("CLIP_VITS16")
        models.load_into(target, src, "CLIP_VITS16", path)


def test_encode_text_truncation_is_exact():
    """Running only up to the longest <|endoftext|> gives the 77-position result."""
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY").eval()
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, length in enumerate([2, 9, 30]):
        tokens[row, 0] = 49406
        tokens[row, 1:length] = torch.randint(1, 49000, (length - 1,))
        tokens[row, length] = 49407
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        mask = torch.full((77, 77), float("-inf")).triu_(1)
        x = model.ln_final(model.transformer(x, mask))
        full = x[torch.arange(3), tokens.argmax(-1)] @ model.text_projection
        assert torch.allclose(model.encode_text(tokens), full, atol=1e-5)
        # one row alone equals the same row in a batch with longer captions
        assert torch.allclose(model.encode_text(tokens[:1]), full[:1], atol=1e-5)


def test_forward_backward_shapes():
    model = models.get_model("CLIP_TINY")
    out = model(torch.randn(2, 3, 224, 224), torch.tensor([[49406, 320, 49407] + [0] * 74] * 2))
    assert out["image_embed"].shape == (2, 32) and out["text_embed"].shape == (2, 32)
    assert torch.isclose(out["logit_scale"], torch.tensor(1 / 0.07))
    (out["image_embed"] @ out["text_embed"].t()).sum().backward()
    assert model.visual.blocks[0].attn.q_norm.weight.grad is not None
    assert model.transformer.resblocks[0].attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_presets_accept_and_ignore_rand_embed(name):
    """The original eval builds ``getattr(models, name)(rand_embed=False)``."""
    with torch.device("meta"):
        plain = models.get_model(name).state_dict()
        for flag in (False, True):
            shapes = {k: v.shape for k, v in models.get_model(name, rand_embed=flag).state_dict().items()}
            assert shapes == {k: v.shape for k, v in plain.items()}


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="CLIP_VITB16"):
        models.get_model("CLIP_VITB32")


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match="trunc.pt"):
        models.load_checkpoint_state(str(bad))
    with pytest.raises(FileNotFoundError, match="--ckpt-path"):
        models.load_checkpoint_state(str(tmp_path / "missing.pt"))


def test_fp16_checkpoint_loads_into_a_float32_model(tmp_path):
    """An fp16 file (saved after .half()) is cast to the model's dtype by the strict load."""
    torch.manual_seed(0)
    src = models.get_model("CLIP_TINY").half()
    path = tmp_path / "half.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = models.get_model("CLIP_TINY")
    models.load_into(dst, models.load_checkpoint_state(str(path)), "CLIP_TINY", str(path))
    for k, v in dst.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, src.state_dict()[k].float()), k


def test_weights_are_memory_mapped_and_old_format_files_still_load(tmp_path, monkeypatch):
    """Eval maps the file (optimizer state is never read); a pre-zip torch file cannot be
    mapped and is read whole instead."""
    state = models.get_model("CLIP_TINY").state_dict()
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": state, "optimizer": {"state": {}}}, legacy, _use_new_zipfile_serialization=False)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = models.load_checkpoint_state(str(legacy))
    assert calls == [True, None] and set(loaded) == set(state)
    calls.clear()
    current = tmp_path / "zip.pt"
    torch.save({"state_dict": state}, current)
    assert set(models.load_checkpoint_state(str(current))) == set(state) and calls == [True]


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path, legacy):
    marker = tmp_path / "payload_ran"
    path = write_payload_checkpoint(tmp_path / "evil.pt", models.get_model("CLIP_TINY").state_dict(), marker, legacy)
    with pytest.raises(ValueError) as err:
        models.load_checkpoint_state(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--ckpt-path: {path!r}")
    assert "mkdir" in message and "can run code" in message and "--trust-checkpoint" in message
    assert set(models.load_checkpoint_state(path, trust=True)) == set(models.get_model("CLIP_TINY").state_dict())
    assert marker.exists()  # trusted: fully unpickled, as torch.load(weights_only=False) would


def test_released_extras_load_without_trust(tmp_path):
    """argparse.Namespace (LaCLIP/SLIP's args) and torch's version string are plain data."""
    import argparse
    path = tmp_path / "released.pt"
    state = models.get_model("CLIP_TINY").state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(model="CLIP_TINY", betas=(0.9, 0.98)),
                "torch_version": torch.__version__}, path)
    ckpt = models.read_checkpoint(str(path))
    assert ckpt["args"].betas == (0.9, 0.98) and ckpt["torch_version"] == torch.__version__


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module.module.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(prefix):
    """DDP (module.), torch.compile (_orig_mod.) and their combinations."""
    state = models.get_model("CLIP_TINY").state_dict()
    assert models.extract_state_dict({"state_dict": {prefix + k: v for k, v in state.items()}}) .keys() == state.keys()


def test_an_unknown_prefix_is_named(tmp_path):
    state = {"model." + k: v for k, v in models.get_model("CLIP_TINY").state_dict().items()}
    with pytest.raises(ValueError, match="every key of the file starts with 'model.'"):
        models.load_into(models.get_model("CLIP_TINY"), state, "CLIP_TINY", "x.pt")
