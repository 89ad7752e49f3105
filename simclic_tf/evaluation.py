"""How good are the representations? Weighted kNN and linear evaluation on
frozen backbone features, the protocol of docs/DESIGN.md section 2."""

import math

import keras
import numpy as np
from keras import ops

from simclic_tf.pipelines import eval_dataset
from simclic_tf.finetune import finetune_accuracy


def extract_features(backbone, images, batch_size=256):
    """Backbone features (N, D) of uint8 images, an image set or an array
    (N, H, W, C), a batch at a time, in inference mode."""
    return backbone.predict(eval_dataset(images, batch_size), verbose=0).astype("float32")


def online_probe_accuracy(model, images, labels):
    """Test accuracy of a SimCLIC model's online probe (see `online_probe`)."""
    logits = model.probe(extract_features(model.backbone, images))
    return float(np.mean(ops.convert_to_numpy(ops.argmax(logits, -1)) == labels))


def knn_predict(train_features, train_labels, query_features, num_classes,
                k=200, temperature=0.1, batch_size=1024):
    """Weighted kNN on cosine similarity (Wu et al. 2018, the SimSiam monitor):
    each of the k nearest training samples votes for its class with weight
    exp(similarity / temperature). Batched as matrix products over queries."""
    train = ops.normalize(ops.convert_to_tensor(train_features, "float32"), axis=-1)
    labels = ops.convert_to_tensor(np.asarray(train_labels, "int32"))
    k = min(k, len(train_features))
    predictions = []
    for start in range(0, len(query_features), batch_size):
        query = ops.normalize(
            ops.convert_to_tensor(query_features[start:start + batch_size], "float32"), axis=-1)
        similarity, neighbours = ops.top_k(ops.matmul(query, ops.transpose(train)), k)
        votes = ops.one_hot(ops.take(labels, neighbours), num_classes)
        weights = ops.exp(similarity / temperature)[..., None]
        predictions.append(ops.convert_to_numpy(ops.argmax(ops.sum(votes * weights, axis=1), -1)))
    return np.concatenate(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                 k=200, temperature=0.1):
    predicted = knn_predict(train_features, train_labels, test_features, num_classes,
                            k=k, temperature=temperature)
    return float(np.mean(predicted == np.asarray(test_labels)))


def linear_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                    epochs=100, batch_size=256, learning_rate=1e-2, seed=0):
    """A softmax classifier trained with Adam on frozen, standardised features;
    returns its test accuracy. Features are computed once, so this is cheap."""
    normalizer = keras.layers.Normalization()
    normalizer.adapt(train_features)
    classifier = keras.Sequential([
        keras.Input((train_features.shape[-1],)),
        normalizer,
        keras.layers.Dense(num_classes, kernel_initializer="zeros"),
    ])
    steps = epochs * math.ceil(len(train_features) / batch_size)
    classifier.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    keras.utils.set_random_seed(seed)
    classifier.fit(train_features, np.asarray(train_labels), epochs=epochs,
                   batch_size=batch_size, verbose=0)
    return float(classifier.evaluate(test_features, np.asarray(test_labels), verbose=0)[1])


def labelled_memory(train_set, test_set, seed=0, max_memory=None):
    """(memory, queries) for kNN and linear evaluation: the training set and
    the test set, or, when the training images have no labels, a stratified
    half of the test set each; the memory capped at a stratified `max_memory`
    images when it is given (for very large sets: its features are N x D
    floats)."""
    if train_set.labels is not None:
        memory, queries = train_set, test_set
    else:
        memory, queries = test_set.stratified_split(0.5, seed)
    if max_memory is not None and len(memory) > max_memory:
        memory = memory.sample(max_memory, seed)
    return memory, queries


def evaluate_backbone(backbone, memory, queries, config):
    """kNN, linear and (with `config.finetune_epochs`) fine-tuned accuracy of a
    backbone on the labelled `queries`, with `memory` as the kNN memory and the
    linear classifier's and fine-tuning's training data (see labelled_memory).
    Fine-tuning works on a copy: `backbone` is left unchanged."""
    memory_features = extract_features(backbone, memory)
    query_features = extract_features(backbone, queries)
    num_classes = memory.num_classes
    results = {"knn_accuracy": knn_accuracy(
        memory_features, memory.labels, query_features, queries.labels, num_classes,
        k=config.knn_k, temperature=config.knn_t)}
    if config.linear_epochs:
        results["linear_accuracy"] = linear_accuracy(
            memory_features, memory.labels, query_features, queries.labels, num_classes,
            epochs=config.linear_epochs, seed=config.seed)
    if config.finetune_epochs:
        results["finetune_accuracy"] = finetune_accuracy(
            backbone, memory, queries, config.finetune_epochs, seed=config.seed)
    return results
