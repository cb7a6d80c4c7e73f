#!/usr/bin/env python3
"""PyTorch CUDA peer for run_gpu_bench.sh: bench/peers/torch_peer.py's network (the tf2015
InceptionV3 from the shared safetensors) on the GPU, with the same image list, preprocessing,
golden check, timed modes and one-line JSON result (bench/peers/common.py).

Strict float32 (TF32 off for convolutions and matmuls), because dltool's wgpu path computes in
float32 and the comparison is meant to be like for like; TORCH_ALLOW_TF32=1 turns TF32 on.
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
peers = os.path.join(here, "..", "peers")
if not os.path.isfile(os.path.join(peers, "torch_peer.py")):
    sys.exit(f"{peers}/torch_peer.py not found: this peer reuses the CPU peer's network definition")
sys.path.insert(0, peers)

import torch  # noqa: E402

import common  # noqa: E402
import torch_peer  # noqa: E402


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA device")
    tf32 = os.environ.get("TORCH_ALLOW_TF32") == "1"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    # cuDNN picks the fastest convolution algorithm per shape on first use; the warm-up batch
    # of the network mode pays for it, as dltool's autotune pays in its first batch.
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(args.threads)
    model = torch_peer.build_model(args.weights).cuda()

    def forward(x):
        with torch.inference_mode():
            # .cpu() waits for the GPU, so the timings cover the whole batch.
            return model(torch.from_numpy(x).cuda()).cpu().numpy()

    name = torch.cuda.get_device_name()
    common.main(f"torch-cuda ({name}{', tf32' if tf32 else ''})", torch.__version__, args, forward)


if __name__ == "__main__":
    main()
