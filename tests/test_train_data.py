"""Caption CSV + rewrite files, caption picking, corrupt-image skipping (training/data.py)."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from train_fixtures import make_train_data
from training.captions import read_caption_csv
from training.data import CaptionImageDataset, EpochSampler, check_root, sample_seed, train_transform


def fake_tokenizer(text: str) -> torch.Tensor:
    return torch.tensor([len(text)])


def dataset(data, aug: bool = True, seed: int = 0) -> CaptionImageDataset:
    return CaptionImageDataset(data["csv"], data["root"], train_transform(), fake_tokenizer,
                               data["rewrites"] if aug else [], seed=seed)


def test_csv_rows_header_quotes_and_extensions(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('filepath,title\n'
                    'a/1.jpg,"a cat, sitting ""on"" a mat"\n'
                    'a/2.PNG,plain caption\n'
                    'notes.txt,not a sample\n'
                    '\n'
                    'a/3.jpeg,unquoted, comma\n')
    table = read_caption_csv(str(path))
    paths, captions = table.paths, table.captions
    assert [paths[i] for i in range(len(paths))] == ["a/1.jpg", "a/2.PNG", "a/3.jpeg"]
    assert captions[0] == 'a cat, sitting "on" a mat'
    assert captions[1] == "plain caption"
    assert captions[2] == "unquoted, comma"


def test_caption_picks_are_uniform_with_one_word_fallback(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=2))
    draws = 6000
    # Sample 1: original + two usable rewrites -> each about a third.
    counts = Counter(ds.pick_caption(1, random.Random(s)) for s in range(draws))
    assert set(counts) == {ds.captions[1], "rewrite 1 of sample 1", "rewrite 2 of sample 1"}
    # Fixed seeds make this deterministic; the band is +-6 standard deviations (sd ~ 36.5).
    assert all(abs(c - draws / 3) < 220 for c in counts.values()), counts
    # Sample 0: rewrite 2 is one word, so its third goes to the original.
    counts = Counter(ds.pick_caption(0, random.Random(s)) for s in range(draws))
    assert "single" not in counts
    assert abs(counts[ds.captions[0]] - 2 * draws / 3) < 220, counts
    assert abs(counts["rewrite 1 of sample 0"] - draws / 3) < 220, counts


def test_items_are_keyed_by_seed_epoch_and_index(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=4))
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 224, 224) and a[2] == 0
    assert not torch.equal(ds[(2, 6)][0], a[0])  # another epoch, another crop
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    ds[(1, 0)]
    assert torch.equal(torch.rand(1), before)  # global RNG untouched


def test_without_aug_text_only_the_original_is_used(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=2), aug=False)
    assert {ds.pick_caption(1, random.Random(s)) for s in range(50)} == {ds.captions[1]}


def test_misaligned_rewrite_file_names_file_and_counts(tmp_path):
    data = make_train_data(tmp_path, n=5)
    with open(data["rewrites"][1], "a") as f:
        f.write("one line too many\n")
    with pytest.raises(ValueError) as err:
        dataset(data)
    msg = str(err.value)
    assert data["rewrites"][1] in msg and "6 lines" in msg and "5 samples" in msg


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=6, corrupt=(2,), missing=(3,)))
    image, used, failed = ds.load_image(2)
    assert (used, failed) == (4, 2)  # 2 corrupt, 3 missing -> 4
    _, _, failed = ds[(2, 0)]
    assert failed == 2
    assert ds[(1, 0)][2] == 0
    # Sample 2 is replaced by sample 4 image *and* caption: same item as key (4, e) but for RNG.
    assert ds.pick_caption(4, random.Random(0)) in {ds.captions[4], "rewrite 1 of sample 4",
                                                     "rewrite 2 of sample 4"}


def test_all_images_unreadable_is_an_error_naming_root(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=3, missing=(0, 1, 2)))
    with pytest.raises(RuntimeError, match="--root"):
        ds[(0, 0)]


def test_sampler_shards_and_reshuffles(tmp_path):
    ds = dataset(make_train_data(tmp_path, n=8))
    shards = [EpochSampler(ds, 2, r, seed=0) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    keys = [k for s in shards for k in s]
    assert sorted(i for i, _ in keys) == list(range(8)) and {e for _, e in keys} == {3}
    single = EpochSampler(ds, 1, 0, seed=0)
    single.set_epoch(0)
    first = [i for i, _ in single]
    single.set_epoch(1)
    assert first != [i for i, _ in single]


def test_crop_equals_a_globally_seeded_transform(tmp_path):
    """Seeding only the CPU generator (the fast path) gives the crop torch.manual_seed gives."""
    ds = dataset(make_train_data(tmp_path, n=4))
    pixels, _, _ = ds[(3, 2)]
    rng = random.Random(sample_seed(0, 2, 3))
    image, _, _ = ds.load_image(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        expected = train_transform()(image)
    assert torch.equal(pixels, expected)


def test_check_root_needs_one_existing_image(tmp_path):
    data = make_train_data(tmp_path, n=6, missing=(0, 1, 2, 3))
    check_root(dataset(data))  # dead links are normal: two of six present is fine
    data["root"] = str(tmp_path)  # one level too high: no path resolves
    with pytest.raises(ValueError, match=r"--root .*none of 6 image paths.*sub/img_0\.JPG"):
        check_root(dataset(data))


def rows(path) -> list[tuple[str, str]]:
    table = read_caption_csv(str(path))
    return [(table.paths[i], table.captions[i]) for i in range(len(table.paths))]


def test_unclosed_quote_stops_naming_the_csv_and_line(tmp_path):
    """24 rows, one caption opening a quote it never closes: csv would read 3 samples."""
    data = make_train_data(tmp_path, n=24)
    csv_path = tmp_path / "train.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    lines[3] = 'sub/img_2.png,"a caption that opens a quote\n'
    csv_path.write_text("".join(lines))
    with pytest.raises(ValueError) as err:  # with rewrite files: the CSV is to blame, not them
        dataset(data)
    message = str(err.value)
    assert message.startswith(f"--train-data {str(csv_path)!r}: the row at line 4 runs over") and "quote" in message


def test_bom_latin1_spaces_and_other_extensions(tmp_path):
    """A byte-order mark, Windows-1252 bytes, spaces around a path and a .webp image are all
    read as meant, and counted in the report."""
    path = tmp_path / "c.csv"
    path.write_bytes(b"\xef\xbb\xbfa/1.jpg,first\r\n"
                     b"a/2.jpg ,caf\xe9 au lait \x96 \x93quoted\x94\r\n"
                     b"  a/3.webp,\xc3\xa9t\xc3\xa9 in UTF-8\r\n"
                     b"a/4.png,mixed \xc3\xa9 and \xe9\r\n")
    assert rows(path) == [("a/1.jpg", "first"), ("a/2.jpg", "caf\u00e9 au lait \u2013 \u201cquoted\u201d"),
                          ("a/3.webp", "\u00e9t\u00e9 in UTF-8"), ("a/4.png", "mixed \u00e9 and \u00e9")]
    report = " ".join(read_caption_csv(str(path)).notes)
    assert "2 captions not UTF-8, read as Windows-1252 (line 2, line 4)" in report
    assert "2 image paths with surrounding spaces, removed (line 2, line 3)" in report


def test_dropped_rows_are_counted_with_the_reason(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("filepath,title\na/1.jpg,ok\nnotes.txt,not an image\n\na/2.gifv,odd\na/3.png,ok\n")
    assert [p for p, _ in rows(path)] == ["a/1.jpg", "a/3.png"]
    report = " ".join(read_caption_csv(str(path)).notes)
    assert "1 header row skipped (line 1: 'filepath')" in report
    assert "2 rows skipped: the first field is not an image file name (line 3: 'notes.txt', line 5: 'a/2.gifv')" in report
    assert "1 blank line skipped" in report


def test_latin1_rewrite_file_is_read_and_counted(tmp_path):
    data = make_train_data(tmp_path, n=2)
    Path(data["rewrites"][0]).write_bytes(b"a caf\xe9 scene\nsecond rewrite\n")
    ds = dataset(data)
    assert ds.rewrites[0][0] == "a caf\u00e9 scene"
    assert any("1 line not UTF-8, read as Windows-1252 (line 1)" in note for note in ds.notes)
