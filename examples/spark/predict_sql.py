#!/usr/bin/env python3
"""A trained dltool head as a Spark SQL function over image paths.

    spark.sql("SELECT path, flower_class(path) AS class FROM images")

`flower_class` is a pandas UDF of the iterator kind: Spark calls it once per partition with the
partition's paths in Arrow batches, and it streams them all through ONE long-lived
`dltool predict HEAD - --format jsonl` process (paths in on stdin, one JSON row out per image,
in input order), not one process per row. An image dltool cannot read gets NULL.

With --serve URL the same function calls a running `dltool serve HEAD` instead: each batch of
paths goes as one multipart POST to URL/v1/predict, and the server batches concurrent
partitions' images on its network.

    python predict_sql.py IMAGES --head head.safetensors --dltool target/release/dltool
    python predict_sql.py IMAGES --serve http://127.0.0.1:8080

IMAGES is a folder of images (one subfolder per class, if --check-labels is to mean anything).
dltool (or the server) must see the same paths as the Spark workers.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid


def list_images(root):
    """(path, label) for every non-hidden file under root, sorted; the label is the first-level
    folder, as dltool labels a directory it walks."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        label = "" if rel == "." else rel.split(os.sep)[0]
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append((os.path.join(dirpath, name), label))
    return found


def predict_with_process(command, paths):
    """Streams `paths` through one `dltool predict HEAD -` process; returns {path: class}.
    A writer thread feeds stdin while this thread reads rows, so neither pipe can fill up and
    stall the other; paths dltool skips (not an image) have no row and are left out."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, encoding="utf-8")

    def feed():
        try:
            for p in paths:
                proc.stdin.write(p + "\n")
        finally:
            proc.stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    classes = {}
    for line in proc.stdout:
        row = json.loads(line)
        classes[row["path"]] = row["prediction"]
    writer.join()
    # 2 means "no image was predicted" (all skipped): the rows are NULL, not an error.
    if proc.wait() not in (0, 2):
        raise RuntimeError(f"{command[0]} predict exited with {proc.returncode}")
    return classes


def predict_with_server(url, paths, per_request=16):
    """POSTs `paths` to a running `dltool serve`, `per_request` images per multipart request;
    returns {path: class} (a file the server refuses as an image is left out)."""
    classes = {}
    for start in range(0, len(paths), per_request):
        chunk = paths[start:start + per_request]
        boundary = uuid.uuid4().hex
        body = bytearray()
        for i, p in enumerate(chunk):
            with open(p, "rb") as f:
                data = f.read()
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                     f"filename=\"{i}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
            body += data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            url.rstrip("/") + "/v1/predict", data=bytes(body), method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        for attempt in range(30):
            try:
                with urllib.request.urlopen(request, timeout=300) as resp:
                    answer = json.load(resp)
                break
            except urllib.error.HTTPError as e:
                if e.code == 503 and attempt < 29:  # busy: wait as the server says
                    time.sleep(float(e.headers.get("Retry-After", "1")))
                    continue
                if e.code == 422:  # every image of the request was refused
                    answer = json.load(e)
                    break
                raise
        # File names are the indices in `chunk`: the answer's order is the request's anyway.
        for p, result in zip(chunk, answer["results"]):
            if "prediction" in result:
                classes[p] = result["prediction"]
    return classes


def make_udf(predict):
    """`predict(paths) -> {path: class}` as a SQL-registrable pandas UDF (iterator of Series
    -> iterator of Series, one call per partition)."""
    from typing import Iterator

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def flower_class(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        # The whole partition goes through one process (or a few requests); its paths are
        # gathered first (strings only: the images stay on disk).
        batches = list(batches)
        paths = sorted({p for batch in batches for p in batch if p is not None})
        classes = predict(paths) if paths else {}
        for batch in batches:
            yield batch.map(classes.get)

    return flower_class


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", help="folder of images (one subfolder per class)")
    ap.add_argument("--master", default="local[*]", help="Spark master (default: local[*])")
    ap.add_argument("--head", help="head file from `dltool train-head` (the process variant)")
    ap.add_argument("--dltool", default="dltool", help="path of the dltool binary on the workers")
    ap.add_argument("--weights", help="the head's backbone weights, if dltool does not find them")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each dltool process (default 1: Spark runs a task per core)")
    ap.add_argument("--serve", metavar="URL", help="call a running `dltool serve` instead")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--expect", metavar="CSV",
                    help="`dltool predict HEAD IMAGES` output over the same folder: exit 1 unless "
                         "every class from SQL equals its row's prediction")
    ap.add_argument("--min-accuracy", type=float, default=0.0,
                    help="exit 1 if fewer classes than this fraction equal the folder labels")
    args = ap.parse_args()
    if bool(args.head) == bool(args.serve):
        sys.exit("predict_sql.py: give --head (a dltool process per partition) or --serve URL")

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(args.master).appName("dltool predict SQL")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    started = time.time()

    images = list_images(args.images)
    if not images:
        sys.exit(f"predict_sql.py: no files under {args.images}")
    df = spark.createDataFrame(images, "path string, label string").repartition(
        min(args.partitions, len(images)))
    df.createOrReplaceTempView("images")

    if args.serve:
        url = args.serve
        spark.udf.register("flower_class", make_udf(lambda paths: predict_with_server(url, paths)))
        how = f"dltool serve at {url}"
    else:
        command = [args.dltool, "predict", os.path.abspath(args.head), "-", "--format", "jsonl",
                   "--quiet", "--threads", str(args.threads)]
        if args.weights:
            command += ["--weights", os.path.abspath(args.weights)]
        spark.udf.register("flower_class",
                           make_udf(lambda paths: predict_with_process(command, paths)))
        how = "one dltool predict process per partition"

    query = "SELECT path, label, flower_class(path) AS class FROM images ORDER BY path"
    print(f'spark.sql("{query}")')
    rows = spark.sql(query).collect()
    spark.stop()
    for r in rows[:5]:
        print(f"  {r['path']}  {r['class']}")
    n = len(rows)
    right = sum(r["class"] == r["label"] for r in rows)
    print(f"flower_class over {n} images ({how}): {right} match their folder "
          f"({right / n:.3f}), in {time.time() - started:.1f} s")

    failed = False
    if args.expect:
        import csv
        with open(args.expect, newline="") as f:
            expected = {r["path"]: r["prediction"] for r in csv.DictReader(f)}
        differ = [r["path"] for r in rows if expected.get(r["path"]) != r["class"]]
        if differ or len(expected) != n:
            print(f"predict_sql.py: {len(differ)} classes differ from {args.expect} "
                  f"({len(expected)} rows there, {n} here), e.g. {differ[:3]}", file=sys.stderr)
            failed = True
        else:
            print(f"all {n} classes equal `dltool predict`")
    if right < args.min_accuracy * n:
        print(f"predict_sql.py: accuracy {right / n:.3f} is below {args.min_accuracy}",
              file=sys.stderr)
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
