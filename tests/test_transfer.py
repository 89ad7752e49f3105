"""The transfer table: tensorflow-datasets names (under mock data), an npz
file with a fixed-seed train/test split, the table's layout, and bad input."""

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from simclic_tf import transfer
from simclic_tf.commands import command
from simclic_tf.backbones import build_backbone

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_IMAGENET = SHARED_DATA / "tinyimagenet200_val.npz"
transfer_command = command("transfer")
ROW_TITLES = ["ours linear", "ours fine-tuned", "paper SimCLIC linear",
              "paper SimCLIC fine-tuned"]


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.keras"
    build_backbone("tiny_convnet", (8, 8, 3), width=4).save(path)
    return path


def read_csv(out):
    with open(out / "transfer.csv") as f:
        return list(csv.reader(f))


def test_tfds_names_under_mock_data(tmp_path, encoder_path, capsys, mock_tfds):
    out = tmp_path / "out"
    with mock_tfds(num_examples=200):
        # mnist is 28x28 grey: resized to 8x8 and repeated to the encoder's RGB.
        assert transfer_command(["--encoder", str(encoder_path),
                              "--datasets", "cifar10,mnist,hand=digits",
                              "--linear-epochs", "2", "--finetune-epochs", "1",
                              "--out", str(out)]) == 0
    rows = read_csv(out)
    assert rows[0] == ["error %", "cifar10", "mnist", "hand"]
    assert [row[0] for row in rows[1:]] == ROW_TITLES
    for row in rows[1:3]:  # ours: numbers
        assert all(0.0 <= float(cell) <= 100.0 for cell in row[1:])
    for row in rows[3:]:  # the paper's numbers are not in the design card
        assert row[1:] == ["n/a"] * 3
    results = json.loads((out / "transfer.json").read_text())
    assert results["input_shape"] == [8, 8, 3]
    assert results["table"]["rows"] == rows[1:]
    cifar = results["datasets"]["cifar10"]
    assert cifar["train_images"] + cifar["test_images"] == 200  # mock: one split, held out
    assert results["datasets"]["hand"]["name"] == "digits"
    markdown = (out / "transfer.md").read_text()
    assert "| ours fine-tuned |" in markdown and "| paper SimCLIC linear |" in markdown
    assert "| error % | cifar10 | mnist | hand |" in capsys.readouterr().out


def test_npz_with_a_fixed_seed_split_and_voc_marked_unsupported(tmp_path, encoder_path):
    if not TINY_IMAGENET.exists():
        pytest.skip(f"{TINY_IMAGENET} not found: the shared data folder must sit beside "
                    "the repo")
    name = f"npz:{TINY_IMAGENET}"
    train, test, how = transfer.load_split(name, (8, 8, 3), test_fraction=0.1, seed=3)
    assert (len(train), len(test)) == (9000, 1000) and "--seed 3" in how
    assert np.bincount(test.labels, minlength=200).tolist() == [5] * 200  # stratified
    again = transfer.load_split(name, (8, 8, 3), test_fraction=0.1, seed=3)[1]
    np.testing.assert_array_equal(again.images, test.images)
    other = transfer.load_split(name, (8, 8, 3), test_fraction=0.1, seed=4)[1]
    assert not np.array_equal(other.images, test.images)

    out = tmp_path / "out"
    # voc/2007's builder is read for its features only: nothing is downloaded.
    assert transfer_command(["--encoder", str(encoder_path), "--datasets", f"{name},voc/2007",
                          "--linear-epochs", "1", "--finetune-epochs", "0",
                          "--test-fraction", "0.1", "--seed", "3", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert rows[0] == ["error %", "npz:tinyimagenet200_val.npz", "voc/2007"]
    assert float(rows[1][1]) > 90.0  # 200 classes, a random 16-feature encoder
    assert rows[2][1] == "not run" and rows[1][2] == rows[2][2] == "unsupported"
    results = json.loads((out / "transfer.json").read_text())
    row = results["datasets"]["npz:tinyimagenet200_val.npz"]
    assert (row["train_images"], row["test_images"], row["num_classes"]) == (9000, 1000, 200)
    assert "mAP" in results["datasets"]["voc/2007"]["reason"]
    assert "multi-label" in (out / "transfer.md").read_text()


def test_the_paper_rows_show_the_paper_numbers_when_filled_in(monkeypatch):
    monkeypatch.setattr(transfer, "PAPER_ERRORS", {"linear": {"cifar10": 12.5},
                                                   "fine-tuned": {}})
    results = {"datasets": {
        "cifar10": {"status": "ok", "linear_error": 40.0, "finetune_error": None},
        "dtd": {"status": "ok", "linear_error": 70.25, "finetune_error": 60.0}}}
    header, rows = transfer.table(results)
    assert header == ["error %", "cifar10", "dtd"]
    assert rows == [["ours linear", "40.00", "70.25"], ["ours fine-tuned", "not run", "60.00"],
                    ["paper SimCLIC linear", "12.50", "n/a"],
                    ["paper SimCLIC fine-tuned", "n/a", "n/a"]]


@pytest.mark.parametrize("argv, words", [
    (["--datasets", "no_such_dataset_xyz"], ["--datasets", "'no_such_dataset_xyz'",
                                             "tensorflow-datasets name"]),
    (["--datasets", "npz:/nonexistent/x.npz"], ["--datasets", "/nonexistent/x.npz"]),
    (["--datasets", " , "], ["--datasets is empty"]),
    (["--datasets", "digits,digits"], ["--datasets", "twice"]),
    (["--datasets", "digits", "--finetune-epochs", "-1"], ["--finetune-epochs -1"]),
])
def test_bad_datasets_are_clear_errors(tmp_path, capsys, encoder_path, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        transfer_command(["--encoder", str(encoder_path), "--out", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message


def test_a_missing_encoder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        transfer_command(["--encoder", str(tmp_path / "nope.keras"), "--datasets", "digits"])
    message = capsys.readouterr().err
    assert "--encoder" in message and "nope.keras" in message and "no such file" in message
