//! The trainable part of a fine-tuned network: the pretrained blocks above the cut layer and a
//! new linear classifier on their average pool.

use super::FineTuneError;
use crate::inception_v3::{self, BlockVariant, InceptionTop, InceptionV3Config, Layer};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Blocks above the cut (BatchNorm folded into the convolutions: held in inference mode) +
/// dropout + a new classifier on the 2048-d average pool.
#[derive(Module, Debug)]
pub struct FineTunedNet {
    pub top: InceptionTop,
    pub classifier: Linear,
}

/// Width of the pooled features the classifier reads (InceptionV3's mixed_7c).
pub const POOLED: usize = 2048;

impl FineTunedNet {
    /// The pretrained blocks above `cut` of a loaded (BatchNorm-folded) network, and a zero
    /// classifier for `classes` classes: zero logits give every class the same probability and
    /// the same gradient, so training starts from the pretrained features unchanged and the
    /// result does not depend on a random initialisation.
    pub fn from_pretrained(
        model: inception_v3::InceptionV3,
        cut: Layer,
        classes: usize,
        device: &Device,
    ) -> Result<Self, FineTuneError> {
        let top = model
            .into_top(cut)
            .ok_or_else(|| FineTuneError::NotACutPoint {
                layer: cut.name().to_string(),
            })?;
        Ok(Self {
            top,
            classifier: LinearConfig::new(POOLED, classes)
                .with_initializer(Initializer::Zeros)
                .init(device),
        })
    }

    /// The architecture alone (weights to be loaded from a model file).
    pub fn architecture(
        variant: BlockVariant,
        cut: Layer,
        classes: usize,
        device: &Device,
    ) -> Result<Self, FineTuneError> {
        let mut model = InceptionV3Config::new(variant).init(device);
        // Folding turns each BatchNorm into the convolution's bias: the layout the file stores.
        model.fold_batchnorm();
        Self::from_pretrained(model, cut, classes, device)
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
            .collect(None, None, true)
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
    pub variant: BlockVariant,
    pub cut: Layer,
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
