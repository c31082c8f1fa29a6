import pytest

from flora.data.datasets import load_image_folder, write_image_folder
from flora.errors import DataError


def test_image_folder_round_trip_and_corrupt_files_are_skipped(tmp_path, digits):
    root = write_image_folder(digits.subset(range(30)), tmp_path / "data")
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "3" / "notes.txt").write_text("ignored: not an image suffix")
    data = load_image_folder(root)
    assert len(data) == 30 and data.skipped == 1
    assert data.skipped_files[0].endswith("broken.png")
    assert data.class_names == sorted(data.class_names)
    assert [data.class_names[i] for i in data.labels[:3]] == [str(v) for v in sorted(digits.labels[:30])[:3]]


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path)
