#!/usr/bin/env bash
# Throughput of `dltool featurize --device wgpu` against PyTorch CUDA on the same GPU and the same
# images, and the parity tests on the GPU. For a machine with a GPU (the `device` tool); it has
# not been run on one yet.
#
# Usage: bash bench/gpu/run_gpu_bench.sh [IMAGE_DIR]      (default: ../shared/flowers)
#   DLTOOL=path    a dltool built with --features wgpu, or that binary gzipped (FILE.gz)
#                  [default: cargo build --release --features wgpu]
#
# Through the `device` tool, whose carry limit (64 MiB) a stripped wgpu build (78.5 MB) exceeds:
#   strip -o target/dltool-wgpu target/release/dltool && gzip -f target/dltool-wgpu   (~20 MB)
# then carry target/dltool-wgpu.gz and run with DLTOOL=target/dltool-wgpu.gz PARITY=0.
#   BATCHES="8 32" featurize batch sizes to time          [default: 8 32 64]
#   PYTHON=python3 the interpreter of the PyTorch peer     [default: bench/.venv/bin/python, else python3]
#   PARITY=0       skip the parity tests (they need cargo)
#
# Prints one line per run: tool, batch, images, seconds, img/s. dltool's figure is end to end
# (decode, resize, network, safetensors out), like the peer's e2e mode; the peer's network mode
# (images decoded before the clock starts) is printed too, for scale.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
shared="${DLTOOL_SHARED:-$root/../shared}"
images="${1:-$shared/flowers}"
weights="$shared/weights/inception_v3_tf2015.safetensors"
golden="$shared/golden/inception_v3_tf2015/net.safetensors"
batches="${BATCHES:-8 32 64}"
threads="$(nproc)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for f in "$weights" "$images"; do
    [ -e "$f" ] || { echo "run_gpu_bench: $f is missing (set DLTOOL_SHARED)" >&2; exit 1; }
done
n_images="$(find "$images" -type f ! -name '.*' | wc -l)"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "images: $images ($n_images files), threads: $threads"

case "${DLTOOL:-}" in
*.gz) gunzip -c "$DLTOOL" >"$tmp/dltool" && chmod +x "$tmp/dltool" && DLTOOL="$tmp/dltool" ;;
esac
if [ -z "${DLTOOL:-}" ]; then
    (cd "$root" && cargo build --release --features wgpu)
    DLTOOL="$root/target/release/dltool"
fi
# Fails with one line when the build has no GPU support or the machine has no GPU.
first="$(find "$images" -type f ! -name '.*' | sort | sed -n 1p)"
"$DLTOOL" featurize --device wgpu --weights "$weights" "$first" >/dev/null

if [ "${PARITY:-1}" != 0 ]; then
    (cd "$root" && DLTOOL_TEST_DEVICE=wgpu DLTOOL_SHARED="$shared" cargo test --release --features wgpu \
        --test it -- --nocapture inception_parity mobilenet_parity device_cli 2>&1 |
        grep -E "test device|max \|diff\||max \|wgpu|test result|panicked|FAILED") ||
        echo "parity tests FAILED on the GPU (run them without the grep to see why)"
fi

# featurize's summary line: "featurized N image(s), skipped S, in T s (R images/s)".
dltool_run() { # device batch
    local line
    line="$("$DLTOOL" featurize --device "$1" --batch-size "$2" --threads "$threads" \
        --weights "$weights" "$images" -o "$tmp/$1-$2.safetensors" 2>&1 >/dev/null | tail -n 1)"
    echo "dltool --device $1  batch $2: $line"
}
for b in $batches; do dltool_run wgpu "$b"; done
dltool_run cpu 8

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/bench/.venv/bin/python" ]; then python="$root/bench/.venv/bin/python"; else python=python3; fi
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "PyTorch CUDA peer skipped: $python has no torch with CUDA (bench/peers/setup.sh installs the CUDA wheel)"
    exit 0
fi
for b in $batches; do
    for mode in e2e network; do
        "$python" "$root/bench/gpu/torch_cuda_peer.py" --mode "$mode" --batch "$b" --threads "$threads" \
            --images "$n_images" --dir "$images" --weights "$weights" --golden "$golden"
    done
done
