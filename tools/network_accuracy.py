#!/usr/bin/env python3
"""Test accuracy on ../shared/flowers per feature set (one network, or several side by side).

For each feature file (as `dltool featurize ../shared/flowers -o F.safetensors` writes it):
  1. `dltool split` 60/40 stratified with seed 42; `dltool tune` (logistic, 5-fold CV, seed 42)
     on the training part only picks standardize / reg / elastic-net from GRID;
  2. that choice is trained (`dltool train-head`) and evaluated on the test part of the seed-42
     split and of splits with seeds 0-9, unchanged.
Prints a Markdown table and writes every figure to --json.

Also `concat A B ... -o OUT`: the rows of several feature files side by side (same images in the
same order, checked), with provenance joined the way `featurize --backbone a,b` joins it, so a
pair can be scored from features computed once per network. Standard library only.

usage: network_accuracy.py score --dltool PATH [--work DIR] [--json OUT] F.safetensors...
       network_accuracy.py concat A.safetensors B.safetensors -o AB.safetensors
"""

import argparse
import json
import os
import struct
import subprocess
import sys

GRID = [
    "--grid", "standardize=true,false",
    "--grid", "reg=0.0001,0.001,0.01,0.1",
    "--grid", "elastic-net=0,0.1,0.5",
]
SEEDS = list(range(10))


def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def tensor(header, data, name):
    a, b = header[name]["data_offsets"]
    return data[a:b]


def concat(paths, out):
    parts = [read_st(p) for p in paths]
    first_h, first_d = parts[0]
    n = first_h["features"]["shape"][0]
    for (h, d), p in zip(parts[1:], paths[1:]):
        for name in ("labels", "path_offsets", "path_bytes"):
            if tensor(h, d, name) != tensor(first_h, first_d, name):
                sys.exit(f"{p}: its {name} differ from {paths[0]}: not the same rows")
    dims = [h["features"]["shape"][1] for h, _ in parts]
    rows = []
    for r in range(n):
        for (h, d), dim in zip(parts, dims):
            f = tensor(h, d, "features")
            rows.append(f[r * dim * 4:(r + 1) * dim * 4])
    features = b"".join(rows)
    meta = dict(first_h["__metadata__"])
    for key in ("backbone", "weights_sha256", "layer", "pool", "tta"):
        meta[key] = "+".join(h["__metadata__"][key] for h, _ in parts)
    blobs = [
        ("path_offsets", "I64", first_h["path_offsets"]["shape"], tensor(first_h, first_d, "path_offsets")),
        ("features", "F32", [n, sum(dims)], features),
        ("labels", "I32", [n], tensor(first_h, first_d, "labels")),
        ("path_bytes", "U8", first_h["path_bytes"]["shape"], tensor(first_h, first_d, "path_bytes")),
    ]
    header = {"__metadata__": meta}
    offset = 0
    for name, dtype, shape, blob in blobs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for *_, blob in blobs:
            f.write(blob)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def accuracy(dltool, head, test):
    report = json.loads(run([dltool, "evaluate", head, test, "--json"]))
    return report["accuracy"]


def score(dltool, features, work):
    name = os.path.basename(features).removesuffix(".safetensors")
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)

    def split(seed):
        train, test = os.path.join(d, f"train{seed}.safetensors"), os.path.join(d, f"test{seed}.safetensors")
        run([dltool, "split", features, "--fractions", "0.6,0.4", "--seed", str(seed), "-q",
             "-o", train, "-o", test])
        return train, test

    train, test = split(42)
    tuned = json.loads(run([dltool, "tune", train, "--head", "logistic", *GRID, "--folds", "5",
                            "--seed", "42", "--json"]))
    best = tuned["results"][0]
    params = best["params"]
    grid = {"standardize": params["standardize"], "reg": params["reg"],
            "elastic-net": params["elastic_net"]}
    flags = ["--head", "logistic", "--reg", str(params["reg"]),
             "--elastic-net", str(params["elastic_net"])]
    if not params["standardize"]:
        flags.append("--no-standardize")

    def test_acc(seed):
        tr, te = (train, test) if seed == 42 else split(seed)
        head = os.path.join(d, f"head{seed}.safetensors")
        run([dltool, "train-head", tr, *flags, "-o", head, "-q"])
        return accuracy(dltool, head, te)

    seed42 = test_acc(42)
    per_seed = [test_acc(s) for s in SEEDS]
    return {
        "features": features,
        "dim": read_st(features)[0]["features"]["shape"][1],
        "backbone": read_st(features)[0]["__metadata__"]["backbone"],
        "cv_choice": grid,
        "cv_score": best["mean"],
        "seed42": seed42,
        "splits_0_9": per_seed,
        "mean_0_9": sum(per_seed) / len(per_seed),
    }


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--dltool", default="target/release/dltool")
    s.add_argument("--work", default="accuracy-work")
    s.add_argument("--json")
    s.add_argument("features", nargs="+")
    c = sub.add_parser("concat")
    c.add_argument("features", nargs="+")
    c.add_argument("-o", required=True)
    args = ap.parse_args()
    if args.cmd == "concat":
        concat(args.features, args.o)
        return
    results = []
    print("| features | dim | logistic chosen by tune (seed-42 train) | CV f1 | seed 42 | mean 0-9 (min-max) |")
    print("|---|---:|---|---:|---:|---:|")
    for f in args.features:
        r = score(args.dltool, f, args.work)
        results.append(r)
        g = r["cv_choice"]
        print(f"| {r['backbone']} | {r['dim']} | standardize={str(g['standardize']).lower()} reg={g['reg']} "
              f"elastic-net={g['elastic-net']} | {r['cv_score']:.4f} | {r['seed42']:.4f} | "
              f"{r['mean_0_9']:.4f} ({min(r['splits_0_9']):.4f}-{max(r['splits_0_9']):.4f}) |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
