import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import file_sources, pipelines, shapes, sources
from simclic_tf.augment import build_augmentation
from simclic_tf.config import ConfigError, SimCLICConfig
from simclic_tf.pipelines import eval_dataset, pretrain_dataset
from simclic_tf.sources import DataError, load_images, load_train_and_eval
from simclic_tf.training import pretrain_inputs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ("airplane", "cat", "ship")
PER_CLASS = 20


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """dir: layout with the first 20 CIFAR-10 test JPEGs of 3 classes."""
    archive = SHARED_DATA / "cifar10_test_jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"shared test data not found at {archive}")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {f"test/{c}/{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)}
    with tarfile.open(archive) as tar:
        members = [m for m in tar if m.name in wanted]
        tar.extractall(root, members=members, filter="data")
    return root / "test"


@pytest.fixture
def cifar_copy(cifar_dir, tmp_path):
    return Path(shutil.copytree(cifar_dir, tmp_path / "test"))


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


# digits


def test_digits():
    data = load_images("digits")
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.labels.dtype == np.int64 and set(data.labels) == set(range(10))
    assert data.class_names == [str(i) for i in range(10)] and data.num_classes == 10
    assert len(data) == 1797


def test_resize_on_load():
    data = load_images("digits", image_size=16)
    assert data.images.shape == (1797, 16, 16, 1) and data.images.dtype == np.uint8


# shapes


def test_shapes_are_balanced_seeded_and_split_apart():
    train, test = load_images("shapes"), load_images("shapes", split="test")
    assert train.images.shape == (3000, 16, 16, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (1000, 16, 16, 3) and train.num_classes == 10
    assert train.class_names[:3] == ["disc", "square", "triangle"]
    np.testing.assert_array_equal(np.bincount(train.labels), [300] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    np.testing.assert_array_equal(load_images("shapes").images, train.images)  # drawn again
    assert not np.array_equal(train.images[:1000], test.images)
    # Each image has its own background: no two images share pixels.
    assert len({image.tobytes() for image in train.images}) == 3000
    assert load_images("shapes", image_size=24).images.shape == (3000, 24, 24, 3)
    with pytest.raises(DataError, match="'shapes' has the splits \\['test', 'train'\\]"):
        load_images("shapes", split="validation")


def test_shapes_classes_differ_in_form_not_in_brightness():
    """What a class means is its shape: the mean image of a class is not
    brighter than another's by more than the spread within a class."""
    data = load_images("shapes")
    brightness = data.images.reshape(3000, -1).mean(axis=1)
    class_means = [brightness[data.labels == k].mean() for k in range(10)]
    assert np.ptp(class_means) < brightness.std()
    masks = shapes.shape_masks(*np.meshgrid(np.linspace(-1, 1, 33), np.linspace(-1, 1, 33)))
    flat = np.array([mask.ravel() for mask in masks])
    assert len({row.tobytes() for row in flat}) == 10  # ten distinct silhouettes


def test_single_set_sources_have_no_test_split():
    with pytest.raises(DataError, match="no 'test' split.*--test-fraction"):
        load_images("digits", split="test")


@pytest.mark.parametrize("name", ["npz", "digits:x", "dir:"])
def test_malformed_names_say_how_to_write_them(name):
    with pytest.raises(DataError, match="write"):
        load_images(name)


# npz


def test_npz(tmp_path):
    x = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    y = np.array([0, 1, 2, 0, 1, 2])
    data = load_images(save_npz(tmp_path / "d.npz", x=x, y=y, class_names=["a", "b", "c"]))
    np.testing.assert_array_equal(data.images, x)
    np.testing.assert_array_equal(data.labels, y)
    assert data.class_names == ["a", "b", "c"]


def test_npz_grey_unlabeled_and_column_labels(tmp_path):
    x = np.zeros((5, 4, 4), np.uint8)
    data = load_images(save_npz(tmp_path / "grey.npz", x=x))
    assert data.images.shape == (5, 4, 4, 1) and data.labels is None
    data = load_images(save_npz(tmp_path / "col.npz", x=x, y=np.arange(5)[:, None]))
    assert data.labels.shape == (5,) and data.class_names == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("arrays, words", [
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8)), ["no array 'x'", "uint8"]),
    (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.arange(4)), ["'y'", "(4,)", "(3,)"]),
    (dict(x=np.zeros((3, 4, 4, 3), np.float32)), ["'x'", "float32", "uint8"]),
    (dict(x=np.zeros((3, 4), np.uint8)), ["'x'", "(3, 4)", "N x H x W x C"]),
    (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.array([0.5, 1, 2])), ["'y'", "integer"]),
    (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.array(["a", None, 1], dtype=object)),
     ["pickle"]),
])
def test_npz_errors_name_the_file_the_array_and_what_is_expected(tmp_path, arrays, words):
    name = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as error:
        load_images(name)
    assert name in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.npz"):
        load_images(f"npz:{tmp_path / 'nothere.npz'}")


def test_shared_npz_loads(tmp_path):
    path = SHARED_DATA / "cifar10_test.npz"
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    data = load_images(f"npz:{path}")
    assert data.images.shape == (10000, 32, 32, 3) and data.class_names[0] == "airplane"
    assert Counter(data.labels.tolist()) == {k: 1000 for k in range(10)}


# dir


def test_dir_labels_follow_sorted_folders(cifar_dir):
    data = load_images(f"dir:{cifar_dir}")
    assert data.images.shape == (3 * PER_CLASS, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.class_names == sorted(CLASSES)
    np.testing.assert_array_equal(data.labels, np.repeat([0, 1, 2], PER_CLASS))


def test_dir_pixels_match_the_shared_decoded_copy(cifar_dir):
    path = SHARED_DATA / "cifar10_test.npz"
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    with np.load(path) as shared:
        rows = [list(shared["source_paths"]).index(f"test/cat/{i:04d}.jpg")
                for i in range(PER_CLASS)]
        expected = shared["x"][rows]
    cats = load_images(f"dir:{cifar_dir}").images[PER_CLASS:2 * PER_CLASS]
    np.testing.assert_array_equal(cats, expected)


def test_dir_skips_and_counts_corrupt_files(cifar_copy, caplog):
    (cifar_copy / "cat" / "x.jpg").write_bytes(b"not an image at all")
    (cifar_copy / "cat" / "notes.txt").write_text("ignored by extension")
    with caplog.at_level(logging.WARNING, logger="simclic_tf.sources"):
        data = load_images(f"dir:{cifar_copy}")
    assert len(data) == 3 * PER_CLASS
    np.testing.assert_array_equal(data.labels, np.repeat([0, 1, 2], PER_CLASS))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert f"skipped 1 of {3 * PER_CLASS + 1}" in warnings[0] and "x.jpg" in warnings[0]


def test_dir_where_nothing_decodes_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"dir:{tmp_path}.*none of its 3 image files"):
        load_images(f"dir:{tmp_path}")


def test_dir_without_images_or_folder_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="holds no image files"):
        load_images(f"dir:{tmp_path}")
    with pytest.raises(DataError, match="no such folder"):
        load_images(f"dir:{tmp_path / 'missing'}")


def test_dir_flat_folder_is_unlabeled_and_resized(cifar_dir):
    data = load_images(f"dir:{cifar_dir / 'ship'}", image_size=16)
    assert data.labels is None and data.class_names == []
    assert data.images.shape == (PER_CLASS, 16, 16, 3)


def test_dir_grey_images_and_mixed_sizes(tmp_path):
    for i, side in enumerate([6, 6, 10]):
        grey = np.full((side, side, 1), 40 * i, np.uint8)
        (tmp_path / f"{i}.png").write_bytes(tf.io.encode_png(grey).numpy())
    data = load_images(f"dir:{tmp_path}")
    assert data.images.shape == (3, 6, 6, 1)  # the first image's size, grey kept
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [0, 40, 80])


# tensorflow-datasets


def test_tfds_with_mock_data(tmp_path, mock_tfds):
    with mock_tfds(num_examples=12):
        train = load_images("cifar10", "train", data_dir=str(tmp_path))
        test = load_images("cifar10", "test", data_dir=str(tmp_path), image_size=16)
    assert train.images.shape == (12, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.labels.max() < 10
    assert train.num_classes == 10  # mock data have no label names: "0".."9"
    assert test.images.shape == (12, 16, 16, 3) and len(test.labels) == 12


def test_tfds_download_failure_says_how_to_get_the_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def failed(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(file_sources, "unreachable", lambda address: None)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", failed)
    with pytest.raises(DataError) as error:
        load_images("cifar10", data_dir=str(tmp_path))
    message = str(error.value)
    for words in ["could not be downloaded", "network is unreachable",
                  "tfds build cifar10", "--data-dir", "dir:PATH", "npz:PATH"]:
        assert words in message


def test_tfds_offline_fails_before_trying_to_download(tmp_path, monkeypatch):
    """Without the check, tensorflow-datasets retries for minutes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    downloads = []
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda *args, **kwargs: downloads.append(args))

    def no_network(address, timeout):
        raise OSError(f"[Errno -2] Name or service not known: {address[0]}")

    monkeypatch.setattr(file_sources.socket, "create_connection", no_network)
    for variable in file_sources.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(DataError, match="cannot reach storage.googleapis.com: .*Name or "
                                        "service not known.*tfds build cifar10"):
        load_images("cifar10", data_dir=str(tmp_path))
    assert downloads == []


def test_with_a_proxy_only_the_download_can_tell(monkeypatch):
    def no_direct_route(address, timeout):
        raise OSError("direct connections are blocked")

    monkeypatch.setattr(file_sources.socket, "create_connection", no_direct_route)
    for variable in file_sources.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert "direct connections are blocked" in file_sources.unreachable(
        file_sources.DOWNLOAD_HOST)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert file_sources.unreachable(file_sources.DOWNLOAD_HOST) is None


def test_unknown_name_is_neither_local_nor_tfds(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="neither a local form .*digits.* nor a tensorflow"):
        load_images("no_such_dataset_anywhere")
    with pytest.raises(DataError, match="did you mean dir:"):
        load_images(str(tmp_path))


# splits


def test_digits_held_out_split_is_stratified_and_disjoint():
    config = SimCLICConfig(dataset="digits", test_fraction=0.25, seed=3)
    train, held_out = load_train_and_eval(config)
    full = load_images("digits")
    assert len(train) + len(held_out) == len(full)
    assert len(held_out) == int(np.ceil(0.25 * len(full)))
    rows = lambda data: Counter(map(bytes, data.images.reshape(len(data), -1)))
    assert rows(train) + rows(held_out) == rows(full)  # a partition of the rows
    for label, count in Counter(full.labels.tolist()).items():
        assert abs(np.sum(held_out.labels == label) - 0.25 * count) <= 1
    again, _ = load_train_and_eval(config)
    np.testing.assert_array_equal(again.images, train.images)


def test_eval_dataset_is_resized_to_the_training_images(tmp_path):
    x = np.zeros((4, 16, 16, 1), np.uint8)
    name = save_npz(tmp_path / "eval.npz", x=x, y=np.array([0, 1, 0, 1]))
    train, evaluation = load_train_and_eval(SimCLICConfig(dataset="digits", eval_dataset=name))
    assert len(train) == 1797 and evaluation.images.shape == (4, 8, 8, 1)


def test_eval_dataset_must_be_labelled(tmp_path):
    name = save_npz(tmp_path / "eval.npz", x=np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(DataError, match="--eval-dataset.*no labels"):
        load_train_and_eval(SimCLICConfig(eval_dataset=name))


def test_unlabeled_dataset_needs_an_eval_dataset(tmp_path):
    name = save_npz(tmp_path / "train.npz", x=np.zeros((10, 8, 8, 1), np.uint8))
    with pytest.raises(DataError, match="--eval-dataset is needed"):
        load_train_and_eval(SimCLICConfig(dataset=name))


def test_load_errors_name_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"^--dataset 'npz:"):
        load_train_and_eval(SimCLICConfig(dataset=f"npz:{tmp_path / 'none.npz'}"))
    with pytest.raises(DataError, match=r"^--eval-dataset 'npz:"):
        load_train_and_eval(SimCLICConfig(eval_dataset=f"npz:{tmp_path / 'none.npz'}"))


# pipelines


def numbered_images(n, side=3):
    """Image k is filled with the value 10 k, so a batch tells which rows it holds."""
    return np.broadcast_to((10 * np.arange(n, dtype=np.uint8))[:, None, None, None],
                           (n, side, side, 1)).copy()


def epochs_of(dataset, steps_per_epoch):
    """The indices of each epoch of a pretraining dataset, a list per epoch."""
    indices = [batch[1].numpy().tolist() for batch in dataset]
    return [sum(indices[k:k + steps_per_epoch], [])
            for k in range(0, len(indices), steps_per_epoch)]


def test_pretrain_dataset_views_and_stable_indices():
    images = numbered_images(11)
    dataset = pretrain_dataset(images, batch_size=4, views=2, augment=tf.identity, seed=0,
                               epochs=2)
    for (view1, view2), indices in dataset:
        assert view1.dtype == tf.float32 and indices.dtype == tf.int32
        assert view1.shape == (4, 3, 3, 1)
        np.testing.assert_allclose(view1.numpy(), images[indices.numpy()] / 255.0)
        np.testing.assert_array_equal(view1.numpy(), view2.numpy())
    epochs = epochs_of(dataset, 2)
    for seen in epochs:
        assert len(seen) == 8 and len(set(seen)) == 8 and set(seen) <= set(range(11))
    assert epochs[0] != epochs[1]  # a new permutation every pass


def test_pretrain_dataset_covers_every_row_once_per_epoch():
    images = numbered_images(12)
    dataset = pretrain_dataset(images, batch_size=4, views=1, augment=tf.identity)
    batches = list(dataset)
    assert len(batches) == 3 and all(len(views) == 1 for views, _ in batches)
    assert sorted(np.concatenate([i.numpy() for _, i in batches])) == list(range(12))


@pytest.mark.parametrize("steps_per_epoch", [None, 3, 7])
def test_a_resumed_epoch_draws_what_an_uninterrupted_run_draws(steps_per_epoch):
    """The order is a function of (seed, pass): the dataset of a run resumed at
    epoch 2 holds exactly the batches epochs 2 on hold in the whole run's,
    also when epochs cut passes (N // B = 5 steps a pass) anywhere."""
    images = numbered_images(43)
    def run(initial_epoch):
        return [i.numpy().tolist() for _, i in pretrain_dataset(
            images, 8, 1, tf.identity, seed=3, epochs=5, initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch)]
    whole, resumed = run(0), run(2)
    steps = steps_per_epoch or 5
    assert len(whole) == 5 * steps and resumed == whole[2 * steps:]
    passes = [sum(whole[k:k + 5], []) for k in range(0, len(whole), 5)]
    assert all(len(set(p)) == len(p) for p in passes)  # each index at most once a pass
    assert all(len(p) == 40 for p in passes[:-1] if steps_per_epoch != 7)


def test_replicas_and_workers_read_their_slices_of_the_global_batch():
    """Four replicas on two input pipelines (workers): each pipeline yields its
    two replicas' quarters of every global batch, in replica order, and
    together they are the single-device batches."""
    images = numbered_images(40)
    single = [i.numpy() for _, i in pretrain_dataset(images, 8, 1, tf.identity, epochs=2)]
    shares = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=4)
        shares.append([i.numpy() for _, i in pretrain_dataset(
            images, 8, 1, tf.identity, epochs=2, input_context=context)])
    assert all(len(share) == 2 * len(single) for share in shares)
    for step, batch in enumerate(single):
        quarters = [shares[pipeline][2 * step + local] for pipeline in (0, 1) for local in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(quarters), batch)


def test_pretrain_dataset_views_are_independent_augmentations():
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    dataset = pretrain_dataset(images, 8, 2, build_augmentation(16, 3))
    (view1, view2), _ = next(iter(dataset))
    assert view1.shape == (8, 16, 16, 3) and 0 <= np.min(view1) and np.max(view1) <= 1
    assert np.abs(view1.numpy() - view2.numpy()).mean(axis=(1, 2, 3)).min() > 1e-3


def test_a_view_with_its_own_augmentation_takes_its_own_size():
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    augments = (build_augmentation(16, 3, seed=0), build_augmentation(8, 3, seed=6))
    (view1, view2), _ = next(iter(pretrain_dataset(images, 8, 2, augments)))
    assert view1.shape == (8, 16, 16, 3) and view2.shape == (8, 8, 8, 3)


def test_augmentations_one_for_all_views_or_one_per_view():
    with pytest.raises(ValueError, match="2 augmentations for 1 views"):
        pretrain_dataset(numbered_images(11), 4, 1, (tf.identity, tf.identity))


def test_a_second_view_larger_than_the_images_names_the_flag_and_the_most_accepted():
    config = SimCLICConfig(second_view_size=16, batch_size=4)
    with pytest.raises(ConfigError, match=r"--second-view-size 16 .* \(8x8\); give at most 8"):
        pretrain_inputs(config, pipelines.as_images(numbered_images(11, side=8)))


def test_batch_larger_than_dataset_names_the_flag():
    with pytest.raises(DataError, match=r"--batch-size 12 .*\(11 images\)"):
        pretrain_dataset(numbered_images(11), 12, 2, tf.identity)


def test_eval_dataset_keeps_order_and_remainder():
    images = numbered_images(11)
    batches = [b.numpy() for b in eval_dataset(images, 4)]
    assert [len(b) for b in batches] == [4, 4, 3] and batches[0].dtype == np.float32
    np.testing.assert_allclose(np.concatenate(batches), images / 255.0)


def images_as_stream(images):
    """A tf.data.Dataset of single images from a generator (no array behind
    it), with its size stated."""
    return tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec(images.shape[1:], tf.uint8),
    ).apply(tf.data.experimental.assert_cardinality(len(images)))


def test_a_tf_data_dataset_of_images_feeds_pretraining_with_stable_indices():
    keras.utils.set_random_seed(0)  # as a run does: the order must not depend on it
    images = load_images("digits").images[:300]
    stream = images_as_stream(images)
    assert pipelines.dataset_size(stream) == 300
    batches = pretrain_dataset(stream, 64, 2, augment=lambda batch: batch, seed=0,
                               shuffle_buffer=100, epochs=3)
    for (first, second), indices in batches:
        indices = indices.numpy()
        # Each index names its own image: what the history bank relies on.
        np.testing.assert_array_equal(first.numpy(), images[indices] / np.float32(255))
        np.testing.assert_array_equal(first.numpy(), second.numpy())
    orders = epochs_of(batches, 4)
    assert all(len(epoch) == len(set(epoch)) == 4 * 64 for epoch in orders)  # each once
    assert orders[0] != orders[1]  # reshuffled every pass
    resumed = pretrain_dataset(stream, 64, 2, augment=lambda batch: batch, seed=0,
                               shuffle_buffer=100, epochs=3, initial_epoch=1)
    assert epochs_of(resumed, 4) == orders[1:]


def test_a_tf_data_dataset_must_be_finite_single_images():
    images = load_images("digits").images[:100]
    unsized = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))
    with pytest.raises(DataError, match="unknown or infinite size.*assert_cardinality"):
        pretrain_dataset(unsized, 32, 2, augment=lambda batch: batch)
    with pytest.raises(DataError, match="unknown or infinite size"):
        pretrain_dataset(images_as_stream(images).repeat(), 32, 2, augment=lambda b: b)
    with pytest.raises(DataError, match="yields single images"):
        pretrain_dataset(images_as_stream(images).batch(4), 32, 2, augment=lambda b: b)
    with pytest.raises(DataError, match="--batch-size 200 is larger than the dataset"):
        pretrain_dataset(images_as_stream(images), 200, 2, augment=lambda b: b)


# streamed storage


def pixels_of(images):
    return np.concatenate(list(images.batches(7).as_numpy_iterator()))


def test_a_streamed_folder_reads_the_pixels_the_decoded_one_holds(cifar_dir):
    memory = load_images(f"dir:{cifar_dir}", storage="memory")
    streamed = load_images(f"dir:{cifar_dir}", storage="stream")
    assert (streamed.storage, memory.storage) == ("files", "memory")
    assert streamed.image_shape == (32, 32, 3) and streamed.nbytes == memory.images.nbytes
    np.testing.assert_array_equal(pixels_of(streamed), memory.images)
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    small = load_images(f"dir:{cifar_dir}", image_size=16, storage="stream")
    np.testing.assert_array_equal(
        pixels_of(small), load_images(f"dir:{cifar_dir}", image_size=16).images)
    # A subset and a held-out split keep index i at image i.
    rest, held_out = streamed.stratified_split(0.25, seed=0)
    rest_memory, held_memory = memory.stratified_split(0.25, seed=0)
    np.testing.assert_array_equal(pixels_of(held_out), held_memory.images)
    np.testing.assert_array_equal(rest.labels, rest_memory.labels)


def test_a_streamed_file_that_does_not_decode_is_skipped_in_pretraining_not_in_evaluation(
        cifar_copy):
    """Pretraining leaves its index out; evaluation, whose features must line
    up with the labels, stops with an error rather than shift them."""
    (cifar_copy / "cat" / "x.jpg").write_bytes(b"not an image at all")
    streamed = load_images(f"dir:{cifar_copy}", storage="stream")
    bad = list(streamed.paths).index(str(cifar_copy / "cat" / "x.jpg"))
    assert len(streamed) == 3 * PER_CLASS + 1
    (batch,) = [i.numpy() for _, i in pretrain_dataset(streamed, len(streamed), 1, tf.identity)]
    assert sorted(batch) == sorted(set(range(len(streamed))) - {bad})
    with pytest.raises(tf.errors.OpError, match="expected to contain"):
        list(streamed.batches(16))


def png_folder(root, per_class=12, classes=("a", "b"), empty=None):
    """dir: layout of random 8x8 PNGs, plus a 0-byte `empty` file (a path
    inside it) when given."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (root / name / f"{i:02d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    if empty:
        (root / empty).write_bytes(b"")
    return root


def tiny_run_flags(run_dir):
    return ["--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "16",
            "--pred-hidden", "8", "--batch-size", "4", "--epochs", "2", "--knn-k", "5",
            "--knn-every", "0", "--linear-epochs", "0", "--kernel-impl", "tf",
            "--data-storage", "stream", "--run-dir", str(run_dir)]


def test_streamed_pretraining_skips_a_file_in_its_own_batch_every_pass(tmp_path):
    """A 0-byte file shortens the batch that holds it, and only that one, on
    every pass: more passes than a batch holds do not end the pipeline short
    of its stated length, and replicas keep their slices."""
    streamed = load_images(f"dir:{png_folder(tmp_path, empty='a/05x.png')}", storage="stream")
    bad = list(streamed.paths).index(str(tmp_path / "a" / "05x.png"))
    whole = numbered_images(len(streamed))
    context = tf.distribute.InputContext(num_replicas_in_sync=2)
    for kwargs in ({}, {"input_context": context}):
        read = [i.numpy().tolist() for _, i in pretrain_dataset(
            streamed, 4, 1, tf.identity, epochs=8, **kwargs)]
        expected = [i.numpy().tolist() for _, i in pretrain_dataset(
            whole, 4, 1, tf.identity, epochs=8, **kwargs)]
        assert read == [[i for i in batch if i != bad] for batch in expected]
        assert sum(batch.count(bad) for batch in expected) >= 4  # a batch's worth


@pytest.mark.e2e
def test_a_streamed_training_set_leaves_out_files_that_do_not_decode_with_one_warning(
        tmp_path, caplog, capsys):
    """`simclic train --data-storage stream` on a labelled folder with a 0-byte
    file: warned about once, left out of pretraining and of the kNN memory
    (the labelled training set), and the run ends."""
    from simclic_tf.commands import train

    folder = png_folder(tmp_path / "set", empty="a/05x.png")
    with caplog.at_level(logging.WARNING, logger="simclic_tf.sources"):
        assert train(["--dataset", f"dir:{folder}", "--test-fraction", "0.25",
                      *tiny_run_flags(tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "simclic_tf.sources"]
    assert len(warnings) == 1
    assert "skipped 1 of 25 image files" in warnings[0] and "05x.png" in warnings[0]
    assert "training 18 images" in capsys.readouterr().out  # 24 decode: 6 held out
    assert (tmp_path / "run" / "report.json").exists()


def test_a_streamed_evaluation_set_with_a_file_that_does_not_decode_is_refused(
        tmp_path, capsys):
    """Refused while loading the data, before the run directory is written,
    with the file, the flags and what to do."""
    from simclic_tf.commands import train

    train_folder = png_folder(tmp_path / "train")
    eval_folder = png_folder(tmp_path / "eval", per_class=4, empty="b/bad.png")
    with pytest.raises(SystemExit):
        train(["--dataset", f"dir:{train_folder}", "--eval-dataset", f"dir:{eval_folder}",
               *tiny_run_flags(tmp_path / "run")])
    message = capsys.readouterr().err
    for words in ["--eval-dataset", "1 of its 9 image files do not decode",
                  str(eval_folder / "b" / "bad.png"), "remove or fix",
                  "--data-storage memory"]:
        assert words in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_undecodable_files_are_found_from_their_first_bytes(tmp_path):
    """Only a file that is empty or does not begin as an image is decoded."""
    folder = png_folder(tmp_path, per_class=2, classes=("a",), empty="a/0.png")
    (folder / "a" / "1.jpg").write_bytes(b"not an image at all")
    (folder / "a" / "2.png").write_bytes(tf.io.encode_jpeg(np.zeros((4, 4, 3), np.uint8)).numpy())
    streamed = load_images(f"dir:{folder}", storage="stream")
    names = [Path(streamed.paths[i]).name for i in streamed.undecodable()]
    assert names == ["0.png", "1.jpg"]  # a JPEG named .png decodes
    assert len(load_images("digits").undecodable()) == 0


def test_a_knn_bank_smaller_than_the_class_count_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--knn-bank-size 5 .* 10 classes.*accepted: 10 "):
        load_train_and_eval(SimCLICConfig(dataset="digits", knn_bank_size=5))
    train, _ = load_train_and_eval(SimCLICConfig(dataset="digits", knn_bank_size=10))
    assert len(train) == 1437


def test_an_uncompressed_npz_is_memory_mapped_and_a_compressed_one_read(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    labels = np.arange(50) % 5
    np.savez(tmp_path / "plain.npz", x=images, y=labels)
    np.savez_compressed(tmp_path / "packed.npz", x=images, y=labels)
    mapped = load_images(f"npz:{tmp_path / 'plain.npz'}", storage="stream")
    assert mapped.storage == "memmap" and isinstance(mapped.array, np.memmap)
    np.testing.assert_array_equal(pixels_of(mapped), images)
    np.testing.assert_array_equal(pixels_of(mapped.subset([3, 1, 40])), images[[3, 1, 40]])
    np.testing.assert_array_equal(
        pixels_of(load_images(f"npz:{tmp_path / 'plain.npz'}", image_size=4, storage="stream")),
        load_images(f"npz:{tmp_path / 'plain.npz'}", image_size=4).images)
    packed = load_images(f"npz:{tmp_path / 'packed.npz'}", storage="stream")
    assert packed.storage == "memory"  # nothing to map: decompressed into memory
    np.testing.assert_array_equal(packed.images, images)


def test_auto_storage_goes_by_the_decoded_size(tmp_path, monkeypatch):
    np.savez(tmp_path / "set.npz", x=np.zeros((40, 8, 8, 3), np.uint8))
    name = f"npz:{tmp_path / 'set.npz'}"
    assert load_images(name).storage == "memory"
    monkeypatch.setattr(sources, "MEMORY_LIMIT", 40 * 8 * 8 * 3 - 1)
    assert load_images(name).storage == "memmap"
    assert load_images(name, storage="memory").storage == "memory"
    with pytest.raises(DataError, match="--data-storage 'disk' is not accepted"):
        load_images(name, storage="disk")


def test_tfds_streams_from_its_prepared_files(tmp_path, mock_tfds):
    with mock_tfds(num_examples=12):
        memory = load_images("cifar10", "train", data_dir=str(tmp_path), storage="memory")
        streamed = load_images("cifar10", "train", data_dir=str(tmp_path), storage="stream")
        assert streamed.storage == "stream" and not streamed.random_access
        np.testing.assert_array_equal(pixels_of(streamed), memory.images)
        np.testing.assert_array_equal(streamed.labels, memory.labels)
        part = streamed.subset([2, 5, 11])
        np.testing.assert_array_equal(pixels_of(part), memory.images[[2, 5, 11]])
        batches = pretrain_dataset(streamed, 4, 1, tf.identity, epochs=2, shuffle_buffer=5)
        for (view,), indices in batches:
            np.testing.assert_array_equal(view.numpy() * 255, memory.images[indices.numpy()])
        assert all(sorted(epoch) == list(range(12)) for epoch in epochs_of(batches, 3))


def test_streamed_pretraining_visits_each_index_at_most_once_a_pass(cifar_dir):
    streamed = load_images(f"dir:{cifar_dir}", storage="stream")
    batches = pretrain_dataset(streamed, 16, 2, tf.identity, seed=1, epochs=2)
    memory = load_images(f"dir:{cifar_dir}")
    for (view, _), indices in batches:
        np.testing.assert_array_equal(np.round(view.numpy() * 255), memory.images[indices.numpy()])
    assert all(len(set(epoch)) == len(epoch) == 48 for epoch in epochs_of(batches, 3))


def test_the_knn_memory_is_capped_to_a_stratified_sample():
    from simclic_tf.evaluation import labelled_memory
    train, test = load_train_and_eval(SimCLICConfig(dataset="digits"))
    memory, queries = labelled_memory(train, test, seed=0, max_memory=100)
    assert len(memory) == 100 and queries is test
    assert np.bincount(memory.labels).min() >= 9  # ten classes, about ten each
    assert set(map(bytes, memory.images)) <= set(map(bytes, train.images))


# across workers


@pytest.mark.e2e
def test_two_workers_each_read_their_half_and_together_the_whole_set(tmp_path):
    """Two MultiWorkerMirroredStrategy workers on loopback, two epochs of
    `simclic train`'s input on digits (44 global batches of 32 a pass): at
    every step each worker trains on its own half of the global batch a
    single device trains on, the halves disjoint; each epoch the two
    together visit 1,408 distinct images, and the history banks' visit counts
    (every write of the global batch) equal the single device's."""
    from test_distribute import check, run_helper, run_two_workers

    script = Path(__file__).parent / "multi_worker_input.py"
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    run_two_workers(lambda i: [script, outs[i], "--epochs", "2"])
    check(run_helper("multi_worker_input.py", [tmp_path / "single.npz", "--epochs", "2"]))
    workers = [np.load(out) for out in outs]
    single = np.load(tmp_path / "single.npz")
    assert int(workers[0]["replicas"]) == 2 and single["trained"].shape == (88, 32)
    halves = [worker["trained"] for worker in workers]
    assert halves[0].shape == halves[1].shape == (88, 16)
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), single["trained"])
    for epoch in range(2):
        seen = np.concatenate([half[44 * epoch:44 * (epoch + 1)] for half in halves], axis=None)
        assert len(np.unique(seen)) == len(seen) == 44 * 32
    for worker in workers:
        np.testing.assert_array_equal(worker["visits"], single["visits"])
    assert single["visits"].sum() == 88 * 32 and single["visits"].max() <= 2


@pytest.mark.e2e
def test_a_run_streams_a_folder_with_steps_per_epoch_and_a_capped_knn_memory(cifar_dir, tmp_path,
                                                                             capsys):
    """`simclic train` end to end on a streamed folder: the log line and the
    report say the images came from files and how big the kNN memory was;
    --steps-per-epoch sets the epochs' length (2 steps of an 8-step pass)."""
    import json

    from simclic_tf.commands import train

    run_dir = tmp_path / "run"
    assert train([
        "--dataset", f"dir:{cifar_dir}", "--test-fraction", "0.2", "--data-storage", "stream",
        "--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "16", "--pred-hidden", "8",
        "--batch-size", "6", "--epochs", "3", "--steps-per-epoch", "2", "--knn-bank-size", "30",
        "--knn-k", "5", "--knn-every", "0", "--linear-epochs", "2", "--kernel-impl", "tf",
        "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Data: training 48 images 32x32x3 (streamed from image files" in out
    assert "kNN memory 30 images" in out and "2/2" in out  # the progress bar's real total
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["storage"] == "files" and report["data"]["knn_memory_images"] == 30
    assert report["steps"] == 6
    assert "read from disk (files); kNN memory 30 images (capped by --knn-bank-size 30)" in (
        run_dir / "report.md").read_text()
    assert len((run_dir / "history.csv").read_text().splitlines()) == 4
