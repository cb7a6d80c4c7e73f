#!/usr/bin/env bash
# End-to-end check of the Spark example: 20 daisy and 20 tulip photos of ../shared/flowers go
# through featurize_spark.py (Spark local mode, dltool as the map step through RDD.pipe); the
# Parquet that dltool writes itself is read back by Spark and must equal the piped rows bit for
# bit; the Parquet that Spark writes is read back by dltool (split, train-head, evaluate). The
# head trained there then becomes a Spark SQL function (predict_sql.py), once through one
# `dltool predict HEAD -` process per partition and once through a running `dltool serve`; both
# must give every image the class `dltool predict` gives it.
# Exits non-zero on any failure. Needs python3 and Java 17; pyspark comes from PyPI into a venv
# kept in ~/.cache/dltool/spark-venv (or $DLTOOL_SPARK_VENV) so later runs skip the download.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${DLTOOL_SHARED:-$repo/../shared}
weights=$shared/weights/inception_v3_tf2015.safetensors
venv=${DLTOOL_SPARK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dltool/spark-venv}
per_class=${PER_CLASS:-20}
started=$SECONDS

for tool in python3 java; do
    command -v "$tool" >/dev/null || { echo "run_test.sh: $tool is required" >&2; exit 1; }
done
[ -f "$weights" ] || { echo "run_test.sh: missing $weights (set DLTOOL_SHARED)" >&2; exit 1; }

# pyspark 3.5 supports Java 8/11/17 and Python 3.8-3.12; MLlib needs numpy; pyspark.ml.functions
# imports pandas at module level and pandas UDFs need pyarrow (pandas 3 and pyarrow 20 came
# after pyspark 3.5).
if ! "$venv/bin/python" -c 'import pyspark, numpy, pandas, pyarrow' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'pyspark>=3.5.2,<3.6' numpy \
        'pandas>=2,<3' 'pyarrow>=11,<20'
fi

if [ -z "${DLTOOL:-}" ]; then
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
    DLTOOL=$repo/target/release/dltool
fi

work=$(mktemp -d)
serve_pid=
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
for class in daisy tulips; do
    mkdir -p "$work/images/$class"
    # sed, not head: head exits after its lines, and under pipefail sort's next write then
    # fails with SIGPIPE (exit 141) whenever sort had not written everything by then.
    find "$shared/flowers/$class" -maxdepth 1 -type f -name '*.jpg' | sort | sed -n "1,${per_class}p" |
        while read -r f; do ln -s "$f" "$work/images/$class/"; done
done

"$DLTOOL" featurize "$work/images" -o "$work/dltool.parquet" --weights "$weights" --quiet

# Spark binds to the machine's address by default; a sandbox may have none worth binding.
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
"$venv/bin/python" "$here/featurize_spark.py" "$work/images" --dltool "$DLTOOL" \
    --weights "$weights" --partitions 4 --out "$work/spark.parquet" \
    --compare "$work/dltool.parquet" --min-accuracy 0.8

# Spark's Parquet (a directory of part files, features as array<float>) into dltool's chain.
"$DLTOOL" split "$work/spark.parquet" --fractions 0.7,0.3 --seed 42 \
    -o "$work/train.parquet" -o "$work/test.parquet"
"$DLTOOL" train-head "$work/train.parquet" -o "$work/head.safetensors" --quiet --weights "$weights" \
    --reg 0.05 --elastic-net 0.3
"$DLTOOL" evaluate "$work/head.safetensors" "$work/test.parquet" | tee "$work/report.txt"
grep -q accuracy "$work/report.txt"

# The head as a SQL function: SELECT path, flower_class(path) AS class FROM images. The classes
# must be the ones `dltool predict` gives (the same decode path and network).
"$DLTOOL" predict "$work/head.safetensors" "$work/images" --weights "$weights" --quiet \
    -o "$work/expected.csv"
"$venv/bin/python" "$here/predict_sql.py" "$work/images" --head "$work/head.safetensors" \
    --dltool "$DLTOOL" --weights "$weights" --partitions 2 --arrow-batch 8 \
    --expect "$work/expected.csv" \
    --min-accuracy 0.8

# The same query against a running server (the port is the OS's pick, printed on stdout).
"$DLTOOL" serve "$work/head.safetensors" --weights "$weights" --listen 127.0.0.1:0 \
    >"$work/serve.out" 2>"$work/serve.log" &
serve_pid=$!
for _ in $(seq 600); do
    grep -q '^listening on ' "$work/serve.out" 2>/dev/null && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.1
done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$url" ] || { echo "run_test.sh: dltool serve did not start" >&2; cat "$work/serve.log" >&2; exit 1; }
# Until the network is loaded the server answers 503 with Retry-After, which the UDF honours.
"$venv/bin/python" "$here/predict_sql.py" "$work/images" --serve "$url" --partitions 2 --arrow-batch 8 \
    --expect "$work/expected.csv" --min-accuracy 0.8
kill -TERM "$serve_pid"
wait "$serve_pid" || { echo "run_test.sh: dltool serve did not exit 0 on SIGTERM" >&2; exit 1; }
serve_pid=
echo "spark example: ok in $((SECONDS - started)) s"
