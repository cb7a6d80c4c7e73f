"""Reference activations for dltool's ResNet50 / VGG16 / VGG19 parity tests.

Builds each network from torchvision's own code (its Bottleneck blocks and `_make_layer`, its
`make_layers` and `VGG` class, its `forward`), at REDUCED width (and ResNet depth) so that
the weights and activations are small enough to commit, with random weights and random
BatchNorm statistics. Writes, per network, into tests/fixtures/classic/:

* `<name>.safetensors`: the state dict, float32, torchvision's tensor names;
* `full_size_names.json`: every tensor name, shape and dtype of torchvision's full-size
  resnet50, vgg16 and vgg19 (no weights downloaded), for the full-size loading tests;
* `<name>_ref.safetensors`: `input` (NCHW) and the activation at every stage dltool exposes,
  computed in float64 from the same float32 weights (so the reference carries no float32
  rounding of its own).

Pinned versions (the tests' figures were produced with these): torch 2.15.0, torchvision
0.29.2, safetensors 0.8.0, numpy 2.x, from PyPI:

    python3 -m venv /work/venvs/classic
    /work/venvs/classic/bin/pip install torch==2.15.0 torchvision==0.29.2 safetensors==0.8.0 numpy
    /work/venvs/classic/bin/python tools/classic_reference.py

Reduced configurations (torchvision's full ones in brackets):
* resnet_tiny: Bottleneck blocks [2, 2, 2, 2] ([3, 4, 6, 3]), stem width 8 (64), block widths
  8/16/32/64 (64/128/256/512, x4 expansion), 10 classes (1000); input 2 x 3 x 99 x 99 (odd
  sizes exercise every padding and stride rounding).
* vgg16_tiny / vgg19_tiny: configurations "D" / "E" with every width divided by 8, classifier
  hidden width 64 (4096), 10 classes (1000); input 2 x 3 x 96 x 96, so block5 is 3 x 3 and the
  adaptive average pool to 7 x 7 (identity at 224) is exercised with overlapping windows.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vgg import VGG, cfgs, make_layers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "classic")


class NarrowResNet(ResNet):
    """torchvision's ResNet with the stem and stage widths as arguments (it hard-codes 64 and
    64/128/256/512); blocks, `_make_layer` and `forward` are torchvision's own."""

    def __init__(self, layers, widths, num_classes):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(Bottleneck, widths[0], layers[0])
        self.layer2 = self._make_layer(Bottleneck, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(Bottleneck, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(Bottleneck, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * Bottleneck.expansion, num_classes)


def randomize_batchnorm(model, gen):
    """Trained-looking BatchNorm: without it folding would be tested on the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) * 1.5 + 0.25
            m.bias.data = torch.randn(c, generator=gen) * 0.2
            m.running_mean.data = torch.randn(c, generator=gen) * 0.3
            m.running_var.data = torch.rand(c, generator=gen) * 1.5 + 0.5


def save(model, name, stages, x):
    os.makedirs(OUT, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, f"{name}.safetensors"))
    ref = {"input": x.float().contiguous()}
    ref.update({k: v.detach().float().contiguous() for k, v in stages.items()})
    save_file(ref, os.path.join(OUT, f"{name}_ref.safetensors"))
    sizes = ", ".join(f"{k} {list(v.shape)}" for k, v in stages.items())
    print(f"{name}: {sizes}")


def resnet(gen):
    model = NarrowResNet([2, 2, 2, 2], [8, 16, 32, 64], num_classes=10)
    randomize_batchnorm(model, gen)
    model.eval()
    # float32 weights are what the file holds; float64 from them for the reference.
    model = model.float().double()
    x = torch.randn(2, 3, 99, 99, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l1 = model.layer1(stem)
        l2 = model.layer2(l1)
        l3 = model.layer3(l2)
        l4 = model.layer4(l3)
        pool = torch.flatten(model.avgpool(l4), 1)
        logits = model.fc(pool)
        # The stages must be what torchvision's own forward computes.
        assert torch.allclose(logits, model(x), rtol=0, atol=1e-12)
    stages = dict(stem=stem, layer1=l1, layer2=l2, layer3=l3, layer4=l4, pool=pool, logits=logits)
    save(model, "resnet_tiny", stages, x)


def vgg(gen, cfg_name, name):
    cfg = [v if v == "M" else v // 8 for v in cfgs[cfg_name]]
    model = VGG(make_layers(cfg, batch_norm=False), num_classes=10, init_weights=True)
    last = cfg[-2]
    hidden = 64
    model.classifier = nn.Sequential(
        nn.Linear(last * 7 * 7, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, 10),
    )
    # torchvision initialises conv biases to zero: random ones test the bias path too.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
    model.eval()
    model = model.float().double()
    x = torch.randn(2, 3, 96, 96, generator=gen, dtype=torch.float64)
    stages = {}
    with torch.no_grad():
        h = x
        block = 1
        for layer in model.features:
            h = layer(h)
            if isinstance(layer, nn.MaxPool2d):
                stages[f"block{block}"] = h
                block += 1
        h = torch.flatten(model.avgpool(h), 1)
        c = model.classifier
        fc6 = c[1](c[0](h))
        fc7 = c[4](c[3](fc6))
        logits = c[6](fc7)
        assert torch.allclose(logits, model(x), rtol=0, atol=1e-12)
    stages.update(fc6=fc6, fc7=fc7, logits=logits)
    save(model, name, stages, x)


def full_size_names():
    """Names and shapes of torchvision's FULL resnet50/vgg16/vgg19 state dicts (built
    without weights): the tests generate random tensors of exactly these, so the full-size
    name mapping is checked against torchvision itself, not against dltool's idea of it."""
    nets = {
        "resnet50": torchvision.models.resnet50(weights=None),
        "vgg16": torchvision.models.vgg16(weights=None),
        "vgg19": torchvision.models.vgg19(weights=None),
    }
    out = {}
    for name, model in nets.items():
        out[name] = [[k, list(v.shape), str(v.dtype).replace("torch.", "")]
                     for k, v in model.state_dict().items()]
    with open(os.path.join(OUT, "full_size_names.json"), "w") as f:
        # One tensor a line: diffs of a regenerated file stay readable.
        f.write("{\n")
        for i, (name, rows) in enumerate(out.items()):
            f.write(f"{json.dumps(name)}: [\n")
            f.write(",\n".join(json.dumps(r) for r in rows))
            f.write("\n]" + ("," if i + 1 < len(out) else "") + "\n")
        f.write("}\n")
    print("full_size_names.json: " + ", ".join(f"{k} {len(v)} tensors" for k, v in out.items()))


def main():
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}", file=sys.stderr)
    gen = torch.Generator().manual_seed(20261201)
    torch.manual_seed(20261201)
    resnet(gen)
    vgg(gen, "D", "vgg16_tiny")
    vgg(gen, "E", "vgg19_tiny")
    full_size_names()


if __name__ == "__main__":
    main()
