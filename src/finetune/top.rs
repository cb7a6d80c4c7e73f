//! The trainable part of a fine-tuned network: the pretrained blocks above the cut layer and a
//! new linear classifier on their average pool.

use super::lite::LiteTop;
use super::{Cut, FineTuneError};
use crate::backbones::efficientnet_lite::FoldedLite;
use crate::inception_v3::{self, BlockVariant, InceptionTop, InceptionV3Config};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// The pretrained blocks above the cut, BatchNorm folded into the convolutions (held in
/// inference mode).
// One per process, moved once per optimizer step: boxing the larger variant would save nothing
// worth the indirection (and the Module derive takes the modules by value).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Top {
    Inception(InceptionTop),
    Lite(LiteTop),
}

impl Top {
    /// Cut-layer activations `[N, C, H, W]` -> the last feature map.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Top::Inception(t) => t.forward(x),
            Top::Lite(t) => t.forward(x),
        }
    }
}

/// The trainable blocks + dropout + a new classifier on the average pool.
#[derive(Module, Debug)]
pub struct FineTunedNet {
    pub top: Top,
    pub classifier: Linear,
}

/// Width of the pooled features InceptionV3's classifier reads (mixed_7c).
pub const INCEPTION_POOLED: usize = 2048;

/// The pretrained weights of the part that trains.
#[derive(Clone)]
pub enum Pretrained {
    Inception(Box<inception_v3::InceptionV3>),
    Lite(Box<FoldedLite>),
}

impl FineTunedNet {
    /// The pretrained blocks above `cut` and a zero classifier for `classes` classes: zero
    /// logits give every class the same probability and the same gradient, so training starts
    /// from the pretrained features unchanged and the result does not depend on a random
    /// initialisation.
    pub fn from_pretrained(
        weights: Pretrained,
        cut: Cut,
        classes: usize,
        device: &Device,
    ) -> Result<Self, FineTuneError> {
        let not_a_cut = || FineTuneError::Params(format!("{cut:?} does not fit these weights"));
        let top = match (weights, cut) {
            (Pretrained::Inception(model), Cut::Inception(layer)) => {
                Top::Inception((*model).into_top(layer).ok_or_else(not_a_cut)?)
            }
            (Pretrained::Lite(folded), Cut::Lite { spec, .. }) if folded.spec == spec => {
                let block = cut.lite_block().expect("a Lite cut");
                Top::Lite(LiteTop::from_folded(&folded, block, device))
            }
            _ => return Err(not_a_cut()),
        };
        Ok(Self {
            top,
            classifier: LinearConfig::new(cut.pooled(), classes)
                .with_initializer(Initializer::Zeros)
                .init(device),
        })
    }

    /// The architecture alone (weights to be loaded from a model file); `variant` is
    /// InceptionV3's block layout.
    pub fn architecture(
        cut: Cut,
        variant: Option<BlockVariant>,
        classes: usize,
        device: &Device,
    ) -> Result<Self, FineTuneError> {
        let weights = match cut {
            Cut::Inception(_) => {
                let variant = variant.ok_or_else(|| {
                    FineTuneError::Params("an InceptionV3 top needs its block variant".into())
                })?;
                let mut model = InceptionV3Config::new(variant).init(device);
                // Folding turns each BatchNorm into the convolution's bias: the layout the file
                // stores.
                model.fold_batchnorm();
                Pretrained::Inception(Box::new(model))
            }
            Cut::Lite { spec, stage } => {
                let block = spec.stage_ends()[stage];
                return Ok(Self {
                    top: Top::Lite(LiteTop::architecture(spec, block, device)),
                    classifier: LinearConfig::new(cut.pooled(), classes).init(device),
                });
            }
        };
        Self::from_pretrained(weights, cut, classes, device)
    }

    /// Width of the pooled features the classifier reads.
    pub fn pooled(&self) -> usize {
        self.classifier.weight.dims()[0]
    }

    /// Logits for a batch of cut-layer activations `[N, C, H, W]`. `keep` is the dropout mask
    /// on the pooled features (already scaled by 1 / keep probability), `None` at inference.
    pub fn forward(&self, x: Tensor<4>, keep: Option<Tensor<2>>) -> Tensor<2> {
        let pooled = inception_v3::global_avg_pool(self.top.forward(x));
        let pooled = match keep {
            Some(mask) => pooled * mask,
            None => pooled,
        };
        self.classifier.forward(pooled)
    }

    /// The pooled features the classifier reads (`n * pooled` floats) for `n` activations laid
    /// back to back (NCHW), at inference.
    pub fn pooled_features(
        &self,
        x: &[f32],
        n: usize,
        shape: [usize; 3],
        device: &Device,
    ) -> Vec<f32> {
        let [c, h, w] = shape;
        let input = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, c, h, w]), device);
        inception_v3::global_avg_pool(self.top.forward(input))
            .into_data()
            .try_into_vec::<f32>()
            .expect("the network returns f32")
    }

    /// Replaces the classifier by `coefficients` (`classes x pooled`, row-major) and
    /// `intercepts` (one per class), as a fitted logistic regression gives them.
    pub fn set_classifier(&mut self, coefficients: &[f64], intercepts: &[f64]) {
        let pooled = self.pooled();
        let classes = intercepts.len();
        assert_eq!(coefficients.len(), classes * pooled, "classifier shape");
        // Linear keeps its weight as [in, out].
        let mut weight = vec![0f32; pooled * classes];
        for k in 0..classes {
            for i in 0..pooled {
                weight[i * classes + k] = coefficients[k * pooled + i] as f32;
            }
        }
        let device = self.classifier.weight.device();
        self.classifier.weight = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [pooled, classes]),
            &device,
        ));
        let bias: Vec<f32> = intercepts.iter().map(|&b| b as f32).collect();
        self.classifier.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [classes]),
            &device,
        )));
    }

    /// Log-probabilities for `n` activations laid back to back (`n * C*H*W` floats, NCHW).
    pub fn log_proba(&self, x: &[f32], n: usize, shape: [usize; 3], device: &Device) -> Vec<f32> {
        let [c, h, w] = shape;
        let input = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, c, h, w]), device);
        log_softmax(self.forward(input, None), 1)
            .into_data()
            .try_into_vec::<f32>()
            .expect("the network returns f32")
    }

    /// Every tensor by name (`top.Mixed_7b.branch1x1.conv.weight`, `classifier.weight`, ...)
    /// with its shape and values, sorted by name.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        use burn::store::ModuleSnapshot;
        let mut out: Vec<_> = self
            .collect(None, None, false)
            .into_iter()
            .map(|t| {
                let bytes = t.to_bytes().expect("module tensors are readable");
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (t.name.clone(), t.shape.to_vec(), values)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Loads every tensor from safetensors `bytes` (what [`Self::tensors`] wrote); a missing,
    /// extra or misshapen tensor is an error naming it.
    pub fn load_bytes(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        use burn::store::{ModuleSnapshot, SafetensorsStore};
        let mut store = SafetensorsStore::from_bytes(Some(bytes))
            .allow_partial(true)
            .validate(false);
        let result = self.load_from(&mut store).map_err(|e| e.to_string())?;
        if !result.missing.is_empty() {
            let names: Vec<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
            return Err(format!("missing tensor(s): {}", names.join(", ")));
        }
        if !result.errors.is_empty() {
            let problems: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
            return Err(problems.join("; "));
        }
        if !result.unused.is_empty() {
            return Err(format!(
                "tensor(s) that are not part of the model: {}",
                result.unused.join(", ")
            ));
        }
        Ok(())
    }
}

/// A fine-tuned top as a head: the trained network, where it was cut, and how it was trained.
#[derive(Debug, Clone)]
pub struct FineTuned {
    pub net: FineTunedNet,
    pub cut: Cut,
    /// InceptionV3's block layout; `None` for other networks.
    pub variant: Option<BlockVariant>,
    pub report: super::TrainReport,
}

impl PartialEq for FineTuned {
    fn eq(&self, other: &Self) -> bool {
        self.variant == other.variant
            && self.cut == other.cut
            && self.report == other.report
            && self.net.tensors() == other.net.tensors()
    }
}

impl FineTuned {
    /// Class probabilities for `n` cut-layer activations (NCHW, back to back).
    pub fn predict_proba(&self, x: &[f32], n: usize) -> Vec<f64> {
        let device = Device::flex();
        self.net
            .log_proba(x, n, self.cut.shape(), &device)
            .into_iter()
            .map(|l| (l as f64).exp())
            .collect()
    }

    /// Floats the head reads per image: the cut layer's whole activation.
    pub fn feature_dim(&self) -> usize {
        self.cut.shape().iter().product()
    }
}
