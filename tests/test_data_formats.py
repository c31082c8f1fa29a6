"""Local data formats: image folder, CSV / JSONL image-caption pairs, a saved Hugging Face dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.data.formats import load_local_data
from flora.errors import ConfigError, DataError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, digits):
    """40 digit images as PNG files, a corrupt one, a truncated one, and their captions."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rows = []
    for i in range(40):
        digits.images[i].save(root / "img" / f"{i:03d}.png")
        label = NAMES[int(digits.labels[i])]
        # Two phrasings per digit: distinct captions, some shared by several images.
        rows.append((f"img/{i:03d}.png", f"{'a photo' if i % 2 else 'a picture'} of the digit {label}."))
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    full = (root / "img" / "000.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    rows += [("img/corrupt.png", "a photo of the digit one."), ("img/truncated.png", "a photo of the digit two.")]
    rows.append(("img/missing.png", "a photo of the digit three."))
    return root, rows


def write_csv(path, rows, header=("image", "caption")):
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_pairs_load_with_bad_images_skipped_and_counted(pairs_dir):
    root, rows = pairs_dir
    data = load_local_data(write_csv(root / "pairs.csv", rows), "csv")
    assert len(data) == 40 and data.skipped == 3
    assert {name.rsplit("/", 1)[-1] for name in data.skipped_files} == {"corrupt.png", "truncated.png", "missing.png"}
    assert data.text_kind == "caption" and len(data.class_names) == len({c for _, c in rows[:40]})
    # Captions are used verbatim: the prompt template does not apply to them.
    assert data.texts("IGNORED {label}") == data.class_names
    assert [data.class_names[i] for i in data.labels] == [c for _, c in rows[:40]]


def test_jsonl_pairs_accept_path_and_text_columns_and_absolute_paths(pairs_dir):
    root, rows = pairs_dir
    path = root / "pairs.jsonl"
    lines = [json.dumps({"path": str(root / image), "text": caption}) for image, caption in rows]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    data = load_local_data(path, "jsonl")
    assert len(data) == 40 and data.skipped == 3 and data.text_kind == "caption"


def test_training_on_caption_pairs(tiny_model_dir, pairs_dir, tmp_path):
    root, rows = pairs_dir
    data = load_local_data(write_csv(root / "train.csv", rows), "csv")
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), data, progress=False, cache_dir=tmp_path)
    everything = np.arange(len(data))
    before, _ = trainer.batch_gradients(everything)
    settings = TrainSettings(local_epochs=3, learning_rate=5e-3, batch_size=16)
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    _, metrics = trainer.train_round(start, settings, round_=1)
    after, _ = trainer.batch_gradients(everything)
    assert after < before and metrics["skipped_images"] == 3 and metrics["steps"] == 3 * 3


def test_a_saved_hugging_face_dataset_with_class_labels_or_captions(tmp_path, digits):
    import datasets

    images = [digits.images[i] for i in range(30)]
    labels = [int(x) for x in digits.labels[:30]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    corrupt = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"garbage", "path": None}], "label": [3]}, features=features
    )
    datasets.concatenate_datasets([ds, corrupt]).save_to_disk(str(tmp_path / "classes"))
    data = load_local_data(tmp_path / "classes", "hf-dataset")
    assert len(data) == 30 and data.skipped == 1 and data.text_kind == "class"
    assert data.class_names == NAMES and list(data.labels) == labels  # the ClassLabel's numbering, all ten names
    assert data.texts("a photo of the digit {label}.")[3] == "a photo of the digit three."

    captions = [f"a photo of the digit {NAMES[label]}." for label in labels]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"img": images, "caption": captions}).cast_column("img", datasets.Image())}
    )
    splits.save_to_disk(str(tmp_path / "captions"))
    data = load_local_data(tmp_path / "captions", "hf-dataset")
    assert len(data) == 30 and data.text_kind == "caption"
    assert [data.class_names[i] for i in data.labels] == captions


@pytest.mark.parametrize(
    ("fmt", "make", "message"),
    [
        ("image-folder", lambda p: p / "nope", "does not exist"),
        ("image-folder", lambda p: p, "has no class subfolders"),
        ("csv", lambda p: p / "nope.csv", r"caption file .*nope\.csv does not exist"),
        ("csv", lambda p: (p / "e.csv", (p / "e.csv").write_text(""))[0], "is empty; expected a header row"),
        ("csv", lambda p: write_csv(p / "h.csv", []), "has no rows"),
        ("csv", lambda p: write_csv(p / "c.csv", [("a.png", "x")], ("file", "label")), "no caption column"),
        ("csv", lambda p: write_csv(p / "m.csv", [("gone.png", "a cat")]), "no readable images listed"),
        ("jsonl", lambda p: (p / "b.jsonl", (p / "b.jsonl").write_text("{oops\n"))[0], r"b\.jsonl:1 is not valid JSON"),
        ("hf-dataset", lambda p: p / "nope", "does not exist; save one with Dataset.save_to_disk"),
        ("hf-dataset", lambda p: p, "is not a dataset saved with save_to_disk"),
    ],
)
def test_missing_empty_or_malformed_data_is_a_clear_error(tmp_path, fmt, make, message):
    with pytest.raises(DataError, match=message):
        load_local_data(make(tmp_path), fmt)


def test_bad_settings_are_refused_with_the_choices(tmp_path):
    base = dict(node_id="n", model="m", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="data_format must be one of image-folder, csv, jsonl, hf-dataset"):
        ClientConfig(**base, data_format="parquet")
    with pytest.raises(ConfigError, match="memory_budget_mb must be > 0"):
        ClientConfig(**base, memory_budget_mb=0)
    with pytest.raises(ConfigError, match="gradient_checkpointing must be one of auto, on, off"):
        ClientConfig(**base, gradient_checkpointing="yes")
    with pytest.raises(ConfigError, match="autocast must be one of auto, off, float16, bfloat16"):
        ClientConfig(**base, autocast="fp8")


def test_the_agent_is_built_from_a_jsonl_file_with_its_cache_in_the_state_dir(tiny_model_dir, pairs_dir, tmp_path):
    from edge_client.main import build_agent

    root, rows = pairs_dir
    path = root / "agent.jsonl"
    path.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    config = ClientConfig(
        node_id="n",
        model=str(tiny_model_dir),
        data_dir=path,
        data_format="jsonl",
        device="cpu",
        state_dir=tmp_path / "state",
        broker_url="memory://formats",
    )
    agent = build_agent(config, progress=False)
    assert agent.trainer.num_examples == 40 and agent.trainer.data.text_kind == "caption"
    assert agent.trainer.cache_status == "built" and (tmp_path / "state" / "cache").is_dir()
    assert build_agent(config, progress=False).trainer.cache_status == "hit"  # after a restart
