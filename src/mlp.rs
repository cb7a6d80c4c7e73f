//! Multilayer perceptron classifier head, trained with burn autodiff on the flex CPU device.
//!
//! This is Spark MLlib's `MultilayerPerceptronClassifier` with the usual modern fixes:
//! inputs are standardized by default (robust to features of any scale, e.g. CSV from other
//! tools; `standardize: false` feeds them raw like MLlib, which on pooled InceptionV3
//! features is usually better, because standardizing lifts near-constant channels to the
//! scale of informative ones), hidden layers default to ReLU (sigmoid is kept as an option
//! for parity), dropout, Adam on shuffled mini-batches instead of full-batch L-BFGS, and
//! early stopping on a stratified validation split with the best weights restored.
//!
//! The trained model is plain data ([`MlpModel`]): other modules can serialize it and
//! predict with [`MlpModel::predict_proba`] without creating a device.
//!
//! # Determinism
//!
//! Everything random (validation split, weight initialization, epoch shuffling, dropout
//! masks) comes from this module's own SplitMix64 streams derived from `seed`. burn's
//! device RNG is deliberately not used: on flex it is one process-wide generator, so any
//! other thread drawing from it (parallel tests, another model) would change our draws.
//! The optimizer runs on host vectors in a fixed order, and flex's kernels at these sizes
//! partition work by output element, so the same inputs and seed give a bit-identical
//! model, also across rayon thread counts (checked by a test).

use burn::tensor::{Device, Tensor, TensorData, activation};
use rayon::prelude::*;

/// Hidden-layer nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    /// MLlib's only choice; trains slower than ReLU but is kept for parity.
    Sigmoid,
}

/// Training hyperparameters. Missing fields in JSON take the defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MlpParams {
    /// Hidden layer sizes, input side first; empty = softmax (multinomial logistic) regression.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Maximum number of passes over the training rows.
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam step size.
    pub lr: f64,
    /// Probability of zeroing each hidden activation during training.
    pub dropout: f64,
    pub seed: u64,
    /// Share of each class held out to choose the stopping epoch; 0 disables early stopping.
    pub validation_fraction: f64,
    /// Epochs without a lower validation loss before training stops.
    pub patience: usize,
    /// Scale each feature to zero mean and unit variance over the training rows before the
    /// first layer; off feeds the raw features.
    pub standardize: bool,
}

impl Default for MlpParams {
    fn default() -> Self {
        Self {
            hidden: vec![256],
            activation: Activation::Relu,
            epochs: 100,
            batch_size: 64,
            lr: 1e-3,
            dropout: 0.0,
            seed: 0,
            validation_fraction: 0.1,
            patience: 10,
            standardize: true,
        }
    }
}

/// Plain data (no burn types), so another module can save it to a file and predict without a device.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlpModel {
    pub dim: usize,
    pub num_classes: usize,
    pub activation: Activation,
    /// Per-feature mean of the training rows; subtracted before the first layer.
    pub mean: Vec<f32>,
    /// Per-feature standard deviation of the training rows (1 for constant features).
    pub std: Vec<f32>,
    /// (weight row-major [in, out], bias [out]) per layer, input to output
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Layers as stored in [`MlpModel::layers`]; training keeps its weights in this form too.
type HostLayers = Vec<(Vec<f32>, Vec<f32>)>;

/// Rows per parallel task in [`MlpModel::predict_proba`]: enough rows that each weight row,
/// once loaded, is reused from L1 several times, few enough to spread over threads.
const PREDICT_BLOCK_ROWS: usize = 16;

impl MlpModel {
    /// Softmax probabilities for n rows (row-major n x dim) -> n x num_classes.
    ///
    /// Plain Rust: f32 layers like the burn forward pass (agrees to ~1e-6), f64 softmax.
    /// Rows are independent, so the result does not depend on the rayon thread count.
    ///
    /// # Panics
    /// If `x.len() != n * dim`, or the model fails [`MlpModel::validate`] in a way that
    /// breaks indexing; call `validate` first on models read from files.
    pub fn predict_proba(&self, x: &[f32], n: usize) -> Vec<f64> {
        assert_eq!(
            Some(x.len()),
            n.checked_mul(self.dim),
            "predict_proba: x has {} values, expected {n} rows x {} features",
            x.len(),
            self.dim
        );
        let c = self.num_classes;
        let mut out = vec![0f64; n * c];
        if n == 0 {
            return out;
        }
        out.par_chunks_mut(PREDICT_BLOCK_ROWS * c)
            .zip(x.par_chunks(PREDICT_BLOCK_ROWS * self.dim))
            .for_each(|(out, x)| self.forward_block(x, out));
        out
    }

    /// Index of the most probable class per row (first one on ties).
    pub fn predict(&self, x: &[f32], n: usize) -> Vec<usize> {
        let c = self.num_classes;
        self.predict_proba(x, n).chunks(c).map(argmax_f64).collect()
    }

    fn forward_block(&self, x: &[f32], out: &mut [f64]) {
        let rows = x.len() / self.dim;
        let mut cur: Vec<f32> = x
            .chunks(self.dim)
            .flat_map(|row| {
                row.iter()
                    .zip(self.mean.iter().zip(&self.std))
                    .map(|(&v, (&m, &s))| (v - m) / s)
            })
            .collect();
        let mut width = self.dim;
        let last = self.layers.len() - 1;
        for (li, (w, b)) in self.layers.iter().enumerate() {
            let fo = b.len();
            let mut next = vec![0f32; rows * fo];
            // Weight-row-outer order keeps one weight row hot across the block's rows and
            // vectorizes the inner loop; skipping zero inputs is exact (weights are finite)
            // and pays off after ReLU.
            for i in 0..width {
                let wrow = &w[i * fo..(i + 1) * fo];
                for r in 0..rows {
                    let xi = cur[r * width + i];
                    if xi != 0.0 {
                        for (o, &wv) in next[r * fo..(r + 1) * fo].iter_mut().zip(wrow) {
                            *o += xi * wv;
                        }
                    }
                }
            }
            // Bias after the product, as burn's matmul-then-add does, to round alike.
            for row in next.chunks_mut(fo) {
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
            if li != last {
                match self.activation {
                    Activation::Relu => next.iter_mut().for_each(|v| *v = v.max(0.0)),
                    Activation::Sigmoid => {
                        next.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()))
                    }
                }
            }
            cur = next;
            width = fo;
        }
        for (logits, probs) in cur.chunks(width).zip(out.chunks_mut(width)) {
            let max = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let mut sum = 0.0;
            for (p, &l) in probs.iter_mut().zip(logits) {
                *p = (l as f64 - max).exp();
                sum += *p;
            }
            probs.iter_mut().for_each(|p| *p /= sum);
        }
    }

    /// Checks internal consistency (layer shapes chain from dim to num_classes, finite values); Err(String) one line.
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 {
            return Err("mlp model: dim is 0".into());
        }
        if self.num_classes < 2 {
            return Err(format!(
                "mlp model: num_classes is {}, need at least 2",
                self.num_classes
            ));
        }
        if self.mean.len() != self.dim || self.std.len() != self.dim {
            return Err(format!(
                "mlp model: mean has {} and std has {} values, expected dim = {}",
                self.mean.len(),
                self.std.len(),
                self.dim
            ));
        }
        if let Some(i) = self.mean.iter().position(|v| !v.is_finite()) {
            return Err(format!("mlp model: mean[{i}] is not finite"));
        }
        if let Some(i) = self.std.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(format!(
                "mlp model: std[{i}] is {}, must be finite and > 0",
                self.std[i]
            ));
        }
        if self.layers.is_empty() {
            return Err("mlp model: no layers".into());
        }
        let mut fan_in = self.dim;
        for (li, (w, b)) in self.layers.iter().enumerate() {
            let fan_out = b.len();
            if fan_out == 0 {
                return Err(format!("mlp model: layer {li} has an empty bias"));
            }
            if Some(w.len()) != fan_in.checked_mul(fan_out) {
                return Err(format!(
                    "mlp model: layer {li} weight has {} values, expected {fan_in} x {fan_out}",
                    w.len()
                ));
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(format!("mlp model: layer {li} weight[{i}] is not finite"));
            }
            if let Some(i) = b.iter().position(|v| !v.is_finite()) {
                return Err(format!("mlp model: layer {li} bias[{i}] is not finite"));
            }
            fan_in = fan_out;
        }
        if fan_in != self.num_classes {
            return Err(format!(
                "mlp model: last layer has {fan_in} outputs, expected num_classes = {}",
                self.num_classes
            ));
        }
        Ok(())
    }
}

/// Progress after one epoch, passed to `fit`'s callback.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's mini-batches, with dropout active.
    pub train_loss: f64,
    /// Mean cross-entropy on the held-out rows; None without validation.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

/// Summary of a finished `fit`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpReport {
    pub epochs_run: usize,
    /// 1-based epoch whose weights were returned (the last one without validation).
    pub best_epoch: usize,
    /// Training ended before `params.epochs` because validation loss stopped improving.
    pub stopped_early: bool,
    /// Accuracy of the returned model on the training rows (validation rows excluded).
    pub train_accuracy: f64,
    /// Validation loss of the returned model; None without validation.
    pub best_val_loss: Option<f64>,
    pub train_rows: usize,
    pub val_rows: usize,
}

/// The project's SplitMix64 (fixed output for a seed forever, see `split`); owning the
/// generator is what makes training reproducible (see the module doc).
type Rng = crate::split::SplitMix64;

/// Independent stream per purpose, so e.g. turning dropout on does not change the initial
/// weights or the validation split.
fn stream(seed: u64, purpose: u64) -> Rng {
    let mut r = Rng::new(seed ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64();
    r
}

const STREAM_SPLIT: u64 = 1;
const STREAM_INIT: u64 = 2;
const STREAM_SHUFFLE: u64 = 3;
const STREAM_DROPOUT: u64 = 4;

/// The stratified (train, validation) row split `fit` uses, each ascending.
///
/// Per class with `k >= 2` rows, `round(fraction * k)` rows are held out, at least 1 and at
/// most `k - 1`, so every class stays in training. A class with a single row cannot spare
/// one: it is kept in training and simply has no validation row (documented fallback, not
/// an error). `fraction == 0` gives no validation rows.
///
/// # Panics
/// If a label is `>= num_classes` (`fit` checks labels before calling this).
pub fn validation_split(
    y: &[usize],
    num_classes: usize,
    fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 {
        return ((0..y.len()).collect(), Vec::new());
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &c) in y.iter().enumerate() {
        by_class[c].push(i);
    }
    let mut rng = stream(seed, STREAM_SPLIT);
    let (mut train, mut val) = (Vec::with_capacity(y.len()), Vec::new());
    for mut rows in by_class {
        let k = rows.len();
        rng.shuffle(&mut rows);
        let hold = if k < 2 {
            0
        } else {
            ((fraction * k as f64).round() as usize).clamp(1, k - 1)
        };
        val.extend_from_slice(&rows[..hold]);
        train.extend_from_slice(&rows[hold..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

fn check_inputs(
    x: &[f32],
    dim: usize,
    y: &[usize],
    num_classes: usize,
    p: &MlpParams,
) -> Result<(), String> {
    let n = y.len();
    if n == 0 {
        return Err("mlp: no training rows".into());
    }
    if dim == 0 {
        return Err("mlp: feature dimension is 0".into());
    }
    if Some(x.len()) != n.checked_mul(dim) {
        return Err(format!(
            "mlp: x has {} values, expected {n} rows x {dim} features",
            x.len()
        ));
    }
    if num_classes < 2 {
        return Err(format!(
            "mlp: num_classes is {num_classes}, need at least 2"
        ));
    }
    if let Some(r) = y.iter().position(|&c| c >= num_classes) {
        return Err(format!(
            "mlp: label {} at row {r} is out of range 0..{num_classes}",
            y[r]
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "mlp: feature value {} at row {}, column {} is not finite",
            x[i],
            i / dim,
            i % dim
        ));
    }
    if p.epochs == 0 {
        return Err("mlp: epochs must be at least 1".into());
    }
    if p.batch_size == 0 {
        return Err("mlp: batch_size must be at least 1".into());
    }
    if !(p.lr.is_finite() && p.lr > 0.0) {
        return Err(format!("mlp: lr must be a finite number > 0, got {}", p.lr));
    }
    if !(0.0..1.0).contains(&p.dropout) {
        return Err(format!("mlp: dropout must be in [0, 1), got {}", p.dropout));
    }
    if !(0.0..1.0).contains(&p.validation_fraction) {
        return Err(format!(
            "mlp: validation_fraction must be in [0, 1), got {}",
            p.validation_fraction
        ));
    }
    if let Some(i) = p.hidden.iter().position(|&h| h == 0) {
        return Err(format!("mlp: hidden layer {i} has size 0"));
    }
    Ok(())
}

/// Per-feature mean and population standard deviation over `rows`, in f64 so a 2048-wide
/// sum over many rows does not lose digits. Constant features get std 1: they carry no
/// information, and dividing by ~0 would turn rounding noise into huge inputs.
fn standardization(x: &[f32], dim: usize, rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len() as f64;
    let mut sum = vec![0f64; dim];
    let mut lo = vec![f32::INFINITY; dim];
    let mut hi = vec![f32::NEG_INFINITY; dim];
    for &r in rows {
        for (j, &v) in x[r * dim..(r + 1) * dim].iter().enumerate() {
            sum[j] += v as f64;
            lo[j] = lo[j].min(v);
            hi[j] = hi[j].max(v);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let mut sq = vec![0f64; dim];
    for &r in rows {
        for (j, &v) in x[r * dim..(r + 1) * dim].iter().enumerate() {
            let d = v as f64 - mean[j];
            sq[j] += d * d;
        }
    }
    let std = (0..dim)
        .map(|j| {
            let s = (sq[j] / n).sqrt() as f32;
            if lo[j] == hi[j] || !(s.is_finite() && s > 0.0) {
                1.0
            } else {
                s
            }
        })
        .collect();
    let mean = (0..dim)
        .map(|j| {
            if lo[j] == hi[j] {
                lo[j]
            } else {
                mean[j] as f32
            }
        })
        .collect();
    (mean, std)
}

/// Uniform initial weights, zero biases. He (Kaiming) bounds for ReLU layers keep the
/// activation variance from shrinking layer by layer; Glorot bounds suit sigmoid layers
/// and the softmax output, which are not rectified.
fn init_layers(
    dim: usize,
    hidden: &[usize],
    num_classes: usize,
    act: Activation,
    seed: u64,
) -> HostLayers {
    let mut rng = stream(seed, STREAM_INIT);
    let sizes: Vec<usize> = std::iter::once(dim)
        .chain(hidden.iter().copied())
        .chain(std::iter::once(num_classes))
        .collect();
    sizes
        .windows(2)
        .enumerate()
        .map(|(li, pair)| {
            let (fi, fo) = (pair[0], pair[1]);
            let is_output = li + 2 == sizes.len();
            let bound = if act == Activation::Relu && !is_output {
                (6.0 / fi as f64).sqrt()
            } else {
                (6.0 / (fi + fo) as f64).sqrt()
            };
            let w = (0..fi * fo)
                .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                .collect();
            (w, vec![0f32; fo])
        })
        .collect()
}

/// Adam moments for one layer, kept on the host next to the weights.
struct AdamState {
    m_w: Vec<f32>,
    v_w: Vec<f32>,
    m_b: Vec<f32>,
    v_b: Vec<f32>,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f32 = 1e-8;

/// One bias-corrected Adam update in a single fused pass. burn's optimizers sit behind
/// its `optim` feature, which this crate does not enable, and a host loop is also cheaper
/// than a dozen separate tensor ops per parameter.
fn adam_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f64, t: i32) {
    let (b1, b2) = (BETA1 as f32, BETA2 as f32);
    let c1 = (1.0 - BETA1.powi(t)) as f32;
    let c2 = (1.0 - BETA2.powi(t)) as f32;
    let lr = lr as f32;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *p -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    t.try_into_data()
        .map_err(|e| format!("mlp: reading a tensor failed: {e:?}"))?
        .try_into_vec::<f32>()
        .map_err(|e| format!("mlp: reading a tensor failed: {e:?}"))
}

fn tensor2(v: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// Logits for a batch. `masks[i]` (already scaled by 1/(1-p)) multiplies the output of
/// hidden layer i; empty means no dropout.
fn forward(
    layers: &[(Tensor<2>, Tensor<1>)],
    x: Tensor<2>,
    act: Activation,
    masks: Vec<Tensor<2>>,
) -> Tensor<2> {
    let last = layers.len() - 1;
    let mut masks = masks.into_iter();
    let mut h = x;
    for (li, (w, b)) in layers.iter().enumerate() {
        h = h.matmul(w.clone()) + b.clone().unsqueeze::<2>();
        if li != last {
            h = match act {
                Activation::Relu => activation::relu(h),
                Activation::Sigmoid => activation::sigmoid(h),
            };
            if let Some(mask) = masks.next() {
                h = h * mask;
            }
        }
    }
    h
}

/// Rows per burn forward when evaluating, to bound memory on large sets.
const EVAL_CHUNK: usize = 4096;

/// Log-probabilities (row-major, rows x classes) of `rows` of the standardized `xs`,
/// computed with burn on a plain (non-autodiff) device.
fn eval_log_proba(
    layers: &[(Vec<f32>, Vec<f32>)],
    act: Activation,
    xs: &[f32],
    dim: usize,
    rows: &[usize],
    device: &Device,
) -> Result<Vec<f32>, String> {
    let mut fan_in = dim;
    let tensors: Vec<(Tensor<2>, Tensor<1>)> = layers
        .iter()
        .map(|(w, b)| {
            let fo = b.len();
            let t = (
                tensor2(w.clone(), fan_in, fo, device),
                Tensor::from_data(TensorData::new(b.clone(), [fo]), device),
            );
            fan_in = fo;
            t
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len() * fan_in);
    for chunk in rows.chunks(EVAL_CHUNK) {
        let mut xb = Vec::with_capacity(chunk.len() * dim);
        for &r in chunk {
            xb.extend_from_slice(&xs[r * dim..(r + 1) * dim]);
        }
        let logits = forward(&tensors, tensor2(xb, chunk.len(), dim, device), act, vec![]);
        out.extend(to_vec(activation::log_softmax(logits, 1))?);
    }
    Ok(out)
}

/// Mean cross-entropy and accuracy from log-probabilities, summed in f64 in row order.
fn loss_and_accuracy(logp: &[f32], labels: impl Iterator<Item = usize>, c: usize) -> (f64, f64) {
    let (mut loss, mut correct, mut n) = (0f64, 0usize, 0usize);
    for (row, y) in logp.chunks(c).zip(labels) {
        loss -= row[y] as f64;
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        correct += usize::from(best == y);
        n += 1;
    }
    (loss / n as f64, correct as f64 / n as f64)
}

/// Larger weights mean the optimiser ran away (Adam moves each weight by about `lr` a step).
const MAX_SANE_WEIGHT: f32 = 1e6;

fn argmax_f64(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

/// x: n rows of dim features (row-major), y: class per row in 0..num_classes.
///
/// Returns the model with the lowest validation loss (or the last epoch's without
/// validation) and a summary; `on_epoch` sees every epoch as it finishes. Errors are one
/// line; bad input or parameters never panic. Training that diverges to a non-finite loss
/// is an error rather than a NaN model.
pub fn fit(
    x: &[f32],
    dim: usize,
    y: &[usize],
    num_classes: usize,
    params: &MlpParams,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(MlpModel, MlpReport), String> {
    check_inputs(x, dim, y, num_classes, params)?;
    let p = params;
    let c = num_classes;
    let (train, val) = validation_split(y, c, p.validation_fraction, p.seed);

    // Statistics from the training rows only, so validation loss is an honest estimate.
    // Without standardization the model keeps an identity transform, so prediction needs no
    // second code path and head files keep one layout.
    let (mean, std) = if p.standardize {
        standardization(x, dim, &train)
    } else {
        (vec![0.0; dim], vec![1.0; dim])
    };
    let xs: Vec<f32> = x
        .chunks(dim)
        .flat_map(|row| {
            row.iter()
                .zip(mean.iter().zip(&std))
                .map(|(&v, (&m, &s))| (v - m) / s)
        })
        .collect();

    let mut layers = init_layers(dim, &p.hidden, c, p.activation, p.seed);
    let mut adam: Vec<AdamState> = layers
        .iter()
        .map(|(w, b)| AdamState {
            m_w: vec![0.0; w.len()],
            v_w: vec![0.0; w.len()],
            m_b: vec![0.0; b.len()],
            v_b: vec![0.0; b.len()],
        })
        .collect();
    let fan_ins: Vec<usize> = std::iter::once(dim)
        .chain(p.hidden.iter().copied())
        .collect();

    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let mut shuffle_rng = stream(p.seed, STREAM_SHUFFLE);
    let mut dropout_rng = stream(p.seed, STREAM_DROPOUT);
    let keep_scale = (1.0 / (1.0 - p.dropout)) as f32;
    let mut order = train.clone();
    let mut step = 0i32;

    let mut best: Option<(f64, usize, HostLayers)> = None;
    let mut since_best = 0usize;
    let mut epochs_run = 0usize;

    for epoch in 1..=p.epochs {
        shuffle_rng.shuffle(&mut order);
        let mut loss_sum = 0f64;
        for batch in order.chunks(p.batch_size) {
            let b = batch.len();
            let mut xb = Vec::with_capacity(b * dim);
            let mut onehot = vec![0f32; b * c];
            for (i, &r) in batch.iter().enumerate() {
                xb.extend_from_slice(&xs[r * dim..(r + 1) * dim]);
                onehot[i * c + y[r]] = 1.0;
            }
            let leaves: Vec<(Tensor<2>, Tensor<1>)> = layers
                .iter()
                .zip(&fan_ins)
                .map(|((w, bias), &fi)| {
                    let fo = bias.len();
                    (
                        tensor2(w.clone(), fi, fo, &ad).require_grad(),
                        Tensor::from_data(TensorData::new(bias.clone(), [fo]), &ad).require_grad(),
                    )
                })
                .collect();
            let masks = if p.dropout > 0.0 {
                p.hidden
                    .iter()
                    .map(|&h| {
                        let m = (0..b * h)
                            .map(|_| {
                                if dropout_rng.next_f64() < p.dropout {
                                    0.0
                                } else {
                                    keep_scale
                                }
                            })
                            .collect();
                        tensor2(m, b, h, &ad)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let logits = forward(&leaves, tensor2(xb, b, dim, &ad), p.activation, masks);
            let loss = (activation::log_softmax(logits, 1) * tensor2(onehot, b, c, &ad))
                .sum()
                .mul_scalar(-1.0 / b as f64);
            let mut grads = loss.backward();
            let batch_loss = to_vec(loss)?[0] as f64;
            if !batch_loss.is_finite() {
                return Err(format!(
                    "mlp: training diverged in epoch {epoch} (loss is {batch_loss}); try a smaller lr"
                ));
            }
            loss_sum += batch_loss * b as f64;

            step += 1;
            for ((w_leaf, b_leaf), ((w, bias), st)) in
                leaves.iter().zip(layers.iter_mut().zip(adam.iter_mut()))
            {
                let missing = || "mlp: autodiff produced no gradient for a layer".to_string();
                let gw = to_vec(w_leaf.grad_remove(&mut grads).ok_or_else(missing)?)?;
                let gb = to_vec(b_leaf.grad_remove(&mut grads).ok_or_else(missing)?)?;
                adam_update(w, &gw, &mut st.m_w, &mut st.v_w, p.lr, step);
                adam_update(bias, &gb, &mut st.m_b, &mut st.v_b, p.lr, step);
            }
        }
        epochs_run = epoch;
        let train_loss = loss_sum / train.len() as f64;

        let (val_loss, val_accuracy) = if val.is_empty() {
            (None, None)
        } else {
            let logp = eval_log_proba(&layers, p.activation, &xs, dim, &val, &plain)?;
            let (l, a) = loss_and_accuracy(&logp, val.iter().map(|&r| y[r]), c);
            (Some(l), Some(a))
        };
        on_epoch(&EpochReport {
            epoch,
            train_loss,
            val_loss,
            val_accuracy,
        });
        if let Some(vl) = val_loss {
            if !vl.is_finite() {
                return Err(format!(
                    "mlp: training diverged in epoch {epoch} (validation loss is {vl}); try a smaller lr"
                ));
            }
            if best.as_ref().is_none_or(|(bl, _, _)| vl < *bl) {
                best = Some((vl, epoch, layers.clone()));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= p.patience {
                    break;
                }
            }
        }
    }

    let (best_val_loss, best_epoch) = match best {
        Some((l, e, w)) => {
            layers = w;
            (Some(l), e)
        }
        None => (None, epochs_run),
    };
    let logp = eval_log_proba(&layers, p.activation, &xs, dim, &train, &plain)?;
    let (_, train_accuracy) = loss_and_accuracy(&logp, train.iter().map(|&r| y[r]), c);
    // A fit can blow up and stay finite (`--lr 1e10`: weights near 1e10, a saturated
    // softmax), and on separable rows even score perfectly: a failure, not a model to rank
    // among the others. (Its training loss says nothing: a sane fit on raw features of large
    // scale can also end far above the class-prior loss.)
    let largest = layers
        .iter()
        .flat_map(|(w, b)| w.iter().chain(b))
        .fold(0f32, |m, v| m.max(v.abs()));
    if largest > MAX_SANE_WEIGHT {
        return Err(format!(
            "mlp: training diverged (a weight reached {largest:.1e}); try a smaller lr"
        ));
    }
    let model = MlpModel {
        dim,
        num_classes: c,
        activation: p.activation,
        mean,
        std,
        layers,
    };
    let report = MlpReport {
        epochs_run,
        best_epoch,
        stopped_early: epochs_run < p.epochs,
        train_accuracy,
        best_val_loss,
        train_rows: train.len(),
        val_rows: val.len(),
    };
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauss(rng: &mut Rng) -> f32 {
        let u1 = rng.next_f64().max(1e-300);
        let u2 = rng.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Two concentric rings (class 0 inside): no linear boundary separates them.
    fn rings(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = stream(seed, 100);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let c = i % 2;
            let r = if c == 0 {
                rng.next_f64()
            } else {
                1.8 + rng.next_f64()
            };
            let a = std::f64::consts::TAU * rng.next_f64();
            x.extend([(r * a.cos()) as f32, (r * a.sin()) as f32]);
            y.push(c);
        }
        (x, y)
    }

    /// Four blobs at the corners of a square labelled by XOR of the signs.
    fn xor(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = stream(seed, 200);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (sx, sy) = ((i % 2) as f32 * 2.0 - 1.0, ((i / 2) % 2) as f32 * 2.0 - 1.0);
            x.extend([sx + 0.3 * gauss(&mut rng), sy + 0.3 * gauss(&mut rng)]);
            y.push(usize::from((sx > 0.0) != (sy > 0.0)));
        }
        (x, y)
    }

    fn noise(n: usize, dim: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = stream(seed, 300);
        let x = (0..n * dim).map(|_| gauss(&mut rng)).collect();
        let y = (0..n).map(|_| rng.below(classes)).collect();
        (x, y)
    }

    fn accuracy(model: &MlpModel, x: &[f32], y: &[usize]) -> f64 {
        let pred = model.predict(x, y.len());
        pred.iter().zip(y).filter(|(p, y)| p == y).count() as f64 / y.len() as f64
    }

    fn bits(m: &MlpModel) -> Vec<u32> {
        m.layers
            .iter()
            .flat_map(|(w, b)| w.iter().chain(b))
            .chain(m.mean.iter().chain(&m.std))
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn learns_rings_that_softmax_regression_cannot() {
        let (x, y) = rings(400, 1);
        let (xt, yt) = rings(400, 2);
        let params = MlpParams {
            hidden: vec![32],
            lr: 1e-2,
            batch_size: 32,
            epochs: 200,
            patience: 20,
            ..Default::default()
        };
        let (model, report) = fit(&x, 2, &y, 2, &params, |_| {}).unwrap();
        model.validate().unwrap();
        let acc = accuracy(&model, &xt, &yt);
        assert!(acc > 0.95, "mlp held-out accuracy {acc}, report {report:?}");
        assert!(report.train_accuracy > 0.95, "{report:?}");

        let linear = MlpParams {
            hidden: vec![],
            ..params
        };
        let (lin, _) = fit(&x, 2, &y, 2, &linear, |_| {}).unwrap();
        assert_eq!(lin.layers.len(), 1);
        let lin_acc = accuracy(&lin, &xt, &yt);
        assert!(
            lin_acc < 0.75,
            "softmax regression should fail on rings: {lin_acc}"
        );
    }

    #[test]
    fn sigmoid_learns_xor() {
        let (x, y) = xor(400, 3);
        let (xt, yt) = xor(400, 4);
        let params = MlpParams {
            hidden: vec![16],
            activation: Activation::Sigmoid,
            lr: 2e-2,
            batch_size: 32,
            epochs: 150,
            validation_fraction: 0.0,
            ..Default::default()
        };
        let mut epochs = 0;
        let (model, report) = fit(&x, 2, &y, 2, &params, |e| {
            assert!(e.val_loss.is_none() && e.val_accuracy.is_none());
            epochs = e.epoch;
        })
        .unwrap();
        assert_eq!(
            (epochs, report.epochs_run, report.best_epoch),
            (150, 150, 150)
        );
        assert!(!report.stopped_early);
        assert_eq!((report.val_rows, report.best_val_loss), (0, None));
        let acc = accuracy(&model, &xt, &yt);
        assert!(acc > 0.95, "sigmoid held-out accuracy {acc}");
    }

    #[test]
    fn early_stopping_on_noise_restores_best_weights() {
        let (x, y) = noise(240, 20, 3, 5);
        let params = MlpParams {
            hidden: vec![64],
            lr: 1e-2,
            batch_size: 32,
            epochs: 200,
            patience: 5,
            validation_fraction: 0.25,
            ..Default::default()
        };
        let mut history = Vec::new();
        let (model, report) = fit(&x, 20, &y, 3, &params, |e| history.push(e.clone())).unwrap();
        assert!(report.stopped_early, "{report:?}");
        assert!(report.best_epoch < report.epochs_run, "{report:?}");
        assert_eq!(report.epochs_run, report.best_epoch + params.patience);
        assert_eq!(history.len(), report.epochs_run);
        // Memorizing noise: training loss keeps falling while validation loss rises.
        let last = history.last().unwrap();
        let best = &history[report.best_epoch - 1];
        assert!(last.train_loss < best.train_loss);
        let best_loss = best.val_loss.unwrap();
        assert_eq!(report.best_val_loss, Some(best_loss));
        assert!(history.iter().all(|e| e.val_loss.unwrap() >= best_loss));

        // The returned weights are the best epoch's, not the last's.
        let (_, val) = validation_split(&y, 3, params.validation_fraction, params.seed);
        assert_eq!(report.val_rows, val.len());
        let xv: Vec<f32> = val
            .iter()
            .flat_map(|&r| x[r * 20..(r + 1) * 20].to_vec())
            .collect();
        let proba = model.predict_proba(&xv, val.len());
        let loss: f64 = val
            .iter()
            .enumerate()
            .map(|(i, &r)| -proba[i * 3 + y[r]].ln())
            .sum::<f64>()
            / val.len() as f64;
        assert!(
            (loss - best_loss).abs() < 1e-5,
            "{loss} vs best {best_loss}"
        );
        assert!((loss - last.val_loss.unwrap()).abs() > 1e-3);
    }

    #[test]
    fn predict_proba_matches_burn_forward() {
        let cases = [
            (12, vec![16, 8], Activation::Relu),
            (12, vec![16, 8], Activation::Sigmoid),
            (12, vec![], Activation::Relu),
            // The production shape, where f32 rounding differences accumulate the most.
            (2048, vec![256], Activation::Relu),
        ];
        for (dim, hidden, activation) in cases {
            let n = 100;
            let (x, y) = noise(n, dim, 4, 6);
            let params = MlpParams {
                hidden,
                activation,
                epochs: 5,
                lr: 1e-2,
                ..Default::default()
            };
            let (model, _) = fit(&x, dim, &y, 4, &params, |_| {}).unwrap();
            let proba = model.predict_proba(&x, n);
            let xs: Vec<f32> = x
                .chunks(dim)
                .flat_map(|row| {
                    row.iter()
                        .zip(model.mean.iter().zip(&model.std))
                        .map(|(&v, (&m, &s))| (v - m) / s)
                })
                .collect();
            let rows: Vec<usize> = (0..n).collect();
            let logp = eval_log_proba(&model.layers, activation, &xs, dim, &rows, &Device::flex())
                .unwrap();
            let max_diff = proba
                .iter()
                .zip(&logp)
                .map(|(p, l)| (p - (*l as f64).exp()).abs())
                .fold(0f64, f64::max);
            assert!(max_diff < 1e-5, "{dim} {activation:?}: max diff {max_diff}");
            for row in proba.chunks(4) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn raw_features_keep_an_identity_transform_and_change_the_fit() {
        let (x, y) = noise(120, 6, 3, 11);
        // Scale one feature up so standardizing it makes a difference.
        let x: Vec<f32> = x
            .chunks(6)
            .flat_map(|r| {
                r.iter()
                    .enumerate()
                    .map(|(j, &v)| if j == 0 { v * 50.0 } else { v })
            })
            .collect();
        let params = MlpParams {
            hidden: vec![8],
            epochs: 5,
            validation_fraction: 0.0,
            ..Default::default()
        };
        let raw = MlpParams {
            standardize: false,
            ..params.clone()
        };
        let (m_std, _) = fit(&x, 6, &y, 3, &params, |_| {}).unwrap();
        let (m_raw, _) = fit(&x, 6, &y, 3, &raw, |_| {}).unwrap();
        assert!(m_std.std[0] > 10.0, "{:?}", m_std.std);
        assert!(m_raw.mean.iter().all(|&m| m == 0.0) && m_raw.std.iter().all(|&s| s == 1.0));
        assert_ne!(
            m_std.predict_proba(&x, 120),
            m_raw.predict_proba(&x, 120),
            "standardize had no effect"
        );
    }

    #[test]
    fn params_without_standardize_read_as_standardized() {
        // Heads written before the field existed were trained on standardized features.
        let p: MlpParams = serde_json::from_str(r#"{"hidden":[4]}"#).unwrap();
        assert!(p.standardize);
    }

    #[test]
    fn same_seed_gives_bit_identical_model() {
        let (x, y) = noise(150, 10, 3, 7);
        let params = MlpParams {
            hidden: vec![32, 16],
            dropout: 0.3,
            epochs: 15,
            batch_size: 16,
            ..Default::default()
        };
        let run = |p: &MlpParams| {
            let mut losses = Vec::new();
            let (m, r) = fit(&x, 10, &y, 3, p, |e| losses.push(e.train_loss.to_bits())).unwrap();
            (bits(&m), r, losses)
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        let other = MlpParams { seed: 1, ..params };
        assert_ne!(a.0, run(&other).0);
    }

    #[test]
    fn bit_identical_across_rayon_thread_counts() {
        // Production shape: flex hands these matmuls to gemm's rayon path (about 1.7x faster on 2 threads).
        let (x, y) = noise(256, 2048, 5, 8);
        let params = MlpParams {
            hidden: vec![256],
            dropout: 0.1,
            epochs: 3,
            ..Default::default()
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (m, r) = fit(&x, 2048, &y, 5, &params, |_| {}).unwrap();
                let proba: Vec<u64> = m
                    .predict_proba(&x, 256)
                    .iter()
                    .map(|p| p.to_bits())
                    .collect();
                (bits(&m), r, proba)
            })
        };
        assert_eq!(run(1), run(2));
    }

    #[test]
    fn standardization_uses_training_rows_and_guards_constant_features() {
        // Column 1 is constant; column 0 is not.
        let x = [0.0f32, 5.0, 2.0, 5.0, 4.0, 5.0, 6.0, 5.0];
        let (mean, std) = standardization(&x, 2, &[0, 1, 2, 3]);
        assert_eq!(mean, vec![3.0, 5.0]);
        assert_eq!(std[1], 1.0);
        assert!((std[0] - 5f32.sqrt()).abs() < 1e-6);
        let (mean, _) = standardization(&x, 2, &[0, 1]);
        assert_eq!(mean[0], 1.0);
    }

    #[test]
    fn validation_split_is_stratified_and_keeps_singletons_in_training() {
        let mut y = vec![0; 50];
        y.extend(vec![1; 20]);
        y.push(2);
        y.extend([3, 3]);
        let (train, val) = validation_split(&y, 5, 0.1, 9);
        let count = |rows: &[usize], c| rows.iter().filter(|&&r| y[r] == c).count();
        assert_eq!(
            (0..4).map(|c| count(&val, c)).collect::<Vec<_>>(),
            vec![5, 2, 0, 1]
        );
        assert_eq!(train.len() + val.len(), y.len());
        assert!(train.iter().all(|r| !val.contains(r)));
        assert_eq!(validation_split(&y, 5, 0.1, 9), (train, val));
        assert_ne!(
            validation_split(&y, 5, 0.1, 10).1,
            validation_split(&y, 5, 0.1, 9).1
        );
        assert!(validation_split(&y, 5, 0.0, 9).1.is_empty());

        // A singleton class trains fine; it just contributes no validation row.
        let x: Vec<f32> = (0..y.len() * 2).map(|i| (i % 7) as f32).collect();
        let params = MlpParams {
            hidden: vec![4],
            epochs: 2,
            ..Default::default()
        };
        let (_, report) = fit(&x, 2, &y, 5, &params, |_| {}).unwrap();
        assert_eq!((report.train_rows, report.val_rows), (65, 8));
    }

    #[test]
    fn rejects_bad_input_with_one_line_errors() {
        let x = vec![0.5f32; 8];
        let y = vec![0, 1, 0, 1];
        let ok = MlpParams {
            hidden: vec![3],
            epochs: 1,
            ..Default::default()
        };
        let err = |x: &[f32], dim, y: &[usize], k, p: &MlpParams| {
            let e = fit(x, dim, y, k, p, |_| {}).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        assert!(fit(&x, 2, &y, 2, &ok, |_| {}).is_ok());
        assert!(err(&[], 2, &[], 2, &ok).contains("no training rows"));
        assert!(err(&x, 3, &y, 2, &ok).contains("expected 4 rows x 3 features"));
        assert!(err(&x, 0, &y, 2, &ok).contains("dimension is 0"));
        assert!(err(&x, 2, &[0, 1, 2, 0], 2, &ok).contains("label 2 at row 2"));
        assert!(err(&x, 2, &y, 1, &ok).contains("num_classes is 1"));
        let mut bad = x.clone();
        bad[5] = f32::NAN;
        assert!(err(&bad, 2, &y, 2, &ok).contains("row 2, column 1"));
        bad[5] = f32::INFINITY;
        assert!(err(&bad, 2, &y, 2, &ok).contains("inf at row 2, column 1"));
        let cases: Vec<(MlpParams, &str)> = vec![
            (
                MlpParams {
                    batch_size: 0,
                    ..ok.clone()
                },
                "batch_size",
            ),
            (
                MlpParams {
                    epochs: 0,
                    ..ok.clone()
                },
                "epochs",
            ),
            (
                MlpParams {
                    lr: 0.0,
                    ..ok.clone()
                },
                "lr",
            ),
            (
                MlpParams {
                    lr: -1.0,
                    ..ok.clone()
                },
                "lr",
            ),
            (
                MlpParams {
                    lr: f64::NAN,
                    ..ok.clone()
                },
                "lr",
            ),
            (
                MlpParams {
                    dropout: 1.0,
                    ..ok.clone()
                },
                "dropout",
            ),
            (
                MlpParams {
                    dropout: -0.1,
                    ..ok.clone()
                },
                "dropout",
            ),
            (
                MlpParams {
                    validation_fraction: 1.0,
                    ..ok.clone()
                },
                "validation_fraction",
            ),
            (
                MlpParams {
                    validation_fraction: -0.5,
                    ..ok.clone()
                },
                "validation_fraction",
            ),
            (
                MlpParams {
                    hidden: vec![4, 0],
                    ..ok.clone()
                },
                "hidden layer 1 has size 0",
            ),
        ];
        for (p, what) in cases {
            assert!(err(&x, 2, &y, 2, &p).contains(what), "{what}");
        }
        let huge = MlpParams {
            lr: 1e30,
            epochs: 5,
            ..ok.clone()
        };
        let (xn, yn) = noise(64, 4, 2, 11);
        assert!(err(&xn, 4, &yn, 2, &huge).contains("diverged"));
    }

    #[test]
    fn validate_catches_inconsistent_models() {
        let (x, y) = noise(40, 3, 3, 12);
        let params = MlpParams {
            hidden: vec![5],
            epochs: 1,
            ..Default::default()
        };
        let (model, _) = fit(&x, 3, &y, 3, &params, |_| {}).unwrap();
        model.validate().unwrap();
        type Edit = Box<dyn Fn(&mut MlpModel)>;
        let broken: Vec<(Edit, &str)> = vec![
            (Box::new(|m| m.num_classes = 4), "num_classes = 4"),
            (Box::new(|m| m.num_classes = 1), "num_classes is 1"),
            (Box::new(|m| m.dim = 4), "mean has 3"),
            (Box::new(|m| m.std[1] = 0.0), "std[1]"),
            (Box::new(|m| m.mean[2] = f32::NAN), "mean[2]"),
            (
                Box::new(|m| m.layers[0].0.truncate(14)),
                "layer 0 weight has 14",
            ),
            (
                Box::new(|m| m.layers[1].1[0] = f32::INFINITY),
                "layer 1 bias[0]",
            ),
            (
                Box::new(|m| m.layers[1].0[3] = f32::NAN),
                "layer 1 weight[3]",
            ),
            (Box::new(|m| m.layers.clear()), "no layers"),
            (Box::new(|m| m.layers[0].1.clear()), "empty bias"),
        ];
        for (edit, what) in broken {
            let mut m = model.clone();
            edit(&mut m);
            let e = m.validate().unwrap_err();
            assert!(e.contains(what) && !e.contains('\n'), "{what}: {e}");
        }
    }

    #[test]
    fn params_and_model_serde() {
        let p: MlpParams =
            serde_json::from_str(r#"{"hidden":[8,4],"activation":"sigmoid"}"#).unwrap();
        assert_eq!(p.hidden, vec![8, 4]);
        assert_eq!(p.activation, Activation::Sigmoid);
        assert_eq!(p.epochs, 100);
        assert_eq!(
            MlpParams {
                hidden: vec![8, 4],
                activation: Activation::Sigmoid,
                ..Default::default()
            },
            p
        );
        let (x, y) = noise(30, 3, 2, 13);
        let (model, _) = fit(
            &x,
            3,
            &y,
            2,
            &MlpParams {
                epochs: 1,
                hidden: vec![2],
                ..p
            },
            |_| {},
        )
        .unwrap();
        let back: MlpModel = serde_json::from_str(&serde_json::to_string(&model).unwrap()).unwrap();
        assert_eq!(bits(&back), bits(&model));
        assert!(
            serde_json::to_string(&model)
                .unwrap()
                .contains(r#""activation":"sigmoid""#)
        );
    }
}
