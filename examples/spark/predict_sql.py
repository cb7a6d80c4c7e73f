#!/usr/bin/env python3
"""A trained dltool head as a Spark SQL function over image paths.

    spark.sql("SELECT path, flower_class(path) AS class FROM images")

`flower_class` is a pandas UDF of the iterator kind: Spark calls it once per partition with the
partition's paths in Arrow batches, and it streams them, batch by batch, through ONE long-lived
`dltool predict HEAD - --format jsonl` process per partition (paths in on stdin, one JSON row out
per image, in input order), not one process per row. An image dltool cannot read gets NULL.

With --serve URL the same function calls a running `dltool serve HEAD` instead: each batch of
paths goes as one multipart POST to URL/v1/predict, and the server batches concurrent
partitions' images on its network.

    python predict_sql.py IMAGES --head head.safetensors --dltool target/release/dltool
    python predict_sql.py IMAGES --serve http://127.0.0.1:8080

IMAGES is a folder of images (one subfolder per class, if --min-accuracy is to mean anything).
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

from featurize_spark import list_images


class PredictProcess:
    """One long-lived `dltool predict HEAD - --format jsonl` process: paths go in on stdin as
    they come, and each gets its class back as soon as dltool has run its batch, while the
    process stays up for the next ones (no process per row, no waiting for the partition's end).

    dltool answers in input order with one JSON row per image; a path it cannot read gets no row
    but a `skipped PATH: reason` line on stderr. Two reader threads turn both into results, so
    neither pipe can fill up and stall dltool, and a skipped path is known without a timeout.
    """

    def __init__(self, command):
        self.command = command
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                     bufsize=1)
        self.results = {}  # path -> class, or None when dltool skipped it
        self.pending = set()  # the paths of the batch being answered
        self.done = threading.Condition()
        self.stderr_tail = []
        self.readers = [threading.Thread(target=self._read_rows, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self.readers:
            t.start()

    def _resolve(self, path, value):
        with self.done:
            self.results[path] = value
            self.done.notify_all()

    def _read_rows(self):
        for line in self.proc.stdout:
            row = json.loads(line)
            self._resolve(row["path"], row["prediction"])
        with self.done:
            self.done.notify_all()

    def _read_stderr(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            if line.startswith("skipped ") and ": " in line:
                # The path is everything up to the last ": " that leaves a known path; paths
                # with ": " inside are rare enough to try each split.
                body = line[len("skipped "):]
                for i in range(len(body)):
                    if body.startswith(": ", i) and body[:i] in self.pending:
                        self._resolve(body[:i], None)
                        break
            else:
                self.stderr_tail = (self.stderr_tail + [line])[-20:]
                print(line, file=sys.stderr)
        with self.done:
            self.done.notify_all()

    def classes(self, paths):
        """The classes of `paths` (None where dltool could not read the image), in order."""
        wanted = [p for p in paths if p is not None and "\n" not in p]
        self.pending = set(wanted)
        self.proc.stdin.write("".join(p + "\n" for p in wanted))
        self.proc.stdin.flush()
        with self.done:
            while not all(p in self.results for p in wanted):
                if self.proc.poll() is not None and not any(t.is_alive() for t in self.readers):
                    raise RuntimeError(f"{self.command[0]} predict exited with "
                                       f"{self.proc.returncode}: {' / '.join(self.stderr_tail)}")
                self.done.wait(timeout=1.0)
        return [self.results.get(p) if p is not None else None for p in paths]

    def close(self):
        self.proc.stdin.close()
        code = self.proc.wait()
        for t in self.readers:
            t.join()
        # 2 means "no image was predicted" (all skipped): the rows are NULL, not an error.
        if code not in (0, 2):
            raise RuntimeError(f"{self.command[0]} predict exited with {code}: "
                               f"{' / '.join(self.stderr_tail)}")


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


def process_udf(command):
    """A SQL-registrable pandas UDF (iterator of Series -> iterator of Series: Spark calls it
    once per partition) that streams the partition's paths, Arrow batch by Arrow batch, through
    one `dltool predict` process."""
    from typing import Iterator

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def flower_class(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        dltool = PredictProcess(command)
        try:
            for batch in batches:
                yield pd.Series(dltool.classes(batch.tolist()), dtype="object")
        finally:
            dltool.close()

    return flower_class


def server_udf(url):
    """The same function over a running `dltool serve`: each Arrow batch's images go as
    multipart requests; the server batches concurrent partitions' images on its network."""
    from typing import Iterator

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def flower_class(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for batch in batches:
            paths = [p for p in batch.tolist() if p is not None]
            classes = predict_with_server(url, paths) if paths else {}
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
    ap.add_argument("--arrow-batch", type=int, default=64,
                    help="paths per Arrow batch: how many the UDF hands dltool at a time")
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
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.arrow_batch))
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
        spark.udf.register("flower_class", server_udf(args.serve))
        how = f"dltool serve at {args.serve}"
    else:
        command = [args.dltool, "predict", os.path.abspath(args.head), "-", "--format", "jsonl",
                   "--quiet", "--threads", str(args.threads)]
        if args.weights:
            command += ["--weights", os.path.abspath(args.weights)]
        spark.udf.register("flower_class", process_udf(command))
        how = "one dltool predict process per partition"

    query = "SELECT path, flower_class(path) AS class FROM images"
    print(f'spark.sql("{query}")')
    rows = sorted(spark.sql(query).collect(), key=lambda r: r["path"])
    spark.stop()
    for r in rows[:5]:
        print(f"  {r['path']}  {r['class']}")
    n = len(rows)
    label = dict(images)
    right = sum(r["class"] == label[r["path"]] for r in rows)
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
