//! A pretrained network turned into a feature extractor: which network and weights, the layer
//! to read, how to pool it, test-time augmentation, and the provenance features record. The
//! networks themselves are in [`crate::backbones`].

use crate::backbones::{LayerShape, LoadOptions, Network};
use crate::features::FeatureMeta;
use crate::image_io::Preprocess;
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

pub use crate::backbones::{BackboneKind, preprocess_of};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct BackboneOptions {
    /// `None`: what the weight file holds when one is named, else the default network.
    pub kind: Option<BackboneKind>,
    pub weights: Option<PathBuf>,
    /// `--variant`, for networks that have variants (InceptionV3's block layout).
    pub variant: Option<String>,
    /// `None`: the network's default layer.
    pub layer: Option<String>,
    pub pool: Pool,
    pub tta: Tta,
    /// For an ONNX model: its preprocessing, input size and limits.
    pub onnx: crate::onnx_net::OnnxChoice,
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
            onnx: crate::onnx_net::OnnxChoice::default(),
        }
    }
}

pub struct Backbone {
    net: Box<dyn Network>,
    device: Device,
    pub kind: BackboneKind,
    pub preprocess: Preprocess,
    pub pool: Pool,
    pub tta: Tta,
    pub weights_path: PathBuf,
    pub meta: FeatureMeta,
    /// The layer read, one the network has.
    layer: String,
    shape: LayerShape,
}

impl Backbone {
    /// Finds the weights (`--weights`, `$DLTOOL_WEIGHTS`, `assets/weights/`, the cache) and
    /// loads them.
    pub fn load(opts: &BackboneOptions, device: Device) -> anyhow::Result<Self> {
        let (path, kind) = Self::resolve(opts)?;
        Self::load_file(&path, kind, opts, device)
    }

    /// The weight file `opts` names (or the default one) and the network it is for, without
    /// loading it: a command whose layer depends on the network asks this first.
    pub fn resolve(opts: &BackboneOptions) -> anyhow::Result<(PathBuf, BackboneKind)> {
        let onnx = &crate::backbones::onnx::SPEC;
        // `--weights NAME` of a model imported with `dltool weights import MODEL.onnx`.
        if let Some(w) = opts.weights.as_deref().filter(|w| !w.exists())
            && let Some(found) = w.to_str().and_then(crate::backbones::onnx::find_by_name)
        {
            return Ok((found, opts.kind.unwrap_or(BackboneKind(onnx))));
        }
        if opts.weights.is_none() && opts.kind.is_some_and(|k| std::ptr::eq(k.spec(), onnx)) {
            anyhow::bail!(
                "--backbone onnx needs --weights MODEL.onnx (a file, or a name given to `dltool \
                 weights import`)"
            );
        }
        let wanted = opts
            .kind
            .map(BackboneKind::spec)
            .unwrap_or_else(crate::backbones::default_spec);
        // A named file (or fetched registry entry) is resolved first, so that what it holds
        // can pick the network when `--backbone` is not given.
        let path =
            crate::weights::resolve(opts.weights.as_deref(), wanted.files, wanted.registry_entry)
                .map_err(anyhow::Error::msg)?;
        let kind = match opts.kind {
            Some(kind) => kind,
            None if opts.weights.is_some() => BackboneKind::of_weights(&path),
            None => BackboneKind(wanted),
        };
        Ok((path, kind))
    }

    pub fn load_file(
        path: &Path,
        kind: BackboneKind,
        opts: &BackboneOptions,
        device: Device,
    ) -> anyhow::Result<Self> {
        let spec = kind.spec();
        if !spec.gpu && !crate::device::is_cpu(&device) {
            anyhow::bail!(
                "{} runs on the CPU engine only (it has no GPU model): use --device cpu",
                spec.title
            );
        }
        if opts.variant.is_some() && spec.variants.is_empty() {
            anyhow::bail!(
                "--variant is an option of {}; {} has none",
                crate::backbones::NETWORKS
                    .iter()
                    .filter(|s| !s.variants.is_empty())
                    .map(|s| s.title)
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.title
            );
        }
        crate::backbones::check_weights_for(spec, path)?;
        let net = (spec.load)(
            path,
            &LoadOptions {
                device: &device,
                variant: opts.variant.as_deref(),
                layer: opts.layer.as_deref(),
                onnx: Some(&opts.onnx),
            },
        )?;
        let layer = opts.layer.clone().unwrap_or_else(|| net.default_layer());
        let shape = net.layer_shape(&layer).ok_or_else(|| {
            anyhow::anyhow!(
                "--layer {layer}: {} has no such layer (it has {})",
                spec.title,
                net.layers().join(", ")
            )
        })?;
        // For a TF.js model the fingerprint covers model.json; its shards are checked by the
        // registry (`dltool weights verify`), and a changed shard changes the features anyway.
        let sha = crate::weights::fingerprint(path)
            .with_context(|| format!("{}: cannot read weights", path.display()))?;
        let meta = FeatureMeta {
            backbone: net.provenance(),
            weights_sha256: sha,
            layer: layer.clone(),
            pool: opts.pool.name().to_string(),
            tta: opts.tta.name().to_string(),
            dltool_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Self {
            preprocess: net.preprocess(),
            net,
            device,
            kind,
            pool: opts.pool,
            tta: opts.tta,
            weights_path: path.to_path_buf(),
            meta,
            layer,
            shape,
        })
    }

    /// True when the network runs on the CPU rather than a GPU.
    pub fn is_cpu(&self) -> bool {
        crate::device::is_cpu(&self.device)
    }

    /// Length of one feature vector.
    pub fn dim(&self) -> usize {
        self.shape.dim(self.pool)
    }

    /// Floats in one preprocessed image.
    pub fn input_len(&self) -> usize {
        3 * self.preprocess.width as usize * self.preprocess.height as usize
    }

    /// Features of `n` preprocessed images laid back to back in `pixels` (`n * input_len()`
    /// floats, CHW each); returns `n * dim()` floats, row-major. With [`Tta::Flip`] the
    /// mirrored batch is a second forward call of the same size, so a row does not depend on
    /// what else is in its batch.
    pub fn features(&self, pixels: Vec<f32>, n: usize) -> Vec<f32> {
        match self.tta {
            Tta::None => self.features_once(&pixels, n),
            Tta::Flip => {
                let mut mirrored = pixels.clone();
                mirror_rows(&mut mirrored, self.preprocess.width as usize);
                let mut out = self.features_once(&pixels, n);
                let mut other = self.features_once(&mirrored, n);
                if self.pool == Pool::None {
                    mirror_rows(&mut other, self.shape.width());
                }
                average_into(&mut out, &other);
                out
            }
        }
    }

    fn features_once(&self, pixels: &[f32], n: usize) -> Vec<f32> {
        self.net.features(pixels, n, &self.layer, self.pool)
    }

    /// Classes of the network's own ImageNet classifier, or `None` when the weights have none
    /// (the shared tf2015 file ends at the pool).
    pub fn num_classes(&self) -> Option<usize> {
        self.net.num_classes()
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
            Tta::None => self.net.classify(&pixels, n),
            Tta::Flip => {
                let mut mirrored = pixels.clone();
                mirror_rows(&mut mirrored, self.preprocess.width as usize);
                let mut out = self.net.classify(&pixels, n)?;
                average_into(&mut out, &self.net.classify(&mirrored, n)?);
                Some(out)
            }
        }
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
