"""The anomaly benchmark's tasks train on normal rows only, with the sizes its docs state; its table averages as it says."""
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from aeserve.training.data.builtin import FASHION_MNIST_DIR
from benchmarks.anomaly import Measured, Task, breast_cancer, digits, fashion_mnist, floors, one_class_split, table, trained_line, wine


def rows_in(rows: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each row of ``rows`` (n, ...), whether it is one of ``pool``'s rows (m, ...)."""
    pool_bytes = {r.tobytes() for r in pool.reshape(len(pool), -1)}
    return np.array([r.tobytes() in pool_bytes for r in rows.reshape(len(rows), -1)])


def test_one_class_split_trains_on_normal_rows_only_and_holds_out_the_rest():
    x = np.arange(20, dtype=float)[:, None]
    normal = np.arange(20) < 10
    train_x, score_x, score_y = one_class_split(x, normal, seed=0)
    assert len(train_x) == 7 and len(score_x) == 13
    assert set(train_x[:, 0]) | set(score_x[score_y == 0, 0]) == set(range(10))  # normal rows: trained on or scored, never both
    assert not set(train_x[:, 0]) & set(score_x[:, 0])
    assert sorted(score_x[score_y == 1, 0]) == list(range(10, 20))
    again = one_class_split(x, normal, seed=0)
    assert np.array_equal(again[0], train_x)
    assert not np.array_equal(one_class_split(x, normal, seed=1)[0], train_x)


def test_breast_cancer_trains_on_250_benign_rows_and_scores_107_benign_and_212_malignant():
    task = breast_cancer(seed=0)
    bunch = load_breast_cancer()
    assert task.train_x.shape == (250, 30) and task.columns == list(bunch.feature_names)
    assert (task.score_y == 0).sum() == 107 and task.score_y.sum() == 212
    assert rows_in(task.train_x, bunch.data[bunch.target == 1]).all()
    assert rows_in(task.score_x[task.score_y == 1], bunch.data[bunch.target == 0]).all()
    assert not rows_in(task.score_x, task.train_x).any()


@pytest.mark.parametrize("cultivar, normal_rows", [(0, 59), (1, 71), (2, 48)])
def test_wine_trains_on_one_cultivar(cultivar, normal_rows):
    task = wine(seed=0, cultivar=cultivar)
    held = int(round(normal_rows * 0.3))
    assert len(task.train_x) == normal_rows - held and (task.score_y == 0).sum() == held
    assert task.score_y.sum() == 178 - normal_rows


def test_digits_trains_on_one_digit_as_images():
    task = digits(seed=0, digit=8)
    bunch = load_digits()
    assert task.columns is None and task.train_x.shape[1:] == (8, 8)
    assert rows_in(task.train_x, bunch.images[bunch.target == 8]).all()
    assert len(task.train_x) + (task.score_y == 0).sum() == (bunch.target == 8).sum() == 174
    assert task.score_y.sum() == 1797 - 174


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_trains_on_2000_images_of_one_class_and_scores_1000_of_it_and_1000_others():
    task = fashion_mnist(seed=0, normal_class=3)
    assert task.train_x.shape == (2000, 28, 28) and (task.score_y == 0).sum() == 1000 and task.score_y.sum() == 1000
    assert task.name == "fashion-mnist-3" and task.normal == "Dress"
    assert not rows_in(task.score_x[task.score_y == 1], task.train_x).any()


def measured(name: str, dataset: str, errors: float, forest: float, scores: float | None = None) -> Measured:
    task = Task(name, dataset, name, "others", np.zeros((4, 2)), np.zeros((3, 2)), np.array([0, 1, 1]))
    aeserve = {"errors": errors, **({"scores": scores} if scores is not None else {})}
    return Measured(task, aeserve, {"IsolationForest": forest}, manifest={}, train_seconds=1.0)


def test_table_averages_classes_within_a_data_set_then_data_sets_and_checks_the_floors():
    runs = [measured("breast-cancer", "breast cancer", 0.93, 0.96), measured("digits-0", "digits", 1.00, 0.90),
            measured("digits-1", "digits", 0.80, 0.90)]
    text, means, datasets = table(runs, "errors", ["IsolationForest"])
    assert datasets["digits"] == {"aeserve": pytest.approx(0.90), "errors": pytest.approx(0.90), "IsolationForest": pytest.approx(0.90)}
    assert means == {"aeserve": pytest.approx(0.915), "errors": pytest.approx(0.915), "IsolationForest": pytest.approx(0.93)}
    assert "| digits | digits-0, digits-1 | 4 | 1 + 2 | **0.900** | **0.900** | **0.900** |" in text  # ties all bold
    assert text.splitlines()[0] == ("| data set | normal (trained on) | train rows | scored: normal + anomalous | aeserve score: `errors` | "
                                    "aeserve `errors` | IsolationForest |")
    assert text.splitlines()[-1] == "| **mean of the 2 data sets** | | | | 0.915 | 0.915 | **0.930** |"
    assert floors("errors", means, datasets) == [
        "floor: aeserve `errors` mean ROC-AUC 0.9150 >= IsolationForest's 0.9300: FAILS",
        "floor: aeserve `errors` ROC-AUC on breast cancer 0.9300 >= 0.955: FAILS"]


def test_table_uses_scores_when_served():
    runs = [measured("breast-cancer", "breast cancer", 0.93, 0.96, scores=0.97)]
    text, means, datasets = table(runs, "scores", ["IsolationForest"])
    assert "aeserve score: `scores` | aeserve `errors` |" in text and means["aeserve"] == pytest.approx(0.97)
    assert floors("scores", means, datasets) == [
        "floor: aeserve `scores` mean ROC-AUC 0.9700 >= IsolationForest's 0.9600: holds",
        "floor: aeserve `scores` ROC-AUC on breast cancer 0.9700 >= 0.955: holds"]


def test_a_trained_line_names_the_published_kind_and_how_the_percentiles_were_obtained():
    run = measured("wine-0", "wine", 0.99, 0.99, scores=1.0)
    run.task.train_x = np.zeros((41, 13))
    run.manifest = {"kind": "pca", "config": {"code_dim": 3}, "code_dim": 3,
                    "metrics": {"test_sq_err": 5.8254, "pca_sq_err": 5.8254},
                    "training": {"history": [{}] * 123, "best_epoch": 73, "run_config": {"model": {"kind": "mlp", "hidden": [32]}}},
                    "anomaly": {"score": "combined", "held_out": "5-fold cross-fit over 41 rows",
                                "cross_fit": {"fold_epochs": 14, "published_epochs": 73, "scale": 0.8292, "scale_rows": 7}}}
    assert trained_line(run) == ("| wine-0 | pca 13-3 | 123 / 73 | 5.825 / 5.825 | 1.0 | combined | 5-fold cross-fit over 41 rows "
                                 "(fold models closed-form PCA, scale 0.829) |")  # a PCA version's fold models train no epochs
    run.manifest.update(kind="mlp", config={"code_dim": 3, "hidden": [32]})
    assert trained_line(run) == ("| wine-0 | mlp 13-32-3 | 123 / 73 | 5.825 / 5.825 | 1.0 | combined | 5-fold cross-fit over 41 rows "
                                 "(fold models 14 epochs against 73, scale 0.829) |")
