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
PAPER_TABLES = Path(__file__).resolve().parents[2] / "shared" / "paper" / "simclic-tables.md"
PERTURBATIONS = ["history", "dropout", "noise"]
ROW_TITLES = (["ours linear", "ours fine-tuned"]
              + [f"paper SimCLIC linear ({p})" for p in PERTURBATIONS]
              + [f"paper SimCLIC fine-tuned ({p})" for p in PERTURBATIONS])
# The paper's Table 2, CIFAR10 column (../shared/paper/simclic-tables.md):
# linear error of history, dropout, noise, then fine-tuned error of the three.
PAPER_CIFAR10 = ["5.97", "6.00", "5.92", "3.12", "3.11", "2.94"]


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.keras"
    build_backbone("tiny_convnet", (8, 8, 3), width=4).save(path)
    return path


def read_csv(out):
    with open(out / "transfer.csv") as f:
        return list(csv.reader(f))


@pytest.mark.e2e
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
    # The paper's rows: its Table 2 for cifar10, n/a for columns it does not have.
    assert [row[1] for row in rows[3:]] == PAPER_CIFAR10
    for row in rows[3:]:
        assert row[2:] == ["n/a"] * 2
    results = json.loads((out / "transfer.json").read_text())
    assert results["input_shape"] == [8, 8, 3]
    assert results["table"]["rows"] == rows[1:]
    cifar = results["datasets"]["cifar10"]
    assert cifar["train_images"] + cifar["test_images"] == 200  # mock: one split, held out
    assert results["datasets"]["hand"]["name"] == "digits"
    markdown = (out / "transfer.md").read_text()
    assert "| ours fine-tuned |" in markdown
    # The paper's CIFAR-10 linear error with history, from its Table 2.
    assert "| paper SimCLIC linear (history) | 5.97 | n/a | n/a |" in markdown
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


def test_the_paper_rows_show_the_papers_table_2():
    results = {"datasets": {
        "cifar10": {"status": "ok", "linear_error": 40.0, "finetune_error": None},
        "mine": {"status": "ok", "linear_error": 70.25, "finetune_error": 60.0}}}
    header, rows = transfer.table(results)
    assert header == ["error %", "cifar10", "mine"]
    assert rows[:2] == [["ours linear", "40.00", "70.25"],
                        ["ours fine-tuned", "not run", "60.00"]]
    assert [row[0] for row in rows] == ROW_TITLES
    assert [row[1] for row in rows[2:]] == PAPER_CIFAR10
    assert all(row[2] == "n/a" for row in rows[2:])
    # Every column label of PAPER_ERRORS is one the table can have: a name of
    # the paper's list, or aircraft (aircraft=dir:PATH).
    for errors in transfer.PAPER_ERRORS.values():
        assert set(errors) == set(transfer.PAPER_DATASETS) | {"aircraft"}


def test_the_paper_numbers_match_the_shared_tables_file():
    if not PAPER_TABLES.exists():
        pytest.skip(f"{PAPER_TABLES} not found: the shared folder must sit beside the repo")
    text = PAPER_TABLES.read_text()
    columns = {"Aircraft": "aircraft", "Caltech101": "caltech101", "Cars": "cars196",
               "CIFAR10": "cifar10", "CIFAR100": "cifar100", "DTD": "dtd",
               "Flowers": "oxford_flowers102", "Food": "food101", "Pets": "oxford_iiit_pet",
               "SUN397": "sun397", "VOC2007": "voc/2007"}
    for protocol, title in (("linear", "linear evaluation error"),
                            ("fine-tuned", "fine-tuned error")):
        section = text[text.index(f"SimCLIC rows: {title}"):]
        lines = [line for line in section.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        for line in lines[2:5]:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            paper = transfer.PAPER_ERRORS[(cells[0], protocol)]
            assert {columns[name]: float(value) for name, value
                    in zip(header[1:], cells[1:])} == paper


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
