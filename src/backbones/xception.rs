//! Xception (Chollet 2017) on the NHWC CPU engine, from timm's `legacy_xception` state dict:
//! Cadene's `pretrainedmodels` port of Keras' ImageNet Xception, the network Spark's
//! `DeepImageFeaturizer` offered as "Xception".
//!
//! Architecture as timm builds it: `conv1` 3x3/2 (no padding) + `bn1` + ReLU, `conv2` 3x3
//! (no padding) + `bn2` + ReLU; the entry flow's three strided blocks (`block1..block3`), the
//! middle flow's identity blocks (`block4..block11`), the exit flow's strided block (`block12`)
//! then the separable `conv3` + `bn3` + ReLU and `conv4` + `bn4` + ReLU (2048 channels), global
//! average pool, `fc`. A block is `rep`, a sequence of (ReLU, separable 3x3, BatchNorm) whose
//! first ReLU `block1` leaves out, a 3x3/2 max pool (padding 1) when strided, plus the
//! shortcut: the input itself, or a strided 1x1 `skip` + `skipbn` when the block changes shape.
//! The sum is not followed by a ReLU (the next block's `rep` starts with one).
//!
//! A separable convolution is a depthwise 3x3 (padding 1, no bias) then a 1x1 `pointwise`;
//! the BatchNorm after it folds into the pointwise convolution, whose epilogue also applies
//! the next ReLU. Block counts and widths come from the tensor shapes, so reduced test
//! networks load through the same code; every Xception block with a `skip` is strided, which
//! is how a block's stride is read from a file (max pools have no tensors).

use crate::backbones::state_dict::{StateDict, StateDictError, fold_batchnorm};
use crate::backbones::weight_file::Container;
use crate::backbones::{
    LayerShape, LayerSpec, LoadError, LoadOptions, Network, Pool, Spec, WeightIndex,
};
use crate::engine::cpu_conv::{Act, Conv, Epilogue};
use crate::engine::cpu_ops::{self, Linear};
use crate::engine::depthwise::DepthwiseConv;
use crate::image_io::{ChannelOrder, Preprocess, Resize};
use std::path::Path;

/// PyTorch's BatchNorm2d default, which timm's `legacy_xception` keeps (Keras used 1e-3 when
/// the weights were trained; Cadene's port and timm run them with 1e-5).
const BN_EPS: f32 = 1e-5;

/// Images that go through the stem and `block1` together: their activations are the
/// network's largest (147x147x128 floats per image at 299).
const STEM_IMAGES: usize = 2;

/// Layers features can be read from, in network order: the end of each entry-flow block, of
/// the middle flow (`block11` in the full network), of the exit flow's residual block
/// (`block12`), `act4` (the last separable convolution's ReLU, 2048 channels) and `pool` (its
/// global average, Keras' `avg_pool`, what Spark's featurizer returned).
pub const LAYERS: [&str; 7] = [
    "block1", "block2", "block3", "middle", "exit", "act4", "pool",
];

/// The provenance suffix: Keras' preprocessing (`x / 127.5 - 1`, 299x299 stretched), which
/// the weights were trained with.
pub const PROVENANCE: &str = "keras";

/// Depthwise 3x3 (padding 1, no bias) then a 1x1 with BatchNorm folded in.
struct SeparableConv {
    depthwise: DepthwiseConv,
    pointwise: Conv,
}

impl SeparableConv {
    fn forward(&self, x: &Act) -> Act {
        self.pointwise.forward(&self.depthwise.forward(x), 0)
    }

    /// `self(x) + residual`, the sum taken in the pointwise convolution's tile pass.
    fn forward_residual(&self, x: &Act, residual: &Act) -> Act {
        self.pointwise
            .forward_residual(&self.depthwise.forward(x), residual)
    }

    fn cout(&self) -> usize {
        self.pointwise.cout
    }
}

/// One Xception block.
struct Block {
    /// The separable convolutions of `rep`, all but the last ending in BatchNorm + ReLU, the
    /// last in BatchNorm alone.
    seps: Vec<SeparableConv>,
    /// `skip` + `skipbn` (bias only); `None`: the identity shortcut, no pool.
    skip: Option<Conv>,
}

impl Block {
    /// The leading ReLU is read by the first depthwise convolution (`with_relu_input`) and the
    /// shortcut sum is taken in the last convolution's tile pass: neither costs a pass over
    /// memory of its own.
    fn forward(&self, x: &Act) -> Act {
        let (last, rest) = self
            .seps
            .split_last()
            .expect("a block has separable convolutions");
        let mut t = None;
        for sep in rest {
            t = Some(sep.forward(t.as_ref().unwrap_or(x)));
        }
        let t = t.as_ref().unwrap_or(x);
        match &self.skip {
            Some(skip) => skip.forward_residual(x, &cpu_ops::max_pool(&last.forward(t), 3, 2, 1)),
            None => last.forward_residual(t, x),
        }
    }
}

/// A loaded Xception.
pub struct Xception {
    conv1: Conv,
    conv2: Conv,
    /// The entry flow's strided blocks (3).
    entry: Vec<Block>,
    /// The middle flow's identity blocks (8 in the full network).
    middle: Vec<Block>,
    /// The exit flow's strided block.
    exit: Block,
    conv3: SeparableConv,
    conv4: SeparableConv,
    fc: Option<Linear>,
    /// Output channels of `[block1, block2, block3, middle, exit, act4]`
    /// (`[128, 256, 728, 728, 1024, 2048]` in the full network).
    pub channels: [usize; 6],
}

/// Every stage at once, NCHW, for comparing with reference activations.
pub struct XceptionStages {
    /// After `act2`.
    pub stem: Vec<f32>,
    /// `block1, block2, block3, middle, exit, act4`, in [`LAYERS`] order.
    pub layers: [Vec<f32>; 6],
    /// `[n][channels[5]]`
    pub pool: Vec<f32>,
    /// `[n][classes]`, `None` without `fc`.
    pub logits: Option<Vec<f32>>,
}

/// Reads BatchNorm `bn` and folds it into the weight `w` (`cout` rows); returns the bias.
fn fold(
    sd: &mut StateDict,
    bn: &str,
    w: &mut [f32],
    cout: usize,
) -> Result<Vec<f32>, StateDictError> {
    let c = [Some(cout)];
    let gamma = sd.take_shaped(&format!("{bn}.weight"), &c)?.data;
    let beta = sd.take_shaped(&format!("{bn}.bias"), &c)?.data;
    let mean = sd.take_shaped(&format!("{bn}.running_mean"), &c)?.data;
    let var = sd.take_shaped(&format!("{bn}.running_var"), &c)?.data;
    Ok(fold_batchnorm(w, cout, &gamma, &beta, &mean, &var, BN_EPS))
}

/// A plain convolution `conv` + BatchNorm `bn`.
fn conv_bn(
    sd: &mut StateDict,
    conv: &str,
    bn: &str,
    cin: usize,
    kernel: usize,
    stride: usize,
) -> Result<Conv, StateDictError> {
    let mut w = sd.take_shaped(
        &format!("{conv}.weight"),
        &[None, Some(cin), Some(kernel), Some(kernel)],
    )?;
    let cout = w.shape[0];
    let bias = fold(sd, bn, &mut w.data, cout)?;
    Ok(Conv::new(
        &w.data,
        &bias,
        [cout, cin, kernel, kernel],
        [stride, stride],
        [0, 0],
    ))
}

/// The separable convolution `sep` (`sep.conv1` depthwise, `sep.pointwise`) + BatchNorm `bn`,
/// of `max(x, 0)` when `relu_input`.
fn separable(
    sd: &mut StateDict,
    sep: &str,
    bn: &str,
    cin: usize,
    epilogue: Epilogue,
    relu_input: bool,
) -> Result<SeparableConv, StateDictError> {
    let dw = sd.take_shaped(
        &format!("{sep}.conv1.weight"),
        &[Some(cin), Some(1), Some(3), Some(3)],
    )?;
    let mut depthwise = DepthwiseConv::new(&dw.data, &vec![0.0; cin], cin, 3, 1, Epilogue::None);
    if relu_input {
        depthwise = depthwise.with_relu_input();
    }
    let mut pw = sd.take_shaped(
        &format!("{sep}.pointwise.weight"),
        &[None, Some(cin), Some(1), Some(1)],
    )?;
    let cout = pw.shape[0];
    let bias = fold(sd, bn, &mut pw.data, cout)?;
    let pointwise =
        Conv::new(&pw.data, &bias, [cout, cin, 1, 1], [1, 1], [0, 0]).with_epilogue(epilogue);
    Ok(SeparableConv {
        depthwise,
        pointwise,
    })
}

/// `block{b}` with input width `cin`.
fn block(sd: &mut StateDict, b: usize, cin: usize) -> Result<Block, StateDictError> {
    let p = format!("block{b}");
    // Without the leading ReLU the first separable convolution is `rep.0`, else `rep.1`;
    // each later one is three modules on (ReLU, separable, BatchNorm).
    let start_relu = !sd.has(&format!("{p}.rep.0.conv1.weight"));
    let first = usize::from(start_relu);
    let reps = (0..)
        .take_while(|k| sd.has(&format!("{p}.rep.{}.conv1.weight", first + 3 * k)))
        .count();
    if reps == 0 {
        // Names the first tensor of the block as missing.
        sd.take(&format!("{p}.rep.1.conv1.weight"))?;
    }
    let mut seps = Vec::with_capacity(reps);
    let mut c = cin;
    for k in 0..reps {
        let i = first + 3 * k;
        let epilogue = if k + 1 < reps {
            Epilogue::BiasRelu
        } else {
            Epilogue::Bias
        };
        let sep = separable(
            sd,
            &format!("{p}.rep.{i}"),
            &format!("{p}.rep.{}", i + 1),
            c,
            epilogue,
            // Every ReLU of `rep` before its first convolution; the later ones are the
            // previous pointwise convolution's epilogue.
            start_relu && k == 0,
        )?;
        c = sep.cout();
        seps.push(sep);
    }
    let skip = if sd.has(&format!("{p}.skip.weight")) {
        let s = conv_bn(sd, &format!("{p}.skip"), &format!("{p}.skipbn"), cin, 1, 2)?;
        if s.cout != c {
            return Err(sd.layout_error(format!(
                "{p}.skip.weight has {} outputs, the block {c}",
                s.cout
            )));
        }
        Some(s.with_epilogue(Epilogue::Bias))
    } else {
        if c != cin {
            return Err(sd.layout_error(format!(
                "{p} changes width ({cin} -> {c} channels) but has no {p}.skip.weight"
            )));
        }
        None
    };
    Ok(Block { seps, skip })
}

fn out_channels(b: &Block) -> usize {
    b.seps.last().map_or(0, SeparableConv::cout)
}

impl Xception {
    /// Loads a timm `legacy_xception` state dict from safetensors or `.pth`.
    pub fn load(path: &Path) -> Result<Self, StateDictError> {
        let mut sd = StateDict::open(path, "Xception")?;
        let net = Self::from_state_dict(&mut sd)?;
        sd.finish()?;
        Ok(net)
    }

    fn from_state_dict(sd: &mut StateDict) -> Result<Self, StateDictError> {
        let conv1 = conv_bn(sd, "conv1", "bn1", 3, 3, 2)?;
        // Stride 1, no padding: Winograd, as InceptionV3's 3x3 convolutions.
        let conv2 = conv_bn(sd, "conv2", "bn2", conv1.cout, 3, 1)?.with_winograd([4, 4]);
        let count = (1..)
            .take_while(|b| {
                sd.has(&format!("block{b}.rep.0.conv1.weight"))
                    || sd.has(&format!("block{b}.rep.1.conv1.weight"))
            })
            .count();
        let mut blocks = Vec::with_capacity(count);
        let mut cin = conv2.cout;
        for b in 1..=count {
            let blk = block(sd, b, cin)?;
            cin = out_channels(&blk);
            blocks.push(blk);
        }
        // Entry flow: the leading strided blocks; middle: the identity blocks after them;
        // exit: one strided block.
        let entry_len = blocks.iter().take_while(|b| b.skip.is_some()).count();
        let middle_len = blocks[entry_len..]
            .iter()
            .take_while(|b| b.skip.is_none())
            .count();
        if entry_len != 3 || middle_len == 0 || entry_len + middle_len + 1 != count {
            return Err(sd.layout_error(format!(
                "{count} blocks laid out as {entry_len} strided, {middle_len} identity, then {} \
                 more: Xception has 3 strided entry blocks, identity middle blocks and one \
                 strided exit block",
                count - entry_len - middle_len
            )));
        }
        let exit = blocks.pop().expect("counted");
        let middle = blocks.split_off(entry_len);
        let entry = blocks;
        let conv3 = separable(sd, "conv3", "bn3", cin, Epilogue::BiasRelu, false)?;
        let conv4 = separable(sd, "conv4", "bn4", conv3.cout(), Epilogue::BiasRelu, false)?;
        let features = conv4.cout();
        let fc = if sd.has("fc.weight") {
            let w = sd.take_shaped("fc.weight", &[None, Some(features)])?;
            let classes = w.shape[0];
            let b = sd.take_shaped("fc.bias", &[Some(classes)])?;
            Some(Linear::new(w.data, b.data, classes, features, false))
        } else {
            None
        };
        let channels = [
            out_channels(&entry[0]),
            out_channels(&entry[1]),
            out_channels(&entry[2]),
            out_channels(middle.last().expect("checked")),
            out_channels(&exit),
            features,
        ];
        Ok(Self {
            conv1,
            conv2,
            entry,
            middle,
            exit,
            conv3,
            conv4,
            fc,
            channels,
        })
    }

    /// Classes of `fc`, `None` without one.
    pub fn num_classes(&self) -> Option<usize> {
        self.fc.as_ref().map(|f| f.cout)
    }

    fn stem(&self, x: &Act) -> Act {
        self.conv2.forward(&self.conv1.forward(x, 0), 0)
    }

    /// Stage `s` (an index into the first six [`LAYERS`]) applied to the previous stage's
    /// output; `block1` (stage 0) takes the stem's.
    fn stage(&self, s: usize, x: Act) -> Act {
        match s {
            0..=2 => self.entry[s].forward(&x),
            3 => self.middle.iter().fold(x, |x, b| b.forward(&x)),
            4 => self.exit.forward(&x),
            _ => self.conv4.forward(&self.conv3.forward(&x)),
        }
    }

    /// Runs `n` preprocessed `h` x `w` images (NCHW) to the end of stage `last` (0..6), the
    /// stem and `block1` a few images at a time.
    fn forward_to(&self, pixels: &[f32], n: usize, h: usize, w: usize, last: usize) -> Act {
        let x = cpu_ops::chunked(pixels, n, [3, h, w], STEM_IMAGES, |x| {
            self.entry[0].forward(&self.stem(x))
        });
        (1..=last).fold(x, |x, s| self.stage(s, x))
    }

    /// `[C, H, W]` of `layer` for `h` x `w` input, `[C, 1, 1]` for `pool`; `None` for a name
    /// that is not in [`LAYERS`].
    pub fn layer_shape(&self, layer: &str, h: usize, w: usize) -> Option<[usize; 3]> {
        let s = LAYERS.iter().position(|l| *l == layer)?;
        if s == 6 {
            return Some([self.channels[5], 1, 1]);
        }
        // conv1 3x3/2 and conv2 3x3 unpadded, then a 3x3/2 pool (padding 1) per strided block.
        let stem = |v: usize| (v - 3) / 2 + 1 - 2;
        let pool = |v: usize| (v - 1) / 2 + 1;
        let strided = [1, 2, 3, 3, 4, 4][s];
        let (mut y, mut x) = (stem(h), stem(w));
        for _ in 0..strided {
            (y, x) = (pool(y), pool(x));
        }
        Some([self.channels[s], y, x])
    }

    /// Features of `n` images at `layer`, pooled: `n` rows, unpooled maps channel-major.
    /// `pool` is the average of `act4` whatever `how` says. Panics on a layer not in
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
            .unwrap_or_else(|| panic!("Xception has no layer {layer}"));
        let act = self.forward_to(pixels, n, h, w, s.min(5));
        if s == 6 {
            return act.global_avg();
        }
        crate::backbones::engine_pool(&act, how)
    }

    /// Class probabilities (softmax of `fc`), `None` without `fc`.
    pub fn classify(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> Option<Vec<f32>> {
        let fc = self.fc.as_ref()?;
        let pooled = self.forward_to(pixels, n, h, w, 5).global_avg();
        let mut p = fc.forward(&pooled, n);
        cpu_ops::softmax_rows(&mut p, fc.cout);
        Some(p)
    }

    /// Every stage, for parity tests (the whole batch at once).
    pub fn forward_stages(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> XceptionStages {
        let stem = self.stem(&Act::from_nchw(pixels, n, 3, h, w));
        let stem_nchw = stem.to_nchw();
        let mut layers: [Vec<f32>; 6] = Default::default();
        let mut x = stem;
        for (s, out) in layers.iter_mut().enumerate() {
            x = self.stage(s, x);
            *out = x.to_nchw();
        }
        let pool = x.global_avg();
        let logits = self.fc.as_ref().map(|fc| fc.forward(&pool, n));
        XceptionStages {
            stem: stem_nchw,
            layers,
            pool,
            logits,
        }
    }
}

/// Keras' Xception preprocessing: 299x299 stretched, `x / 127.5 - 1`, RGB (what Spark's
/// featurizer fed it, and timm's `mean = std = 0.5`).
pub fn preprocess() -> Preprocess {
    Preprocess {
        width: 299,
        height: 299,
        mean: [127.5; 3],
        std: [127.5; 3],
        resize: Resize::Stretch,
        channels: ChannelOrder::Rgb,
    }
}

fn preprocess_of(variant: &str) -> Option<Preprocess> {
    (variant == PROVENANCE).then(preprocess)
}

/// `--backbone xception`: timm's `legacy_xception` (Keras' ImageNet weights).
pub static SPEC: Spec = Spec {
    name: "xception",
    title: "Xception",
    help: "Xception (Keras' ImageNet weights as timm's legacy_xception), 299x299, CPU engine",
    input: [299, 299],
    preprocess: preprocess_of,
    layers: &[
        LayerSpec {
            name: "block1",
            shape: Some([128, 74, 74]),
        },
        LayerSpec {
            name: "block2",
            shape: Some([256, 37, 37]),
        },
        LayerSpec {
            name: "block3",
            shape: Some([728, 19, 19]),
        },
        LayerSpec {
            name: "middle",
            shape: Some([728, 19, 19]),
        },
        LayerSpec {
            name: "exit",
            shape: Some([1024, 10, 10]),
        },
        LayerSpec {
            name: "act4",
            shape: Some([2048, 10, 10]),
        },
        LayerSpec {
            name: "pool",
            shape: Some([2048, 1, 1]),
        },
    ],
    default_layer: "pool",
    variants: &[],
    recognise,
    files: &["xception-43020ad28.pth", "xception.safetensors"],
    registry_entry: "xception_imagenet",
    gpu: false,
    load: load_network,
};

/// timm's names: separable convolutions (`pointwise`) inside `rep` sequences, a `skip`.
fn recognise(index: &WeightIndex) -> bool {
    matches!(index.container, Container::Safetensors | Container::Pytorch)
        && index.has("conv1.weight")
        && index.has("block1.rep.0.pointwise.weight")
        && index.has("block1.skip.weight")
        && index.has("conv4.pointwise.weight")
}

fn load_network(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Network>, LoadError> {
    opts.refuse_variant(path, SPEC.title)?;
    Ok(Box::new(XceptionNet(Xception::load(path)?)))
}

/// A loaded Xception as the rest of dltool sees it.
pub struct XceptionNet(pub Xception);

impl Network for XceptionNet {
    fn spec(&self) -> &'static Spec {
        &SPEC
    }

    fn provenance(&self) -> String {
        format!("{}/{PROVENANCE}", SPEC.name)
    }

    fn preprocess(&self) -> Preprocess {
        preprocess()
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
