//! Multinomial logistic regression with an elastic-net penalty: the classifier head that
//! Spark MLlib's `LogisticRegression(family="multinomial")` trained on DeepImageFeaturizer
//! features, with the same objective and parameters (`regParam`, `elasticNetParam`,
//! `maxIter`, `tol`, `fitIntercept`, `standardization`).
//!
//! # Objective
//!
//! With `K` classes, `n` rows `x_i` of `D` features and labels `y_i`, the fit minimises
//!
//! ```text
//! F(W, b) = (1/n) sum_i -log softmax(W z_i + b)[y_i]
//!           + reg * ( alpha * ||W||_1 + (1 - alpha)/2 * ||W||_2^2 )
//! ```
//!
//! where `W` is `K x D`, the `K` intercepts `b` are not penalised, `reg` is `regParam` and
//! `alpha` is `elasticNetParam` (0 = ridge, 1 = lasso). Every class has its own coefficient
//! row (the symmetric softmax parametrisation), so binary problems are solved as `K = 2`
//! multinomial ones, like MLlib's `family="multinomial"`; note that this is not the same
//! penalised problem as the one-vector binomial model.
//!
//! # Standardization
//!
//! `z_ij = (x_ij - m_j) / s_j` with `s_j` the unbiased *sample* standard deviation (divisor
//! `n - 1`), as MLlib computes it. With `standardize` on, the penalty applies to `W` in this
//! scaled space; with it off, the penalty applies to the original-space coefficients
//! `W_kj / s_j`, which the solver handles as per-feature penalty weights (`1/s_j` for L1,
//! `1/s_j^2` for L2) so it still works on well-conditioned scaled features — MLlib's trick.
//! `m_j` is the feature mean when an intercept is fitted (the shift is folded back into the
//! intercept, so the model is the same as without centring, only better conditioned) and 0
//! otherwise, because without an intercept centring would change the model and MLlib never
//! centres. Features that are constant over the training set (exactly, `min == max`) get a
//! zero coefficient, as in MLlib. The returned [`LogisticModel`] holds original-space
//! coefficients and intercepts, so it predicts from raw features.
//!
//! # Solver
//!
//! OWL-QN (Andrew & Gao 2007), the algorithm MLlib itself uses for elastic net: L-BFGS
//! (memory 10) on the smooth part, with the L1 term handled through the pseudo-gradient,
//! orthant-constrained directions and a projected backtracking (Armijo) line search, which
//! produces exact zeros. With `reg * alpha == 0` it is plain L-BFGS. The solver is written
//! here rather than taken from a crate because `linfa-logistic` only offers an L2 penalty
//! and the project needs MLlib's elastic net; a quasi-Newton method rather than proximal
//! gradient (FISTA) because every iteration is a full pass over up to `10^5 x 2048`
//! features and quasi-Newton needs far fewer passes to reach a tight optimum.
//!
//! `max_iter` counts OWL-QN iterations, each one direction plus a line search of one or
//! more (usually one) passes over the data; [`FitReport::evaluations`] counts the passes. The
//! fit stops as converged when one quasi-Newton iteration changes the objective by less
//! than `tol` relative to its value (steepest-descent iterations, the first one and those
//! after a reset of the L-BFGS memory, have arbitrary step lengths and do not count), when
//! the pseudo-gradient is exactly zero, or when not even a steepest-descent step can
//! decrease the objective in floating point. (MLlib, through Breeze, instead compares the
//! objective with its value 20 iterations earlier, so it never stops before 20 iterations.)
//!
//! # Determinism
//!
//! Rows are cut into fixed blocks of `BLOCK_ROWS`; blocks run in parallel on rayon's
//! pool, and their partial sums are added in block order, so the result is bit-for-bit the
//! same whatever the number of threads. The kernels fix the order of every floating-point
//! operation (lanes, chains, folds) and use fused multiply-adds everywhere (`f64::mul_add`
//! in the portable version), so the vector unit chosen at run time (AVX-512F, AVX2 + FMA,
//! or none) gives bit-identical results too. The portable version is meant for non-x86
//! CPUs, which all have FMA instructions; on an x86-64 without FMA it is correct but slow
//! (software `fma`).
//!
//! # Cost
//!
//! A pass over the data costs about `2 n D K` multiply-adds in `f64` (logits, then
//! gradient), tiled for the caches: about 30 G/s on two AVX-512 cores, i.e. 0.5 s for
//! `n = 20 000, D = 2048, K = 100`. L-BFGS typically needs tens of passes, MLlib's default
//! `max_iter = 100` caps it.

use std::collections::VecDeque;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Training rows per block: the unit of parallel work and of the ordered reduction.
/// It must not depend on the thread count, or determinism is lost.
const BLOCK_ROWS: usize = 128;
/// Blocks computed in parallel before their partial gradients are folded into the total;
/// bounds the memory held by partials (`BLOCKS_PER_WAVE * K * D` doubles).
const BLOCKS_PER_WAVE: usize = 32;
/// Rows per dot-product tile in the logits pass: each load of coefficients serves this
/// many rows.
const TILE_ROWS: usize = 8;
/// Feature columns per tile in the logits pass: keeps a `K x TILE_COLS` slice of the
/// coefficients resident in L2 cache while all rows of a block stream past it.
const TILE_COLS: usize = 256;
/// Feature columns per strip in the gradient pass: a strip of all rows of a block
/// (`BLOCK_ROWS x GRAD_COLS` doubles, 32 KiB) fits in L1 cache.
const GRAD_COLS: usize = 32;
/// Independent accumulators per dot product (one AVX-512 vector, two AVX2 ones).
const LANES: usize = 8;
/// L-BFGS history length (MLlib's default).
const LBFGS_MEMORY: usize = 10;
/// Armijo sufficient-decrease constant.
const ARMIJO_C1: f64 = 1e-4;
/// Halvings of the step before the line search gives up.
const MAX_BACKTRACKS: usize = 60;

/// Hyper-parameters, with MLlib's names in the docs and MLlib's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogisticParams {
    /// Penalty strength (`regParam`), >= 0.
    pub reg: f64,
    /// L1 share of the penalty (`elasticNetParam`), in `[0, 1]`.
    pub elastic_net: f64,
    /// Maximum OWL-QN iterations (`maxIter`); see the module docs for what one counts.
    pub max_iter: usize,
    /// Relative objective change that ends the fit (`tol`); 0 disables this criterion.
    pub tol: f64,
    /// Fit one unpenalised intercept per class (`fitIntercept`).
    pub fit_intercept: bool,
    /// Penalise coefficients of standardised features (`standardization`).
    pub standardize: bool,
}

impl Default for LogisticParams {
    fn default() -> Self {
        Self {
            reg: 0.0,
            elastic_net: 0.0,
            max_iter: 100,
            tol: 1e-6,
            fit_intercept: true,
            standardize: true,
        }
    }
}

/// A fitted softmax classifier in the original feature space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticModel {
    pub num_classes: usize,
    pub dim: usize,
    /// `num_classes x dim`, row-major.
    pub coefficients: Vec<f64>,
    /// One per class (all 0 when fitted without intercept).
    pub intercepts: Vec<f64>,
}

impl LogisticModel {
    /// Coefficient row of class `k`.
    pub fn class_coefficients(&self, k: usize) -> &[f64] {
        &self.coefficients[k * self.dim..(k + 1) * self.dim]
    }

    /// Unnormalised log-probabilities `W x + b`, one per class.
    ///
    /// # Panics
    /// If `x.len() != self.dim`.
    pub fn logits(&self, x: &[f32]) -> Vec<f64> {
        assert_eq!(
            x.len(),
            self.dim,
            "logistic model expects {} features, got {}",
            self.dim,
            x.len()
        );
        (0..self.num_classes)
            .map(|k| self.intercepts[k] + dot_f32(self.class_coefficients(k), x))
            .collect()
    }

    /// Class probabilities (softmax of the logits).
    ///
    /// # Panics
    /// If `x.len() != self.dim`.
    pub fn predict_proba(&self, x: &[f32]) -> Vec<f64> {
        let mut p = self.logits(x);
        softmax_in_place(&mut p);
        p
    }

    /// Most probable class (the lowest index on ties).
    ///
    /// # Panics
    /// If `x.len() != self.dim`.
    pub fn predict(&self, x: &[f32]) -> usize {
        argmax(&self.logits(x))
    }
}

/// Replaces logits by their softmax. Subtracting the maximum first keeps `exp` from
/// overflowing, whatever the magnitude of the logits.
pub fn softmax_in_place(logits: &mut [f64]) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in logits.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in logits.iter_mut() {
        *v /= sum;
    }
}

/// `w . x` with eight independent partial sums: a single running sum would be one long
/// dependency chain, several times slower on 2048 features.
fn dot_f32(w: &[f64], x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (w_tail, x_tail) = (wc.remainder(), xc.remainder());
    for (wc, xc) in wc.zip(xc) {
        for l in 0..8 {
            acc[l] += wc[l] * f64::from(xc[l]);
        }
    }
    for (l, (&w, &v)) in w_tail.iter().zip(x_tail).enumerate() {
        acc[l] += w * f64::from(v);
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Index of the largest value (the lowest index on ties).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// How a fit ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// OWL-QN iterations done (at most `max_iter`).
    pub iterations: usize,
    /// Final value of the penalised objective (see the module docs; the penalty is in the
    /// standardised space when `standardize` is on).
    pub objective: f64,
    /// Whether a stopping criterion other than `max_iter` ended the fit.
    pub converged: bool,
    /// Passes over the data (objective-and-gradient evaluations), the real cost measure.
    pub evaluations: usize,
}

/// Fits the model. `x` holds `y.len()` rows of `dim` features (row-major), `y` a class
/// index in `0..num_classes` per row. `on_iter(iteration, objective)` is called after
/// every iteration, with iterations numbered from 1.
///
/// Classes absent from `y` are allowed; their intercepts drift towards minus infinity
/// until the objective stops changing, as do coefficients of separable unpenalised data.
pub fn fit(
    x: &[f32],
    dim: usize,
    y: &[usize],
    num_classes: usize,
    params: &LogisticParams,
    mut on_iter: impl FnMut(usize, f64),
) -> Result<(LogisticModel, FitReport), String> {
    validate(x, dim, y, num_classes, params)?;
    let problem = Problem::new(x, dim, y, num_classes, params);
    let k = num_classes;

    let mut theta = vec![0.0; problem.num_params()];
    if params.fit_intercept {
        // Start from the (smoothed) class log-priors, as MLlib does: the optimum of the
        // intercept-only model, so the first iterations go to the coefficients.
        let mut counts = vec![0usize; k];
        for &label in y {
            counts[label] += 1;
        }
        let logs: Vec<f64> = counts.iter().map(|&c| (c as f64).ln_1p()).collect();
        let mean = logs.iter().sum::<f64>() / k as f64;
        for (t, l) in theta[k * dim..].iter_mut().zip(&logs) {
            *t = l - mean;
        }
    }

    let report = owlqn(
        &problem,
        &mut theta,
        params.max_iter,
        params.tol,
        &mut on_iter,
    );
    Ok((problem.to_model(&theta), report))
}

fn validate(
    x: &[f32],
    dim: usize,
    y: &[usize],
    num_classes: usize,
    params: &LogisticParams,
) -> Result<(), String> {
    if num_classes < 2 {
        return Err(format!(
            "logistic regression needs at least 2 classes, got {num_classes}"
        ));
    }
    if y.is_empty() {
        return Err("logistic regression: no training rows".into());
    }
    if dim == 0 {
        return Err("logistic regression: feature dimension is 0".into());
    }
    if y.len().checked_mul(dim) != Some(x.len()) {
        return Err(format!(
            "logistic regression: {} feature values do not make {} rows of dimension {dim}",
            x.len(),
            y.len()
        ));
    }
    if let Some((i, &label)) = y.iter().enumerate().find(|&(_, &l)| l >= num_classes) {
        return Err(format!(
            "logistic regression: label {label} of row {i} is out of range 0..{num_classes}"
        ));
    }
    if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "logistic regression: non-finite feature value {} at row {}, column {}",
            x[pos],
            pos / dim,
            pos % dim
        ));
    }
    if !params.reg.is_finite() || params.reg < 0.0 {
        return Err(format!(
            "logistic regression: reg must be finite and >= 0, got {}",
            params.reg
        ));
    }
    if !(0.0..=1.0).contains(&params.elastic_net) {
        return Err(format!(
            "logistic regression: elastic_net must be in [0, 1], got {}",
            params.elastic_net
        ));
    }
    if params.tol.is_nan() || params.tol < 0.0 {
        return Err(format!(
            "logistic regression: tol must be >= 0, got {}",
            params.tol
        ));
    }
    Ok(())
}

/// The training problem in the standardised space. Parameters are laid out as `W`
/// (`K x D`, row-major) followed, with an intercept, by the `K` intercepts.
struct Problem<'a> {
    x: &'a [f32],
    y: &'a [usize],
    n: usize,
    dim: usize,
    k: usize,
    fit_intercept: bool,
    /// Subtracted from each feature before scaling (the mean, or 0 without intercept).
    shift: Vec<f64>,
    /// `1 / s_j`, or 0 for constant features so they drop out of the model.
    inv_std: Vec<f64>,
    /// Per-feature L1 weight on standardised coefficients (`reg * alpha` times 1 or `1/s_j`).
    l1: Vec<f64>,
    /// Per-feature L2 weight on standardised coefficients.
    l2: Vec<f64>,
    /// Vector unit the kernels run on; every choice computes the same bits.
    isa: Isa,
}

impl<'a> Problem<'a> {
    fn new(x: &'a [f32], dim: usize, y: &'a [usize], k: usize, params: &LogisticParams) -> Self {
        let n = y.len();
        let mut mean = vec![0.0f64; dim];
        let mut min = vec![f32::INFINITY; dim];
        let mut max = vec![f32::NEG_INFINITY; dim];
        for row in x.chunks_exact(dim) {
            for j in 0..dim {
                mean[j] += f64::from(row[j]);
                min[j] = min[j].min(row[j]);
                max[j] = max[j].max(row[j]);
            }
        }
        for m in &mut mean {
            *m /= n as f64;
        }
        // Two-pass variance: no cancellation for features with a large mean.
        let mut var = vec![0.0f64; dim];
        for row in x.chunks_exact(dim) {
            for j in 0..dim {
                let d = f64::from(row[j]) - mean[j];
                var[j] += d * d;
            }
        }
        let l1_all = params.reg * params.elastic_net;
        let l2_all = params.reg * (1.0 - params.elastic_net);
        let mut inv_std = vec![0.0; dim];
        let mut l1 = vec![0.0; dim];
        let mut l2 = vec![0.0; dim];
        for j in 0..dim {
            // Exact constancy test: a rounding-level variance of a constant column
            // would otherwise become a huge 1/s_j.
            if min[j] == max[j] {
                continue;
            }
            let s = (var[j] / (n - 1) as f64).sqrt();
            inv_std[j] = 1.0 / s;
            let (a, b) = if params.standardize {
                (1.0, 1.0)
            } else {
                (1.0 / s, 1.0 / (s * s))
            };
            l1[j] = l1_all * a;
            l2[j] = l2_all * b;
        }
        let shift = if params.fit_intercept {
            mean
        } else {
            vec![0.0; dim]
        };
        Self {
            x,
            y,
            n,
            dim,
            k,
            fit_intercept: params.fit_intercept,
            shift,
            inv_std,
            l1,
            l2,
            isa: Isa::detect(),
        }
    }

    fn num_params(&self) -> usize {
        self.k * self.dim + if self.fit_intercept { self.k } else { 0 }
    }

    /// L1 weight of every parameter (0 for intercepts).
    fn l1_weights(&self) -> Vec<f64> {
        let mut w = Vec::with_capacity(self.num_params());
        for _ in 0..self.k {
            w.extend_from_slice(&self.l1);
        }
        w.resize(self.num_params(), 0.0);
        w
    }

    fn to_model(&self, theta: &[f64]) -> LogisticModel {
        let (k, d) = (self.k, self.dim);
        let mut coefficients = vec![0.0; k * d];
        let mut intercepts = vec![0.0; k];
        for c in 0..k {
            let mut folded = 0.0;
            for j in 0..d {
                let beta = theta[c * d + j] * self.inv_std[j];
                coefficients[c * d + j] = beta;
                folded += beta * self.shift[j];
            }
            let b = if self.fit_intercept {
                theta[k * d + c]
            } else {
                0.0
            };
            intercepts[c] = b - folded;
        }
        LogisticModel {
            num_classes: k,
            dim: d,
            coefficients,
            intercepts,
        }
    }

    /// Smooth part of the objective (mean loss + L2 term) and its gradient.
    fn eval(&self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let (k, d) = (self.k, self.dim);
        let w = &theta[..k * d];
        let zero_intercepts = vec![0.0; k];
        let b = if self.fit_intercept {
            &theta[k * d..]
        } else {
            &zero_intercepts[..]
        };
        let sums = self.data_pass(w, b);
        let inv_n = 1.0 / self.n as f64;
        let mut f = sums.loss * inv_n;
        for c in 0..k {
            for j in 0..d {
                let i = c * d + j;
                grad[i] = sums.grad[i] * inv_n + self.l2[j] * w[i];
                f += 0.5 * self.l2[j] * w[i] * w[i];
            }
        }
        if self.fit_intercept {
            for c in 0..k {
                grad[k * d + c] = sums.resid[c] * inv_n;
            }
        }
        f
    }

    /// Sums over all rows, block by block, folded in block order for determinism.
    fn data_pass(&self, w: &[f64], b: &[f64]) -> Sums {
        let blocks = self.n.div_ceil(BLOCK_ROWS);
        let mut total = Sums::zeros(self.k, self.dim);
        for first in (0..blocks).step_by(BLOCKS_PER_WAVE) {
            let last = (first + BLOCKS_PER_WAVE).min(blocks);
            let partials: Vec<Sums> = (first..last)
                .into_par_iter()
                .map(|blk| self.block(blk, w, b))
                .collect();
            for p in &partials {
                total.add(p);
            }
        }
        total
    }

    fn block(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        match self.isa {
            // SAFETY: `Isa::detect` picks AVX-512F only where the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.block_avx512(blk, w, b) },
            // SAFETY: `Isa::detect` picks AVX2 only where the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.block_avx2(blk, w, b) },
            Isa::Generic => self.block_impl::<{ Isa::GENERIC }>(blk, w, b),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn block_avx512(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        self.block_impl::<{ Isa::AVX512 }>(blk, w, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn block_avx2(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        self.block_impl::<{ Isa::AVX2 }>(blk, w, b)
    }

    /// Loss, gradient and residual sums of one block of rows. Inlined into each
    /// `target_feature` wrapper so that all of it is compiled for that vector unit.
    #[inline(always)]
    fn block_impl<const ISA: u8>(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        let (k, d) = (self.k, self.dim);
        let start = blk * BLOCK_ROWS;
        let m = BLOCK_ROWS.min(self.n - start);
        let mut tile = [[0.0f64; TILE_COLS]; TILE_ROWS];

        // Logits, tile by tile of columns so a K x TILE_COLS slice of W stays in cache.
        let mut probs = vec![0.0; m * k];
        for row in probs.chunks_exact_mut(k) {
            row.copy_from_slice(b);
        }
        for j0 in (0..d).step_by(TILE_COLS) {
            let width = TILE_COLS.min(d - j0);
            for i0 in (0..m).step_by(TILE_ROWS) {
                let rows = TILE_ROWS.min(m - i0);
                self.load_tile(start + i0, rows, j0, width, &mut tile);
                for c in 0..k {
                    let wc = &w[c * d + j0..c * d + j0 + width];
                    let dots = dot_tile_isa::<ISA>(&tile, wc);
                    for r in 0..rows {
                        probs[(i0 + r) * k + c] += dots[r];
                    }
                }
            }
        }

        // Softmax, loss and residuals (p - onehot) in place.
        let mut loss = 0.0;
        for (i, row) in probs.chunks_exact_mut(k).enumerate() {
            let label = self.y[start + i];
            let target = row[label];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            loss += max + sum.ln() - target;
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
            row[label] -= 1.0;
        }
        let mut resid = vec![0.0; k];
        for row in probs.chunks_exact(k) {
            for (s, &r) in resid.iter_mut().zip(row) {
                *s += r;
            }
        }

        // Gradient sum_i r_ic z_i. Here the tiling goes the other way: a strip of
        // GRAD_COLS standardised columns of all the block's rows stays in L1 while each
        // class sweeps it with its accumulators in registers, so the gradient itself is
        // written once instead of read and written for every few rows.
        let mut resid_by_class = vec![0.0; k * m];
        for (i, row) in probs.chunks_exact(k).enumerate() {
            for (c, &r) in row.iter().enumerate() {
                resid_by_class[c * m + i] = r;
            }
        }
        let mut strip = vec![[0.0f64; GRAD_COLS]; m];
        let mut grad = vec![0.0; k * d];
        for j0 in (0..d).step_by(GRAD_COLS) {
            let width = GRAD_COLS.min(d - j0);
            self.load_strip(start, j0, width, &mut strip);
            for c in 0..k {
                let sums = grad_strip_isa::<ISA>(&strip, &resid_by_class[c * m..(c + 1) * m]);
                grad[c * d + j0..c * d + j0 + width].copy_from_slice(&sums[..width]);
            }
        }
        Sums { loss, grad, resid }
    }

    /// Standardised features of rows `row0..row0 + strip.len()`, columns
    /// `j0..j0 + width`, into `strip`; columns past `width` are zero.
    #[inline(always)]
    fn load_strip(&self, row0: usize, j0: usize, width: usize, strip: &mut [[f64; GRAD_COLS]]) {
        let shift = &self.shift[j0..j0 + width];
        let scale = &self.inv_std[j0..j0 + width];
        for (i, t) in strip.iter_mut().enumerate() {
            let at = (row0 + i) * self.dim + j0;
            let src = &self.x[at..at + width];
            for (((t, &v), &m), &s) in t.iter_mut().zip(src).zip(shift).zip(scale) {
                *t = (f64::from(v) - m) * s;
            }
            t[width..].fill(0.0);
        }
    }

    /// Standardised features of `rows` rows from `row0`, columns `j0..j0 + width`,
    /// into the first `width` columns of `tile`; missing rows are zero.
    #[inline(always)]
    fn load_tile(&self, row0: usize, rows: usize, j0: usize, width: usize, tile: &mut Tile) {
        let shift = &self.shift[j0..j0 + width];
        let scale = &self.inv_std[j0..j0 + width];
        for (r, t) in tile.iter_mut().enumerate() {
            let t = &mut t[..width];
            if r < rows {
                let at = (row0 + r) * self.dim + j0;
                let src = &self.x[at..at + width];
                for (((t, &v), &m), &s) in t.iter_mut().zip(src).zip(shift).zip(scale) {
                    *t = (f64::from(v) - m) * s;
                }
            } else {
                t.fill(0.0);
            }
        }
    }
}

/// Which vector unit the kernels use (see `Problem::block`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    const GENERIC: u8 = 0;
    #[cfg(target_arch = "x86_64")]
    const AVX2: u8 = 1;
    #[cfg(target_arch = "x86_64")]
    const AVX512: u8 = 2;

    /// The engine's one dispatch decides (`DLTOOL_SIMD` can force a path).
    fn detect() -> Self {
        Self::of(crate::engine::cpu::simd())
    }

    fn of(simd: crate::engine::cpu::Simd) -> Self {
        use crate::engine::cpu::Simd;
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => Isa::Avx512,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => Isa::Avx2,
            _ => Isa::Generic,
        }
    }
}

type Tile = [[f64; TILE_COLS]; TILE_ROWS];

/// `dot_tile` on the vector unit `ISA`; resolved at compile time.
#[inline(always)]
fn dot_tile_isa<const ISA: u8>(tile: &Tile, w: &[f64]) -> [f64; TILE_ROWS] {
    #[cfg(target_arch = "x86_64")]
    {
        if ISA == Isa::AVX512 {
            // SAFETY: ISA is AVX512 only inside `block_avx512`, which runs only on CPUs
            // with AVX-512F.
            return unsafe { x86::dot_tile_avx512(tile, w) };
        }
        if ISA == Isa::AVX2 {
            // SAFETY: as above, for AVX2 + FMA and `block_avx2`.
            return unsafe { x86::dot_tile_avx2(tile, w) };
        }
    }
    dot_tile(tile, w)
}

/// Dot products of `w` with each row of `tile` (first `w.len()` columns). Each row keeps
/// `LANES` partial sums updated by fused multiply-adds and folded in a fixed order; the
/// SIMD versions in `x86` do exactly the same operations, so every path gives the same
/// bits. (Fused: one rounding instead of two, and twice the throughput of mul + add.)
#[inline(always)]
fn dot_tile(tile: &Tile, w: &[f64]) -> [f64; TILE_ROWS] {
    let len = w.len();
    let main = len - len % LANES;
    let mut acc = [[0.0f64; LANES]; TILE_ROWS];
    for o in (0..main).step_by(LANES) {
        for (a, row) in acc.iter_mut().zip(tile) {
            for l in 0..LANES {
                a[l] = row[o + l].mul_add(w[o + l], a[l]);
            }
        }
    }
    finish_dots(acc, tile, w, main)
}

/// Adds the columns past the last full group of `LANES` and folds the lanes.
#[inline(always)]
fn finish_dots(
    mut acc: [[f64; LANES]; TILE_ROWS],
    tile: &Tile,
    w: &[f64],
    main: usize,
) -> [f64; TILE_ROWS] {
    for (a, row) in acc.iter_mut().zip(tile) {
        for o in main..w.len() {
            a[o - main] = row[o].mul_add(w[o], a[o - main]);
        }
    }
    acc.map(|mut v| {
        // Pairwise: a fixed order, and a little more accurate than a chain.
        let mut half = LANES / 2;
        while half > 0 {
            for l in 0..half {
                v[l] += v[l + half];
            }
            half /= 2;
        }
        v[0]
    })
}

/// `grad_strip` on the vector unit `ISA`; resolved at compile time.
#[inline(always)]
fn grad_strip_isa<const ISA: u8>(strip: &[[f64; GRAD_COLS]], r: &[f64]) -> [f64; GRAD_COLS] {
    #[cfg(target_arch = "x86_64")]
    {
        if ISA == Isa::AVX512 {
            // SAFETY: as in `dot_tile_isa`.
            return unsafe { x86::grad_strip_avx512(strip, r) };
        }
        if ISA == Isa::AVX2 {
            // SAFETY: as in `dot_tile_isa`.
            return unsafe { x86::grad_strip_avx2(strip, r) };
        }
    }
    grad_strip(strip, r)
}

/// `sum_i r[i] * strip[i]`, column by column. Each column keeps two fused multiply-add
/// chains, over even and over odd rows (two chains hide the FMA latency), added at the
/// end; the SIMD versions do the same per column, so all paths agree bit for bit.
#[inline(always)]
fn grad_strip(strip: &[[f64; GRAD_COLS]], r: &[f64]) -> [f64; GRAD_COLS] {
    assert_eq!(strip.len(), r.len());
    let mut even = [0.0f64; GRAD_COLS];
    let mut odd = [0.0f64; GRAD_COLS];
    for (z, rr) in strip.chunks_exact(2).zip(r.chunks_exact(2)) {
        for j in 0..GRAD_COLS {
            even[j] = z[0][j].mul_add(rr[0], even[j]);
            odd[j] = z[1][j].mul_add(rr[1], odd[j]);
        }
    }
    if let (Some(z), Some(&rl)) = (strip.last(), r.last())
        && strip.len() % 2 == 1
    {
        for j in 0..GRAD_COLS {
            even[j] = z[j].mul_add(rl, even[j]);
        }
    }
    for j in 0..GRAD_COLS {
        even[j] += odd[j];
    }
    even
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Explicit SIMD versions of `dot_tile` and `grad_strip`: the autovectoriser does not
    //! find the register layouts (rows side by side, two chains per column) that keep
    //! both FMA units busy.
    use super::{GRAD_COLS, LANES, TILE_ROWS, Tile, finish_dots};
    use std::arch::x86_64::*;

    const _: () = assert!(GRAD_COLS == 32, "the strip kernels hold 32 columns");

    #[target_feature(enable = "avx512f")]
    pub(super) fn grad_strip_avx512(strip: &[[f64; GRAD_COLS]], r: &[f64]) -> [f64; GRAD_COLS] {
        assert_eq!(strip.len(), r.len());
        let mut even = [_mm512_setzero_pd(); 4];
        let mut odd = [_mm512_setzero_pd(); 4];
        for (z, rr) in strip.chunks_exact(2).zip(r.chunks_exact(2)) {
            let (r0, r1) = (_mm512_set1_pd(rr[0]), _mm512_set1_pd(rr[1]));
            for q in 0..4 {
                // SAFETY: each strip row holds 32 doubles; q * 8 + 8 <= 32.
                unsafe {
                    let z0 = _mm512_loadu_pd(z[0].as_ptr().add(q * 8));
                    let z1 = _mm512_loadu_pd(z[1].as_ptr().add(q * 8));
                    even[q] = _mm512_fmadd_pd(z0, r0, even[q]);
                    odd[q] = _mm512_fmadd_pd(z1, r1, odd[q]);
                }
            }
        }
        if strip.len() % 2 == 1 {
            let (z, rl) = (&strip[strip.len() - 1], _mm512_set1_pd(r[r.len() - 1]));
            for (q, e) in even.iter_mut().enumerate() {
                // SAFETY: as above.
                *e = _mm512_fmadd_pd(unsafe { _mm512_loadu_pd(z.as_ptr().add(q * 8)) }, rl, *e);
            }
        }
        let mut out = [0.0; GRAD_COLS];
        for q in 0..4 {
            // SAFETY: `out` holds 32 doubles; q * 8 + 8 <= 32.
            unsafe {
                _mm512_storeu_pd(out.as_mut_ptr().add(q * 8), _mm512_add_pd(even[q], odd[q]))
            };
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn grad_strip_avx2(strip: &[[f64; GRAD_COLS]], r: &[f64]) -> [f64; GRAD_COLS] {
        assert_eq!(strip.len(), r.len());
        let mut out = [0.0; GRAD_COLS];
        // Two passes of 16 columns: 2 x 4 accumulators fit the 16 AVX2 registers.
        for half in 0..2 {
            let base = half * 16;
            let mut even = [_mm256_setzero_pd(); 4];
            let mut odd = [_mm256_setzero_pd(); 4];
            for (z, rr) in strip.chunks_exact(2).zip(r.chunks_exact(2)) {
                let (r0, r1) = (_mm256_set1_pd(rr[0]), _mm256_set1_pd(rr[1]));
                for q in 0..4 {
                    // SAFETY: each strip row holds 32 doubles; base + q * 4 + 4 <= 32.
                    unsafe {
                        let z0 = _mm256_loadu_pd(z[0].as_ptr().add(base + q * 4));
                        let z1 = _mm256_loadu_pd(z[1].as_ptr().add(base + q * 4));
                        even[q] = _mm256_fmadd_pd(z0, r0, even[q]);
                        odd[q] = _mm256_fmadd_pd(z1, r1, odd[q]);
                    }
                }
            }
            if strip.len() % 2 == 1 {
                let (z, rl) = (&strip[strip.len() - 1], _mm256_set1_pd(r[r.len() - 1]));
                for (q, e) in even.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let zq = unsafe { _mm256_loadu_pd(z.as_ptr().add(base + q * 4)) };
                    *e = _mm256_fmadd_pd(zq, rl, *e);
                }
            }
            for q in 0..4 {
                // SAFETY: `out` holds 32 doubles; base + q * 4 + 4 <= 32.
                unsafe {
                    _mm256_storeu_pd(
                        out.as_mut_ptr().add(base + q * 4),
                        _mm256_add_pd(even[q], odd[q]),
                    )
                };
            }
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_tile_avx512(tile: &Tile, w: &[f64]) -> [f64; TILE_ROWS] {
        let len = w.len();
        assert!(len <= tile[0].len());
        let main = len - len % LANES;
        let mut a = [_mm512_setzero_pd(); TILE_ROWS];
        for o in (0..main).step_by(LANES) {
            // SAFETY: o + LANES <= main <= len <= every row's length (asserted above).
            unsafe {
                let wv = _mm512_loadu_pd(w.as_ptr().add(o));
                for (a, row) in a.iter_mut().zip(tile) {
                    *a = _mm512_fmadd_pd(_mm512_loadu_pd(row.as_ptr().add(o)), wv, *a);
                }
            }
        }
        let mut acc = [[0.0f64; LANES]; TILE_ROWS];
        for (dst, v) in acc.iter_mut().zip(a) {
            // SAFETY: `dst` holds exactly LANES = 8 doubles.
            unsafe { _mm512_storeu_pd(dst.as_mut_ptr(), v) };
        }
        finish_dots(acc, tile, w, main)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_tile_avx2(tile: &Tile, w: &[f64]) -> [f64; TILE_ROWS] {
        let len = w.len();
        assert!(len <= tile[0].len());
        let main = len - len % LANES;
        // Lanes 0..4 and 4..8 of the generic version in two registers per row.
        let mut lo = [_mm256_setzero_pd(); TILE_ROWS];
        let mut hi = [_mm256_setzero_pd(); TILE_ROWS];
        for o in (0..main).step_by(LANES) {
            // SAFETY: o + LANES <= main <= len <= every row's length (asserted above).
            unsafe {
                let w0 = _mm256_loadu_pd(w.as_ptr().add(o));
                let w1 = _mm256_loadu_pd(w.as_ptr().add(o + 4));
                for r in 0..TILE_ROWS {
                    let p = tile[r].as_ptr().add(o);
                    lo[r] = _mm256_fmadd_pd(_mm256_loadu_pd(p), w0, lo[r]);
                    hi[r] = _mm256_fmadd_pd(_mm256_loadu_pd(p.add(4)), w1, hi[r]);
                }
            }
        }
        let mut acc = [[0.0f64; LANES]; TILE_ROWS];
        for r in 0..TILE_ROWS {
            // SAFETY: each row of `acc` holds 8 doubles: 4 at offset 0 and 4 at offset 4.
            unsafe {
                _mm256_storeu_pd(acc[r].as_mut_ptr(), lo[r]);
                _mm256_storeu_pd(acc[r].as_mut_ptr().add(4), hi[r]);
            }
        }
        finish_dots(acc, tile, w, main)
    }
}

/// Unnormalised sums over rows: loss, `sum_i r_i z_i^T` (`K x D`) and `sum_i r_i`.
struct Sums {
    loss: f64,
    grad: Vec<f64>,
    resid: Vec<f64>,
}

impl Sums {
    fn zeros(k: usize, d: usize) -> Self {
        Self {
            loss: 0.0,
            grad: vec![0.0; k * d],
            resid: vec![0.0; k],
        }
    }

    fn add(&mut self, other: &Sums) {
        self.loss += other.loss;
        for (a, b) in self.grad.iter_mut().zip(&other.grad) {
            *a += b;
        }
        for (a, b) in self.resid.iter_mut().zip(&other.resid) {
            *a += b;
        }
    }
}

/// L-BFGS curvature pairs, newest last.
struct History {
    pairs: VecDeque<(Vec<f64>, Vec<f64>, f64)>,
}

impl History {
    fn new() -> Self {
        Self {
            pairs: VecDeque::with_capacity(LBFGS_MEMORY),
        }
    }

    fn push(&mut self, s: Vec<f64>, y: Vec<f64>) {
        let sy = dot(&s, &y);
        // Convexity gives s.y >= 0; a tiny value means no usable curvature, and adding it
        // would blow up the inverse-Hessian estimate.
        if sy <= 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() || sy <= 0.0 {
            return;
        }
        if self.pairs.len() == LBFGS_MEMORY {
            self.pairs.pop_front();
        }
        self.pairs.push_back((s, y, 1.0 / sy));
    }

    /// `out = -H g` by the two-loop recursion.
    fn direction(&self, g: &[f64], out: &mut [f64]) {
        for (o, &v) in out.iter_mut().zip(g) {
            *o = -v;
        }
        let mut alphas = Vec::with_capacity(self.pairs.len());
        for (s, y, rho) in self.pairs.iter().rev() {
            let a = rho * dot(s, out);
            axpy(out, -a, y);
            alphas.push(a);
        }
        if let Some((s, y, _)) = self.pairs.back() {
            let gamma = dot(s, y) / dot(y, y);
            for o in out.iter_mut() {
                *o *= gamma;
            }
        }
        for ((s, y, rho), a) in self.pairs.iter().zip(alphas.iter().rev()) {
            let beta = rho * dot(y, out);
            axpy(out, a - beta, s);
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn l1_term(theta: &[f64], l1: &[f64]) -> f64 {
    theta.iter().zip(l1).map(|(t, w)| w * t.abs()).sum()
}

/// Minimum-norm subgradient of the full objective, given the smooth gradient `g`.
fn pseudo_gradient(theta: &[f64], g: &[f64], l1: &[f64], out: &mut [f64]) {
    for i in 0..theta.len() {
        let (t, gi, w) = (theta[i], g[i], l1[i]);
        out[i] = if w == 0.0 {
            gi
        } else if t > 0.0 {
            gi + w
        } else if t < 0.0 {
            gi - w
        } else if gi + w < 0.0 {
            gi + w
        } else if gi - w > 0.0 {
            gi - w
        } else {
            0.0
        };
    }
}

/// OWL-QN from `theta` (updated in place).
fn owlqn(
    problem: &Problem,
    theta: &mut Vec<f64>,
    max_iter: usize,
    tol: f64,
    on_iter: &mut impl FnMut(usize, f64),
) -> FitReport {
    let p = theta.len();
    let l1 = problem.l1_weights();
    let mut grad = vec![0.0; p];
    let mut objective = problem.eval(theta, &mut grad) + l1_term(theta, &l1);
    let mut evaluations = 1;
    let mut history = History::new();
    let mut pg = vec![0.0; p];
    let mut dir = vec![0.0; p];
    let mut trial = vec![0.0; p];
    let mut trial_grad = vec![0.0; p];
    let mut iterations = 0;
    let mut converged = false;

    while iterations < max_iter {
        if objective == 0.0 {
            // Both terms are non-negative: nothing left to gain (separable data, no penalty).
            converged = true;
            break;
        }
        pseudo_gradient(theta, &grad, &l1, &mut pg);
        if pg.iter().all(|&v| v == 0.0) {
            converged = true;
            break;
        }
        history.direction(&pg, &mut dir);
        // Never move a penalised coordinate against its pseudo-gradient: that would
        // leave the orthant in which the L1 term is linear.
        for i in 0..p {
            if l1[i] > 0.0 && dir[i] * pg[i] >= 0.0 {
                dir[i] = 0.0;
            }
        }
        let slope = dot(&dir, &pg);
        if slope.is_nan() || slope >= 0.0 {
            history.pairs.clear();
            for (d, &g) in dir.iter_mut().zip(&pg) {
                *d = -g;
            }
        }
        // Quasi-Newton steps are well scaled; a steepest-descent one is not, so start it
        // at unit length.
        let steepest = history.pairs.is_empty();
        let mut step = if steepest {
            (1.0 / dot(&pg, &pg).sqrt()).min(1.0)
        } else {
            1.0
        };

        let mut accepted = None;
        for _ in 0..MAX_BACKTRACKS {
            for i in 0..p {
                let t = theta[i] + step * dir[i];
                let orthant = if theta[i] != 0.0 {
                    theta[i].signum()
                } else {
                    -pg[i].signum()
                };
                trial[i] = if l1[i] > 0.0 && t * orthant <= 0.0 {
                    0.0
                } else {
                    t
                };
            }
            let value = problem.eval(&trial, &mut trial_grad) + l1_term(&trial, &l1);
            evaluations += 1;
            let predicted: f64 = (0..p).map(|i| pg[i] * (trial[i] - theta[i])).sum();
            if value <= objective + ARMIJO_C1 * predicted {
                accepted = Some(value);
                break;
            }
            step *= 0.5;
        }
        let Some(value) = accepted else {
            if history.pairs.is_empty() {
                // Not even a tiny steepest-descent step decreases the objective: the
                // optimum is reached to floating-point precision.
                converged = true;
                break;
            }
            // A stale curvature estimate can give a poor direction: retry from scratch.
            history.pairs.clear();
            continue;
        };

        let s: Vec<f64> = trial.iter().zip(theta.iter()).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = trial_grad.iter().zip(&grad).map(|(a, b)| a - b).collect();
        history.push(s, yv);
        std::mem::swap(theta, &mut trial);
        std::mem::swap(&mut grad, &mut trial_grad);
        let change =
            (objective - value).abs() / value.abs().max(objective.abs()).max(f64::MIN_POSITIVE);
        objective = value;
        iterations += 1;
        on_iter(iterations, objective);
        // A steepest-descent step has an arbitrary length, so its small effect says
        // nothing about the distance to the optimum (with a small gradient, the first
        // iteration would otherwise stop the fit at once).
        if change < tol && !steepest {
            converged = true;
            break;
        }
    }
    FitReport {
        iterations,
        objective,
        converged,
        evaluations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Relative to this file, so the tests also run from a scratch crate that mounts it.
    const IRIS_CSV: &str = include_str!("../tests/fixtures/logistic_iris.csv");
    const SYNTH_CSV: &str = include_str!("../tests/fixtures/logistic_synth.csv");
    const REFERENCE_JSON: &str = include_str!("../tests/fixtures/logistic_reference.json");

    #[derive(Deserialize)]
    struct Reference {
        cases: Vec<RefCase>,
    }

    #[derive(Deserialize)]
    struct RefCase {
        name: String,
        data: String,
        reg: f64,
        elastic_net: f64,
        standardize: bool,
        fit_intercept: bool,
        num_classes: usize,
        dim: usize,
        coefficients: Vec<f64>,
        intercepts: Vec<f64>,
        objective: f64,
        train_accuracy: f64,
    }

    struct Data {
        x: Vec<f32>,
        y: Vec<usize>,
        dim: usize,
    }

    impl Data {
        fn n(&self) -> usize {
            self.y.len()
        }

        fn row(&self, i: usize) -> &[f32] {
            &self.x[i * self.dim..(i + 1) * self.dim]
        }

        fn mean_std(&self) -> (Vec<f64>, Vec<f64>) {
            let n = self.n() as f64;
            let mut mean = vec![0.0; self.dim];
            for i in 0..self.n() {
                for (m, &v) in mean.iter_mut().zip(self.row(i)) {
                    *m += f64::from(v) / n;
                }
            }
            let mut var = vec![0.0; self.dim];
            for i in 0..self.n() {
                for j in 0..self.dim {
                    var[j] += (f64::from(self.row(i)[j]) - mean[j]).powi(2) / (n - 1.0);
                }
            }
            (mean, var.into_iter().map(f64::sqrt).collect())
        }
    }

    fn parse_csv(text: &str) -> Data {
        let mut lines = text.lines();
        let dim = lines.next().unwrap().split(',').count() - 1;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for line in lines {
            let mut fields = line.split(',');
            y.push(fields.next().unwrap().parse().unwrap());
            x.extend(fields.map(|v| v.parse::<f32>().unwrap()));
        }
        assert_eq!(x.len(), y.len() * dim);
        Data { x, y, dim }
    }

    fn dataset(file: &str) -> Data {
        match file {
            "logistic_iris.csv" => parse_csv(IRIS_CSV),
            "logistic_synth.csv" => parse_csv(SYNTH_CSV),
            other => panic!("unknown fixture {other}"),
        }
    }

    /// xorshift64*: reproducible test data without a `rand` dependency.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Gaussian-ish blobs, one per class, with features on different scales.
    fn blobs(n: usize, dim: usize, k: usize, spread: f64, seed: u64) -> Data {
        let mut rng = Rng(seed);
        let centers: Vec<f64> = (0..k * dim).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        let scales: Vec<f64> = (0..dim).map(|j| 0.5 + (j % 7) as f64).collect();
        let mut x = Vec::with_capacity(n * dim);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = (i * 7 + i / 3) % k;
            y.push(c);
            for j in 0..dim {
                let noise: f64 = (0..3).map(|_| rng.uniform() - 0.5).sum();
                x.push(((centers[c * dim + j] + spread * noise) * scales[j]) as f32);
            }
        }
        Data { x, y, dim }
    }

    fn fit_data(data: &Data, k: usize, params: &LogisticParams) -> (LogisticModel, FitReport) {
        fit(&data.x, data.dim, &data.y, k, params, |_, _| {}).unwrap()
    }

    fn tight(reg: f64, elastic_net: f64) -> LogisticParams {
        LogisticParams {
            reg,
            elastic_net,
            max_iter: 10_000,
            tol: 1e-13,
            ..LogisticParams::default()
        }
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn accuracy(model: &LogisticModel, data: &Data) -> f64 {
        let hits = (0..data.n())
            .filter(|&i| model.predict(data.row(i)) == data.y[i])
            .count();
        hits as f64 / data.n() as f64
    }

    /// Coefficients in the space where the penalty applies, and the intercepts there
    /// (centred, since a common shift of all intercepts changes nothing).
    fn penalty_space(model: &LogisticModel, case: &RefCase, data: &Data) -> (Vec<f64>, Vec<f64>) {
        let (mean, std) = data.mean_std();
        let d = model.dim;
        let mut w = model.coefficients.clone();
        let mut b = model.intercepts.clone();
        for c in 0..model.num_classes {
            for j in 0..d {
                let beta = model.coefficients[c * d + j];
                if case.standardize {
                    w[c * d + j] = beta * std[j];
                }
                if case.fit_intercept {
                    b[c] += beta * mean[j];
                }
            }
        }
        let mean_b = b.iter().sum::<f64>() / b.len() as f64;
        b.iter_mut().for_each(|v| *v -= mean_b);
        (w, b)
    }

    #[test]
    fn matches_sklearn_reference() {
        let reference: Reference = serde_json::from_str(REFERENCE_JSON).unwrap();
        assert!(reference.cases.len() >= 6);
        for case in &reference.cases {
            let data = dataset(&case.data);
            assert_eq!(data.dim, case.dim);
            let params = LogisticParams {
                standardize: case.standardize,
                fit_intercept: case.fit_intercept,
                ..tight(case.reg, case.elastic_net)
            };
            let (model, report) = fit_data(&data, case.num_classes, &params);
            let sk = LogisticModel {
                num_classes: case.num_classes,
                dim: case.dim,
                coefficients: case.coefficients.clone(),
                intercepts: case.intercepts.clone(),
            };
            assert!(report.converged, "{}: {report:?}", case.name);

            let objective_rel = (report.objective - case.objective).abs() / case.objective;
            let mut proba_diff = 0.0f64;
            for i in 0..data.n() {
                let (p, q) = (
                    model.predict_proba(data.row(i)),
                    sk.predict_proba(data.row(i)),
                );
                proba_diff = proba_diff.max(max_abs_diff(&p, &q));
            }
            let (w, b) = penalty_space(&model, case, &data);
            let (w_sk, b_sk) = penalty_space(&sk, case, &data);
            let coef_diff = max_abs_diff(&w, &w_sk);
            let intercept_diff = max_abs_diff(&b, &b_sk);
            // Zero patterns: where they differ, the non-zero value must be negligible.
            let mut pattern_mismatch = 0;
            for (a, r) in w.iter().zip(&w_sk) {
                if (*a == 0.0) != (*r == 0.0) {
                    pattern_mismatch += 1;
                    assert!(a.abs().max(r.abs()) < 1e-4, "{}: {a} vs {r}", case.name);
                }
            }
            let zeros = w.iter().filter(|v| **v == 0.0).count();
            eprintln!(
                "{:32} obj rel {objective_rel:.1e} (ours-sk {:+.1e})  proba {proba_diff:.1e}  \
                 coef {coef_diff:.1e}  icpt {intercept_diff:.1e}  zeros {zeros}/{} \
                 (sk {}, mismatched {pattern_mismatch})  iters {} evals {}",
                case.name,
                report.objective - case.objective,
                w.len(),
                w_sk.iter().filter(|v| **v == 0.0).count(),
                report.iterations,
                report.evaluations,
            );

            assert!(
                objective_rel < 1e-6,
                "{}: objective {objective_rel:e}",
                case.name
            );
            assert!(
                proba_diff < 1e-4,
                "{}: probabilities {proba_diff:e}",
                case.name
            );
            if case.elastic_net < 1.0 {
                // Strictly convex in W: the optimum is unique, so compare it directly.
                assert!(
                    coef_diff < 1e-3,
                    "{}: coefficients {coef_diff:e}",
                    case.name
                );
                assert!(
                    intercept_diff < 1e-3,
                    "{}: intercepts {intercept_diff:e}",
                    case.name
                );
            }
            if case.elastic_net > 0.0 {
                assert!(zeros > 0, "{}: L1 must give exact zeros", case.name);
                assert!(
                    pattern_mismatch * 20 <= w.len(),
                    "{}: sparsity pattern",
                    case.name
                );
            }
            let acc = accuracy(&model, &data);
            assert!(
                (acc - case.train_accuracy).abs() <= 1.0 / data.n() as f64,
                "{}: accuracy {acc} vs {}",
                case.name,
                case.train_accuracy
            );
            if !case.fit_intercept {
                assert!(model.intercepts.iter().all(|&v| v == 0.0));
            }
            if case.data == "logistic_synth.csv" {
                // Column 7 is constant in the fixture.
                for c in 0..model.num_classes {
                    assert_eq!(model.class_coefficients(c)[7], 0.0);
                }
            }
        }
    }

    #[test]
    fn default_tolerance_is_close_to_reference() {
        // The project's recipe as the CLI runs it: MLlib defaults apart from reg/alpha.
        let reference: Reference = serde_json::from_str(REFERENCE_JSON).unwrap();
        let case = reference
            .cases
            .iter()
            .find(|c| c.name == "synth_reg0.05_en0.3")
            .unwrap();
        let data = dataset(&case.data);
        let params = LogisticParams {
            reg: 0.05,
            elastic_net: 0.3,
            ..LogisticParams::default()
        };
        let (model, report) = fit_data(&data, case.num_classes, &params);
        let sk = LogisticModel {
            num_classes: case.num_classes,
            dim: case.dim,
            coefficients: case.coefficients.clone(),
            intercepts: case.intercepts.clone(),
        };
        let objective_rel = (report.objective - case.objective) / case.objective;
        let mut proba_diff = 0.0f64;
        for i in 0..data.n() {
            let (p, q) = (
                model.predict_proba(data.row(i)),
                sk.predict_proba(data.row(i)),
            );
            proba_diff = proba_diff.max(max_abs_diff(&p, &q));
        }
        eprintln!(
            "default tol: {report:?} objective rel {objective_rel:.1e} proba {proba_diff:.1e}"
        );
        assert!(report.converged && report.iterations < 100);
        assert!((-1e-9..1e-5).contains(&objective_rel), "{objective_rel:e}");
        assert!(proba_diff < 1e-2, "{proba_diff:e}");
    }

    #[test]
    fn same_bits_for_any_thread_count() {
        // 40 blocks: more than one wave; dim 37 leaves a partial group of lanes.
        let data = blobs(5000, 37, 3, 1.5, 7);
        let params = LogisticParams {
            reg: 0.01,
            elastic_net: 0.5,
            ..LogisticParams::default()
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut trace = Vec::new();
                let (model, report) = fit(&data.x, data.dim, &data.y, 3, &params, |i, f| {
                    trace.push((i, f))
                })
                .unwrap();
                (model, report, trace)
            })
        };
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (m1, r1, t1) = run(1);
        assert!(r1.iterations > 5, "{r1:?}");
        for threads in [2, 3] {
            let (m, r, t) = run(threads);
            assert_eq!(bits(&m.coefficients), bits(&m1.coefficients));
            assert_eq!(bits(&m.intercepts), bits(&m1.intercepts));
            assert_eq!(r.objective.to_bits(), r1.objective.to_bits());
            assert_eq!(
                (r.iterations, r.evaluations),
                (r1.iterations, r1.evaluations)
            );
            assert_eq!(t, t1);
        }
    }

    #[test]
    fn vector_units_agree_bit_for_bit_and_with_naive_sums() {
        // 300 columns: a full tile of 256 and a partial one ending in a partial group of
        // lanes, and a partial strip of 12; 301 rows: a last block of 45, an odd count.
        let data = blobs(301, 300, 4, 1.0, 3);
        let params = LogisticParams {
            reg: 0.1,
            elastic_net: 0.2,
            ..LogisticParams::default()
        };
        let k = 4;
        let mut problem = Problem::new(&data.x, data.dim, &data.y, k, &params);
        let mut rng = Rng(11);
        let theta: Vec<f64> = (0..problem.num_params())
            .map(|_| rng.uniform() - 0.5)
            .collect();
        problem.isa = Isa::Generic;
        let mut grad = vec![0.0; theta.len()];
        let f = problem.eval(&theta, &mut grad);
        let units: Vec<Isa> = crate::engine::cpu::Simd::available_paths()
            .into_iter()
            .map(Isa::of)
            .collect();
        eprintln!("vector units compared with the portable kernels: {units:?}");
        for isa in units {
            problem.isa = isa;
            let mut grad_isa = vec![0.0; theta.len()];
            let f_isa = problem.eval(&theta, &mut grad_isa);
            assert_eq!(f.to_bits(), f_isa.to_bits(), "{isa:?}");
            assert!(
                grad.iter()
                    .zip(&grad_isa)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }

        // Straightforward evaluation of the same objective and gradient.
        let (mean, std) = data.mean_std();
        let d = data.dim;
        let (mut f_naive, mut g_naive) = (0.0, vec![0.0; theta.len()]);
        for i in 0..data.n() {
            let z: Vec<f64> = (0..d)
                .map(|j| (f64::from(data.row(i)[j]) - mean[j]) / std[j])
                .collect();
            let mut p: Vec<f64> = (0..k)
                .map(|c| theta[k * d + c] + (0..d).map(|j| theta[c * d + j] * z[j]).sum::<f64>())
                .collect();
            let lse = p.iter().map(|v| v.exp()).sum::<f64>().ln();
            f_naive += (lse - p[data.y[i]]) / data.n() as f64;
            softmax_in_place(&mut p);
            p[data.y[i]] -= 1.0;
            for c in 0..k {
                for j in 0..d {
                    g_naive[c * d + j] += p[c] * z[j] / data.n() as f64;
                }
                g_naive[k * d + c] += p[c] / data.n() as f64;
            }
        }
        let l2 = 0.1 * 0.8;
        for i in 0..k * d {
            f_naive += 0.5 * l2 * theta[i] * theta[i];
            g_naive[i] += l2 * theta[i];
        }
        assert!(
            (f - f_naive).abs() < 1e-12 * f_naive.abs(),
            "{f} vs {f_naive}"
        );
        assert!(
            max_abs_diff(&grad, &g_naive) < 1e-12,
            "{}",
            max_abs_diff(&grad, &g_naive)
        );
    }

    #[test]
    fn rejects_bad_input() {
        let x = [0.0f32, 1.0, 2.0, 3.0];
        let y = [0usize, 1];
        let ok = LogisticParams::default();
        let err = |x: &[f32], dim: usize, y: &[usize], k: usize, p: &LogisticParams| {
            let e = fit(x, dim, y, k, p, |_, _| {}).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        assert!(err(&x, 2, &y, 1, &ok).contains("at least 2 classes"));
        assert!(err(&[], 2, &[], 2, &ok).contains("no training rows"));
        assert!(err(&x, 0, &y, 2, &ok).contains("dimension is 0"));
        assert!(err(&x, 3, &y, 2, &ok).contains("rows of dimension 3"));
        assert!(err(&x[..3], 2, &y, 2, &ok).contains("do not make"));
        assert!(err(&x, 2, &[0, 2], 2, &ok).contains("label 2 of row 1"));
        assert!(err(&[0.0, f32::NAN, 2.0, 3.0], 2, &y, 2, &ok).contains("row 0, column 1"));
        assert!(err(&[0.0, 1.0, 2.0, f32::INFINITY], 2, &y, 2, &ok).contains("non-finite"));
        let bad = |p: LogisticParams| err(&x, 2, &y, 2, &p);
        assert!(
            bad(LogisticParams {
                reg: -0.1,
                ..ok.clone()
            })
            .contains("reg")
        );
        assert!(
            bad(LogisticParams {
                reg: f64::NAN,
                ..ok.clone()
            })
            .contains("reg")
        );
        for en in [-0.1, 1.5, f64::NAN] {
            let p = LogisticParams {
                elastic_net: en,
                ..ok.clone()
            };
            assert!(bad(p).contains("elastic_net"));
        }
        assert!(
            bad(LogisticParams {
                tol: -1.0,
                ..ok.clone()
            })
            .contains("tol")
        );
        assert!(fit(&x, 2, &y, 2, &ok, |_, _| {}).is_ok());
    }

    #[test]
    fn standardized_fit_ignores_feature_scale() {
        let data = blobs(400, 6, 3, 1.0, 5);
        let params = tight(0.05, 0.3);
        let (m1, r1) = fit_data(&data, 3, &params);
        // Power-of-two factors are exact in floating point, so the standardised problem
        // is the very same one and the result must be exactly rescaled.
        let factors = [1.0f32, 1024.0, 1.0 / 64.0, 8.0, 0.5, 4096.0];
        let mut scaled = Data {
            x: data.x.clone(),
            y: data.y.clone(),
            dim: data.dim,
        };
        for (i, v) in scaled.x.iter_mut().enumerate() {
            *v *= factors[i % 6];
        }
        let (m2, r2) = fit_data(&scaled, 3, &params);
        assert_eq!(r1.objective.to_bits(), r2.objective.to_bits());
        for (i, (a, b)) in m1.coefficients.iter().zip(&m2.coefficients).enumerate() {
            assert_eq!(*a, b * f64::from(factors[i % 6]));
        }
        assert_eq!(m1.intercepts, m2.intercepts);

        // Without standardisation the penalty sees the scale, so the fit changes.
        let raw = LogisticParams {
            standardize: false,
            ..params
        };
        let (m3, _) = fit_data(&data, 3, &raw);
        let (m4, _) = fit_data(&scaled, 3, &raw);
        let p3 = m3.predict_proba(data.row(0));
        let p4 = m4.predict_proba(scaled.row(0));
        assert!(max_abs_diff(&p3, &p4) > 1e-3);
    }

    #[test]
    fn constant_features_get_zero_coefficients() {
        let mut data = blobs(200, 4, 2, 1.0, 9);
        for i in 0..data.n() {
            // 0.1 is inexact, so a variance computed from the mean need not be exactly 0.
            data.x[i * 4 + 2] = 0.1;
        }
        for standardize in [true, false] {
            let params = LogisticParams {
                standardize,
                ..LogisticParams::default()
            };
            let (model, report) = fit_data(&data, 2, &params);
            assert!(report.objective.is_finite());
            assert_eq!(model.coefficients[2], 0.0);
            assert_eq!(model.coefficients[4 + 2], 0.0);
            assert!(model.coefficients.iter().filter(|v| **v != 0.0).count() == 6);
        }
    }

    #[test]
    fn callback_sees_every_iteration_and_objective_decreases() {
        let data = blobs(300, 10, 4, 1.0, 1);
        let mut trace = Vec::new();
        let params = LogisticParams {
            reg: 0.02,
            elastic_net: 0.5,
            ..LogisticParams::default()
        };
        let (_, report) = fit(&data.x, 10, &data.y, 4, &params, |i, f| trace.push((i, f))).unwrap();
        assert_eq!(trace.len(), report.iterations);
        assert!(trace.iter().enumerate().all(|(n, &(i, _))| i == n + 1));
        assert!(trace.windows(2).all(|w| w[1].1 <= w[0].1));
        assert_eq!(trace.last().unwrap().1, report.objective);
        assert!(report.evaluations > report.iterations);
    }

    #[test]
    fn max_iter_bounds_the_work() {
        let data = blobs(300, 10, 4, 1.0, 1);
        for max_iter in [0, 3] {
            let params = LogisticParams {
                max_iter,
                ..tight(0.01, 0.0)
            };
            let (model, report) = fit_data(&data, 4, &params);
            assert_eq!(report.iterations, max_iter);
            assert!(!report.converged);
            assert!(model.coefficients.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn strong_lasso_leaves_only_class_priors() {
        let data = blobs(300, 5, 3, 1.0, 2);
        let (model, report) = fit_data(&data, 3, &tight(10.0, 1.0));
        assert!(report.converged);
        assert!(model.coefficients.iter().all(|&v| v == 0.0));
        // Then the optimum is the intercept-only model: intercepts = log class frequencies.
        let mut counts = [0.0f64; 3];
        for &c in &data.y {
            counts[c] += 1.0;
        }
        for c in 1..3 {
            let got = model.intercepts[c] - model.intercepts[0];
            let want = (counts[c] / counts[0]).ln();
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn binary_ridge_is_antisymmetric() {
        // K = 2 in the multinomial form: with an L2 penalty the two rows are opposite.
        let data = blobs(200, 5, 2, 2.0, 4);
        let (model, _) = fit_data(&data, 2, &tight(0.05, 0.0));
        for j in 0..5 {
            let (a, b) = (model.coefficients[j], model.coefficients[5 + j]);
            assert!(
                a != 0.0 && (a + b).abs() < 1e-8 * a.abs().max(1.0),
                "{a} {b}"
            );
        }
        assert!(accuracy(&model, &data) > 0.6);
    }

    #[test]
    fn degenerate_data_still_returns_a_finite_model() {
        // A class with no rows, and separable data without penalty.
        let data = blobs(100, 3, 2, 0.01, 6);
        let (model, report) = fit_data(&data, 3, &LogisticParams::default());
        assert!(report.objective.is_finite() && report.objective < 1e-3);
        assert!(model.coefficients.iter().all(|v| v.is_finite()));
        assert!(model.intercepts.iter().all(|v| v.is_finite()));
        let p = model.predict_proba(data.row(0));
        assert!(p[2] < 1e-3 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(accuracy(&model, &data), 1.0);
    }

    #[test]
    fn predict_proba_survives_huge_logits() {
        let model = LogisticModel {
            num_classes: 3,
            dim: 2,
            coefficients: vec![1e6, 0.0, -1e6, 0.0, 0.0, 1e-3],
            intercepts: vec![0.0, 5.0, 0.0],
        };
        let p = model.predict_proba(&[1e3, 1.0]);
        assert!(p.iter().all(|v| v.is_finite()));
        assert_eq!(p[0], 1.0);
        assert_eq!(model.predict(&[1e3, 1.0]), 0);
        assert_eq!(model.predict(&[-1e3, 1.0]), 1);
        let q = model.predict_proba(&[0.0, 0.0]);
        assert!((q[1] - 5f64.exp() / (2.0 + 5f64.exp())).abs() < 1e-15);
    }

    #[test]
    fn params_serde_defaults() {
        let p: LogisticParams =
            serde_json::from_str(r#"{"reg": 0.05, "elastic_net": 0.3}"#).unwrap();
        assert_eq!(
            p,
            LogisticParams {
                reg: 0.05,
                elastic_net: 0.3,
                max_iter: 100,
                tol: 1e-6,
                fit_intercept: true,
                standardize: true,
            }
        );
        let back: LogisticParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
