"""tasks.data: transforms, caption cleaning, caption datasets with bad images, webdataset shards, mixing, sampling."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tasks.data import (
    CLIP_MEAN,
    CLIP_STD,
    BadSample,
    CaptionDataset,
    MixedDataset,
    MixedIterableDataset,
    ResumableDistributedSampler,
    SkipCounter,
    TooManyBadSamples,
    WebCaptionDataset,
    clean_caption,
    clean_question,
    collate,
    eval_transform,
    track,
    train_transform,
)
from tasks.data.captions import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    load_image,
    require_usable,
    set_max_image_pixels,
)
from tests.data_helpers import jpeg_bytes, write_caption_dataset, write_shards

# ----------------------------------------------------------------------------------------------- transforms


def _expected_constant(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD, strict=True)])


def test_eval_transform_shape_normalization_and_determinism():
    rgb = (200, 100, 50)
    out = eval_transform(224)(Image.new("RGB", (300, 170), rgb))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # a constant image stays constant under bicubic resizing: every pixel is the normalized colour
    torch.testing.assert_close(out.mean(dim=(1, 2)), _expected_constant(rgb), atol=1e-4, rtol=0)
    assert out.std(dim=(1, 2)).max() < 1e-4

    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    torch.testing.assert_close(eval_transform(224)(noisy), eval_transform(224)(noisy), atol=0, rtol=0)
    # squashed to a square, not cropped: the left column of the output comes from the left of the input
    left_half = Image.fromarray(np.concatenate([np.zeros((50, 50, 3)), np.full((50, 50, 3), 255)], 1).astype(np.uint8))
    out = eval_transform(32)(left_half)
    assert out[:, :, 0].mean() < 0 < out[:, :, -1].mean()


def test_train_transform_shape_normalization_and_randomness():
    rgb = (10, 120, 240)
    out = train_transform(224)(Image.new("RGB", (320, 240), rgb))
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out.mean(dim=(1, 2)), _expected_constant(rgb), atol=1e-4, rtol=0)

    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    transform = train_transform(64)
    torch.manual_seed(5)
    a = transform(noisy)
    torch.manual_seed(5)
    b = transform(noisy)
    c = transform(noisy)
    assert a.shape == (3, 64, 64)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # torch's generator drives the randomness
    assert not torch.equal(a, c)


def test_train_transform_without_flip_keeps_left_and_right_and_without_crop_the_whole_image():
    """`data.hflip: false` / `data.min_scale: 1.0`: for captions that name positions or counts."""
    left_half = Image.fromarray(np.concatenate([np.zeros((50, 50, 3)), np.full((50, 50, 3), 255)], 1).astype(np.uint8))
    flips = [train_transform(32)(left_half)[0, :, 0].mean() > 0 for _ in range(40)]
    assert 0 < sum(flips) < 40  # the default flips some of the time
    for seed in range(40):
        torch.manual_seed(seed)
        out = train_transform(32, hflip=False)(left_half)
        assert out[0, :, 0].mean() < 0 < out[0, :, -1].mean()
        torch.manual_seed(seed)
        whole = train_transform(32, min_scale=1.0, hflip=False)(left_half)
        torch.testing.assert_close(whole, eval_transform(32)(left_half), atol=0, rtol=0)


def test_augmentation_settings_reach_the_training_loader(tmp_path, monkeypatch):
    """With `min_scale: 1.0, hflip: false` every training image is the plain resize of one of the set's images;
    with the default (BLIP-2's crop and flip) they are not."""
    from pathlib import Path

    from tasks.config import DataConfig, load_config
    from tasks.tiny_assets import make_all
    from tasks.train_data import TrainLoader

    with pytest.raises(ValueError, match="min_scale"):
        DataConfig(min_scale=0.0)
    monkeypatch.setenv("QFORMER_TINY", str(make_all(tmp_path / "assets")))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage2_opt2.7b.yaml"
    images = sorted((tmp_path / "assets" / "data").rglob("*.jpg"))
    size = load_config(config).model.vision.image_size
    plain = torch.stack([eval_transform(size)(Image.open(p).convert("RGB")) for p in images])  # [I, 3, S, S]

    def first_batch(*overrides: str) -> torch.Tensor:
        cfg = load_config(config, [f"output_dir={tmp_path / 'out'}", "data.batch_size=8", *overrides])
        return next(iter(TrainLoader(cfg, rank=0, world=1, seed=0)))["image"]

    def is_plain(x: torch.Tensor) -> bool:
        return bool(((plain - x).abs().flatten(1).amax(1) < 1e-6).any())

    assert all(is_plain(x) for x in first_batch("data.min_scale=1.0", "data.hflip=false"))
    assert not all(is_plain(x) for x in first_batch())


# ------------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # each of . ! " ( ) * # : ; ~ becomes a space, then runs of 2+ whitespace collapse to one space
        ("A Dog (running) on the beach!!", "a dog running on the beach"),
        ('He said "hi";  ok~ #tag *bold*', "he said hi ok tag bold"),
        ("time:10.30", "time 10 30"),
        # commas, apostrophes, question marks, hyphens, slashes, brackets survive
        ("It's a man, isn't it? well-known/famous [x]", "it's a man, isn't it? well-known/famous [x]"),
        # trailing newline and spaces go; a single tab inside stays (only runs of 2+ whitespace collapse)
        ("  A cat.\n", "a cat"),
        ("a\tcat", "a\tcat"),
        ("a \t cat\n\n", "a cat"),
        ("...", ""),
    ],
)
def test_clean_caption_matches_lavis_regexes(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_truncation_and_prompt():
    words = [f"W{i}" for i in range(60)]
    assert clean_caption(" ".join(words)) == " ".join(w.lower() for w in words[:50])
    assert clean_caption(" ".join(words), max_words=3) == "w0 w1 w2"
    assert clean_caption("A Dog.", prompt="a photo of ") == "a photo of a dog"  # prompt is prepended as is
    with pytest.raises(TypeError, match="caption must be a str"):
        clean_caption(None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("What is the man's name?", "what is the man's name?"),
        ("Is it (red)?!", "is it red?"),  # characters are deleted, not replaced by a space
        ("What.is  it ", "whatis  it"),  # no space collapsing, only trailing spaces stripped
        (" Hi.", " hi"),  # leading space kept
    ],
)
def test_clean_question_matches_lavis_regexes(raw, expected):
    assert clean_question(raw) == expected


def test_clean_question_truncation():
    assert clean_question("a b c d e", max_words=2) == "a b"


# -------------------------------------------------------------------------------------------- caption data


@pytest.fixture
def caption_data(tmp_path):
    files, image_root, paths, captions = write_caption_dataset(tmp_path, n_images=20, bad=(3,), missing=(11,))
    return files, image_root, paths, captions


def test_caption_dataset_flattening_and_image_ids(caption_data):
    files, image_root, paths, captions = caption_data
    ds = CaptionDataset(files, image_root, eval_transform(32))
    # 20 images, 5 of them (i % 4 == 0) with two captions, plus image 0 again in the second file
    assert len(ds) == 20 + 5 + 1
    assert ds.num_images == 20
    ids = [ds.samples[i][2] for i in range(len(ds))]
    assert ids[0] == ids[1] == ids[-1] == 0  # both captions of image 0 and its second-file entry
    assert sorted(set(ids)) == list(range(20))
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32)
    assert sample["text_input"] == "a photo number 0"
    assert sample["image_id"] == 0

    whole = CaptionDataset(files, image_root, eval_transform(32), split_captions=False)
    assert len(whole) == 21
    assert whole[0]["text_input"] in {clean_caption(c) for c, i in captions.items() if i == 0}


@pytest.mark.parametrize(("num_workers", "on_error"), [(0, "replace"), (2, "replace"), (2, "drop")])
def test_caption_dataset_skips_and_counts_exactly_the_bad_images(caption_data, num_workers, on_error):
    files, image_root, paths, captions = caption_data
    ds = CaptionDataset(files, image_root, eval_transform(32), on_error=on_error)
    bad_index = next(i for i, s in enumerate(ds.samples) if "img_03" in s[0])
    item = ds[bad_index]
    if on_error == "drop":
        assert isinstance(item, BadSample) and item.path == paths[3] and "truncated" in item.reason
    else:
        assert item["skipped"][0][0] == paths[3] and item["text_input"] != clean_caption("Image #3.")
    counter = SkipCounter(max_skip_fraction=0.2, min_samples=5)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=num_workers, collate_fn=collate)
    texts, sizes = [], []
    for batch in track(loader, counter):
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert batch["image_id"].dtype == torch.long and len(batch["image_id"]) == len(batch["text_input"])
        texts += batch["text_input"]
        sizes.append(len(batch["text_input"]))
    assert counter.num_skipped == 2
    assert sorted(counter.skipped_paths) == sorted([paths[3], paths[11]])
    assert counter.num_seen == len(ds)
    # every caption of every good image was trained on
    good = {clean_caption(c) for c, i in captions.items() if i not in (3, 11)}
    assert good <= set(texts)
    if on_error == "drop":
        assert len(texts) == len(ds) - 2 and sorted(texts) == sorted(good)
    else:  # bad indices were answered with substitutes: batches keep their size
        assert sizes == [4] * (len(ds) // 4) + ([len(ds) % 4] if len(ds) % 4 else [])


def test_skip_threshold_fires_and_names_the_threshold(tmp_path):
    files, image_root, paths, _ = write_caption_dataset(tmp_path, n_images=20, bad=(1, 2, 5), missing=(7, 9))
    ds = CaptionDataset(files, image_root, eval_transform(16), on_error="drop")
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    counter = SkipCounter(max_skip_fraction=0.1, min_samples=8)
    with pytest.raises(TooManyBadSamples, match=r"max_skip_fraction=0\.1") as err:
        for _ in track(loader, counter):
            pass
    assert "min_samples=8" in str(err.value) and paths[1] in str(err.value)
    # below min_samples nothing fires; with a lenient threshold the whole pass runs
    lenient = SkipCounter(max_skip_fraction=0.5, min_samples=8)
    for _ in track(loader, lenient):
        pass
    assert lenient.num_skipped == 5 and lenient.num_seen == len(ds)
    state = json.loads(json.dumps(lenient.state_dict()))
    restored = SkipCounter()
    restored.load_state_dict(state)
    assert restored.num_skipped == 5 and restored.skipped_paths == lenient.skipped_paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_blank_captions_are_skipped_and_counted_like_bad_images(tmp_path, num_workers):
    files, image_root, paths, _ = write_caption_dataset(tmp_path, n_images=8, bad=(), missing=())
    entries = json.loads(files[0].read_text())  # images 0-3
    entries[1]["caption"] = "   "
    entries[2]["caption"] = "..."  # nothing left once cleaned
    entries[0]["caption"] = ["", "A photo: number 0!"]  # a list keeps its worded captions
    files[0].write_text(json.dumps(entries))
    ds = CaptionDataset(files, image_root, eval_transform(16), on_error="drop")
    blank = sorted(ds.blank.values())
    assert blank == [f"{files[0]}[0]", f"{files[0]}[1]", f"{files[0]}[2]"]
    counter = SkipCounter(max_skip_fraction=None)
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate)
    texts = [t for batch in track(loader, counter) for t in batch["text_input"]]
    assert counter.num_skipped == 3 and counter.num_seen == len(ds)
    assert sorted(counter.skipped_paths) == blank
    assert "" not in texts and "a photo number 0" in texts and len(texts) == len(ds) - 3
    whole = CaptionDataset(files, image_root, eval_transform(16), split_captions=False)
    assert sorted(whole.blank.values()) == [f"{files[0]}[1]", f"{files[0]}[2]"]
    assert whole.samples[0][1] == "A photo: number 0!"  # the blank one of the list is left out
    item = whole[1]  # replaced by a substitute, the entry named
    assert item["skipped"] == [(f"{files[0]}[1]", "ValueError: empty or blank caption")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": 7}, r"\[2\]: 'image' must be a path \(a non-empty string\), got 7"),
        ({"image": ""}, r"\[2\]: 'image' must be a path"),
        ({"caption": 5}, r"\[2\]: 'caption' must be a string or a non-empty list of strings, got 5"),
        ({"caption": ["a", None]}, r"\[2\]: 'caption' must be"),
        ({"caption": []}, r"\[2\]: 'caption' must be"),
        ({"image_id": [1]}, r"\[2\]: 'image_id' must be a string or an integer"),
    ],
)
def test_annotation_types_are_checked_when_read_naming_file_and_entry(tmp_path, change, message):
    files, image_root, _, _ = write_caption_dataset(tmp_path, n_images=4, bad=(), missing=())
    entries = json.loads(files[1].read_text())
    entries[2].update(change)
    files[1].write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="ann_b.json" + message):
        CaptionDataset(files, image_root, eval_transform(16))


def test_invalid_json_and_decompression_bombs_name_the_file(tmp_path):
    files, image_root, paths, _ = write_caption_dataset(tmp_path, n_images=4, bad=(), missing=())
    text = files[0].read_text()
    files[0].write_text(text.replace("}", "}}", 1))  # an extra brace after the first entry
    column = text.index("}") + 2
    with pytest.raises(ValueError, match=rf"ann_a.json is not valid JSON: .*: line 1 column {column} "):
        CaptionDataset(files, image_root, eval_transform(16))
    files[0].write_text(text)
    ds = CaptionDataset(files, image_root, eval_transform(16), on_error="drop")
    try:
        set_max_image_pixels(48 * 40 - 1)  # the test images are 48 x 40
        with pytest.raises(ImageTooLarge, match=f"{paths[1]}: 1,920 pixels, above the limit of 1,919"):
            load_image(paths[1])
        item = ds[0]
        assert isinstance(item, BadSample) and "ImageTooLarge" in item.reason and "1,920 pixels" in item.reason
        set_max_image_pixels(48 * 40)
        assert load_image(paths[1]).size == (48, 40)
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def test_a_batch_with_no_usable_sample_is_an_error_naming_it():
    good = {"image": torch.zeros(3, 4, 4), "text_input": "a", "image_id": 7}
    assert require_usable(collate([good, BadSample("/x.jpg", "bad")]))["text_input"] == ["a"]
    with pytest.raises(TooManyBadSamples, match=r"a batch of 2 sample\(s\) has none usable.*/y.jpg \(missing\)"):
        require_usable(collate([BadSample("/y.jpg", "missing"), None]))


def test_collate_drops_none_and_bad_samples():
    good = {"image": torch.zeros(3, 4, 4), "text_input": "a", "image_id": 7}
    batch = collate([good, None, BadSample("/x.jpg", "OSError: truncated"), good])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["image_id"].tolist() == [7, 7]
    assert batch["skipped"][1] == "/x.jpg" and batch["num_attempted"] == 4
    empty = collate([BadSample("/y.jpg", "missing")])
    assert empty["image"] is None and empty["text_input"] == [] and empty["num_attempted"] == 1


# ------------------------------------------------------------------------------------------------ webdata

BAD_JPEG, NO_IMAGE = "w03_02", "w05_04"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root, "w", n_shards=8, per_shard=6, bad_jpeg=(BAD_JPEG,), no_image=(NO_IMAGE,))


def _run(ds, num_workers, batch_size, n_batches=None, trackers=()):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    batches = track(loader, *trackers)
    return list(batches if n_batches is None else islice(batches, n_batches))


def test_webdataset_splits_disjointly_over_ranks_and_workers(shards):
    urls, captions = shards
    seen: dict[tuple[int, int], set[str]] = {}
    counter = SkipCounter(max_skip_fraction=0.5, min_samples=1)
    for rank in range(2):
        ds = WebCaptionDataset(
            urls, eval_transform(16), seed=3, rank=rank, world_size=2, repeat=False, shuffle_buffer=5
        )
        for batch in _run(ds, num_workers=2, batch_size=4, trackers=(counter,)):
            assert batch["image"].shape[1:] == (3, 16, 16)
            worker = batch["position"][0][1]
            for key, text in zip(batch["key"], batch["text_input"], strict=True):
                assert text == clean_caption(captions[key])
                seen.setdefault((rank, worker), set()).add(key)
    assert len(seen) == 4 and all(seen.values())
    readers = list(seen.values())
    assert sum(len(r) for r in readers) == len(set().union(*readers))  # disjoint
    assert set().union(*readers) == set(captions) - {BAD_JPEG, NO_IMAGE}
    assert counter.num_skipped == 2 and counter.num_seen == len(captions)
    assert sorted(p.split("#")[1] for p in counter.skipped_paths) == sorted([BAD_JPEG, NO_IMAGE])


def test_webdataset_blank_captions_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    url = str(tmp_path / "blank.tar")
    with wds.TarWriter(url) as sink:
        for i, caption in enumerate(["a red cat", "  ", "...", "two dogs"]):
            sink.write({"__key__": f"k{i}", "jpg": jpeg_bytes(i, size=(16, 16)), "txt": caption})
    ds = WebCaptionDataset([url], eval_transform(8), rank=0, world_size=1, repeat=False)
    counter = SkipCounter(max_skip_fraction=None)
    texts = [t for b in _run(ds, num_workers=0, batch_size=4, trackers=(counter,)) for t in b["text_input"]]
    assert sorted(texts) == ["a red cat", "two dogs"]
    assert sorted(counter.skipped_paths) == [f"{url}#k1", f"{url}#k2"] and counter.num_seen == 4


def test_webdataset_is_deterministic_per_epoch(shards):
    urls, _ = shards

    def keys(epoch, seed=3):
        ds = WebCaptionDataset(urls, eval_transform(8), seed=seed, rank=0, world_size=1, repeat=False)
        ds.set_epoch(epoch)
        return [k for b in _run(ds, num_workers=0, batch_size=8) for k in b["key"]]

    first = keys(0)
    assert keys(0) == first and len(first) == 46
    assert keys(1) != first and sorted(keys(1)) == sorted(first)
    assert keys(0, seed=4) != first


def test_webdataset_reports_truncated_and_missing_shards(tmp_path):
    urls, captions = write_shards(tmp_path, "t", n_shards=3, per_shard=5)
    data = open(urls[1], "rb").read()
    with open(urls[1], "wb") as f:  # cut inside the 4th sample: tarfile would end the shard silently
        f.write(data[: len(data) // 2 + 100])
    missing = str(tmp_path / "gone.tar")
    ds = WebCaptionDataset([*urls, missing], eval_transform(8), rank=0, world_size=1, repeat=False)
    counter = SkipCounter(max_skip_fraction=None)
    keys = [k for b in _run(ds, num_workers=0, batch_size=4, trackers=(counter,)) for k in b["key"]]
    assert set(keys) < set(captions) and {k for k in captions if k.startswith("t00") or k.startswith("t02")} <= set(
        keys
    )
    assert sorted(counter.skipped_paths) == sorted([urls[1], missing])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_resume_is_exact(shards, num_workers):
    urls, _ = shards

    def make():
        return WebCaptionDataset(urls, eval_transform(8), seed=1, rank=1, world_size=2, shuffle_buffer=4, repeat=True)

    # 12 batches of 3 = 36 samples from this rank's 24 (4 shards of 6): the stream crosses into epoch 1
    reference = [b["key"] for b in _run(make(), num_workers, batch_size=3, n_batches=12)]
    first = make()
    consumed = [b["key"] for b in _run(first, num_workers, batch_size=3, n_batches=5, trackers=(first,))]
    assert consumed == reference[:5]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["key"] for b in _run(resumed, num_workers, batch_size=3, n_batches=7)]
    assert rest == reference[5:12]

    if num_workers:
        other = make()
        other.load_state_dict(state)
        with pytest.raises(ValueError, match="same num_workers"):
            _run(other, num_workers=0, batch_size=3, n_batches=1)
    wrong_seed = WebCaptionDataset(urls, eval_transform(8), seed=2, rank=1, world_size=2, shuffle_buffer=4)
    with pytest.raises(ValueError, match="'seed'"):
        wrong_seed.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- mix


class _Items(torch.utils.data.Dataset):
    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"source": self.name, "index": i, "image_id": i}


def test_mixed_dataset_follows_ratios_and_is_deterministic():
    a, b = _Items("a", 100), _Items("b", 30)
    mix = MixedDataset([(a, 0.7), (b, 0.3)], seed=0, length=1000)
    items = [mix[i] for i in range(len(mix))]
    counts = Counter(it["source"] for it in items)
    assert counts == {"a": 700, "b": 300}
    # any window follows the ratios (sources are interleaved at random, not in blocks)
    window = Counter(it["source"] for it in items[:200])
    assert abs(window["a"] / 200 - 0.7) < 0.08
    # each source is covered evenly: 700 uses of 100 samples = 7 each, 300 of 30 = 10 each
    assert set(Counter(it["index"] for it in items if it["source"] == "a").values()) == {7}
    assert set(Counter(it["index"] for it in items if it["source"] == "b").values()) == {10}
    # image ids of the second source are offset past the first
    assert all(it["image_id"] == it["index"] + (100 if it["source"] == "b" else 0) for it in items)

    again = MixedDataset([(a, 0.7), (b, 0.3)], seed=0, length=1000)
    assert [again[i] for i in range(1000)] == items
    assert [MixedDataset([(a, 0.7), (b, 0.3)], seed=1, length=1000)[i] for i in range(1000)] != items
    mix.set_epoch(1)
    epoch1 = [mix[i] for i in range(1000)]
    assert epoch1 != items and Counter(it["source"] for it in epoch1) == counts

    # down-sampling: 20 uses per epoch of 100 samples see different samples in consecutive epochs
    small = MixedDataset([(a, 0.2), (b, 0.8)], seed=0, length=100)
    seen = []
    for epoch in range(5):
        small.set_epoch(epoch)
        seen += [small[i]["index"] for i in range(100) if small[i]["source"] == "a"]
    assert sorted(seen) == list(range(100))
    state = small.state_dict()
    fresh = MixedDataset([(a, 0.2), (b, 0.8)], seed=0, length=100)
    fresh.load_state_dict(state)
    assert [fresh[i] for i in range(100)] == [small[i] for i in range(100)]


def test_mixed_iterable_follows_ratios_and_resumes_exactly(tmp_path):
    urls_a, _ = write_shards(tmp_path / "a", "a", n_shards=4, per_shard=8)
    urls_b, _ = write_shards(tmp_path / "b", "b", n_shards=4, per_shard=8)

    def make():
        sources = [
            (WebCaptionDataset(urls_a, eval_transform(8), seed=0, rank=0, world_size=1, shuffle_buffer=4), 3.0),
            (WebCaptionDataset(urls_b, eval_transform(8), seed=0, rank=0, world_size=1, shuffle_buffer=4), 1.0),
        ]
        return MixedIterableDataset(sources, seed=7, rank=0, world_size=1)

    keys = [k for b in _run(make(), num_workers=0, batch_size=20, n_batches=20) for k in b["key"]]
    assert len(keys) == 400
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.06
    assert [k for b in _run(make(), num_workers=0, batch_size=20, n_batches=20) for k in b["key"]] == keys

    reference = [b["key"] for b in _run(make(), num_workers=2, batch_size=5, n_batches=14)]
    first = make()
    assert [b["key"] for b in _run(first, 2, batch_size=5, n_batches=9, trackers=(first,))] == reference[:9]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [b["key"] for b in _run(resumed, 2, batch_size=5, n_batches=5)] == reference[9:14]


# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_gives_disjoint_rank_shards_and_resumes_exactly():
    data = list(range(103))
    samplers = [ResumableDistributedSampler(data, rank=r, world_size=2, seed=5) for r in range(2)]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [51, 51] and [len(s) for s in samplers] == [51, 51]
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 102
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != shards[0]
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == shards[0]

    # consume 4 batches of 5 through a DataLoader, checkpoint, resume: the rest of the epoch, exactly
    sampler = ResumableDistributedSampler(data, rank=0, world_size=2, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    loader = DataLoader(
        data,
        batch_size=5,
        sampler=sampler,
        collate_fn=lambda xs: {"num_attempted": len(xs), "index": xs},
    )
    taken = [b["index"] for b in islice(track(loader, sampler), 4)]
    assert sum(taken, []) == full[:20]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 20)

    resumed = ResumableDistributedSampler(data, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop's call for the loaded epoch keeps the position
    assert len(resumed) == 31 and list(resumed) == full[20:]
    resumed.set_epoch(3)
    assert resumed.position == 0 and len(list(resumed)) == 51
    with pytest.raises(ValueError, match="world_size"):
        ResumableDistributedSampler(data, rank=0, world_size=4, seed=5).load_state_dict(state)
