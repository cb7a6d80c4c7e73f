//! ResNet with Bottleneck blocks (torchvision's `resnet50`, and any depth or width of the same
//! blocks) on the NHWC CPU engine, from a torchvision state dict.
//!
//! Architecture as torchvision builds it (the "v1.5" ResNet: a block's stride sits on its 3x3
//! convolution, not its first 1x1): `conv1` 7x7/2 + `bn1` + ReLU, 3x3/2 max pool (padding 1),
//! `layer1..layer4` of Bottleneck blocks (1x1, 3x3 with the stage's stride on the first block,
//! 1x1 to 4x the width; the first block of each stage projects its shortcut with a strided
//! 1x1 `downsample`), global average pool, `fc`. Every BatchNorm is folded into the
//! convolution before it at load. Depth (blocks per stage), widths and class count come from
//! the file's tensor shapes, so reduced test networks load through the same code.

use crate::backbones::state_dict::{StateDict, StateDictError, fold_batchnorm};
use crate::backbones::weight_file::Container;
use crate::backbones::{
    LayerShape, LayerSpec, LoadError, LoadOptions, Network, Pool, Spec, WeightIndex, torchvision,
};
use crate::engine::cpu_conv::{Act, Conv, Epilogue};
use crate::engine::cpu_ops::{self, Linear};
use crate::image_io::Preprocess;
use std::path::Path;

/// torchvision's BatchNorm2d default.
const BN_EPS: f32 = 1e-5;

/// Winograd output tile for the stride-1 3x3 convolutions (the one `inception_fast` measured
/// best for 3x3).
const TILE_3X3: [usize; 2] = [4, 4];

/// Images that go through the stem together: its 7x7 convolution's output is the network's
/// largest activation (112x112x64 floats per image at 224).
const STEM_IMAGES: usize = 2;

/// Layers features can be read from, in network order: the end of each stage, and `pool`
/// (the global average of `layer4`, Keras' `avg_pool`, what Spark's featurizer returned).
pub const LAYERS: [&str; 5] = ["layer1", "layer2", "layer3", "layer4", "pool"];

/// Bottleneck block: 1x1, 3x3 (stride), 1x1, plus the shortcut.
struct Bottleneck {
    conv1: Conv,
    conv2: Conv,
    /// Bias, no ReLU: the shortcut is added and the ReLU applied in its own tile pass.
    conv3: Conv,
    /// Projection shortcut (bias, no ReLU), `None` for identity.
    downsample: Option<Conv>,
}

impl Bottleneck {
    fn forward(&self, x: &Act) -> Act {
        let t = self.conv1.forward(x, 0);
        let t = self.conv2.forward(&t, 0);
        match &self.downsample {
            Some(d) => self.conv3.forward_residual_relu(&t, &d.forward(x, 0)),
            None => self.conv3.forward_residual_relu(&t, x),
        }
    }
}

/// A loaded ResNet.
pub struct ResNet {
    stem: Conv,
    stages: [Vec<Bottleneck>; 4],
    fc: Option<Linear>,
    /// Blocks per stage (`[3, 4, 6, 3]` for ResNet50).
    pub depths: [usize; 4],
    /// Output channels of each stage (`[256, 512, 1024, 2048]` for ResNet50).
    pub channels: [usize; 4],
}

/// Every stage at once, NCHW, for comparing with reference activations.
pub struct ResNetStages {
    pub stem: Vec<f32>,
    pub layers: [Vec<f32>; 4],
    /// `[n][channels[3]]`
    pub pool: Vec<f32>,
    /// `[n][classes]`, `None` without `fc`.
    pub logits: Option<Vec<f32>>,
}

/// Reads the folded convolution `conv` + BatchNorm `bn`, checking its kernel and input width.
fn conv_bn(
    sd: &mut StateDict,
    conv: &str,
    bn: &str,
    cin: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Result<Conv, StateDictError> {
    let mut w = sd.take_shaped(
        &format!("{conv}.weight"),
        &[None, Some(cin), Some(kernel), Some(kernel)],
    )?;
    let cout = w.shape[0];
    let c = [Some(cout)];
    let gamma = sd.take_shaped(&format!("{bn}.weight"), &c)?.data;
    let beta = sd.take_shaped(&format!("{bn}.bias"), &c)?.data;
    let mean = sd.take_shaped(&format!("{bn}.running_mean"), &c)?.data;
    let var = sd.take_shaped(&format!("{bn}.running_var"), &c)?.data;
    let bias = fold_batchnorm(&mut w.data, cout, &gamma, &beta, &mean, &var, BN_EPS);
    Ok(Conv::new(
        &w.data,
        &bias,
        [cout, cin, kernel, kernel],
        [stride, stride],
        [pad, pad],
    ))
}

impl ResNet {
    /// Loads a torchvision ResNet state dict (Bottleneck blocks) from safetensors or `.pth`.
    pub fn load(path: &Path) -> Result<Self, StateDictError> {
        let mut sd = StateDict::open(path, "ResNet")?;
        let net = Self::from_state_dict(&mut sd)?;
        sd.finish()?;
        Ok(net)
    }

    fn from_state_dict(sd: &mut StateDict) -> Result<Self, StateDictError> {
        if sd.has("layer1.0.conv1.weight") && !sd.has("layer1.0.conv3.weight") {
            return Err(sd.layout_error(
                "a ResNet of basic blocks (resnet18/34); dltool runs Bottleneck ResNets (resnet50)",
            ));
        }
        let stem = conv_bn(sd, "conv1", "bn1", 3, 7, 2, 3)?;
        let mut cin = stem.cout;
        let mut depths = [0; 4];
        let mut channels = [0; 4];
        let mut stages: [Vec<Bottleneck>; 4] = Default::default();
        for (s, stage) in stages.iter_mut().enumerate() {
            let depth = (0..)
                .take_while(|j| sd.has(&format!("layer{}.{j}.conv1.weight", s + 1)))
                .count();
            if depth == 0 {
                // Names the first tensor of the stage as missing.
                sd.take(&format!("layer{}.0.conv1.weight", s + 1))?;
            }
            for j in 0..depth {
                let p = format!("layer{}.{j}", s + 1);
                let stride = if s > 0 && j == 0 { 2 } else { 1 };
                let conv1 = conv_bn(sd, &format!("{p}.conv1"), &format!("{p}.bn1"), cin, 1, 1, 0)?;
                let mid = conv1.cout;
                let mut conv2 = conv_bn(
                    sd,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    mid,
                    3,
                    stride,
                    1,
                )?;
                if stride == 1 {
                    conv2 = conv2.with_winograd(TILE_3X3);
                }
                let conv3 = conv_bn(sd, &format!("{p}.conv3"), &format!("{p}.bn3"), mid, 1, 1, 0)?
                    .with_epilogue(Epilogue::Bias);
                let cout = conv3.cout;
                let downsample = if sd.has(&format!("{p}.downsample.0.weight")) {
                    let d = conv_bn(
                        sd,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        cin,
                        1,
                        stride,
                        0,
                    )?;
                    if d.cout != cout {
                        return Err(sd.layout_error(format!(
                            "{p}.downsample.0.weight has {} outputs, the block {cout}",
                            d.cout
                        )));
                    }
                    Some(d.with_epilogue(Epilogue::Bias))
                } else {
                    if stride != 1 || cin != cout {
                        return Err(sd.layout_error(format!(
                            "{p} changes shape ({cin} -> {cout} channels, stride {stride}) but \
                             has no {p}.downsample.0.weight"
                        )));
                    }
                    None
                };
                stage.push(Bottleneck {
                    conv1,
                    conv2,
                    conv3,
                    downsample,
                });
                cin = cout;
            }
            depths[s] = depth;
            channels[s] = cin;
        }
        let fc = if sd.has("fc.weight") {
            let w = sd.take_shaped("fc.weight", &[None, Some(cin)])?;
            let classes = w.shape[0];
            let b = sd.take_shaped("fc.bias", &[Some(classes)])?;
            Some(Linear::new(w.data, b.data, classes, cin, false))
        } else {
            None
        };
        Ok(Self {
            stem,
            stages,
            fc,
            depths,
            channels,
        })
    }

    /// Classes of `fc`, `None` without one.
    pub fn num_classes(&self) -> Option<usize> {
        self.fc.as_ref().map(|f| f.cout)
    }

    /// `conv1`, `bn1`, ReLU, max pool, a few images at a time.
    fn stem(&self, pixels: &[f32], n: usize, h: usize, w: usize) -> Act {
        cpu_ops::chunked(pixels, n, [3, h, w], STEM_IMAGES, |x| {
            cpu_ops::max_pool(&self.stem.forward(x, 0), 3, 2, 1)
        })
    }

    fn stage(&self, s: usize, x: Act) -> Act {
        self.stages[s].iter().fold(x, |x, b| b.forward(&x))
    }

    /// Runs `n` preprocessed `h` x `w` images (NCHW) up to the end of stage `last` (0..4).
    fn forward_to(&self, pixels: &[f32], n: usize, h: usize, w: usize, last: usize) -> Act {
        let x = self.stem(pixels, n, h, w);
        (0..=last).fold(x, |x, s| self.stage(s, x))
    }

    /// `[C, H, W]` of `layer` for `h` x `w` input, `[C, 1, 1]` for `pool`; `None` for a name
    /// that is not in [`LAYERS`].
    pub fn layer_shape(&self, layer: &str, h: usize, w: usize) -> Option<[usize; 3]> {
        let s = LAYERS.iter().position(|l| *l == layer)?;
        if s == 4 {
            return Some([self.channels[3], 1, 1]);
        }
        // conv1 /2 (pad 3, k 7), pool /2 (pad 1, k 3), then /2 per strided stage.
        let down = |v: usize, k: usize, p: usize| (v + 2 * p - k) / 2 + 1;
        let (mut y, mut x) = (down(down(h, 7, 3), 3, 1), down(down(w, 7, 3), 3, 1));
        for _ in 0..s {
            (y, x) = (down(y, 3, 1), down(x, 3, 1));
        }
        Some([self.channels[s], y, x])
    }

    /// Features of `n` images at `layer`, pooled: `n` rows, unpooled maps channel-major.
    /// `pool` is the average of `layer4` whatever `how` says. Panics on a layer not in
    /// [`LAYERS`] (callers check names first).
    pub fn features(
        &self,
        pixels: &[f32],
        n: usize,
        [h, w]: [usize; 2],
        layer: &str,
        how: Pool,
    ) -> Vec<f32> {
        let s = LAYERS
            .iter()
            .position(|l| *l == layer)
            .unwrap_or_else(|| panic!("ResNet has no layer {layer}"));
        let act = self.forward_to(pixels, n, h, w, s.min(3));
        if s == 4 {
            return act.global_avg();
        }
        crate::backbones::engine_pool(&act, how)
    }

    /// Class probabilities (softmax of `fc`), `None` without `fc`.
    pub fn classify(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> Option<Vec<f32>> {
        let fc = self.fc.as_ref()?;
        let pooled = self.forward_to(pixels, n, h, w, 3).global_avg();
        let mut p = fc.forward(&pooled, n);
        cpu_ops::softmax_rows(&mut p, fc.cout);
        Some(p)
    }

    /// Every stage, for parity tests.
    pub fn forward_stages(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> ResNetStages {
        let stem = self.stem(pixels, n, h, w);
        let stem_nchw = stem.to_nchw();
        let mut layers: [Vec<f32>; 4] = Default::default();
        let mut x = stem;
        for (s, out) in layers.iter_mut().enumerate() {
            x = self.stage(s, x);
            *out = x.to_nchw();
        }
        let pool = x.global_avg();
        let logits = self.fc.as_ref().map(|fc| fc.forward(&pool, n));
        ResNetStages {
            stem: stem_nchw,
            layers,
            pool,
            logits,
        }
    }
}

/// `--backbone resnet50`: torchvision's ResNet50 (any Bottleneck ResNet loads through it).
pub static SPEC: Spec = Spec {
    name: "resnet50",
    title: "ResNet50",
    help: "ResNet50 (torchvision's ImageNet weights), 224x224, CPU engine",
    input: [224, 224],
    preprocess: torchvision::preprocess_of,
    layers: &[
        LayerSpec {
            name: "layer1",
            shape: Some([256, 56, 56]),
        },
        LayerSpec {
            name: "layer2",
            shape: Some([512, 28, 28]),
        },
        LayerSpec {
            name: "layer3",
            shape: Some([1024, 14, 14]),
        },
        LayerSpec {
            name: "layer4",
            shape: Some([2048, 7, 7]),
        },
        LayerSpec {
            name: "pool",
            shape: Some([2048, 1, 1]),
        },
    ],
    default_layer: "pool",
    variants: &[],
    recognise,
    files: &["resnet50-0676ba61.pth", "resnet50.safetensors"],
    registry_entry: "resnet50_imagenet1k_v1",
    gpu: false,
    load: load_network,
};

/// torchvision's Bottleneck ResNet names: a stem conv and projected stages with a third conv.
fn recognise(index: &WeightIndex) -> bool {
    matches!(index.container, Container::Safetensors | Container::Pytorch)
        && index.has("conv1.weight")
        && index.has("layer1.0.conv3.weight")
        && index.has("layer4.0.downsample.0.weight")
}

fn load_network(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Network>, LoadError> {
    opts.refuse_variant(path, SPEC.title)?;
    Ok(Box::new(ResNetNet(ResNet::load(path)?)))
}

/// A loaded ResNet as the rest of dltool sees it.
pub struct ResNetNet(pub ResNet);

impl Network for ResNetNet {
    fn spec(&self) -> &'static Spec {
        &SPEC
    }

    fn provenance(&self) -> String {
        format!("{}/{}", SPEC.name, torchvision::PROVENANCE)
    }

    fn preprocess(&self) -> Preprocess {
        torchvision::preprocess()
    }

    fn layers(&self) -> Vec<String> {
        LAYERS.iter().map(|l| l.to_string()).collect()
    }

    fn layer_shape(&self, layer: &str) -> Option<LayerShape> {
        let [h, w] = SPEC.input;
        let shape = self.0.layer_shape(layer, h, w)?;
        Some(if layer == "pool" {
            LayerShape::Flat(shape[0])
        } else {
            LayerShape::Map(shape)
        })
    }

    fn features(&self, pixels: &[f32], n: usize, layer: &str, pool: Pool) -> Vec<f32> {
        crate::engine::batch_split::run_images(pixels, n, |part, k| {
            self.0.features(part, k, SPEC.input, layer, pool)
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.0.num_classes()
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        self.0.classify(pixels, n, SPEC.input)
    }
}
