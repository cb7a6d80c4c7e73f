"""What the peer benchmarks share: the image list, PIL preprocessing, batching, the golden
check, the two timed modes and the one-line JSON result.

A peer module supplies `forward(x) -> features` for a float32 [B, 3, H, W] batch (H, W from
--preprocess); `main` does the rest, so the PyTorch and ONNX Runtime peers differ only in the
network call.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

SIZE = 299
# Far above float32 noise (the reference network matches a correct port to ~1e-4) and far
# below what a wrong layer gives.
GOLDEN_TOLERANCE = 1e-3


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--mode", choices=["network", "e2e"], default="network")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=32, help="use the first N images of the sorted list")
    p.add_argument("--dir", required=True, help="image folder, walked recursively in name order")
    p.add_argument(
        "--network",
        default="inception_v3",
        help="dltool's --backbone name of the network (inception_v3, efficientnet_lite0, "
        "efficientnet_lite2, resnet50, vgg16, vgg19, xception) [default: inception_v3]",
    )
    p.add_argument("--weights", required=True, help="the weight file dltool runs (.safetensors or .pth)")
    p.add_argument("--golden", help="golden net.safetensors (input -> pool) to check the network against")
    p.add_argument("--out", help="e2e: features .npy to write [default: a temporary file, removed]")
    p.add_argument(
        "--preprocess",
        help="dltool's preprocessing spec (WxH_stretch|crop_RGB|BGR_meanA,B,C_stdA,B,C), which "
        "dltool bench passes for every network [default: InceptionV3's, 299x299 stretched, x/128 - 1]",
    )
    args = p.parse_args()
    if args.preprocess:
        set_preprocess(args.preprocess)
    for name in ("batch", "threads", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def list_images(root):
    """Files under `root`, depth first with the entries of each folder in name order and hidden
    entries left out: the order `dltool featurize DIR` walks."""
    if not os.path.isdir(root):
        sys.exit(f"{root}: not a directory")
    out = []

    def walk(d):
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                walk(e.path)
            elif e.is_file():
                out.append(e.path)

    walk(root)
    return out


# What load_image makes of an image; --preprocess replaces it (an ONNX model's preset).
PRE = {"size": (SIZE, SIZE), "crop": False, "bgr": False, "mean": None, "std": None}


def set_preprocess(spec):
    """Reads dltool's `Preprocess::spec()` string."""
    try:
        size, resize, channels, mean, std = spec.split("_")
        w, h = (int(v) for v in size.split("x"))
        PRE["size"] = (w, h)
        PRE["crop"] = resize == "crop"
        PRE["bgr"] = channels == "BGR"
        PRE["mean"] = np.array([float(v) for v in mean[len("mean"):].split(",")], dtype=np.float32)
        PRE["std"] = np.array([float(v) for v in std[len("std"):].split(",")], dtype=np.float32)
    except ValueError:
        sys.exit(f"--preprocess {spec}: not a dltool preprocessing spec")


def load_image(path):
    """Decode, apply EXIF orientation, RGB, bilinear resize (PIL's antialiased filter, the golden
    pipeline's) straight to 299x299, x/128 - 1, CHW float32; or what --preprocess says, with
    torchvision's Resize(size / 0.875) + CenterCrop(size) for a crop."""
    w, h = PRE["size"]
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        if PRE["crop"]:
            rw, rh = int(w / 0.875), int(h / 0.875)
            sw, sh = im.size
            if rw * sh >= rh * sw:
                nw, nh = rw, max(rh, sh * rw // sw)
            else:
                nw, nh = max(rw, sw * rh // sh), rh
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = int(round((nw - w) / 2.0)), int(round((nh - h) / 2.0))
            im = im.crop((left, top, left + w, top + h))
        else:
            im = im.resize((w, h), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32)
    if PRE["mean"] is None:
        x = x / np.float32(128.0) - np.float32(1.0)
    else:
        if PRE["bgr"]:
            x = x[:, :, ::-1]
        x = (x - PRE["mean"]) / PRE["std"]
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def golden_check(forward, path):
    """Max |forward(input) - pool| on the golden file; exits if the network is not the reference."""
    from safetensors.numpy import load_file

    g = load_file(path)
    got = forward(np.ascontiguousarray(g["input"], dtype=np.float32))
    diff = float(np.max(np.abs(got - g["pool"])))
    print(f"golden check ({path}): max abs diff {diff:.2e}", file=sys.stderr)
    if not diff <= GOLDEN_TOLERANCE:
        sys.exit(f"{path}: features differ from the reference by {diff:.2e} (> {GOLDEN_TOLERANCE})")
    return diff


def save_npy_atomic(path, array):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_network(forward, paths, args):
    """Time the network only: images decoded and batched before the clock starts; one untimed
    warm-up batch first (so one-time kernel selection is not counted), as dltool's worker does."""
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        pixels = list(pool.map(load_image, paths))
    xs = [np.stack(b) for b in batches(pixels, args.batch)]
    forward(xs[0])
    t0 = time.perf_counter()
    for x in xs:
        forward(x)
    return time.perf_counter() - t0


def run_e2e(forward, paths, args):
    """Decode + resize + network + write, the clock around all of it. Decoding runs on a pool
    of `threads` PIL workers (PIL releases the GIL) one batch ahead of the network, the same
    overlap `dltool featurize` has; the network keeps its own `threads` threads."""
    out = args.out
    tmpdir = None
    if out is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="peer-e2e-")
        out = os.path.join(tmpdir.name, "features.npy")
    try:
        t0 = time.perf_counter()
        chunks = batches(paths, args.batch)
        feats = []
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            pending = [pool.submit(load_image, p) for p in chunks[0]]
            for k in range(len(chunks)):
                ready = pending
                pending = (
                    [pool.submit(load_image, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
                )
                x = np.stack([f.result() for f in ready])
                feats.append(forward(x))
        save_npy_atomic(out, np.concatenate(feats).astype(np.float32, copy=False))
        return time.perf_counter() - t0
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def main(tool, version, args, forward):
    """Golden check, then the timed mode; prints one JSON line on stdout."""
    paths = list_images(args.dir)[: args.images]
    if not paths:
        sys.exit(f"{args.dir}: no images")
    diff = golden_check(forward, args.golden) if args.golden else None
    run = run_network if args.mode == "network" else run_e2e
    secs = run(forward, paths, args)
    print(
        json.dumps(
            {
                "tool": tool,
                "version": version,
                "mode": args.mode,
                "batch": args.batch,
                "threads": args.threads,
                "images": len(paths),
                "seconds": secs,
                "img_per_s": len(paths) / secs,
                "golden_max_abs_diff": diff,
            }
        ),
        flush=True,
    )
