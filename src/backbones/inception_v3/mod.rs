//! InceptionV3 (Szegedy et al., "Rethinking the Inception Architecture", 2015) as a burn module.
//!
//! Parameter names follow torchvision's `Inception3` (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch1x1.bn.running_mean`, ...), which is also what pytorch-fid's port of Google's
//! 2015 TensorFlow graph uses, so both families of weight files load into the same tree. The two
//! differ only in the pooling inside the Mixed blocks, which [`BlockVariant`] selects.
//!
//! After loading, every BatchNorm is folded into the convolution before it: inference then runs
//! one convolution (with bias) and a ReLU per layer instead of three passes over each activation.

// Field names are the weight files' tensor names (`Mixed_5b`, ...), so the derive's code is not snake case.
#![allow(non_snake_case)]

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

/// The two published block layouts that share the torchvision parameter names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockVariant {
    /// Google's 2015 graph (pytorch-fid, `classify_image.py`): the 3x3 average pools inside the
    /// Mixed blocks exclude padding, and the pool branch of `Mixed_7c` is a max pool.
    Tf2015,
    /// torchvision's `Inception3`: average pools count padding, every pool branch averages.
    Torchvision,
}

impl BlockVariant {
    pub fn name(self) -> &'static str {
        match self {
            BlockVariant::Tf2015 => "tf2015",
            BlockVariant::Torchvision => "torchvision",
        }
    }
}

impl std::str::FromStr for BlockVariant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tf2015" | "tf2015_fid" => Ok(BlockVariant::Tf2015),
            "torchvision" => Ok(BlockVariant::Torchvision),
            other => Err(format!(
                "unknown InceptionV3 variant '{other}' (expected tf2015 or torchvision)"
            )),
        }
    }
}

/// Where to stop the network and read features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// 288 x 35 x 35
    Mixed5d,
    /// 768 x 17 x 17
    Mixed6e,
    /// 1280 x 8 x 8
    Mixed7a,
    /// 2048 x 8 x 8
    Mixed7c,
}

impl Layer {
    pub fn name(self) -> &'static str {
        match self {
            Layer::Mixed5d => "mixed_5d",
            Layer::Mixed6e => "mixed_6e",
            Layer::Mixed7a => "mixed_7a",
            Layer::Mixed7c => "mixed_7c",
        }
    }

    /// (channels, height, width) of the layer's output for a 299x299 input.
    pub fn shape(self) -> [usize; 3] {
        match self {
            Layer::Mixed5d => [288, 35, 35],
            Layer::Mixed6e => [768, 17, 17],
            Layer::Mixed7a => [1280, 8, 8],
            Layer::Mixed7c => [2048, 8, 8],
        }
    }
}

impl std::str::FromStr for Layer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed_5d" => Ok(Layer::Mixed5d),
            "mixed_6e" => Ok(Layer::Mixed6e),
            "mixed_7a" => Ok(Layer::Mixed7a),
            "mixed_7c" => Ok(Layer::Mixed7c),
            other => Err(format!(
                "unknown layer '{other}' (expected mixed_5d, mixed_6e, mixed_7a or mixed_7c)"
            )),
        }
    }
}

/// Architecture of one InceptionV3 weight file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InceptionV3Config {
    pub variant: BlockVariant,
    /// Classes of the `fc` layer when the weights carry one (1008 for pytorch-fid, 1000 for
    /// torchvision); `None` builds the feature extractor alone.
    pub num_classes: Option<usize>,
    /// BatchNorm epsilon: 0.001 in both families.
    pub bn_eps: f64,
}

impl InceptionV3Config {
    pub fn new(variant: BlockVariant) -> Self {
        Self {
            variant,
            num_classes: None,
            bn_eps: 1e-3,
        }
    }

    pub fn with_num_classes(mut self, num_classes: Option<usize>) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, device: &Device) -> InceptionV3 {
        InceptionV3::new(self, device)
    }

    /// The input both trainings expect: RGB, 299x299, scaled to [-1, 1]. Google's graph
    /// computes `x / 128 - 1`; torchvision's `transform_input` turns ImageNet-normalised input
    /// back into `x / 127.5 - 1`.
    pub fn preprocess(&self) -> crate::image_io::Preprocess {
        let (mean, std) = match self.variant {
            BlockVariant::Tf2015 => (128.0, 128.0),
            BlockVariant::Torchvision => (127.5, 127.5),
        };
        crate::image_io::Preprocess {
            width: 299,
            height: 299,
            mean: [mean; 3],
            std: [std; 3],
            resize: crate::image_io::Resize::Stretch,
            channels: crate::image_io::ChannelOrder::Rgb,
        }
    }
}

/// Conv (no bias) + BatchNorm + ReLU, torchvision's `BasicConv2d`; after
/// [`BasicConv2d::fold_batchnorm`] the BatchNorm lives in the convolution's weight and bias.
#[derive(Module, Debug)]
pub struct BasicConv2d {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm>,
}

struct ConvSpec {
    cin: usize,
    cout: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
}

fn conv(cin: usize, cout: usize, k: usize) -> ConvSpec {
    ConvSpec {
        cin,
        cout,
        kernel: [k, k],
        stride: [1, 1],
        padding: [0, 0],
    }
}

impl ConvSpec {
    fn kernel(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = [kh, kw];
        self
    }
    fn stride(mut self, s: usize) -> Self {
        self.stride = [s, s];
        self
    }
    fn pad(mut self, ph: usize, pw: usize) -> Self {
        self.padding = [ph, pw];
        self
    }
    fn init(self, eps: f64, device: &Device) -> BasicConv2d {
        let [ph, pw] = self.padding;
        BasicConv2d {
            conv: Conv2dConfig::new([self.cin, self.cout], self.kernel)
                .with_stride(self.stride)
                .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
                .with_bias(false)
                // Every parameter is overwritten by the weight file: skip the random init.
                .with_initializer(Initializer::Zeros)
                .init(device),
            bn: Some(
                BatchNormConfig::new(self.cout)
                    .with_epsilon(eps)
                    .init(device),
            ),
        }
    }
}

impl BasicConv2d {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = crate::burn_ops::conv::forward(&self.conv, x);
        let x = match &self.bn {
            Some(bn) => bn.forward(x),
            None => x,
        };
        relu(x)
    }

    /// `bn(conv(x)) = conv'(x) + b'` with `w' = w * s`, `b' = beta - mean * s`,
    /// `s = gamma / sqrt(var + eps)`, per output channel.
    pub fn fold_batchnorm(&mut self) {
        let Some(bn) = self.bn.take() else { return };
        let scale = bn.gamma.val() / (bn.running_var.value() + bn.epsilon).sqrt();
        let shift = bn.beta.val() - bn.running_mean.value() * scale.clone();
        let [cout] = scale.dims();
        let weight = self.conv.weight.val() * scale.clone().reshape([cout, 1, 1, 1]);
        let bias = match &self.conv.bias {
            Some(b) => b.val() * scale + shift,
            None => shift,
        };
        self.conv.weight = Param::from_tensor(weight);
        self.conv.bias = Some(Param::from_tensor(bias));
    }
}

/// The pool that feeds a Mixed block's `branch_pool` convolution.
#[derive(Debug, Clone)]
pub enum BranchPool {
    Avg(AvgPool2d),
    Max(MaxPool2d),
}

impl BranchPool {
    fn avg3x3(count_include_pad: bool) -> Self {
        BranchPool::Avg(
            AvgPool2dConfig::new([3, 3])
                .with_strides([1, 1])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_count_include_pad(count_include_pad)
                .init(),
        )
    }

    fn max3x3() -> Self {
        BranchPool::Max(
            MaxPool2dConfig::new([3, 3])
                .with_strides([1, 1])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
        )
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            BranchPool::Avg(p) => p.forward(x),
            BranchPool::Max(p) => p.forward(x),
        }
    }
}

fn max_pool_3x3_s2() -> MaxPool2d {
    MaxPool2dConfig::new([3, 3]).with_strides([2, 2]).init()
}

#[derive(Module, Debug)]
#[allow(non_snake_case)]
pub struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
    #[module(skip)]
    pool: BranchPool,
}

impl InceptionA {
    fn new(cin: usize, pool_features: usize, pool: BranchPool, eps: f64, d: &Device) -> Self {
        Self {
            branch1x1: conv(cin, 64, 1).init(eps, d),
            branch5x5_1: conv(cin, 48, 1).init(eps, d),
            branch5x5_2: conv(48, 64, 5).pad(2, 2).init(eps, d),
            branch3x3dbl_1: conv(cin, 64, 1).init(eps, d),
            branch3x3dbl_2: conv(64, 96, 3).pad(1, 1).init(eps, d),
            branch3x3dbl_3: conv(96, 96, 3).pad(1, 1).init(eps, d),
            branch_pool: conv(cin, pool_features, 1).init(eps, d),
            pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self
            .branch5x5_2
            .forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        let bp = self.branch_pool.forward(self.pool.forward(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch1x1,
            &mut self.branch5x5_1,
            &mut self.branch5x5_2,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3,
            &mut self.branch_pool,
        ]
    }
}

#[derive(Module, Debug)]
pub struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    pool: MaxPool2d,
}

impl InceptionB {
    fn new(cin: usize, eps: f64, d: &Device) -> Self {
        Self {
            branch3x3: conv(cin, 384, 3).stride(2).init(eps, d),
            branch3x3dbl_1: conv(cin, 64, 1).init(eps, d),
            branch3x3dbl_2: conv(64, 96, 3).pad(1, 1).init(eps, d),
            branch3x3dbl_3: conv(96, 96, 3).stride(2).init(eps, d),
            pool: max_pool_3x3_s2(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        let bp = self.pool.forward(x);
        Tensor::cat(vec![b3, bd, bp], 1)
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch3x3,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3,
        ]
    }
}

#[derive(Module, Debug)]
pub struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7_1: BasicConv2d,
    branch7x7_2: BasicConv2d,
    branch7x7_3: BasicConv2d,
    branch7x7dbl_1: BasicConv2d,
    branch7x7dbl_2: BasicConv2d,
    branch7x7dbl_3: BasicConv2d,
    branch7x7dbl_4: BasicConv2d,
    branch7x7dbl_5: BasicConv2d,
    branch_pool: BasicConv2d,
    #[module(skip)]
    pool: BranchPool,
}

impl InceptionC {
    fn new(cin: usize, c7: usize, pool: BranchPool, eps: f64, d: &Device) -> Self {
        Self {
            branch1x1: conv(cin, 192, 1).init(eps, d),
            branch7x7_1: conv(cin, c7, 1).init(eps, d),
            branch7x7_2: conv(c7, c7, 1).kernel(1, 7).pad(0, 3).init(eps, d),
            branch7x7_3: conv(c7, 192, 1).kernel(7, 1).pad(3, 0).init(eps, d),
            branch7x7dbl_1: conv(cin, c7, 1).init(eps, d),
            branch7x7dbl_2: conv(c7, c7, 1).kernel(7, 1).pad(3, 0).init(eps, d),
            branch7x7dbl_3: conv(c7, c7, 1).kernel(1, 7).pad(0, 3).init(eps, d),
            branch7x7dbl_4: conv(c7, c7, 1).kernel(7, 1).pad(3, 0).init(eps, d),
            branch7x7dbl_5: conv(c7, 192, 1).kernel(1, 7).pad(0, 3).init(eps, d),
            branch_pool: conv(cin, 192, 1).init(eps, d),
            pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = self.branch7x7_3.forward(
            self.branch7x7_2
                .forward(self.branch7x7_1.forward(x.clone())),
        );
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        for c in [
            &self.branch7x7dbl_2,
            &self.branch7x7dbl_3,
            &self.branch7x7dbl_4,
            &self.branch7x7dbl_5,
        ] {
            bd = c.forward(bd);
        }
        let bp = self.branch_pool.forward(self.pool.forward(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch1x1,
            &mut self.branch7x7_1,
            &mut self.branch7x7_2,
            &mut self.branch7x7_3,
            &mut self.branch7x7dbl_1,
            &mut self.branch7x7dbl_2,
            &mut self.branch7x7dbl_3,
            &mut self.branch7x7dbl_4,
            &mut self.branch7x7dbl_5,
            &mut self.branch_pool,
        ]
    }
}

#[derive(Module, Debug)]
pub struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3_1: BasicConv2d,
    branch7x7x3_2: BasicConv2d,
    branch7x7x3_3: BasicConv2d,
    branch7x7x3_4: BasicConv2d,
    pool: MaxPool2d,
}

impl InceptionD {
    fn new(cin: usize, eps: f64, d: &Device) -> Self {
        Self {
            branch3x3_1: conv(cin, 192, 1).init(eps, d),
            branch3x3_2: conv(192, 320, 3).stride(2).init(eps, d),
            branch7x7x3_1: conv(cin, 192, 1).init(eps, d),
            branch7x7x3_2: conv(192, 192, 1).kernel(1, 7).pad(0, 3).init(eps, d),
            branch7x7x3_3: conv(192, 192, 1).kernel(7, 1).pad(3, 0).init(eps, d),
            branch7x7x3_4: conv(192, 192, 3).stride(2).init(eps, d),
            pool: max_pool_3x3_s2(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self
            .branch3x3_2
            .forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        for c in [
            &self.branch7x7x3_2,
            &self.branch7x7x3_3,
            &self.branch7x7x3_4,
        ] {
            b7 = c.forward(b7);
        }
        let bp = self.pool.forward(x);
        Tensor::cat(vec![b3, b7, bp], 1)
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch3x3_1,
            &mut self.branch3x3_2,
            &mut self.branch7x7x3_1,
            &mut self.branch7x7x3_2,
            &mut self.branch7x7x3_3,
            &mut self.branch7x7x3_4,
        ]
    }
}

#[derive(Module, Debug)]
pub struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    #[module(skip)]
    pool: BranchPool,
}

impl InceptionE {
    fn new(cin: usize, pool: BranchPool, eps: f64, d: &Device) -> Self {
        Self {
            branch1x1: conv(cin, 320, 1).init(eps, d),
            branch3x3_1: conv(cin, 384, 1).init(eps, d),
            branch3x3_2a: conv(384, 384, 1).kernel(1, 3).pad(0, 1).init(eps, d),
            branch3x3_2b: conv(384, 384, 1).kernel(3, 1).pad(1, 0).init(eps, d),
            branch3x3dbl_1: conv(cin, 448, 1).init(eps, d),
            branch3x3dbl_2: conv(448, 384, 3).pad(1, 1).init(eps, d),
            branch3x3dbl_3a: conv(384, 384, 1).kernel(1, 3).pad(0, 1).init(eps, d),
            branch3x3dbl_3b: conv(384, 384, 1).kernel(3, 1).pad(1, 0).init(eps, d),
            branch_pool: conv(cin, 192, 1).init(eps, d),
            pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(
            vec![
                self.branch3x3_2a.forward(b3.clone()),
                self.branch3x3_2b.forward(b3),
            ],
            1,
        );
        let bd = self
            .branch3x3dbl_2
            .forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd = Tensor::cat(
            vec![
                self.branch3x3dbl_3a.forward(bd.clone()),
                self.branch3x3dbl_3b.forward(bd),
            ],
            1,
        );
        let bp = self.branch_pool.forward(self.pool.forward(x));
        Tensor::cat(vec![b1, b3, bd, bp], 1)
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch1x1,
            &mut self.branch3x3_1,
            &mut self.branch3x3_2a,
            &mut self.branch3x3_2b,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3a,
            &mut self.branch3x3dbl_3b,
            &mut self.branch_pool,
        ]
    }
}

/// InceptionV3 up to its 2048-d average pool, plus the ImageNet classifier when the weights
/// carry one. Field names are the weight files' tensor prefixes.
#[derive(Module, Debug)]
#[allow(non_snake_case)]
pub struct InceptionV3 {
    Conv2d_1a_3x3: BasicConv2d,
    Conv2d_2a_3x3: BasicConv2d,
    Conv2d_2b_3x3: BasicConv2d,
    Conv2d_3b_1x1: BasicConv2d,
    Conv2d_4a_3x3: BasicConv2d,
    Mixed_5b: InceptionA,
    Mixed_5c: InceptionA,
    Mixed_5d: InceptionA,
    Mixed_6a: InceptionB,
    Mixed_6b: InceptionC,
    Mixed_6c: InceptionC,
    Mixed_6d: InceptionC,
    Mixed_6e: InceptionC,
    Mixed_7a: InceptionD,
    Mixed_7b: InceptionE,
    Mixed_7c: InceptionE,
    fc: Option<Linear>,
    maxpool: MaxPool2d,
}

/// Every stage the parity test compares against the reference network.
pub struct Stages {
    pub stem: Tensor<4>,
    pub mixed_5d: Tensor<4>,
    pub mixed_6e: Tensor<4>,
    pub mixed_7c: Tensor<4>,
    pub pool: Tensor<2>,
}

impl InceptionV3 {
    fn new(config: &InceptionV3Config, d: &Device) -> Self {
        let eps = config.bn_eps;
        let include_pad = config.variant == BlockVariant::Torchvision;
        let avg = || BranchPool::avg3x3(include_pad);
        let last_pool = match config.variant {
            BlockVariant::Tf2015 => BranchPool::max3x3(),
            BlockVariant::Torchvision => avg(),
        };
        Self {
            Conv2d_1a_3x3: conv(3, 32, 3).stride(2).init(eps, d),
            Conv2d_2a_3x3: conv(32, 32, 3).init(eps, d),
            Conv2d_2b_3x3: conv(32, 64, 3).pad(1, 1).init(eps, d),
            Conv2d_3b_1x1: conv(64, 80, 1).init(eps, d),
            Conv2d_4a_3x3: conv(80, 192, 3).init(eps, d),
            Mixed_5b: InceptionA::new(192, 32, avg(), eps, d),
            Mixed_5c: InceptionA::new(256, 64, avg(), eps, d),
            Mixed_5d: InceptionA::new(288, 64, avg(), eps, d),
            Mixed_6a: InceptionB::new(288, eps, d),
            Mixed_6b: InceptionC::new(768, 128, avg(), eps, d),
            Mixed_6c: InceptionC::new(768, 160, avg(), eps, d),
            Mixed_6d: InceptionC::new(768, 160, avg(), eps, d),
            Mixed_6e: InceptionC::new(768, 192, avg(), eps, d),
            Mixed_7a: InceptionD::new(768, eps, d),
            Mixed_7b: InceptionE::new(1280, avg(), eps, d),
            Mixed_7c: InceptionE::new(2048, last_pool, eps, d),
            fc: config.num_classes.map(|n| {
                LinearConfig::new(2048, n)
                    .with_initializer(Initializer::Zeros)
                    .init(d)
            }),
            maxpool: max_pool_3x3_s2(),
        }
    }

    /// Folds every BatchNorm into its convolution (see [`BasicConv2d::fold_batchnorm`]).
    pub fn fold_batchnorm(&mut self) {
        let mut convs: Vec<&mut BasicConv2d> = vec![
            &mut self.Conv2d_1a_3x3,
            &mut self.Conv2d_2a_3x3,
            &mut self.Conv2d_2b_3x3,
            &mut self.Conv2d_3b_1x1,
            &mut self.Conv2d_4a_3x3,
        ];
        convs.extend(self.Mixed_5b.convs_mut());
        convs.extend(self.Mixed_5c.convs_mut());
        convs.extend(self.Mixed_5d.convs_mut());
        convs.extend(self.Mixed_6a.convs_mut());
        convs.extend(self.Mixed_6b.convs_mut());
        convs.extend(self.Mixed_6c.convs_mut());
        convs.extend(self.Mixed_6d.convs_mut());
        convs.extend(self.Mixed_6e.convs_mut());
        convs.extend(self.Mixed_7a.convs_mut());
        convs.extend(self.Mixed_7b.convs_mut());
        convs.extend(self.Mixed_7c.convs_mut());
        for c in convs {
            c.fold_batchnorm();
        }
    }

    /// The block layout, read back from the last block's pool branch (max only in tf2015).
    pub fn variant(&self) -> BlockVariant {
        match self.Mixed_7c.pool {
            BranchPool::Max(_) => BlockVariant::Tf2015,
            BranchPool::Avg(_) => BlockVariant::Torchvision,
        }
    }

    pub fn has_classifier(&self) -> bool {
        self.fc.is_some()
    }

    /// Outputs of the classifier (1008 for pytorch-fid's file, 1000 for torchvision's).
    pub fn num_classes(&self) -> Option<usize> {
        self.fc.as_ref().map(|fc| fc.weight.dims()[1])
    }

    fn stem(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.Conv2d_1a_3x3.forward(x);
        let x = self.Conv2d_2a_3x3.forward(x);
        let x = self.Conv2d_2b_3x3.forward(x);
        let x = self.maxpool.forward(x);
        let x = self.Conv2d_3b_1x1.forward(x);
        let x = self.Conv2d_4a_3x3.forward(x);
        self.maxpool.forward(x)
    }

    fn to_5d(&self, stem: Tensor<4>) -> Tensor<4> {
        let x = self.Mixed_5b.forward(stem);
        let x = self.Mixed_5c.forward(x);
        self.Mixed_5d.forward(x)
    }

    fn to_6e(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.Mixed_6a.forward(x);
        let x = self.Mixed_6b.forward(x);
        let x = self.Mixed_6c.forward(x);
        let x = self.Mixed_6d.forward(x);
        self.Mixed_6e.forward(x)
    }

    fn to_7c(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.Mixed_7a.forward(x);
        let x = self.Mixed_7b.forward(x);
        self.Mixed_7c.forward(x)
    }

    /// Runs the network on a preprocessed `[N, 3, 299, 299]` batch up to `layer`.
    pub fn forward_to(&self, x: Tensor<4>, layer: Layer) -> Tensor<4> {
        let x = self.to_5d(self.stem(x));
        if layer == Layer::Mixed5d {
            return x;
        }
        let x = self.to_6e(x);
        if layer == Layer::Mixed6e {
            return x;
        }
        let x = self.Mixed_7a.forward(x);
        if layer == Layer::Mixed7a {
            return x;
        }
        self.Mixed_7c.forward(self.Mixed_7b.forward(x))
    }

    /// The blocks above `cut` (`mixed_6e` or `mixed_7a`), for fine-tuning them; `None` for a
    /// layer that is not a cut point.
    pub fn into_top(self, cut: Layer) -> Option<InceptionTop> {
        let mixed_7a = match cut {
            Layer::Mixed6e => Some(self.Mixed_7a),
            Layer::Mixed7a => None,
            Layer::Mixed5d | Layer::Mixed7c => return None,
        };
        Some(InceptionTop {
            Mixed_7a: mixed_7a,
            Mixed_7b: self.Mixed_7b,
            Mixed_7c: self.Mixed_7c,
        })
    }

    /// Every stage at once, for comparing against reference activations.
    pub fn forward_stages(&self, x: Tensor<4>) -> Stages {
        let stem = self.stem(x);
        let mixed_5d = self.to_5d(stem.clone());
        let mixed_6e = self.to_6e(mixed_5d.clone());
        let mixed_7c = self.to_7c(mixed_6e.clone());
        let pool = global_avg_pool(mixed_7c.clone());
        Stages {
            stem,
            mixed_5d,
            mixed_6e,
            mixed_7c,
            pool,
        }
    }

    /// ImageNet logits from pooled `[N, 2048]` features, when the weights carry `fc`.
    pub fn classify(&self, pooled: Tensor<2>) -> Option<Tensor<2>> {
        self.fc.as_ref().map(|fc| fc.forward(pooled))
    }
}

/// The trainable part of a fine-tuned InceptionV3: the Mixed blocks above the cut point, with
/// BatchNorm folded (held in inference mode). Field names are the weight files' prefixes.
#[derive(Module, Debug)]
#[allow(non_snake_case)]
pub struct InceptionTop {
    Mixed_7a: Option<InceptionD>,
    Mixed_7b: InceptionE,
    Mixed_7c: InceptionE,
}

impl InceptionTop {
    /// `[N, 768, 17, 17]` (cut at mixed_6e) or `[N, 1280, 8, 8]` (mixed_7a) -> mixed_7c.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = match &self.Mixed_7a {
            Some(block) => block.forward(x),
            None => x,
        };
        self.Mixed_7c.forward(self.Mixed_7b.forward(x))
    }
}

/// `[N, C, H, W]` -> `[N, C]` mean over the spatial axes.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([n, c])
}

/// `[N, C, H, W]` -> `[N, C]` max over the spatial axes.
pub fn global_max_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    x.max_dim(3).max_dim(2).reshape([n, c])
}

pub mod fast;
mod load;
pub use load::{LoadError, LoadedWeights, WeightFormat, detect_format, load, safetensors_metadata};
mod network;
pub use network::{InceptionNet, SPEC};
