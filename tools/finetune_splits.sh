#!/usr/bin/env bash
# A network fine-tuned vs its best linear head, per 60/40 split of ../shared/flowers
# (BENCHMARKS.md, "Over splits 0-9"). Each split: `dltool split` with that seed, the logistic head
# with the setting `tune` chose on the seed-42 training part, and `fine-tune` with its defaults on
# the split's training photos (linked into train/<class>/), both evaluated on the test photos.
# The fine-tune cache is shared across splits. Prints one line per split.
# usage: tools/finetune_splits.sh WORKDIR SEED...   (DLTOOL=path/to/dltool, SHARED=../shared,
#        NETWORK=efficientnet_lite2 (default) or inception_v3,
#        FT_ARGS="--refit": more fine-tune flags, word-split)
# The heads: EfficientNet-Lite2, logistic `--no-standardize --reg 0.001 --elastic-net 0` on its
# pooled `head` features; InceptionV3, logistic `--no-standardize --reg 0.001 --elastic-net 0.3`
# on `--tta flip` features (its best head, BENCHMARKS.md).
# Each split's folder WORKDIR/sSEED is made afresh (an earlier one is removed); the features file
# and WORKDIR/cache are kept and reused. Needs GNU time (/usr/bin/time) for the time and memory.
set -euo pipefail
[ -x /usr/bin/time ] || { echo "finetune_splits.sh: /usr/bin/time (GNU time) is required" >&2; exit 1; }
work=$1; shift
D=$(realpath "${DLTOOL:-target/release/dltool}")
shared=$(realpath "${SHARED:-../shared}")
case "${NETWORK:-efficientnet_lite2}" in
  efficientnet_lite2)
    W=$shared/weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth
    features=lite2.csv; featurize_args=(); head_args=(--reg 0.001 --elastic-net 0) ;;
  inception_v3)
    W=$shared/weights/inception_v3_tf2015.safetensors
    features=inception_flip.csv; featurize_args=(--tta flip); head_args=(--reg 0.001 --elastic-net 0.3) ;;
  *) echo "finetune_splits.sh: NETWORK is efficientnet_lite2 or inception_v3" >&2; exit 2 ;;
esac
mkdir -p "$work"; cd "$work"
[ -f "$features" ] || "$D" featurize "$shared/flowers" --weights "$W" "${featurize_args[@]}" \
    -o "$features" --quiet
acc() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$1"; }
for s in "$@"; do
  rm -rf "s$s"; mkdir -p "s$s"; cd "s$s"
  "$D" split "../$features" --fractions 0.6,0.4 --seed "$s" -o train.csv -o test.csv
  for part in train test; do
    python3 - "$part" <<'PY'
import csv, os, sys
part = sys.argv[1]
for row in csv.DictReader(open(f"{part}.csv")):
    p = row["path"]
    cls = os.path.basename(os.path.dirname(p))
    os.makedirs(f"{part}/{cls}", exist_ok=True)
    os.symlink(p, f"{part}/{cls}/{os.path.basename(p)}")
PY
  done
  "$D" train-head train.csv --head logistic --no-standardize "${head_args[@]}" -o lin.safetensors
  "$D" evaluate lin.safetensors test.csv --json > lin.json
  /usr/bin/time -v "$D" fine-tune train -o ft.safetensors --weights "$W" --seed 42 \
      --cache-dir ../cache --quiet ${FT_ARGS:-} 2> ft.time
  "$D" evaluate ft.safetensors test --weights "$W" --json > ft.json
  echo "split $s: linear $(acc lin.json) fine-tuned $(acc ft.json)" \
       "$(grep -E 'Elapsed|Maximum resident' ft.time | tr -s ' \t' ' ')"
  cd ..
done
