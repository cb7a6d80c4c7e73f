//! The training loop: AdamW with separate learning rates for the pretrained blocks and the new
//! classifier, decoupled weight decay, dropout, a cosine schedule, early stopping on a
//! stratified validation split, and the best model kept (also when stopped by Ctrl-C).

use super::FineTuneError;
use super::cache::{ActivationCache, VIEWS};
use super::top::FineTunedNet;
use crate::split::SplitMix64;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// Hyper-parameters of a fine-tune (recorded in the model file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FineTuneParams {
    pub epochs: usize,
    /// Activations per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate of the pretrained blocks.
    pub lr: f64,
    /// Peak learning rate of the new classifier: it starts from zero and must move much
    /// further than the pretrained weights, which a large step would wreck.
    pub head_lr: f64,
    /// AdamW's decoupled weight decay (both groups).
    pub weight_decay: f64,
    /// Dropout on the pooled features before the classifier.
    pub dropout: f64,
    /// Fraction of each class held out for early stopping and model choice.
    pub validation_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub seed: u64,
    /// After the validated run, train a fresh copy again on every image (the validation split
    /// included) for the epoch count validation chose, on the same schedule. Missing in files
    /// written before it existed: those models were not refitted.
    #[serde(default)]
    pub refit: bool,
    /// Start the new classifier from a logistic regression fitted on the pretrained top's
    /// pooled features (linear probing, then fine-tuning: "LP-FT", Kumar et al. 2022) instead
    /// of zeros. Missing in files written before it existed: those started from zeros.
    #[serde(default)]
    pub linear_probe: bool,
    /// Mixup on the cut layer's activations ("manifold mixup", Verma et al. 2019): each batch
    /// is blended with a shuffled copy of itself, activations and targets alike, by a weight
    /// drawn from Beta(mixup, mixup); 0 turns it off. Cached views are few and fixed, and a
    /// few hundred images are memorised within an epoch or two (training loss 0.007 by the
    /// third): blends are new samples at no cost.
    #[serde(default)]
    pub mixup: f64,
    /// Label smoothing: the target puts `1 - label_smoothing` on the true class and spreads
    /// the rest evenly over all classes; 0 turns it off. 0.1 by default: over splits 0-9 of
    /// the flowers it lifted EfficientNet-Lite2's fine-tune from +1.35 to +2.18 points over
    /// the linear head (better than unsmoothed on 6 of the 10 splits, worse on 3;
    /// BENCHMARKS.md). Missing in files written before it existed: those were trained without.
    #[serde(default)]
    pub label_smoothing: f64,
}

impl Default for FineTuneParams {
    fn default() -> Self {
        Self {
            epochs: 8,
            batch_size: 32,
            lr: 1e-4,
            head_lr: 1e-3,
            weight_decay: 1e-2,
            dropout: 0.5,
            validation_fraction: 0.15,
            patience: 3,
            seed: 42,
            refit: false,
            linear_probe: false,
            mixup: 0.0,
            label_smoothing: 0.1,
        }
    }
}

impl FineTuneParams {
    pub fn check(&self) -> Result<(), FineTuneError> {
        let bad = |m: String| Err(FineTuneError::Params(m));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        for (name, v) in [("--lr", self.lr), ("--head-lr", self.head_lr)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number, not {v}"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be >= 0, not {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("--dropout must be in [0, 1), not {}", self.dropout));
        }
        if !(self.mixup.is_finite() && self.mixup >= 0.0) {
            return bad(format!("--mixup must be >= 0, not {}", self.mixup));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "--label-smoothing must be in [0, 1), not {}",
                self.label_smoothing
            ));
        }
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return bad(format!(
                "--validation-fraction must be in (0, 1), not {}",
                self.validation_fraction
            ));
        }
        Ok(())
    }
}

/// One finished epoch.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    /// Zero in a refit epoch, which has no validation split.
    pub val_loss: f64,
    pub val_accuracy: f64,
    /// An epoch of the refit on every image (see [`FineTuneParams::refit`]).
    #[serde(default)]
    pub refit: bool,
}

/// Progress inside an epoch, after each optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub epoch: usize,
    /// Epochs this phase runs: the schedule's, or the refit's.
    pub epochs: usize,
    pub refit: bool,
    pub step: usize,
    pub steps: usize,
    /// Mean loss of the epoch so far.
    pub loss: f64,
}

/// How a training ended.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct TrainReport {
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub best_val_accuracy: f64,
    pub train_images: usize,
    pub val_images: usize,
    /// Training samples per epoch: train images times views.
    pub samples_per_epoch: usize,
    pub stopped_early: bool,
    /// Ctrl-C stopped it; the best model of the finished epochs is kept.
    pub interrupted: bool,
    pub history: Vec<EpochReport>,
    /// The refit on every image, when there was one: the model kept is its last epoch, or the
    /// validated best when Ctrl-C stopped the refit.
    #[serde(default)]
    pub refit: Option<RefitReport>,
    /// The linear probe the classifier started from, when there was one.
    #[serde(default)]
    pub probe: Option<ProbeReport>,
}

/// The logistic regression the classifier started from (see [`FineTuneParams::linear_probe`]).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ProbeReport {
    /// The L2 strength the validation split chose among [`PROBE_REGS`].
    pub reg: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
}

/// The L2 strengths (MLlib's `regParam`, unstandardised) the linear probe tries: the range the
/// logistic heads of `tune` land in on pooled features.
pub const PROBE_REGS: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];

/// The second training of a refit: every image, `epochs` epochs of the validated run's
/// schedule.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct RefitReport {
    pub images: usize,
    pub samples_per_epoch: usize,
    pub epochs: usize,
    pub train_loss: Vec<f64>,
    pub interrupted: bool,
}

impl TrainReport {
    /// Images the kept model was trained on.
    pub fn fitted_images(&self) -> usize {
        match &self.refit {
            Some(r) if !r.interrupted => r.images,
            _ => self.train_images,
        }
    }
}

/// Learning-rate factor at step `t` of `total`: half a cosine from 1 down to 0.
fn cosine(t: usize, total: usize) -> f64 {
    0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total.max(1) as f64).cos())
}

/// A draw from Beta(alpha, alpha): `G1 / (G1 + G2)` of two Gamma(alpha) draws.
fn beta(rng: &mut SplitMix64, alpha: f64) -> f64 {
    let a = gamma(rng, alpha);
    let b = gamma(rng, alpha);
    if a + b > 0.0 { a / (a + b) } else { 0.5 }
}

/// A draw from Gamma(shape, 1): Marsaglia and Tsang's method (2000), with the
/// `U^(1/shape)` boost for shapes below 1.
fn gamma(rng: &mut SplitMix64, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal by Box-Muller.
        let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
        let u2 = rng.next_f64();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// `(train, validation)` image indices: each class split alike (shuffled by `seed`).
pub fn split(
    labels: &[usize],
    classes: usize,
    fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    crate::mlp::validation_split(labels, classes, fraction, seed)
}

/// Fine-tunes `net` on the cached activations of `images` (indices into the selection of
/// `cache`; class index per selected image in `labels`): the validation split is taken from
/// these images alone, so cross-validation can hold a fold out. `stop` (Ctrl-C) ends training
/// after the current step; the best model by validation loss among the finished epochs is
/// returned, or `Interrupted` when none finished.
///
/// With [`FineTuneParams::refit`], a fresh copy of `net` then trains on every image of
/// `images` for the best epoch count, on the same schedule (its steps scaled to the larger
/// epoch): the validation photos were only needed to choose when to stop, and a model that
/// also learns from them is the better one to keep (a Ctrl-C during the refit keeps the
/// validated model).
#[allow(clippy::too_many_arguments)]
pub fn train(
    mut net: FineTunedNet,
    cache: &mut ActivationCache,
    shape: [usize; 3],
    images: &[usize],
    labels: &[usize],
    classes: usize,
    params: &FineTuneParams,
    stop: &AtomicBool,
    mut on_step: impl FnMut(StepReport),
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(FineTunedNet, TrainReport), FineTuneError> {
    params.check()?;
    let subset: Vec<usize> = images.iter().map(|&i| labels[i]).collect();
    let (train_at, val_at) = split(&subset, classes, params.validation_fraction, params.seed);
    let train_images: Vec<usize> = train_at.into_iter().map(|p| images[p]).collect();
    let val_images: Vec<usize> = val_at.into_iter().map(|p| images[p]).collect();
    if val_images.is_empty() || train_images.is_empty() {
        return Err(FineTuneError::Params(
            "too few images for a validation split".into(),
        ));
    }
    let mut data = Data {
        cache,
        shape,
        labels,
        classes,
        params,
        stop,
    };
    let probe = if params.linear_probe {
        Some(linear_probe(
            &mut net,
            &mut data,
            &train_images,
            &val_images,
        )?)
    } else {
        None
    };
    let fresh = params.refit.then(|| net.clone());
    let mut report = TrainReport {
        train_images: train_images.len(),
        val_images: val_images.len(),
        best_val_loss: f64::INFINITY,
        probe,
        ..TrainReport::default()
    };
    let validated = fit(
        net,
        &mut data,
        &train_images,
        Some(&val_images),
        params.epochs,
        &mut report,
        &mut on_step,
        &mut on_epoch,
    )?
    .ok_or(FineTuneError::Interrupted)?;
    let Some(fresh) = fresh.filter(|_| !report.interrupted) else {
        return Ok((validated, report));
    };
    let mut second = TrainReport::default();
    let refitted = fit(
        fresh,
        &mut data,
        images,
        None,
        report.best_epoch,
        &mut second,
        &mut on_step,
        &mut on_epoch,
    )?;
    report.refit = Some(RefitReport {
        images: images.len(),
        samples_per_epoch: second.samples_per_epoch,
        epochs: report.best_epoch,
        train_loss: second.history.iter().map(|e| e.train_loss).collect(),
        interrupted: second.interrupted,
    });
    match refitted {
        Some(net) if !second.interrupted => Ok((net, report)),
        _ => {
            report.interrupted = true;
            Ok((validated, report))
        }
    }
}

/// Fits the classifier of `net` as a logistic regression on the pretrained top's pooled
/// features of every view of `train_images`, the L2 strength chosen by the log loss on the
/// original view of `val_images`. Fine-tuning then starts from a classifier that already
/// separates the classes, so the first steps' gradients reach the pretrained blocks with a
/// meaningful direction instead of the zero classifier's none, and the blocks' features move
/// less (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"). Not the default:
/// on the flowers (Lite2, split 0) the probed classifier drove the training loss to 0.11 in
/// the first epoch, leaving the blocks little to learn from, and the best validation loss was
/// 0.238 against 0.153 from zeros.
fn linear_probe(
    net: &mut FineTunedNet,
    data: &mut Data<'_>,
    train_images: &[usize],
    val_images: &[usize],
) -> Result<ProbeReport, FineTuneError> {
    let samples: Vec<(usize, usize)> = train_images
        .iter()
        .flat_map(|&i| (0..VIEWS.len()).map(move |v| (i, v)))
        .collect();
    let val: Vec<(usize, usize)> = val_images.iter().map(|&i| (i, 0)).collect();
    let (x_train, y_train) = pooled(net, data, &samples)?;
    let (x_val, y_val) = pooled(net, data, &val)?;
    let dim = net.pooled();
    let mut best: Option<(ProbeReport, crate::logistic::LogisticModel)> = None;
    for reg in PROBE_REGS {
        let params = crate::logistic::LogisticParams {
            reg,
            standardize: false,
            ..Default::default()
        };
        let (model, _) =
            crate::logistic::fit(&x_train, dim, &y_train, data.classes, &params, |_, _| {})
                .map_err(FineTuneError::Params)?;
        let (mut loss, mut correct) = (0f64, 0usize);
        for (row, &y) in x_val.chunks_exact(dim).zip(&y_val) {
            let p = model.predict_proba(row);
            loss -= p[y].max(f64::MIN_POSITIVE).ln();
            correct += usize::from(crate::logistic::argmax(&p) == y);
        }
        let n = y_val.len() as f64;
        let report = ProbeReport {
            reg,
            val_loss: loss / n,
            val_accuracy: correct as f64 / n,
        };
        if best
            .as_ref()
            .is_none_or(|(b, _)| report.val_loss < b.val_loss)
        {
            best = Some((report, model));
        }
    }
    let (report, model) = best.expect("PROBE_REGS is not empty");
    net.set_classifier(&model.coefficients, &model.intercepts);
    Ok(report)
}

/// The pretrained top's pooled features and the label of each `(image, view)` sample, at
/// inference; `Interrupted` if Ctrl-C came first.
fn pooled(
    net: &FineTunedNet,
    data: &mut Data<'_>,
    samples: &[(usize, usize)],
) -> Result<(Vec<f32>, Vec<usize>), FineTuneError> {
    const CHUNK: usize = 32;
    let device = Device::flex();
    let mut out = Vec::with_capacity(samples.len() * net.pooled());
    let mut x = Vec::new();
    for chunk in samples.chunks(CHUNK) {
        if data.stop.load(Ordering::SeqCst) {
            return Err(FineTuneError::Interrupted);
        }
        x.clear();
        for &(image, view) in chunk {
            data.cache.read_into(image, view, &mut x)?;
        }
        out.extend(net.pooled_features(&x, chunk.len(), data.shape, &device));
    }
    let labels = samples.iter().map(|&(i, _)| data.labels[i]).collect();
    Ok((out, labels))
}

/// What every phase of a fine-tune reads.
struct Data<'a> {
    cache: &'a mut ActivationCache,
    shape: [usize; 3],
    labels: &'a [usize],
    classes: usize,
    params: &'a FineTuneParams,
    stop: &'a AtomicBool,
}

/// Trains `net` on every view of `train_images` for at most `run_epochs` epochs of the
/// `params.epochs`-epoch cosine schedule. With `validation`: early stopping, and the model of
/// the best validation loss is returned (`None` when no epoch finished). Without (a refit):
/// the model after the last finished epoch.
#[allow(clippy::too_many_arguments)]
fn fit(
    net: FineTunedNet,
    data: &mut Data<'_>,
    train_images: &[usize],
    validation: Option<&[usize]>,
    run_epochs: usize,
    report: &mut TrainReport,
    on_step: &mut impl FnMut(StepReport),
    on_epoch: &mut impl FnMut(&EpochReport),
) -> Result<Option<FineTunedNet>, FineTuneError> {
    let (shape, labels, classes, params, stop) = (
        data.shape,
        data.labels,
        data.classes,
        data.params,
        data.stop,
    );
    let cache = &mut *data.cache;
    let refit = validation.is_none();
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let mut net = net.fork(&ad).train();
    let optim = |wd: f64| AdamWConfig::new().with_weight_decay(wd as f32).init();
    let mut optim_top = optim(params.weight_decay);
    let mut optim_head = optim(params.weight_decay);

    // Every training image in every view is a sample; validation reads the original only,
    // as `predict` does.
    let mut samples: Vec<(usize, usize)> = train_images
        .iter()
        .flat_map(|&i| (0..VIEWS.len()).map(move |v| (i, v)))
        .collect();
    let steps_per_epoch = samples.len().div_ceil(params.batch_size);
    let total_steps = steps_per_epoch * params.epochs;
    let mut rng = SplitMix64::new(params.seed ^ 0x6669_6e65_7475_6e65 ^ u64::from(refit));
    let dim: usize = shape.iter().product();
    let keep_scale = 1.0 / (1.0 - params.dropout);
    let pooled = net.pooled();
    report.samples_per_epoch = samples.len();

    let mut best: Option<FineTunedNet> = None;
    let mut since_best = 0;
    let mut global_step = 0;
    let mut x = Vec::new();
    'epochs: for epoch in 1..=run_epochs {
        rng.shuffle(&mut samples);
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for (step, batch) in samples.chunks(params.batch_size).enumerate() {
            if stop.load(Ordering::SeqCst) {
                report.interrupted = true;
                break 'epochs;
            }
            let b = batch.len();
            x.clear();
            let smooth = params.label_smoothing;
            let mut onehot = vec![(smooth / classes as f64) as f32; b * classes];
            for (row, &(image, view)) in batch.iter().enumerate() {
                cache.read_into(image, view, &mut x)?;
                onehot[row * classes + labels[image]] += (1.0 - smooth) as f32;
            }
            if params.mixup > 0.0 && b > 1 {
                let lambda = beta(&mut rng, params.mixup) as f32;
                let mut partner: Vec<usize> = (0..b).collect();
                rng.shuffle(&mut partner);
                let blend = |v: &mut Vec<f32>, width: usize| {
                    let original = v.clone();
                    for (row, &other) in partner.iter().enumerate() {
                        let mine = &mut v[row * width..(row + 1) * width];
                        let theirs = &original[other * width..(other + 1) * width];
                        for (a, &o) in mine.iter_mut().zip(theirs) {
                            *a = lambda * *a + (1.0 - lambda) * o;
                        }
                    }
                };
                blend(&mut x, dim);
                blend(&mut onehot, classes);
            }
            let [c, h, w] = shape;
            let input = Tensor::<4>::from_data(TensorData::new(x.clone(), [b, c, h, w]), &ad);
            let keep = (params.dropout > 0.0).then(|| {
                let mask: Vec<f32> = (0..b * pooled)
                    .map(|_| {
                        if rng.next_f64() < params.dropout {
                            0.0
                        } else {
                            keep_scale as f32
                        }
                    })
                    .collect();
                Tensor::<2>::from_data(TensorData::new(mask, [b, pooled]), &ad)
            });
            let target = Tensor::<2>::from_data(TensorData::new(onehot, [b, classes]), &ad);
            let loss = (log_softmax(net.forward(input, keep), 1) * target)
                .sum()
                .mul_scalar(-1.0 / b as f64);
            let value = loss
                .clone()
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| FineTuneError::Params(format!("loss unreadable: {e:?}")))?[0]
                as f64;
            if !value.is_finite() {
                return Err(FineTuneError::Diverged { epoch, loss: value });
            }
            let mut grads = loss.backward();
            let factor = cosine(global_step, total_steps);
            let top_grads = GradientsParams::from_module(&mut grads, &net.top);
            let head_grads = GradientsParams::from_module(&mut grads, &net.classifier);
            if top_grads.is_empty() || head_grads.is_empty() {
                return Err(FineTuneError::Params(
                    "autodiff produced no gradient for the trainable layers".into(),
                ));
            }
            net.top = optim_top.step(params.lr * factor, net.top, top_grads);
            net.classifier = optim_head.step(params.head_lr * factor, net.classifier, head_grads);
            global_step += 1;
            loss_sum += value * b as f64;
            seen += b;
            on_step(StepReport {
                epoch,
                epochs: run_epochs,
                refit,
                step: step + 1,
                steps: steps_per_epoch,
                loss: loss_sum / seen as f64,
            });
        }
        let valid = net.valid();
        let train_loss = loss_sum / seen.max(1) as f64;
        let Some(val_images) = validation else {
            let epoch_report = EpochReport {
                epoch,
                train_loss,
                refit,
                ..EpochReport::default()
            };
            on_epoch(&epoch_report);
            report.history.push(epoch_report);
            report.epochs_run = epoch;
            best = Some(valid);
            continue;
        };
        let (val_loss, val_accuracy) =
            evaluate(&valid, cache, shape, dim, labels, val_images, &plain)?;
        let epoch_report = EpochReport {
            epoch,
            train_loss,
            val_loss,
            val_accuracy,
            refit,
        };
        on_epoch(&epoch_report);
        report.history.push(epoch_report);
        report.epochs_run = epoch;
        if val_loss < report.best_val_loss {
            report.best_val_loss = val_loss;
            report.best_val_accuracy = val_accuracy;
            report.best_epoch = epoch;
            best = Some(valid);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= params.patience && epoch < params.epochs {
                report.stopped_early = true;
                break;
            }
        }
    }
    Ok(best)
}

/// Mean cross-entropy and accuracy of `net` on the original view of `images`.
fn evaluate(
    net: &FineTunedNet,
    cache: &mut ActivationCache,
    shape: [usize; 3],
    dim: usize,
    labels: &[usize],
    images: &[usize],
    device: &Device,
) -> Result<(f64, f64), FineTuneError> {
    const CHUNK: usize = 32;
    let (mut loss, mut correct) = (0f64, 0usize);
    let mut x = Vec::with_capacity(CHUNK * dim);
    for chunk in images.chunks(CHUNK) {
        x.clear();
        for &image in chunk {
            cache.read_into(image, 0, &mut x)?;
        }
        let logp = net.log_proba(&x, chunk.len(), shape, device);
        let k = logp.len() / chunk.len();
        for (row, &image) in logp.chunks_exact(k).zip(chunk) {
            let y = labels[image];
            loss -= row[y] as f64;
            let best = (0..k).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            correct += usize::from(best == y);
        }
    }
    let n = images.len() as f64;
    Ok((loss / n, correct as f64 / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_goes_from_one_to_zero() {
        assert_eq!(cosine(0, 10), 1.0);
        assert!((cosine(5, 10) - 0.5).abs() < 1e-12);
        assert!(cosine(10, 10).abs() < 1e-12);
    }

    #[test]
    fn beta_draws_have_the_beta_mean_and_variance() {
        for alpha in [0.2, 0.4, 1.0, 2.0] {
            let mut rng = SplitMix64::new(3);
            let n = 200_000;
            let draws: Vec<f64> = (0..n).map(|_| beta(&mut rng, alpha)).collect();
            assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
            let mean = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.005, "alpha {alpha}: mean {mean}");
            assert!(
                (var - want).abs() < 0.02 * want,
                "alpha {alpha}: var {var} vs {want}"
            );
        }
    }

    #[test]
    fn files_from_before_the_refit_read_as_not_refitted() {
        let mut v = serde_json::to_value(FineTuneParams {
            refit: true,
            ..FineTuneParams::default()
        })
        .unwrap();
        assert_eq!(v["refit"], serde_json::json!(true));
        v.as_object_mut().unwrap().remove("refit");
        let old: FineTuneParams = serde_json::from_value(v).unwrap();
        assert!(!old.refit);
        let mut v = serde_json::to_value(TrainReport {
            refit: Some(RefitReport::default()),
            ..TrainReport::default()
        })
        .unwrap();
        v.as_object_mut().unwrap().remove("refit");
        let report: TrainReport = serde_json::from_value(v).unwrap();
        assert!(report.refit.is_none());
    }

    #[test]
    fn bad_params_are_refused_with_the_flag_name() {
        let p = FineTuneParams {
            dropout: 1.0,
            ..FineTuneParams::default()
        };
        assert!(p.check().unwrap_err().to_string().contains("--dropout"));
        let p = FineTuneParams {
            lr: 0.0,
            ..FineTuneParams::default()
        };
        assert!(p.check().unwrap_err().to_string().contains("--lr"));
        let p = FineTuneParams {
            mixup: -0.2,
            ..FineTuneParams::default()
        };
        assert!(p.check().unwrap_err().to_string().contains("--mixup"));
        let p = FineTuneParams {
            label_smoothing: 1.0,
            ..FineTuneParams::default()
        };
        assert!(
            p.check()
                .unwrap_err()
                .to_string()
                .contains("--label-smoothing")
        );
        assert!(FineTuneParams::default().check().is_ok());
    }
}
