//! VGG (torchvision's `vgg16` and `vgg19`, with or without BatchNorm, any width) on the NHWC
//! CPU engine, from a torchvision state dict.
//!
//! torchvision numbers the layers of `features` in order (convolution, [BatchNorm,] ReLU, and
//! a max pool after each block), so where the pools are follows from the gaps between the
//! convolutions' indices; the block sizes then tell VGG16 (2, 2, 3, 3, 3 convolutions) from
//! VGG19 (2, 2, 4, 4, 4). After `features`: an adaptive average pool to 7x7 (the identity at
//! 224x224), the flattened map (channel-major) into `classifier.0` (fc6) + ReLU,
//! `classifier.3` (fc7) + ReLU, `classifier.6` (the logits); the dropouts are inactive at
//! inference.

use crate::backbones::state_dict::{StateDict, StateDictError, fold_batchnorm};
use crate::backbones::weight_file::Container;
use crate::backbones::{
    LayerShape, LayerSpec, LoadError, LoadOptions, Network, Pool, Spec, WeightIndex, torchvision,
};
use crate::engine::cpu_conv::{Act, Conv};
use crate::engine::cpu_ops::{self, Linear};
use crate::image_io::Preprocess;
use std::path::Path;

const BN_EPS: f32 = 1e-5;
/// Winograd output tile of the 3x3 convolutions.
const TILE_3X3: [usize; 2] = [4, 4];
/// Images that go through the first two blocks together (224x224x64 floats per image after
/// the first convolution).
const EARLY_IMAGES: usize = 2;
/// Blocks run a few images at a time.
const EARLY_BLOCKS: usize = 2;
/// The classifier's input grid.
const GRID: usize = 7;

/// Layers features can be read from, in network order: the pool at the end of each block and
/// the two hidden fully connected layers (after their ReLU; fc7 is Keras' `fc2`).
pub const LAYERS: [&str; 7] = [
    "block1", "block2", "block3", "block4", "block5", "fc6", "fc7",
];

/// Convolutions per block of the two VGG depths dltool knows.
pub const VGG16_BLOCKS: [usize; 5] = [2, 2, 3, 3, 3];
pub const VGG19_BLOCKS: [usize; 5] = [2, 2, 4, 4, 4];

struct Classifier {
    fc6: Linear,
    fc7: Linear,
    fc8: Linear,
}

/// A loaded VGG.
pub struct Vgg {
    blocks: Vec<Vec<Conv>>,
    classifier: Option<Classifier>,
    /// Output channels of each block.
    pub channels: Vec<usize>,
}

/// Every stage at once, for parity tests: blocks NCHW, the rest `[n][features]`.
pub struct VggStages {
    pub blocks: Vec<Vec<f32>>,
    pub fc6: Option<Vec<f32>>,
    pub fc7: Option<Vec<f32>>,
    pub logits: Option<Vec<f32>>,
}

impl Vgg {
    /// Loads a torchvision VGG state dict whose blocks hold `blocks` convolutions each
    /// ([`VGG16_BLOCKS`], [`VGG19_BLOCKS`]); `network` names it in messages.
    pub fn load(
        path: &Path,
        network: &'static str,
        blocks: [usize; 5],
    ) -> Result<Self, StateDictError> {
        let mut sd = StateDict::open(path, network)?;
        let net = Self::from_state_dict(&mut sd, network, blocks)?;
        sd.finish()?;
        Ok(net)
    }

    fn from_state_dict(
        sd: &mut StateDict,
        network: &'static str,
        want: [usize; 5],
    ) -> Result<Self, StateDictError> {
        // Indices of the 4-D `features.N.weight` tensors (convolutions; BatchNorm's are 1-D).
        let mut convs = Vec::new();
        let mut batchnorm = None;
        let mut i = 0;
        while i < 200 {
            let name = format!("features.{i}.weight");
            if sd.has(&name) && !sd.has(&format!("features.{i}.running_var")) {
                convs.push(i);
                batchnorm.get_or_insert(sd.has(&format!("features.{}.running_var", i + 1)));
            }
            i += 1;
        }
        if convs.is_empty() {
            sd.take("features.0.weight")?;
        }
        let bn = batchnorm.unwrap_or(false);
        // conv [bn] relu: the next conv follows at +2 (+3 with BatchNorm), one more when a
        // pool sits between them; the last block ends in a pool.
        let step = if bn { 3 } else { 2 };
        let mut sizes = vec![1usize];
        for pair in convs.windows(2) {
            match pair[1] - pair[0] {
                d if d == step => *sizes.last_mut().unwrap() += 1,
                d if d == step + 1 => sizes.push(1),
                _ => {
                    return Err(sd.layout_error(format!(
                        "features.{} follows features.{}: not a torchvision VGG layout",
                        pair[1], pair[0]
                    )));
                }
            }
        }
        if sizes != want {
            let known = match sizes.as_slice() {
                s if s == VGG16_BLOCKS => " (VGG16)",
                s if s == VGG19_BLOCKS => " (VGG19)",
                _ => "",
            };
            return Err(sd.layout_error(format!(
                "holds a VGG with {sizes:?} convolutions per block{known}, not {network} ({want:?})"
            )));
        }
        let mut blocks = Vec::new();
        let mut channels = Vec::new();
        let mut cin = 3;
        let mut k = 0;
        for &size in &sizes {
            let mut block = Vec::new();
            for _ in 0..size {
                let i = convs[k];
                k += 1;
                let mut w = sd.take_shaped(
                    &format!("features.{i}.weight"),
                    &[None, Some(cin), Some(3), Some(3)],
                )?;
                let cout = w.shape[0];
                let c = [Some(cout)];
                let mut bias = sd.take_shaped(&format!("features.{i}.bias"), &c)?.data;
                if bn {
                    let p = format!("features.{}", i + 1);
                    let gamma = sd.take_shaped(&format!("{p}.weight"), &c)?.data;
                    let beta = sd.take_shaped(&format!("{p}.bias"), &c)?.data;
                    let mean = sd.take_shaped(&format!("{p}.running_mean"), &c)?.data;
                    let var = sd.take_shaped(&format!("{p}.running_var"), &c)?.data;
                    // BN(conv + b) = conv * s + (b - mean) * s + beta.
                    let shifted: Vec<f32> = mean.iter().zip(&bias).map(|(m, b)| m - b).collect();
                    bias = fold_batchnorm(&mut w.data, cout, &gamma, &beta, &shifted, &var, BN_EPS);
                }
                block.push(
                    Conv::new(&w.data, &bias, [cout, cin, 3, 3], [1, 1], [1, 1])
                        .with_winograd(TILE_3X3),
                );
                cin = cout;
            }
            blocks.push(block);
            channels.push(cin);
        }
        let classifier = if sd.has("classifier.0.weight") {
            let flat = cin * GRID * GRID;
            let mut linear = |i: usize, cin: usize, relu: bool| -> Result<Linear, StateDictError> {
                let w = sd.take_shaped(&format!("classifier.{i}.weight"), &[None, Some(cin)])?;
                let cout = w.shape[0];
                let b = sd.take_shaped(&format!("classifier.{i}.bias"), &[Some(cout)])?;
                Ok(Linear::new(w.data, b.data, cout, cin, relu))
            };
            let fc6 = linear(0, flat, true)?;
            let fc7 = linear(3, fc6.cout, true)?;
            let fc8 = linear(6, fc7.cout, false)?;
            Some(Classifier { fc6, fc7, fc8 })
        } else {
            None
        };
        Ok(Self {
            blocks,
            classifier,
            channels,
        })
    }

    /// Classes of the classifier, `None` without one.
    pub fn num_classes(&self) -> Option<usize> {
        self.classifier.as_ref().map(|c| c.fc8.cout)
    }

    /// The layers this file has: the blocks, and fc6/fc7 when it has a classifier.
    pub fn layers(&self) -> Vec<&'static str> {
        let n = if self.classifier.is_some() { 7 } else { 5 };
        LAYERS[..n].to_vec()
    }

    fn block(&self, b: usize, x: &Act) -> Act {
        let x = self.blocks[b][1..]
            .iter()
            .fold(self.blocks[b][0].forward(x, 0), |x, c| c.forward(&x, 0));
        cpu_ops::max_pool(&x, 2, 2, 0)
    }

    /// Runs `n` preprocessed images (NCHW) through blocks `0..=last`.
    fn blocks_to(&self, pixels: &[f32], n: usize, h: usize, w: usize, last: usize) -> Act {
        let early = EARLY_BLOCKS.min(last + 1);
        let x = cpu_ops::chunked(pixels, n, [3, h, w], EARLY_IMAGES, |x| {
            (1..early).fold(self.block(0, x), |x, b| self.block(b, &x))
        });
        (early..=last).fold(x, |x, b| self.block(b, &x))
    }

    /// `[C, H, W]` of a block's output for `h` x `w` input, `[D, 1, 1]` for fc6/fc7; `None`
    /// for a layer this file does not have.
    pub fn layer_shape(&self, layer: &str, h: usize, w: usize) -> Option<[usize; 3]> {
        let i = self.layers().iter().position(|l| *l == layer)?;
        let c = self.classifier.as_ref();
        match i {
            5 => c.map(|c| [c.fc6.cout, 1, 1]),
            6 => c.map(|c| [c.fc7.cout, 1, 1]),
            b => Some([self.channels[b], h >> (b + 1), w >> (b + 1)]),
        }
    }

    /// Features of `n` images at `layer` (one of [`Vgg::layers`]): `n` rows, unpooled maps
    /// channel-major; fc6/fc7 are vectors whatever `how` says.
    pub fn features(
        &self,
        pixels: &[f32],
        n: usize,
        [h, w]: [usize; 2],
        layer: &str,
        how: Pool,
    ) -> Vec<f32> {
        let i = self
            .layers()
            .iter()
            .position(|l| *l == layer)
            .unwrap_or_else(|| panic!("VGG has no layer {layer}"));
        let act = self.blocks_to(pixels, n, h, w, i.min(4));
        if i >= 5 {
            let c = self
                .classifier
                .as_ref()
                .expect("fc layers need the classifier");
            let fc6 = c
                .fc6
                .forward(&cpu_ops::adaptive_avg_flat(&act, GRID, GRID), n);
            return if i == 5 { fc6 } else { c.fc7.forward(&fc6, n) };
        }
        crate::backbones::engine_pool(&act, how)
    }

    /// Class probabilities (softmax of the logits), `None` without a classifier.
    pub fn classify(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> Option<Vec<f32>> {
        let c = self.classifier.as_ref()?;
        let act = self.blocks_to(pixels, n, h, w, 4);
        let fc6 = c
            .fc6
            .forward(&cpu_ops::adaptive_avg_flat(&act, GRID, GRID), n);
        let mut p = c.fc8.forward(&c.fc7.forward(&fc6, n), n);
        cpu_ops::softmax_rows(&mut p, c.fc8.cout);
        Some(p)
    }

    /// Every stage, for parity tests.
    pub fn forward_stages(&self, pixels: &[f32], n: usize, [h, w]: [usize; 2]) -> VggStages {
        let mut x = Act::from_nchw(pixels, n, 3, h, w);
        let mut blocks = Vec::new();
        for b in 0..self.blocks.len() {
            x = self.block(b, &x);
            blocks.push(x.to_nchw());
        }
        let (mut fc6, mut fc7, mut logits) = (None, None, None);
        if let Some(c) = &self.classifier {
            let a = c
                .fc6
                .forward(&cpu_ops::adaptive_avg_flat(&x, GRID, GRID), n);
            let b = c.fc7.forward(&a, n);
            logits = Some(c.fc8.forward(&b, n));
            (fc6, fc7) = (Some(a), Some(b));
        }
        VggStages {
            blocks,
            fc6,
            fc7,
            logits,
        }
    }
}

/// Layers of the table rows, shapes at 224x224.
const SPEC_LAYERS: &[LayerSpec] = &[
    LayerSpec {
        name: "block1",
        shape: Some([64, 112, 112]),
    },
    LayerSpec {
        name: "block2",
        shape: Some([128, 56, 56]),
    },
    LayerSpec {
        name: "block3",
        shape: Some([256, 28, 28]),
    },
    LayerSpec {
        name: "block4",
        shape: Some([512, 14, 14]),
    },
    LayerSpec {
        name: "block5",
        shape: Some([512, 7, 7]),
    },
    LayerSpec {
        name: "fc6",
        shape: Some([4096, 1, 1]),
    },
    LayerSpec {
        name: "fc7",
        shape: Some([4096, 1, 1]),
    },
];

/// `--backbone vgg16`.
pub static VGG16_SPEC: Spec = Spec {
    name: "vgg16",
    title: "VGG16",
    help: "VGG16 (torchvision's ImageNet weights), 224x224, CPU engine",
    input: [224, 224],
    preprocess: torchvision::preprocess_of,
    layers: SPEC_LAYERS,
    default_layer: "fc7",
    variants: &[],
    recognise: |index| convolutions(index) == Some(VGG16_BLOCKS.iter().sum()),
    files: &["vgg16-397923af.pth", "vgg16.safetensors"],
    registry_entry: "vgg16_imagenet1k_v1",
    gpu: false,
    load: |path, opts| load_network(path, opts, &VGG16_SPEC, VGG16_BLOCKS),
};

/// `--backbone vgg19`.
pub static VGG19_SPEC: Spec = Spec {
    name: "vgg19",
    title: "VGG19",
    help: "VGG19 (torchvision's ImageNet weights), 224x224, CPU engine",
    input: [224, 224],
    preprocess: torchvision::preprocess_of,
    layers: SPEC_LAYERS,
    default_layer: "fc7",
    variants: &[],
    recognise: |index| convolutions(index) == Some(VGG19_BLOCKS.iter().sum()),
    files: &["vgg19-dcbb9e9d.pth", "vgg19.safetensors"],
    registry_entry: "vgg19_imagenet1k_v1",
    gpu: false,
    load: |path, opts| load_network(path, opts, &VGG19_SPEC, VGG19_BLOCKS),
};

/// The number of convolutions of a torchvision VGG state dict (`features.N.weight` of the
/// convolutions, not of BatchNorms), `None` when the names are not a VGG's.
fn convolutions(index: &WeightIndex) -> Option<usize> {
    if !matches!(index.container, Container::Safetensors | Container::Pytorch)
        || !index.has("features.0.weight")
        || index.any_contains("layer1.")
    {
        return None;
    }
    let count = index
        .names
        .iter()
        .filter_map(|n| n.strip_prefix("features.")?.strip_suffix(".weight"))
        .filter(|i| !index.has(&format!("features.{i}.running_var")))
        .count();
    Some(count)
}

fn load_network(
    path: &Path,
    opts: &LoadOptions,
    spec: &'static Spec,
    blocks: [usize; 5],
) -> Result<Box<dyn Network>, LoadError> {
    opts.refuse_variant(path, spec.title)?;
    Ok(Box::new(VggNet {
        net: Vgg::load(path, spec.title, blocks)?,
        spec,
    }))
}

/// A loaded VGG as the rest of dltool sees it.
pub struct VggNet {
    pub net: Vgg,
    spec: &'static Spec,
}

impl Network for VggNet {
    fn spec(&self) -> &'static Spec {
        self.spec
    }

    fn provenance(&self) -> String {
        format!("{}/{}", self.spec.name, torchvision::PROVENANCE)
    }

    fn preprocess(&self) -> Preprocess {
        torchvision::preprocess()
    }

    fn layers(&self) -> Vec<String> {
        self.net.layers().iter().map(|l| l.to_string()).collect()
    }

    fn layer_shape(&self, layer: &str) -> Option<LayerShape> {
        let [h, w] = self.spec.input;
        let shape = self.net.layer_shape(layer, h, w)?;
        Some(if layer.starts_with("fc") {
            LayerShape::Flat(shape[0])
        } else {
            LayerShape::Map(shape)
        })
    }

    fn features(&self, pixels: &[f32], n: usize, layer: &str, pool: Pool) -> Vec<f32> {
        crate::engine::batch_split::run_images(pixels, n, |part, k| {
            self.net.features(part, k, self.spec.input, layer, pool)
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.net.num_classes()
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        self.net.classify(pixels, n, self.spec.input)
    }
}
