"""FLOP per image of every network in dltool's table, up to its default feature layer, for
`dltool bench` (src/bench.rs `flop_per_image`): torch's FlopCounterMode (2 per multiply-add of
every convolution and linear layer; BatchNorm, activations, pooling and additions not counted)
over each network built in PyTorch with the real layer shapes, one image at the network's input
size.

* inception_v3 (299): torchvision's Inception3 (aux head off) up to the average pool; the
  tf2015 network dltool runs has the same convolutions (it differs in two pooling layers).
* mobilenet_v1 0.25 (224): Keras' MobileNet v1 layout (3x3/2 stem, 13 depthwise + pointwise
  pairs, widths x alpha) up to conv_pw_13_relu.
* efficientnet_lite0/2 (224/260): every convolution of the shared state dict (its shapes give
  the kernels and widths), strides from EfficientNet-B0's stage table, TF "SAME" output sizes
  (ceil(H / stride)), up to the head convolution.
* resnet50 (224): torchvision's resnet50 up to the average pool (fc excluded).
* vgg16 / vgg19 (224): torchvision's model up to fc7 (classifier[:5]), dltool's default layer.
* xception (299): timm's legacy_xception up to the average pool (fc excluded).

Pinned: torch 2.15.0, torchvision 0.29.2, timm 1.0.31 (the same venv as
tools/classic_reference.py and tools/xception_reference.py).
usage: python tools/flop_counts.py [SHARED_DIR]
"""

import math
import sys

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SHARED = sys.argv[1] if len(sys.argv) > 1 else "../shared"


def count(model, size):
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops()


def inception():
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = nn.Identity()
    return net


def resnet50():
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def vgg(name):
    net = getattr(torchvision.models, name)(weights=None)
    net.classifier = net.classifier[:5]
    return net


def xception():
    import timm

    net = timm.create_model("legacy_xception", pretrained=False)
    net.fc = nn.Identity()
    return net


def mobilenet(alpha=0.25):
    def c(n):
        return int(n * alpha)

    layers = [nn.Conv2d(3, c(32), 3, 2, 1, bias=False)]
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]
    cin = c(32)
    for cout, s in cfg:
        layers += [nn.Conv2d(cin, cin, 3, s, 1, groups=cin, bias=False),
                   nn.Conv2d(cin, c(cout), 1, bias=False)]
        cin = c(cout)
    return nn.Sequential(*layers)


class Same(nn.Module):
    """A convolution padded so its output is ceil(H / stride), as TF "SAME"."""

    def __init__(self, w, stride, groups=1):
        super().__init__()
        cout, cin_g, k, _ = w.shape
        self.conv = nn.Conv2d(cin_g * groups, cout, k, stride, groups=groups, bias=False)
        self.k, self.s = k, stride

    def forward(self, x):
        h = x.shape[-1]
        out = -(-h // self.s)
        pad = max((out - 1) * self.s + self.k - h, 0)
        x = nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return self.conv(x)


def efficientnet(path, depth):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    repeats = [1, 2, 2, 3, 3, 4, 1]
    strides = [1, 2, 2, 2, 1, 2, 1]
    reps = [repeats[0]] + [math.ceil(r * depth) for r in repeats[1:-1]] + [repeats[-1]]
    block_strides = []
    for r, s in zip(reps, strides):
        block_strides += [s] + [1] * (r - 1)
    layers = [Same(sd["_conv_stem.weight"], 2)]
    for i, s in enumerate(block_strides):
        p = f"_blocks.{i}."
        if p + "_expand_conv.weight" in sd:
            layers.append(Same(sd[p + "_expand_conv.weight"], 1))
        dw = sd[p + "_depthwise_conv.weight"]
        layers.append(Same(dw, s, groups=dw.shape[0]))
        layers.append(Same(sd[p + "_project_conv.weight"], 1))
    assert f"_blocks.{len(block_strides)}._depthwise_conv.weight" not in sd, "block count"
    layers.append(Same(sd["_conv_head.weight"], 1))
    return nn.Sequential(*layers)


def main():
    rows = [
        ("inception_v3", count(inception(), 299)),
        ("mobilenet_v1", count(mobilenet(0.25), 224)),
        ("efficientnet_lite0", count(efficientnet(
            f"{SHARED}/weights/efficientnet_lite0/efficientnet-lite0-57934424.pth", 1.0), 224)),
        ("efficientnet_lite2", count(efficientnet(
            f"{SHARED}/weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth", 1.2), 260)),
        ("resnet50", count(resnet50(), 224)),
        ("vgg16", count(vgg("vgg16"), 224)),
        ("vgg19", count(vgg("vgg19"), 224)),
        ("xception", count(xception(), 299)),
    ]
    for name, flops in rows:
        print(f"{name}\t{flops}\t{flops / 1e9:.3f} GFLOP")


if __name__ == "__main__":
    main()
