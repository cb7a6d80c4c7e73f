#!/usr/bin/env python3
"""Featurize a folder of images on Spark with dltool as the map step, then train MLlib's
LogisticRegression on the features.

The driver lists the images, Spark distributes the paths, and each partition pipes its paths
through `dltool featurize -` (RDD.pipe): dltool streams one CSV row back per image, so a task's
memory stays bounded whatever the partition size. The rows become a DataFrame
(path, label, features array<float>) written as Parquet, which dltool itself also reads
(`dltool train-head FEATURES.parquet/`).

    python featurize_spark.py flower_photos --dltool target/release/dltool --out features.parquet

dltool must be installed at the same path on every worker (a static binary: copy it, or ship it
with --files and point --dltool at ./dltool).
"""

import argparse
import csv
import os
import shlex
import sys
import time


def list_images(root):
    """(path, label) for every non-hidden file under root, in sorted order; the label is the
    first-level folder, as dltool labels a directory it walks itself."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        label = "" if rel == "." else rel.split(os.sep)[0]
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append((os.path.join(dirpath, name), label))
    return found


def parse_row(line, labels):
    """One CSV row from dltool (RFC 4180, so quoted paths survive) into a tuple for Spark."""
    fields = next(csv.reader([line]))
    path = fields[0]
    return (path, labels.value.get(path, fields[1]), [float(v) for v in fields[2:]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", help="folder of images, one subfolder per class")
    ap.add_argument("--master", default="local[*]", help="Spark master (default: local[*])")
    ap.add_argument("--dltool", default="dltool", help="path of the dltool binary on the workers")
    ap.add_argument("--weights", help="weight file for dltool (default: dltool's own search)")
    ap.add_argument("--partitions", type=int, help="partitions of the path list (default: Spark's parallelism)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each dltool process (default 1: Spark already runs one task per core)")
    ap.add_argument("--out", default="features.parquet", help="Parquet output (a directory, as Spark writes)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--min-accuracy", type=float, default=0.0,
                    help="exit 1 if the test accuracy is lower (for tests)")
    ap.add_argument("--compare", metavar="PARQUET",
                    help="a file written by `dltool featurize -o F.parquet` over the same folder: "
                         "read it with Spark and check its rows equal the ones computed here")
    args = ap.parse_args()

    # Local mode: the Python workers must be this interpreter (the one that has pyspark).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.functions import array_to_vector

    spark = (SparkSession.builder.master(args.master).appName("dltool featurize")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    sc = spark.sparkContext
    started = time.time()

    images = list_images(args.images)
    if not images:
        sys.exit(f"featurize_spark.py: no files under {args.images}")
    # Every partition starts one dltool process, and an empty one would have nothing to do.
    partitions = min(args.partitions or sc.defaultParallelism, len(images))
    labels = sc.broadcast(dict(images))
    command = [args.dltool, "featurize", "-", "--quiet", "--no-header", "--threads", str(args.threads)]
    if args.weights:
        command += ["--weights", os.path.abspath(args.weights)]
    rows = (sc.parallelize([p for p, _ in images], partitions)
            .pipe(shlex.join(command), checkCode=True)
            .map(lambda line: parse_row(line, labels)))
    df = spark.createDataFrame(rows, "path string, label string, features array<float>")
    df.write.mode("overwrite").parquet(args.out)

    features = spark.read.parquet(args.out).cache()
    n = features.count()
    dim = features.select(F.size("features")).first()[0]
    print(f"featurized {n} of {len(images)} images ({dim} features each) in {partitions} "
          f"partitions in {time.time() - started:.1f} s -> {args.out}")

    if args.compare:
        theirs = spark.read.parquet(args.compare)
        print(f"{args.compare} read by Spark: {theirs.count()} rows, schema "
              + theirs.schema.simpleString())
        joined = features.alias("a").join(theirs.alias("b"), "path")
        same = joined.filter((F.col("a.features") == F.col("b.features"))
                             & (F.col("a.label") == F.col("b.label"))).count()
        if same != n or theirs.count() != n:
            sys.exit(f"featurize_spark.py: {args.compare} has {theirs.count()} rows, "
                     f"{same} of them equal to the {n} computed through Spark")
        print(f"all {n} rows equal the ones computed through Spark, bit for bit")

    data = (StringIndexer(inputCol="label", outputCol="y").fit(features).transform(features)
            .withColumn("x", array_to_vector("features")))
    train, test = data.randomSplit([1 - args.test_fraction, args.test_fraction], seed=args.seed)
    model = LogisticRegression(featuresCol="x", labelCol="y", maxIter=100, regParam=0.05,
                               elasticNetParam=0.3).fit(train)
    accuracy = MulticlassClassificationEvaluator(labelCol="y", metricName="accuracy").evaluate(
        model.transform(test))
    print(f"MLlib LogisticRegression: test accuracy {accuracy:.3f} "
          f"({train.count()} training, {test.count()} test images)")
    spark.stop()
    if accuracy < args.min_accuracy:
        sys.exit(f"featurize_spark.py: accuracy {accuracy:.3f} is below {args.min_accuracy}")


if __name__ == "__main__":
    main()
