//! A pretrained network turned into a feature extractor: weights, preprocessing, the layer to
//! read and how to pool it.

use crate::features::FeatureMeta;
use crate::image_io::Preprocess;
use crate::inception_v3::{self, BlockVariant, InceptionV3, Layer};
use anyhow::Context;
use burn::prelude::*;
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

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct BackboneOptions {
    pub weights: Option<PathBuf>,
    pub variant: Option<BlockVariant>,
    pub layer: Layer,
    pub pool: Pool,
}

impl Default for BackboneOptions {
    fn default() -> Self {
        Self {
            weights: None,
            variant: None,
            layer: Layer::Mixed7c,
            pool: Pool::Avg,
        }
    }
}

pub struct Backbone {
    model: InceptionV3,
    /// The same network on the NHWC CPU engine; `None` runs burn (see `inception_fast::engine_from_env`).
    fast: Option<crate::inception_fast::FastInceptionV3>,
    device: Device,
    pub preprocess: Preprocess,
    pub layer: Layer,
    pub pool: Pool,
    pub weights_path: PathBuf,
    pub meta: FeatureMeta,
}

impl Backbone {
    pub fn load(opts: &BackboneOptions, device: Device) -> anyhow::Result<Self> {
        let path =
            crate::weights::resolve(opts.weights.as_deref(), crate::weights::INCEPTION_FILES)
                .map_err(anyhow::Error::msg)?;
        Self::load_file(&path, opts, device)
    }

    pub fn load_file(path: &Path, opts: &BackboneOptions, device: Device) -> anyhow::Result<Self> {
        let (model, loaded) = inception_v3::load(path, opts.variant, &device)?;
        let sha = crate::weights::sha256_file(path)
            .with_context(|| format!("{}: cannot read weights", path.display()))?;
        let preprocess = loaded.config.preprocess();
        let meta = FeatureMeta {
            backbone: format!("inception_v3/{}", loaded.config.variant.name()),
            weights_sha256: sha,
            layer: opts.layer.name().to_string(),
            pool: opts.pool.name().to_string(),
            dltool_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Self {
            fast: crate::inception_fast::engine_from_env(&model)?,
            model,
            device,
            preprocess,
            layer: opts.layer,
            pool: opts.pool,
            weights_path: path.to_path_buf(),
            meta,
        })
    }

    /// Length of one feature vector.
    pub fn dim(&self) -> usize {
        let [c, h, w] = self.layer.shape();
        match self.pool {
            Pool::Avg | Pool::Max => c,
            Pool::None => c * h * w,
        }
    }

    /// Floats in one preprocessed image.
    pub fn input_len(&self) -> usize {
        3 * self.preprocess.width as usize * self.preprocess.height as usize
    }

    /// Features of `n` preprocessed images laid back to back in `pixels` (`n * input_len()`
    /// floats, CHW each); returns `n * dim()` floats, row-major.
    pub fn features(&self, pixels: Vec<f32>, n: usize) -> Vec<f32> {
        if let Some(fast) = &self.fast {
            let act = fast.forward_act(&pixels, n, self.layer);
            return match self.pool {
                Pool::Avg => act.global_avg(),
                Pool::Max => act.global_max(),
                Pool::None => act.to_nchw(),
            };
        }
        let (h, w) = (
            self.preprocess.height as usize,
            self.preprocess.width as usize,
        );
        let x = Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, h, w]), &self.device);
        let act = self.model.forward_to(x, self.layer);
        let out = match self.pool {
            Pool::Avg => inception_v3::global_avg_pool(act),
            Pool::Max => inception_v3::global_max_pool(act),
            Pool::None => act.reshape([n as i32, -1]),
        };
        out.into_data()
            .try_into_vec::<f32>()
            .expect("the network returns f32")
    }
}
