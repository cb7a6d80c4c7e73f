//! Fine-tuning: train the top of a pretrained network (and a new classifier) on the user's
//! images, the way DL4J's `TransferLearningHelper` does it: the frozen bottom runs once per
//! image and view on dltool's CPU engine and its activations at the cut layer are cached
//! ([`cache`]); the blocks above the cut run in burn with autodiff ([`top`], [`train`]):
//! InceptionV3's Mixed blocks, or EfficientNet-Lite's MBConv blocks and head ([`lite`]).
//!
//! BatchNorm in the trained blocks is held in inference mode: it is folded into the
//! convolutions, which is exact for the pretrained statistics, and a few hundred images are too
//! few to estimate new ones (batches of 32 would make them noisy, and the pretrained blocks
//! were tuned to the ImageNet statistics).
//!
//! The result is a head file of kind `fine-tuned` ([`crate::head`]): features are the cut
//! layer's activations (`pool none`), the head is the trained top.

pub mod cache;
pub mod lite;
pub mod search;
pub mod top;
pub mod train;

use crate::backbone::{Backbone, BackboneKind, BackboneOptions};
use crate::backbones::efficientnet_lite::{HEAD, LITE0, LITE2, LiteLayer, LiteSpec};
use crate::featurize::{self, Outcome};
use crate::inception_v3::Layer;
use crate::inputs::Input;
use crate::journal::FileStamp;
use cache::{ActivationCache, VIEWS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use top::Pretrained;

pub use top::FineTunedNet;
pub use train::{EpochReport, FineTuneParams, StepReport, TrainReport};

#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    #[error("--from-layer {layer}: not a fine-tuning cut point of {network} (cut points: {})", points.join(", "))]
    NotACutPoint {
        layer: String,
        network: String,
        points: Vec<String>,
    },
    #[error(
        "--backbone {0}: fine-tuning supports inception_v3, efficientnet_lite0 and \
         efficientnet_lite2"
    )]
    Backbone(String),
    #[error("{path}: activation cache: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("{0}")]
    Params(String),
    #[error("training diverged in epoch {epoch} (loss {loss}); try a smaller --lr / --head-lr")]
    Diverged { epoch: usize, loss: f64 },
    #[error("interrupted before the first epoch finished: no model to keep")]
    Interrupted,
    /// Images that cannot be trained on: unlabelled, one class, a class too small.
    #[error("{0}")]
    Classes(String),
}

/// Images per class of `labels` (of the images `what` names), refusing what cannot be
/// trained and validated: an unlabelled image, one class, a class too small to give both the
/// training and the validation split an image.
pub fn check_classes<'a>(
    labels: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<BTreeMap<String, usize>, FineTuneError> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in labels {
        if l.is_empty() {
            return Err(FineTuneError::Classes(format!(
                "{what}: an image has no label (images directly in the folder given); put each \
                 class in its own subfolder"
            )));
        }
        *counts.entry(l.to_string()).or_default() += 1;
    }
    if counts.len() < 2 {
        return Err(FineTuneError::Classes(format!(
            "{what}: only one class ({}): a classifier needs at least two",
            counts.keys().next().map(String::as_str).unwrap_or("none")
        )));
    }
    if let Some((class, n)) = counts.iter().find(|(_, n)| **n < 2) {
        return Err(FineTuneError::Classes(format!(
            "{what}: class '{class}' has {n} image(s); the validation split needs at least 2 per \
             class (one to train on, one to validate)"
        )));
    }
    Ok(counts)
}

/// Where a network is cut: the frozen part ends at this layer, the trainable top starts above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// InceptionV3 at `mixed_6e` (Mixed_7a..7c train) or `mixed_7a` (7b, 7c).
    Inception(Layer),
    /// EfficientNet-Lite at the end of stage `stage` (0..7): the later blocks and the head
    /// convolution train.
    Lite {
        spec: &'static LiteSpec,
        stage: usize,
    },
}

impl Cut {
    /// The layer's name, as `--from-layer` and `--layer` take it.
    pub fn layer(&self) -> String {
        match self {
            Cut::Inception(l) => l.name().to_string(),
            Cut::Lite { spec, stage } => format!("block{}", spec.stage_ends()[*stage]),
        }
    }

    /// `[C, H, W]` of the cached activations.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Cut::Inception(l) => l.shape(),
            Cut::Lite { spec, stage } => spec.layer_shape(LiteLayer::Stage(*stage)),
        }
    }

    /// Width of the pooled features the new classifier reads.
    pub fn pooled(&self) -> usize {
        match self {
            Cut::Inception(_) => top::INCEPTION_POOLED,
            Cut::Lite { .. } => HEAD,
        }
    }

    /// The last frozen block of an EfficientNet-Lite cut.
    pub fn lite_block(&self) -> Option<usize> {
        match self {
            Cut::Lite { spec, stage } => Some(spec.stage_ends()[*stage]),
            Cut::Inception(_) => None,
        }
    }
}

/// The EfficientNet-Lite size of a backbone name (`efficientnet_lite2`), if it is one.
pub fn lite_spec(network: &str) -> Option<&'static LiteSpec> {
    [&LITE0, &LITE2].into_iter().find(|s| s.name == network)
}

/// The layers `network` can be cut at, first to last.
pub fn cut_points(network: &str) -> Result<Vec<String>, FineTuneError> {
    if network == "inception_v3" {
        return Ok(vec!["mixed_6e".into(), "mixed_7a".into()]);
    }
    let spec = lite_spec(network).ok_or_else(|| FineTuneError::Backbone(network.to_string()))?;
    Ok(spec
        .stage_ends()
        .iter()
        .map(|b| format!("block{b}"))
        .collect())
}

/// The default cut of `network`: about the last third of the network trains. InceptionV3:
/// Mixed_7a..7c. EfficientNet-Lite2: blocks 15-20 and the head (the PyTorch
/// reference, 0.93 on the flowers); Lite0: its stage 5 and 6 alike (blocks 11-15).
pub fn default_cut(network: &str) -> Result<&'static str, FineTuneError> {
    match network {
        "inception_v3" => Ok("mixed_6e"),
        "efficientnet_lite2" => Ok("block14"),
        "efficientnet_lite0" => Ok("block10"),
        other => Err(FineTuneError::Backbone(other.to_string())),
    }
}

/// Most epochs when the user names none. EfficientNet-Lite2's top (cut at block14) fits the
/// 600 flowers training photos within 2-3 epochs (training loss 0.57, 0.06, 0.007): on the
/// seed-42 split an 8-epoch cosine schedule stopped early with its best validation loss 0.391
/// at epoch 3, a 3-epoch one reached 0.319 at epoch 2 (BENCHMARKS.md), in 3/8 of the time.
pub fn default_epochs(cut: Cut) -> usize {
    match cut {
        Cut::Lite { .. } => 3,
        Cut::Inception(_) => FineTuneParams::default().epochs,
    }
}

/// The cut at layer `name` of `kind`.
pub fn cut_layer(kind: BackboneKind, name: &str) -> Result<Cut, FineTuneError> {
    cut_of(kind.name(), name)
}

/// The cut at layer `name` of the network called `network` (`inception_v3`,
/// `efficientnet_lite2`).
pub fn cut_of(network: &str, name: &str) -> Result<Cut, FineTuneError> {
    let points = cut_points(network)?;
    let not_a_cut = || FineTuneError::NotACutPoint {
        layer: name.to_string(),
        network: network.to_string(),
        points: points.clone(),
    };
    match lite_spec(network) {
        None => match name.parse::<Layer>() {
            Ok(layer @ (Layer::Mixed6e | Layer::Mixed7a)) => Ok(Cut::Inception(layer)),
            _ => Err(not_a_cut()),
        },
        Some(spec) => {
            let stage = points
                .iter()
                .position(|p| p == name)
                .ok_or_else(not_a_cut)?;
            Ok(Cut::Lite { spec, stage })
        }
    }
}

/// What [`fill`] did.
#[derive(Debug, Default)]
pub struct FillReport {
    /// Images found in the cache from an earlier (or interrupted) run.
    pub reused: usize,
    /// Images computed now.
    pub computed: usize,
    /// Images that could not be read or decoded: (display path, reason).
    pub skipped: Vec<(String, String)>,
    /// Ctrl-C stopped the filling; what was computed is kept.
    pub interrupted: bool,
}

/// Computes every view of every input not in `cache` yet (the network runs on the batches of
/// `batch_size` images the featurize loop decodes), appending each as it is done, then selects
/// the inputs that are cached, in input order. `on_image` is called once per input.
pub fn fill(
    cache: &mut ActivationCache,
    backbone: &Backbone,
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    stop: &AtomicBool,
    mut on_image: impl FnMut(),
) -> anyhow::Result<FillReport> {
    let mut report = FillReport::default();
    let mut stamps = Vec::with_capacity(inputs.len());
    let mut todo = Vec::new();
    for input in inputs {
        let key = input.path.display().to_string();
        let stamp = std::fs::metadata(&input.path)
            .and_then(|m| FileStamp::of(&m))
            .ok();
        if let Some(s) = stamp
            && cache.is_fresh(&key, s)
        {
            report.reused += 1;
            on_image();
        } else {
            todo.push(input.clone());
        }
        stamps.push(stamp);
    }
    let dim = cache.dim();
    let network = |pixels: featurize::Pixels, n: usize| {
        // One network, so one preprocessing: its buffer is the only one.
        let pixels = pixels.into_iter().next().unwrap_or_default();
        let mut mirrored = pixels.clone();
        crate::backbone::mirror_rows(&mut mirrored, backbone.preprocess.width as usize);
        let original = backbone.features(pixels, n);
        let mirror = backbone.features(mirrored, n);
        // Per image: its views back to back, as `ActivationCache::append` takes them.
        let mut out = Vec::with_capacity(n * dim * VIEWS.len());
        for i in 0..n {
            out.extend_from_slice(&original[i * dim..(i + 1) * dim]);
            out.extend_from_slice(&mirror[i * dim..(i + 1) * dim]);
        }
        out
    };
    let network = featurize::Network {
        preprocesses: std::slice::from_ref(&backbone.preprocess),
        run: network,
        dim: dim * VIEWS.len(),
        on_cpu: backbone.is_cpu(),
    };
    let result = featurize::run_network(network, &todo, batch_size, max_pixels, |i, outcome| {
        let input = &todo[i];
        match outcome {
            Outcome::Features(views) => {
                let key = input.path.display().to_string();
                // Stamp taken after the network read the file, so a file changed while
                // it was read is stale next time rather than wrongly fresh.
                let stamp = std::fs::metadata(&input.path).and_then(|m| FileStamp::of(&m));
                match stamp {
                    Ok(stamp) => {
                        cache.append(&key, &input.label, stamp, views)?;
                        report.computed += 1;
                    }
                    Err(e) => report.skipped.push((input.display.clone(), e.to_string())),
                }
            }
            Outcome::Skipped(reason) => report
                .skipped
                .push((input.display.clone(), reason.to_string())),
        }
        on_image();
        if stop.load(Ordering::SeqCst) {
            anyhow::bail!(Stopped);
        }
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(e) if e.is::<Stopped>() => report.interrupted = true,
        Err(e) => return Err(e),
    }
    let mut selected = Vec::new();
    for (input, stamp) in inputs.iter().zip(stamps) {
        let key = input.path.display().to_string();
        let stamp = std::fs::metadata(&input.path)
            .and_then(|m| FileStamp::of(&m))
            .ok()
            .or(stamp);
        if let Some(s) = stamp
            && cache.is_fresh(&key, s)
        {
            selected.push((key, input.label.clone(), s));
        }
    }
    cache.select(&selected);
    Ok(report)
}

/// A network cut at one layer, its activation cache and the pretrained weights above the cut:
/// what every fine-tune at that cut starts from (one per `fine-tune` run, one per cut layer of
/// a search, shared by its grid points and folds).
pub struct Prepared {
    pub cut: Cut,
    /// The frozen network up to the cut (`pool none`).
    pub backbone: Backbone,
    pub cache: ActivationCache,
    pretrained: Pretrained,
    /// InceptionV3's block layout; `None` for other networks.
    variant: Option<crate::inception_v3::BlockVariant>,
}

impl Prepared {
    /// Loads the network in `weights` (of `kind`, with `opts`' variant and preprocessing) cut
    /// at `cut`, and opens the cut's cache under `cache_root`, holding at most `memory_limit`
    /// bytes of activations in memory.
    pub fn open(
        weights: &Path,
        kind: BackboneKind,
        opts: &BackboneOptions,
        cut: Cut,
        cache_root: &Path,
        memory_limit: u64,
        device: burn::prelude::Device,
    ) -> anyhow::Result<Prepared> {
        let opts = BackboneOptions {
            pool: crate::backbone::Pool::None,
            tta: crate::backbone::Tta::None,
            layer: Some(cut.layer()),
            ..opts.clone()
        };
        let backbone = Backbone::load_file(weights, kind, &opts, device)?;
        let cache = ActivationCache::open(
            cache_root,
            &backbone.meta,
            &backbone.preprocess,
            backbone.dim(),
            memory_limit,
        )?;
        let flex = burn::prelude::Device::flex();
        let (pretrained, variant) = match cut {
            Cut::Inception(_) => {
                let variant = opts
                    .variant
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?;
                let (model, loaded) =
                    crate::inception_v3::load(&backbone.weights_path, variant, &flex)?;
                (
                    Pretrained::Inception(Box::new(model)),
                    Some(loaded.config.variant),
                )
            }
            Cut::Lite { spec, .. } => (
                Pretrained::Lite(Box::new(
                    crate::backbones::efficientnet_lite::FoldedLite::load(
                        &backbone.weights_path,
                        Some(spec.name),
                    )?,
                )),
                None,
            ),
        };
        Ok(Prepared {
            cut,
            backbone,
            cache,
            pretrained,
            variant,
        })
    }

    /// Caches every view of `inputs` not cached yet and selects them (see [`fill`]).
    pub fn fill(
        &mut self,
        inputs: &[Input],
        batch_size: usize,
        max_pixels: u64,
        stop: &AtomicBool,
        on_image: impl FnMut(),
    ) -> anyhow::Result<FillReport> {
        fill(
            &mut self.cache,
            &self.backbone,
            inputs,
            batch_size,
            max_pixels,
            stop,
            on_image,
        )
    }

    /// Trains a fresh copy of the pretrained top and a new classifier on `images` (indices
    /// into the cache's selection) with the class index of each selected image in `labels`.
    #[allow(clippy::too_many_arguments)]
    pub fn train(
        &mut self,
        images: &[usize],
        labels: &[usize],
        classes: usize,
        params: &FineTuneParams,
        stop: &AtomicBool,
        on_step: impl FnMut(StepReport),
        on_epoch: impl FnMut(&EpochReport),
    ) -> Result<(FineTunedNet, TrainReport), FineTuneError> {
        let net = FineTunedNet::from_pretrained(
            self.pretrained.clone(),
            self.cut,
            classes,
            &burn::prelude::Device::flex(),
        )?;
        train::train(
            net,
            &mut self.cache,
            self.cut.shape(),
            images,
            labels,
            classes,
            params,
            stop,
            on_step,
            on_epoch,
        )
    }

    /// The model file of a trained top: a head of kind `fine-tuned` whose features are the
    /// cut's activations, recording the frozen part by its weights' SHA-256.
    pub fn head(
        &self,
        net: FineTunedNet,
        report: TrainReport,
        params: FineTuneParams,
        classes: Vec<String>,
    ) -> crate::head::Head {
        let training = crate::head::TrainingSummary {
            rows: report.fitted_images(),
            train_accuracy: f64::NAN,
            iterations: report.epochs_run,
            converged: !report.interrupted,
        };
        crate::head::Head {
            feature_dim: self.backbone.dim(),
            model: crate::head::HeadModel::FineTuned {
                model: Box::new(top::FineTuned {
                    net,
                    cut: self.cut,
                    variant: self.variant,
                    report,
                }),
                params,
            },
            classes,
            provenance: self.backbone.meta.clone(),
            preprocess: Some(self.backbone.preprocess),
            dltool_version: env!("CARGO_PKG_VERSION").to_string(),
            training,
        }
    }
}

/// Ctrl-C while filling the cache.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Stopped;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_points_default_cuts_and_shapes_follow_the_network() {
        assert_eq!(default_cut("efficientnet_lite2").unwrap(), "block14");
        let cut = cut_of("efficientnet_lite2", "block14").unwrap();
        assert_eq!(
            cut,
            Cut::Lite {
                spec: &LITE2,
                stage: 4
            }
        );
        assert_eq!(cut.shape(), [120, 17, 17]);
        assert_eq!(cut.lite_block(), Some(14));
        assert_eq!(cut.pooled(), 1280);
        let cut = cut_of(
            "efficientnet_lite0",
            default_cut("efficientnet_lite0").unwrap(),
        )
        .unwrap();
        assert_eq!(
            (cut.layer(), cut.shape()),
            ("block10".to_string(), [112, 14, 14])
        );
        let cut = cut_of("inception_v3", "mixed_7a").unwrap();
        assert_eq!(
            (cut.shape(), cut.pooled(), cut.lite_block()),
            ([1280, 8, 8], 2048, None)
        );
        // A layer of the network that is not a stage end, and another network's layer.
        for (network, layer) in [
            ("efficientnet_lite2", "block13"),
            ("efficientnet_lite2", "head"),
            ("inception_v3", "block14"),
        ] {
            let err = cut_of(network, layer).unwrap_err().to_string();
            assert!(
                err.contains(&format!("not a fine-tuning cut point of {network}")),
                "{err}"
            );
        }
        assert!(matches!(
            cut_of("mobilenet_v1", "conv_pw_13_relu"),
            Err(FineTuneError::Backbone(_))
        ));
    }
}
