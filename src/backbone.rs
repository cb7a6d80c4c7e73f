//! A pretrained network turned into a feature extractor: weights, preprocessing, the layer to
//! read and how to pool it. Two networks: InceptionV3 (the default) and MobileNet v1.

use crate::features::FeatureMeta;
use crate::image_io::Preprocess;
use crate::inception_v3::{self, BlockVariant, InceptionV3, Layer};
use crate::mobilenet_v1::{self, MobileNetV1};
use anyhow::Context;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use std::path::{Path, PathBuf};

/// How a `[C, H, W]` activation becomes one feature vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// Mean over H and W: C features (2048 for mixed_7c).
    Avg,
    /// Max over H and W: C features.
    Max,
    /// No pooling: C*H*W features, channel-major (`c * H * W + h * W + w`).
    None,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Avg => "avg",
            Pool::Max => "max",
            Pool::None => "none",
        }
    }
}

impl std::str::FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "avg" => Ok(Pool::Avg),
            "max" => Ok(Pool::Max),
            "none" => Ok(Pool::None),
            other => Err(format!(
                "unknown pooling '{other}' (expected avg, max or none)"
            )),
        }
    }
}

/// Test-time augmentation: what else each image is run as, the results averaged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tta {
    /// The image as it is.
    #[default]
    None,
    /// The image and its left-right mirror (the preprocessed input reversed along its width);
    /// the two pooled feature vectors are averaged. With `--pool none` the mirror's activation
    /// map is reversed back along its width first, so each position still averages the same
    /// region of the image.
    Flip,
}

impl Tta {
    pub fn name(self) -> &'static str {
        match self {
            Tta::None => "none",
            Tta::Flip => "flip",
        }
    }
}

impl std::str::FromStr for Tta {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Tta::None),
            "flip" => Ok(Tta::Flip),
            other => Err(format!(
                "unknown test-time augmentation '{other}' (expected none or flip)"
            )),
        }
    }
}

/// Reverses every run of `width` floats: mirrors CHW (or NCHW) data left-right.
pub fn mirror_rows(data: &mut [f32], width: usize) {
    data.chunks_exact_mut(width).for_each(<[f32]>::reverse);
}

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneKind {
    InceptionV3,
    MobileNetV1,
}

/// The one layer MobileNet v1 exposes: the last feature map before its global pool.
pub const MOBILENET_LAYER: &str = "conv_pw_13_relu";

/// Weight files MobileNet v1 is looked for as, best first: the registry's folders.
pub const MOBILENET_FILES: &[&str] = &[
    "mobilenet_v1_1.0_224/model.json",
    "mobilenet_v1_0.75_224/model.json",
    "mobilenet_v1_0.50_224/model.json",
    "mobilenet_v1_0.25_224/model.json",
];

impl BackboneKind {
    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::InceptionV3 => "inception_v3",
            BackboneKind::MobileNetV1 => "mobilenet_v1",
        }
    }

    /// The layer features are read from when the user names none.
    pub fn default_layer(self) -> &'static str {
        match self {
            BackboneKind::InceptionV3 => Layer::Mixed7c.name(),
            BackboneKind::MobileNetV1 => MOBILENET_LAYER,
        }
    }

    /// The kind a weight path is for: a TF.js `model.json` (or a folder holding one) is a
    /// MobileNet, anything else is taken for InceptionV3 and its loader says if it is not.
    pub fn of_weights(path: &Path) -> BackboneKind {
        let is_model_json = path.file_name().is_some_and(|n| n == "model.json");
        if is_model_json || path.join("model.json").is_file() {
            BackboneKind::MobileNetV1
        } else {
            BackboneKind::InceptionV3
        }
    }

    /// The kind recorded in feature/head provenance (`inception_v3/tf2015`, `mobilenet_v1/...`).
    pub fn of_provenance(backbone: &str) -> Option<BackboneKind> {
        let family = backbone.split('/').next().unwrap_or("");
        [BackboneKind::InceptionV3, BackboneKind::MobileNetV1]
            .into_iter()
            .find(|k| k.name() == family)
    }
}

impl std::str::FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inception_v3" => Ok(BackboneKind::InceptionV3),
            "mobilenet_v1" => Ok(BackboneKind::MobileNetV1),
            other => Err(format!(
                "unknown backbone '{other}' (expected inception_v3 or mobilenet_v1)"
            )),
        }
    }
}

/// The preprocessing of the network a provenance string names (`inception_v3/tf2015`,
/// `mobilenet_v1/0.25_224`), for recording in heads.
pub fn preprocess_of(backbone: &str) -> Option<Preprocess> {
    let (family, rest) = backbone.split_once('/')?;
    match BackboneKind::of_provenance(family)? {
        BackboneKind::InceptionV3 => {
            let variant: BlockVariant = rest.parse().ok()?;
            Some(inception_v3::InceptionV3Config::new(variant).preprocess())
        }
        BackboneKind::MobileNetV1 => {
            let size: u32 = rest.rsplit_once('_')?.1.parse().ok()?;
            Some(Preprocess {
                width: size,
                height: size,
                mean: [127.5; 3],
                std: [127.5; 3],
            })
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct BackboneOptions {
    /// `None`: from the weight file when one is named, else InceptionV3.
    pub kind: Option<BackboneKind>,
    pub weights: Option<PathBuf>,
    pub variant: Option<BlockVariant>,
    /// `None`: the kind's default layer.
    pub layer: Option<String>,
    pub pool: Pool,
    pub tta: Tta,
}

impl Default for BackboneOptions {
    fn default() -> Self {
        Self {
            kind: None,
            weights: None,
            variant: None,
            layer: None,
            pool: Pool::Avg,
            tta: Tta::None,
        }
    }
}

enum Net {
    Inception {
        model: Box<InceptionV3>,
        layer: Layer,
        /// The same network on the NHWC CPU engine; `None` runs burn (see
        /// `inception_fast::engine_from_env`).
        fast: Option<Box<crate::inception_fast::FastInceptionV3>>,
    },
    MobileNet {
        model: MobileNetV1,
    },
}

pub struct Backbone {
    net: Net,
    device: Device,
    pub kind: BackboneKind,
    pub preprocess: Preprocess,
    pub pool: Pool,
    pub tta: Tta,
    pub weights_path: PathBuf,
    pub meta: FeatureMeta,
    /// `[C, H, W]` of the layer read.
    shape: [usize; 3],
}

impl Backbone {
    /// Finds the weights (`--weights`, `$DLTOOL_WEIGHTS`, `assets/weights/`, the cache) and
    /// loads them.
    pub fn load(opts: &BackboneOptions, device: Device) -> anyhow::Result<Self> {
        let kind = opts.kind.unwrap_or_else(|| {
            opts.weights
                .as_deref()
                .map(BackboneKind::of_weights)
                .unwrap_or(BackboneKind::InceptionV3)
        });
        let path = match kind {
            BackboneKind::InceptionV3 => crate::weights::resolve(
                opts.weights.as_deref(),
                crate::weights::INCEPTION_FILES,
                "inception_v3_tf2015",
            ),
            BackboneKind::MobileNetV1 => crate::weights::resolve(
                opts.weights.as_deref(),
                MOBILENET_FILES,
                "mobilenet_v1_1.0_224",
            ),
        }
        .map_err(anyhow::Error::msg)?;
        Self::load_file(&path, kind, opts, device)
    }

    pub fn load_file(
        path: &Path,
        kind: BackboneKind,
        opts: &BackboneOptions,
        device: Device,
    ) -> anyhow::Result<Self> {
        let layer_name = opts
            .layer
            .clone()
            .unwrap_or_else(|| kind.default_layer().to_string());
        let (net, preprocess, backbone, shape) = match kind {
            BackboneKind::InceptionV3 => {
                let layer: Layer = layer_name.parse().map_err(|e| {
                    anyhow::anyhow!(
                        "--layer: {e} (InceptionV3 has mixed_5d, mixed_6e, mixed_7a, mixed_7c)"
                    )
                })?;
                let (model, loaded) = inception_v3::load(path, opts.variant, &device)?;
                (
                    Net::Inception {
                        // The CPU engine replaces burn-flex only; on a GPU burn runs the model.
                        fast: if crate::device::is_cpu(&device) {
                            crate::inception_fast::engine_from_env(&model)?.map(Box::new)
                        } else {
                            None
                        },
                        model: Box::new(model),
                        layer,
                    },
                    loaded.config.preprocess(),
                    format!("inception_v3/{}", loaded.config.variant.name()),
                    layer.shape(),
                )
            }
            BackboneKind::MobileNetV1 => {
                if layer_name != MOBILENET_LAYER {
                    anyhow::bail!(
                        "--layer {layer_name}: MobileNet v1 features come from {MOBILENET_LAYER} only"
                    );
                }
                if opts.variant.is_some() {
                    anyhow::bail!("--variant is an InceptionV3 option; MobileNet v1 has none");
                }
                let (model, config) = mobilenet_v1::load(path, &device)?;
                (
                    Net::MobileNet { model },
                    config.preprocess(),
                    format!("mobilenet_v1/{:.2}_{}", config.alpha, config.input_size),
                    [config.feature_dim, config.map_size, config.map_size],
                )
            }
        };
        // For a TF.js model the fingerprint covers model.json; its shards are checked by the
        // registry (`dltool weights verify`), and a changed shard changes the features anyway.
        let sha = crate::weights::sha256_file(path)
            .with_context(|| format!("{}: cannot read weights", path.display()))?;
        let meta = FeatureMeta {
            backbone,
            weights_sha256: sha,
            layer: layer_name,
            pool: opts.pool.name().to_string(),
            tta: opts.tta.name().to_string(),
            dltool_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Self {
            net,
            device,
            kind,
            preprocess,
            pool: opts.pool,
            tta: opts.tta,
            weights_path: path.to_path_buf(),
            meta,
            shape,
        })
    }

    /// True when the network runs on the CPU (burn-flex) rather than a GPU.
    pub fn is_cpu(&self) -> bool {
        crate::device::is_cpu(&self.device)
    }

    /// Length of one feature vector.
    pub fn dim(&self) -> usize {
        let [c, h, w] = self.shape;
        match self.pool {
            Pool::Avg | Pool::Max => c,
            Pool::None => c * h * w,
        }
    }

    /// Floats in one preprocessed image.
    pub fn input_len(&self) -> usize {
        3 * self.preprocess.width as usize * self.preprocess.height as usize
    }

    fn input(&self, pixels: Vec<f32>, n: usize) -> Tensor<4> {
        let (h, w) = (
            self.preprocess.height as usize,
            self.preprocess.width as usize,
        );
        Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, h, w]), &self.device)
    }

    /// Features of `n` preprocessed images laid back to back in `pixels` (`n * input_len()`
    /// floats, CHW each); returns `n * dim()` floats, row-major. With [`Tta::Flip`] the
    /// mirrored batch is a second forward call of the same size, so a row does not depend on
    /// what else is in its batch.
    pub fn features(&self, pixels: Vec<f32>, n: usize) -> Vec<f32> {
        match self.tta {
            Tta::None => self.features_once(pixels, n),
            Tta::Flip => {
                let mut mirrored = pixels.clone();
                mirror_rows(&mut mirrored, self.preprocess.width as usize);
                let mut out = self.features_once(pixels, n);
                let mut other = self.features_once(mirrored, n);
                if self.pool == Pool::None {
                    mirror_rows(&mut other, self.shape[2]);
                }
                average_into(&mut out, &other);
                out
            }
        }
    }

    fn features_once(&self, pixels: Vec<f32>, n: usize) -> Vec<f32> {
        if let Net::Inception {
            fast: Some(fast),
            layer,
            ..
        } = &self.net
        {
            let act = fast.forward_act(&pixels, n, *layer);
            return match self.pool {
                Pool::Avg => act.global_avg(),
                Pool::Max => act.global_max(),
                Pool::None => act.to_nchw(),
            };
        }
        let x = self.input(pixels, n);
        let act = match &self.net {
            Net::Inception { model, layer, .. } => model.forward_to(x, *layer),
            Net::MobileNet { model } => model.forward_map(x),
        };
        let out = match self.pool {
            Pool::Avg => inception_v3::global_avg_pool(act),
            Pool::Max => inception_v3::global_max_pool(act),
            Pool::None => act.reshape([n as i32, -1]),
        };
        out.into_data()
            .try_into_vec::<f32>()
            .expect("the network returns f32")
    }

    /// Classes of the network's own ImageNet classifier, or `None` when the weights have none
    /// (the shared tf2015 file ends at the pool).
    pub fn num_classes(&self) -> Option<usize> {
        match &self.net {
            Net::Inception { model, .. } => model.num_classes(),
            Net::MobileNet { model } => model.classifier.as_ref().map(|fc| fc.weight.dims()[1]),
        }
    }

    /// Class probabilities (softmax) of the pretrained classifier for `n` preprocessed images:
    /// `n * num_classes()` floats, row-major; `None` without a classifier. Independent of the
    /// layer and pooling chosen for features: the classifier reads the average pool of the
    /// last layer.
    ///
    /// With [`Tta::Flip`] the probabilities of the image and of its mirror are averaged (the
    /// mean of two distributions is one; averaging logits would need the classifier's
    /// pre-softmax output, which MobileNet's model does not expose).
    pub fn classify(&self, pixels: Vec<f32>, n: usize) -> Option<Vec<f32>> {
        match self.tta {
            Tta::None => self.classify_once(pixels, n),
            Tta::Flip => {
                let mut mirrored = pixels.clone();
                mirror_rows(&mut mirrored, self.preprocess.width as usize);
                let mut out = self.classify_once(pixels, n)?;
                average_into(&mut out, &self.classify_once(mirrored, n)?);
                Some(out)
            }
        }
    }

    fn classify_once(&self, pixels: Vec<f32>, n: usize) -> Option<Vec<f32>> {
        let x = self.input(pixels, n);
        let probs = match &self.net {
            Net::Inception { model, .. } => {
                model.num_classes()?;
                let pooled = inception_v3::global_avg_pool(model.forward_to(x, Layer::Mixed7c));
                softmax(model.classify(pooled)?, 1)
            }
            Net::MobileNet { model } => {
                model.classifier.as_ref()?;
                model.classify(model.forward_features(x))?
            }
        };
        Some(
            probs
                .into_data()
                .try_into_vec::<f32>()
                .expect("the network returns f32"),
        )
    }
}

/// `a[i] = (a[i] + b[i]) / 2`.
fn average_into(a: &mut [f32], b: &[f32]) {
    debug_assert_eq!(a.len(), b.len());
    for (x, y) in a.iter_mut().zip(b) {
        *x = 0.5 * (*x + *y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_rows_reverses_each_row_only() {
        // Two rows of width 3 (one channel, two lines): each line is reversed in place.
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        mirror_rows(&mut x, 3);
        assert_eq!(x, vec![3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
        mirror_rows(&mut x, 3);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn tta_names_round_trip_and_unknown_is_refused() {
        for t in [Tta::None, Tta::Flip] {
            assert_eq!(t.name().parse::<Tta>(), Ok(t));
        }
        assert!("rot90".parse::<Tta>().unwrap_err().contains("none or flip"));
    }
}
