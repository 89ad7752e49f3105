"""What a run leaves beside its report: TensorBoard's HParams session, the
pictures, the per-epoch history read back, and the exported models."""

import csv
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import api_pb2, summary as hparams_summary

from simclic_tf import plots
from simclic_tf.backbones import copy_model
from simclic_tf.evaluation import extract_features
from simclic_tf.faults import atomic_path
from simclic_tf.report import hparam_values, tensorboard_metrics


def train_logs(run_dir):
    """The TensorBoard run that keras.callbacks.TensorBoard(run_dir/logs) writes
    its per-epoch scalars to, and that holds the run's other summaries."""
    return os.path.join(run_dir, "logs", "train")


def draw_views(train_set, augmentation, run_dir, count=8, seed=0):
    """Pairs of augmented views of `count` images drawn with `seed`, as
    views.png and a TensorBoard image."""
    chosen = np.random.default_rng(seed).choice(len(train_set), count, replace=False)
    grid = plots.view_pairs(train_set.subset(np.sort(chosen)).head(count), augmentation)
    plots.save_image(grid, os.path.join(run_dir, "views.png"))
    with tf.summary.create_file_writer(train_logs(run_dir)).as_default():
        tf.summary.image("augmented_views", grid[None], step=0)


def draw_results(model, queries, rows, report, run_dir):
    """The training curves of history `rows`, with the report's random-init
    references, and the embedding map; returns {title: file name}."""
    pictures = {"training curves": "curves.png", "augmented views (image, view 1, view 2)":
                "views.png", "embeddings of the evaluation images": "embeddings.png"}
    plots.training_curves(rows, os.path.join(run_dir, pictures["training curves"]),
                          report["config"]["proj_dim"], report["random_init"])
    plots.embedding_map(extract_features(model.backbone, queries), queries.labels,
                        queries.class_names, os.path.join(run_dir, "embeddings.png"))
    return pictures


def history_rows(history_csv):
    """The rows of history.csv, each {column: float} (NA columns left out):
    every epoch, also those trained before a resume."""
    with open(history_csv, newline="") as f:
        return [{key: float(value) for key, value in row.items() if value not in ("", "NA")}
                for row in csv.DictReader(f)]


def log_results(report, run_dir):
    """The run as one session of TensorBoard's HParams dashboard: the config
    (`hparam_values`) and the final errors (`tensorboard_metrics`, step 0),
    with a success or, diverged, failure status, in `train_logs` beside the
    per-epoch scalars, which the dashboard then counts as the session's
    metrics too. Not in run_dir/logs (the tuner's place, logs/trial_ID): with
    --logdir run_dir/logs that is TensorBoard's root run ".", to which the
    dashboard links no metrics."""
    writer = tf.summary.create_file_writer(train_logs(run_dir))
    with writer.as_default():
        hparams_api.hparams(hparam_values(report["config"]))
        for tag, value in tensorboard_metrics(report).items():
            tf.summary.scalar(tag, value, step=0)
        status = api_pb2.STATUS_FAILURE if "diverged" in report else api_pb2.STATUS_SUCCESS
        tf.summary.experimental.write_raw_pb(
            hparams_summary.session_end_pb(status).SerializeToString(), step=0)
    writer.close()


def export(model, run_dir):
    """model.keras and encoder.keras, each written whole or not at all. The
    encoder takes the images' shape, also where a smaller second view kept
    the backbone open to any size: transfer and downstream users read it."""
    encoder = model.backbone
    if None in encoder.input_shape[1:3]:
        encoder = copy_model(encoder, model.image_shape)
    for network, name in ((model, "model.keras"), (encoder, "encoder.keras")):
        with atomic_path(os.path.join(run_dir, name)) as partial:
            network.save(partial)
