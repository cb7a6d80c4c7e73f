"""Reference activations for dltool's Xception parity tests (tests/xception_parity.rs).

Builds a REDUCED Xception from timm's own `legacy_xception` modules (its `Block`, whose `rep`
holds its `SeparableConv2d`s, BatchNorms, ReLUs and max pool, and its stem and exit layers):
the same block types as the full network with fewer middle blocks, narrower channels and a
smaller input, random weights and random BatchNorm statistics. Writes into
tests/fixtures/xception/:

* `xception_tiny.safetensors`: the state dict, float32, timm's tensor names;
* `xception_tiny_ref.safetensors`: `input` (NCHW) and the activation at every stage dltool
  exposes, computed in float64 from the same float32 weights;
* `full_size_names.json`: every tensor name, shape and dtype of timm's full-size
  `legacy_xception` (built without weights), for the full-size loading test.

The reduced network's forward chains its blocks by name; the script first checks that the
same chaining reproduces timm's own `forward_features` and `forward` on the full-size
network (random weights), so the reduced reference is timm's computation, not a copy of it.

Pinned versions (the fixtures were produced with these): torch 2.15.0, timm 1.0.31,
safetensors 0.8.0, numpy 2.x, from PyPI:

    /work/venvs/classic/bin/pip install torch==2.15.0 timm==1.0.31 safetensors==0.8.0 numpy
    /work/venvs/classic/bin/python tools/xception_reference.py

Reduced configuration (timm's full one in brackets): stem 8/16 (32/64); entry blocks 32, 64,
96 (128, 256, 728); 2 middle blocks of 96 (8 of 728); exit block 96 -> 128 (728 -> 1024);
conv3 192 (1536), conv4 256 (2048); 10 classes (1000); input 2 x 3 x 71 x 71 (299), odd so
that every stride and pool rounds.
"""

import json
import os
import sys

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import create_classifier
from timm.models.xception import Block, SeparableConv2d

# Run from anywhere: the sibling script's BatchNorm randomisation is shared.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classic_reference import randomize_batchnorm  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "xception")


class ReducedXception(nn.Module):
    """timm's Xception layout with widths and middle depth as arguments (timm hard-codes them):
    the same attribute names, so the state dict has timm's tensor names."""

    def __init__(self, stem, entry, middle, exit_out, conv3, conv4, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem[0], 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(stem[0])
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem[0], stem[1], 3, bias=False)
        self.bn2 = nn.BatchNorm2d(stem[1])
        self.act2 = nn.ReLU(inplace=True)
        cin = stem[1]
        b = 1
        for i, c in enumerate(entry):
            setattr(self, f"block{b}", Block(cin, c, 2, 2, start_with_relu=(i > 0)))
            cin, b = c, b + 1
        for _ in range(middle):
            setattr(self, f"block{b}", Block(cin, cin, 3, 1))
            b += 1
        setattr(self, f"block{b}", Block(cin, exit_out, 2, 2, grow_first=False))
        self.blocks = b
        self.conv3 = SeparableConv2d(exit_out, conv3, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(conv3)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(conv3, conv4, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(conv4)
        self.act4 = nn.ReLU(inplace=True)
        self.global_pool, self.fc = create_classifier(conv4, num_classes, pool_type="avg")


def stages(model, x, blocks, middle_end):
    """The stages dltool exposes, by chaining the model's modules the way timm's
    `forward_features` does."""
    out = {}
    h = model.act1(model.bn1(model.conv1(x)))
    h = model.act2(model.bn2(model.conv2(h)))
    out["stem"] = h
    for b in range(1, blocks + 1):
        h = getattr(model, f"block{b}")(h)
        if b <= 3:
            out[f"block{b}"] = h
        elif b == middle_end:
            out["middle"] = h
        elif b == blocks:
            out["exit"] = h
    h = model.act3(model.bn3(model.conv3(h)))
    h = model.act4(model.bn4(model.conv4(h)))
    out["act4"] = h
    pool = model.global_pool(h)
    out["pool"] = pool
    out["logits"] = model.fc(pool)
    return out


def check_chaining_against_timm(gen):
    """`stages` on timm's full legacy_xception equals timm's own forward."""
    model = timm.create_model("legacy_xception", pretrained=False)
    randomize_batchnorm(model, gen)
    model.eval()
    model = model.double()
    x = torch.randn(1, 3, 71, 71, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        s = stages(model, x, 12, 11)
        assert torch.allclose(s["act4"], model.forward_features(x), rtol=0, atol=1e-12)
        assert torch.allclose(s["logits"], model(x), rtol=0, atol=1e-12)
    print("chaining matches timm's legacy_xception forward", file=sys.stderr)


def reduced(gen):
    model = ReducedXception((8, 16), (32, 64, 96), 2, 128, 192, 256, num_classes=10)
    randomize_batchnorm(model, gen)
    model.eval()
    # float32 weights are what the file holds; float64 from them for the reference.
    model = model.float().double()
    x = torch.randn(2, 3, 71, 71, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        s = stages(model, x, model.blocks, model.blocks - 1)
    os.makedirs(OUT, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "xception_tiny.safetensors"))
    ref = {"input": x.float().contiguous()}
    ref.update({k: v.detach().float().contiguous() for k, v in s.items()})
    save_file(ref, os.path.join(OUT, "xception_tiny_ref.safetensors"))
    print("xception_tiny: " + ", ".join(f"{k} {list(v.shape)}" for k, v in s.items()))


def full_size_names(model):
    rows = [[k, list(v.shape), str(v.dtype).replace("torch.", "")]
            for k, v in model.state_dict().items()]
    with open(os.path.join(OUT, "full_size_names.json"), "w") as f:
        # One tensor a line: diffs of a regenerated file stay readable.
        f.write('{\n"legacy_xception": [\n')
        f.write(",\n".join(json.dumps(r) for r in rows))
        f.write("\n]\n}\n")
    print(f"full_size_names.json: legacy_xception {len(rows)} tensors")


def main():
    print(f"torch {torch.__version__}, timm {timm.__version__}", file=sys.stderr)
    gen = torch.Generator().manual_seed(20261201)
    torch.manual_seed(20261201)
    check_chaining_against_timm(gen)
    reduced(gen)
    full_size_names(timm.create_model("legacy_xception", pretrained=False))


if __name__ == "__main__":
    main()
