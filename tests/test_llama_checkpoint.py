"""Loading Meta-format directories: every validation error, rope.freqs, shard merge and split."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_sharded_tiny_llamas
from rewrite.launch import choose_mp_size, setup_parallel
from rewrite.llama import CheckpointError, ParallelError, ParallelInfo, TokenizerError, load_generator
from rewrite.llama.checkpoint import load_rank_state
from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama, random_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same weights written as 1, 2 and 4 shards (tokenizer in the 1-shard directory)."""
    return make_sharded_tiny_llamas(tmp_path_factory.mktemp("ckpts"), seed=2)


def load(d, tok=None, parallel=None):
    tok = tok or d / "tokenizer.model"
    return load_generator(str(d), str(tok), 32, 4, parallel or ParallelInfo.single(), dtype=torch.float64)


def test_merged_shards_give_the_same_model(ckpts):
    tokens = torch.tensor([[1, 5, 9, 30, 7, 2]])
    with torch.inference_mode():
        logits = [load(ckpts[mp]).model(tokens) for mp in (1, 2, 4)]
    torch.testing.assert_close(logits[1], logits[0])
    torch.testing.assert_close(logits[2], logits[0])


def test_split_and_merge_give_each_rank_its_part(ckpts):
    # rank r of MP=2 cut from the 1-shard file, and merged from shards 2r, 2r+1 of the 4-shard one,
    # equals shard r of the 2-shard file.
    for r in range(2):
        want = torch.load(ckpts[2] / f"consolidated.{r:02d}.pth")
        for d in (ckpts[1], ckpts[4]):
            got = load_rank_state(str(d), 2, r)
            assert got.keys() == want.keys() - {"rope.freqs"}  # present in the files, never loaded
            for k in got:
                assert torch.equal(got[k], want[k]), (d, r, k)


def test_rope_freqs_is_optional(ckpts, tmp_path):
    d = shutil.copytree(ckpts[1], tmp_path / "c")
    state = torch.load(d / "consolidated.00.pth")
    assert "rope.freqs" in state  # written like Meta's, ignored on load
    del state["rope.freqs"]
    torch.save(state, d / "consolidated.00.pth")
    load(d)


def copy(ckpts, tmp_path, mp=1):
    return shutil.copytree(ckpts[mp], tmp_path / f"c{mp}")


def test_directory_errors(ckpts, tmp_path):
    tok = ckpts[1] / "tokenizer.model"
    with pytest.raises(CheckpointError, match="nowhere is not a directory") as e:  # the engine names no flag
        load(tmp_path / "nowhere", tok)
    assert "--" not in str(e.value)
    d = copy(ckpts, tmp_path)
    (d / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        load(d)
    (d / "params.json").unlink()
    with pytest.raises(CheckpointError, match="has no params.json"):
        load(d)
    d4 = copy(ckpts, tmp_path, 4)
    (d4 / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="missing consolidated.01.pth"):
        load(d4, tok)
    for p in d4.glob("consolidated.*"):
        p.unlink()
    with pytest.raises(ValueError, match="no consolidated"):
        load(d4, tok)


def test_params_with_unknown_keys(ckpts, tmp_path):
    d = copy(ckpts, tmp_path)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "moe_experts": 2}))
    with pytest.raises(ValueError, match="moe_experts"):
        load(d)


def test_tokenizer_errors(ckpts, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at .*missing.model"):
        load(ckpts[1], tmp_path / "missing.model")
    other = make_tiny_llama(tmp_path / "other", TINY_TEXTS[:3], dim=32, n_heads=4, vocab_size=300)
    with pytest.raises(ValueError, match=r"has \d+ pieces but tok_embeddings.weight in .* has \d+ rows") as e:
        load(ckpts[1], other / "tokenizer.model")
    assert "other/tokenizer.model" in str(e.value) and str(ckpts[1]) in str(e.value)


def test_key_errors_list_the_keys(ckpts, tmp_path):
    d = copy(ckpts, tmp_path)
    state = torch.load(d / "consolidated.00.pth")
    del state["layers.1.ffn_norm.weight"]
    state["layers.2.attention.wq.weight"] = state["layers.1.attention.wq.weight"]
    torch.save(state, d / "consolidated.00.pth")
    with pytest.raises(ValueError) as e:
        load(d)
    assert "missing keys ['layers.1.ffn_norm.weight']" in str(e.value)
    assert "unexpected keys ['layers.2.attention.wq.weight']" in str(e.value)


def test_shard_count_must_map_to_model_parallel_size(ckpts, tmp_path):
    d = tmp_path / "mp3"
    d.mkdir()
    for s in range(3):
        shutil.copy(ckpts[1] / "consolidated.00.pth", d / f"consolidated.{s:02d}.pth")
    shutil.copy(ckpts[1] / "params.json", d / "params.json")
    par = ParallelInfo(0, 2, 0, 2, 0, 1, 0, torch.device("cpu"))
    with pytest.raises(ParallelError, match="the 3 shards of .*mp3 cannot be loaded on 2 model-parallel ranks"):
        load(d, ckpts[1] / "tokenizer.model", par)
    with pytest.raises(ValueError, match="--model_parallel_size 2: the 3 shards .* cannot be loaded on 2"):
        choose_mp_size(3, 2, 2)
    with pytest.raises(ValueError, match="--model_parallel_size 3 does not divide the 4 processes"):
        choose_mp_size(3, 4, None)
    assert choose_mp_size(8, 2, None) == 2 and choose_mp_size(1, 4, None) == 1
    assert choose_mp_size(2, 4, 4) == 4


@pytest.mark.parametrize("n_shards, expected", [  # default MP size for worlds of 1, 2, 3, 4, 8, 16 processes
    (1, [1, 1, 1, 1, 1, 1]), (2, [1, 2, None, 2, 2, 2]), (4, [1, 2, None, 4, 4, 4]), (8, [1, 2, None, 4, 8, 8])])
def test_default_model_parallel_size_for_each_shard_count(n_shards, expected):
    """The shard count, or the world size if smaller; None: refused with a clear message."""
    for world, mp in zip((1, 2, 3, 4, 8, 16), expected):
        if mp is None:
            with pytest.raises(ValueError, match="--model_parallel_size"):
                choose_mp_size(n_shards, world, None)
            continue
        assert choose_mp_size(n_shards, world, None) == mp
        # fairscale's groups: arange(world).reshape(dp, mp) rows; ParallelInfo's rank = dp_rank * mp + mp_rank
        grid = torch.arange(world).reshape(world // mp, mp)
        assert all(grid[r // mp, r % mp] == r for r in range(world))
    assert choose_mp_size(2, 1, 1) == 1 and choose_mp_size(2, 3, 1) == 1  # 13B merged: on 1 GPU, 3 DP groups
    assert choose_mp_size(1, 2, 2) == 2 and choose_mp_size(8, 16, 4) == 4  # 7B cut over 2 GPUs; 65B on 4 x 4


def test_setup_parallel_single_process(ckpts, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    info = setup_parallel(str(ckpts[4]), device="cpu")
    assert (info.world_size, info.mp_size, info.dp_size, info.is_writer) == (1, 1, 1, True)
    assert info.device == torch.device("cpu")
    with pytest.raises(ValueError, match="--model_parallel_size 2 needs that many processes"):
        setup_parallel(str(ckpts[1]), model_parallel_size=2)
    with pytest.raises(ValueError, match="--ckpt_dir"):
        setup_parallel(str(ckpts[1] / "nowhere"))


def test_random_weights_are_reproducible():
    from rewrite.llama.model import ModelArgs
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=20, multiple_of=8)
    a, b = random_state_dict(args, 5), random_state_dict(args, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_happens_on_the_target_device(ckpts, monkeypatch):
    """Parts are moved (here to 'meta', standing in for a GPU) before they are concatenated:
    the host never holds a merged copy of the weights."""
    cat_devices = []
    real_cat = torch.cat

    def spy(tensors, *args, **kwargs):
        cat_devices.extend(t.device.type for t in tensors)
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", spy)
    state = load_rank_state(str(ckpts[4]), 1, 0, torch.device("meta"), torch.bfloat16)
    assert cat_devices and set(cat_devices) == {"meta"}
    assert {(t.device.type, t.dtype) for t in state.values()} == {("meta", torch.bfloat16)}
    cut = load_rank_state(str(ckpts[1]), 2, 1, torch.device("meta"), torch.float64)  # split side
    assert {(t.device.type, t.dtype) for t in cut.values()} == {("meta", torch.float64)}
    assert cut["tok_embeddings.weight"].shape[1] == 16 and cut["tok_embeddings.weight"].is_contiguous()


def test_loaded_parameters_are_on_the_device_in_the_dtype(ckpts):
    from rewrite.llama import load_model
    from rewrite.llama.sentencepiece_tokenizer import Tokenizer
    tok = Tokenizer(str(ckpts[1] / "tokenizer.model"))
    model = load_model(str(ckpts[2]), tok, ParallelInfo.single(torch.device("meta")), torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    model = load_model(str(ckpts[2]), tok, ParallelInfo.single(torch.device("cpu")))  # CPU default: float32
    assert {(p.device.type, p.dtype, p.requires_grad) for p in model.parameters()} == {("cpu", torch.float32, False)}


def test_a_mismatched_checkpoint_fails_before_any_copy(ckpts, tmp_path, monkeypatch):
    other = make_tiny_llama(tmp_path / "other", TINY_TEXTS[:3], dim=32, n_heads=4, vocab_size=300)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("merged before validating"))
    with pytest.raises(ValueError, match="pieces but tok_embeddings.weight"):
        load(ckpts[4], other / "tokenizer.model")


def test_a_shard_that_would_run_code_is_refused(ckpts, tmp_path):
    """LLaMA shards hold tensors only: one that pickles a callable is refused before it runs
    (there is no trust flag for shards: Meta's files never need one)."""
    from conftest import Payload
    d = copy(ckpts, tmp_path)
    state = torch.load(d / "consolidated.00.pth", weights_only=True)
    marker = tmp_path / "payload_ran"
    torch.save({**state, "note": Payload(marker)}, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load(d)
    assert not marker.exists()
