#!/usr/bin/env python3
"""Reference fits from scikit-learn for `src/logistic.rs` (multinomial elastic-net
logistic regression with Spark MLlib's semantics).

Setup:  python3 -m pip install scikit-learn numpy
Run from the repository root:  python3 tools/sklearn_logistic_reference.py

Writes (all small, committed):
  tests/fixtures/logistic_iris.csv        iris, 150 x 4, 3 classes (bundled with scikit-learn)
  tests/fixtures/logistic_synth.csv       make_classification, 240 x 24, 4 classes, rescaled
                                          columns and one constant column
  tests/fixtures/logistic_reference.json  one entry per (data set, reg, alpha, ...) case

CSV rows are `label,f0,f1,...`. Every value is a float32 written with the shortest
decimal that round-trips, so Rust's `str::parse::<f32>` reads exactly the numbers
scikit-learn was fitted on.

The objective both sides minimise is

    (1/n) sum_i CE(softmax(W z_i + b), y_i) + reg * (alpha ||W||_1 + (1 - alpha)/2 ||W||_2^2)

where z_i are the features standardised by the *sample* standard deviation (ddof=1,
as MLlib does) and W is K x D. scikit-learn minimises C sum_i CE + r(W) with
r = l1_ratio ||W||_1 + (1 - l1_ratio)/2 ||W||^2; dividing by C n shows that
C = 1 / (n reg), l1_ratio = alpha gives the same minimiser. StandardScaler divides by
the population std, so its output is multiplied by sqrt((n-1)/n) to get the sample-std
scaling. The "objective" stored is evaluated here with numpy on sklearn's solution, so
it does not depend on how sklearn reports anything.

Cases with standardize=false put the penalty on the original coefficients: sklearn
then sees the centred but unscaled features. Cases with fit_intercept=false are neither
centred nor given an intercept (MLlib scales but never centres).

Coefficients are written in the original feature space (K x D, row-major) with the
intercepts adjusted for the centring, i.e. exactly what `LogisticModel` holds.
"""

import csv
import json
import math
import os
import sys

import numpy as np
import sklearn
from sklearn.datasets import load_iris, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# (reg, alpha, standardize, fit_intercept). (0.05, 0.3) is the project's seed recipe.
COMMON_CASES = [(0.05, 0.3, True, True), (0.01, 0.0, True, True), (0.1, 1.0, True, True)]
EXTRA_CASES = {
    # Unscaled iris is well conditioned enough for saga to converge tightly.
    "iris": [(0.02, 0.5, False, True)],
    "synth": [(0.05, 0.3, True, False), (0.02, 1.0, True, True)],
}


def iris():
    data = load_iris()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def synth():
    x, y = make_classification(
        n_samples=240,
        n_features=24,
        n_informative=8,
        n_redundant=4,
        n_classes=4,
        random_state=0,
    )
    rng = np.random.RandomState(1)
    # Columns on very different scales and offsets, so the mapping between the
    # standardised and the original space is exercised; 4 significant digits keep
    # the CSV small (the data are whatever the CSV says, so rounding is harmless).
    scale = 10.0 ** rng.uniform(-2.0, 2.0, size=x.shape[1])
    offset = rng.uniform(-5.0, 5.0, size=x.shape[1]) * scale
    x = x * scale + offset
    x = np.vectorize(lambda v: float("%.4g" % v))(x)
    x[:, 7] = 3.5  # zero variance: must get a zero coefficient
    return x.astype(np.float32), y.astype(np.int64)


def f32_str(v):
    return np.format_float_positional(np.float32(v), unique=True, trim="-")


def write_csv(path, x, y):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label"] + ["f%d" % j for j in range(x.shape[1])])
        for row, label in zip(x, y):
            w.writerow([str(int(label))] + [f32_str(v) for v in row])


def read_back(path):
    """Parse the CSV again so the fit uses exactly the written numbers."""
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    y = np.array([int(r[0]) for r in rows], dtype=np.int64)
    x = np.array([[np.float32(v) for v in r[1:]] for r in rows], dtype=np.float32)
    return x.astype(np.float64), y


def log_softmax(logits):
    m = logits.max(axis=1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))


def fit_case(x, y, reg, alpha, standardize, fit_intercept):
    n, d = x.shape
    k = int(y.max()) + 1
    const = x.max(axis=0) == x.min(axis=0)
    mean = x.mean(axis=0)
    sd = x.std(axis=0, ddof=1)
    sd[const] = 1.0  # unused: those columns are zeroed below

    if standardize:
        if fit_intercept:
            z = StandardScaler().fit_transform(x) * math.sqrt((n - 1) / n)
        else:
            z = x / sd
        scale = sd
    else:
        z = x - mean if fit_intercept else x.copy()
        scale = np.ones(d)
    z[:, const] = 0.0

    kwargs = dict(
        C=1.0 / (n * reg),
        l1_ratio=alpha,
        solver="saga",
        tol=1e-10,
        max_iter=100000,
        fit_intercept=fit_intercept,
        random_state=0,  # saga visits samples in random order: fix it for stable fixtures
    )
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 8):
        kwargs["penalty"] = "elasticnet"  # before 1.8 l1_ratio alone was ignored
    clf = LogisticRegression(**kwargs).fit(z, y)
    w = clf.coef_.copy()
    b = clf.intercept_.copy() if fit_intercept else np.zeros(k)
    assert w.shape == (k, d), "expected the multinomial (K x D) parametrisation"

    logits = z @ w.T + b
    logp = log_softmax(logits)
    loss = -logp[np.arange(n), y].mean()
    objective = loss + reg * (alpha * np.abs(w).sum() + 0.5 * (1 - alpha) * (w**2).sum())

    # Largest violation of the optimality conditions, to judge sklearn's convergence.
    resid = np.exp(logp)
    resid[np.arange(n), y] -= 1.0
    grad = resid.T @ z / n + reg * (1 - alpha) * w
    l1 = reg * alpha
    viol = np.where(w != 0, np.abs(grad + l1 * np.sign(w)), np.maximum(np.abs(grad) - l1, 0.0))
    viol[:, const] = 0.0
    kkt = float(viol.max())
    if fit_intercept:
        kkt = max(kkt, float(np.abs(resid.mean(axis=0)).max()))

    coef = w / scale
    coef[:, const] = 0.0
    shift = mean if fit_intercept else np.zeros(d)
    intercepts = b - coef @ shift
    acc = float((np.argmax(x @ coef.T + intercepts, axis=1) == y).mean())
    return {
        "reg": reg,
        "elastic_net": alpha,
        "standardize": standardize,
        "fit_intercept": fit_intercept,
        "num_classes": k,
        "dim": d,
        "coefficients": [float(v) for v in coef.ravel()],
        "intercepts": [float(v) for v in intercepts],
        "objective": float(objective),
        "train_accuracy": acc,
        "sklearn_epochs": int(np.max(clf.n_iter_)),
        "kkt_violation": kkt,
    }


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    cases = []
    for name, make in (("iris", iris), ("synth", synth)):
        file = "logistic_%s.csv" % name
        path = os.path.join(FIXTURES, file)
        write_csv(path, *make())
        x, y = read_back(path)
        for reg, alpha, standardize, fit_intercept in COMMON_CASES + EXTRA_CASES[name]:
            case = {"name": "%s_reg%g_en%g%s%s" % (
                name, reg, alpha,
                "" if standardize else "_raw",
                "" if fit_intercept else "_nointercept",
            ), "data": file}
            case.update(fit_case(x, y, reg, alpha, standardize, fit_intercept))
            zeros = sum(v == 0.0 for v in case["coefficients"])
            print(
                "%-32s objective %.12f  acc %.4f  epochs %6d  kkt %.1e  zeros %d/%d"
                % (case["name"], case["objective"], case["train_accuracy"],
                   case["sklearn_epochs"], case["kkt_violation"], zeros,
                   len(case["coefficients"])),
                file=sys.stderr,
            )
            cases.append(case)
    out = {
        "generator": "tools/sklearn_logistic_reference.py",
        "sklearn_version": sklearn.__version__,
        "numpy_version": np.__version__,
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "logistic_reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
