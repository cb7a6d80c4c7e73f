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
//! (rarely) more passes over the data; [`FitReport::evaluations`] counts the passes. The
//! fit stops as converged when one iteration changes the objective by less than `tol`
//! relative to its value, when the pseudo-gradient is exactly zero, or when not even a
//! steepest-descent step can decrease the objective in floating point.
//!
//! # Determinism
//!
//! Rows are cut into fixed blocks of [`BLOCK_ROWS`]; blocks run in parallel on rayon's
//! pool, and their partial sums are added in block order, so the result is bit-for-bit the
//! same whatever the number of threads. The SIMD kernels keep a fixed lane structure and
//! never fuse multiply-adds, so the vector widths chosen at run time (AVX-512, AVX2 or
//! SSE2 on x86-64) give bit-identical results too.

use std::collections::VecDeque;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Training rows per block: the unit of parallel work and of the ordered reduction.
/// It must not depend on the thread count, or determinism is lost.
pub const BLOCK_ROWS: usize = 128;
/// Blocks computed in parallel before their partial gradients are folded into the total;
/// bounds the memory held by partials (`BLOCKS_PER_WAVE * K * D` doubles).
const BLOCKS_PER_WAVE: usize = 32;
/// Rows processed together by the kernels: one load of a feature tile serves this many rows.
const TILE_ROWS: usize = 4;
/// Feature columns per tile: keeps a `K x TILE_COLS` slice of coefficients or gradient
/// resident in L2 cache while all rows of a block stream past it.
const TILE_COLS: usize = 256;
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
    /// Relative objective change that ends the fit (`tol`); 0 runs all `max_iter`.
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
            .map(|k| {
                let w = self.class_coefficients(k);
                self.intercepts[k]
                    + w.iter()
                        .zip(x)
                        .map(|(&w, &v)| w * f64::from(v))
                        .sum::<f64>()
            })
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

fn argmax(v: &[f64]) -> usize {
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

    let report = owlqn(&problem, &mut theta, params.max_iter, params.tol, &mut on_iter);
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
    if !(params.reg >= 0.0 && params.reg.is_finite()) {
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
    if !(params.tol >= 0.0) {
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
}

impl<'a> Problem<'a> {
    fn new(
        x: &'a [f32],
        dim: usize,
        y: &'a [usize],
        k: usize,
        params: &LogisticParams,
    ) -> Self {
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

    /// Picks the widest vector unit available; all variants compute identical bits.
    fn block(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                return unsafe { self.block_avx512(blk, w, b) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.block_avx2(blk, w, b) };
            }
        }
        self.block_generic(blk, w, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn block_avx512(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        self.block_generic(blk, w, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn block_avx2(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
        self.block_generic(blk, w, b)
    }

    /// Loss, gradient and residual sums of one block of rows. Inlined into each
    /// `target_feature` wrapper so that it is compiled for that vector unit.
    #[inline(always)]
    fn block_generic(&self, blk: usize, w: &[f64], b: &[f64]) -> Sums {
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
                    let dots = dot_tile(&tile, wc);
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

        // Gradient sum_i r_ic z_i, with the same tiling.
        let mut grad = vec![0.0; k * d];
        for j0 in (0..d).step_by(TILE_COLS) {
            let width = TILE_COLS.min(d - j0);
            for i0 in (0..m).step_by(TILE_ROWS) {
                let rows = TILE_ROWS.min(m - i0);
                self.load_tile(start + i0, rows, j0, width, &mut tile);
                for c in 0..k {
                    let mut coef = [0.0; TILE_ROWS];
                    for r in 0..rows {
                        coef[r] = probs[(i0 + r) * k + c];
                    }
                    axpy_tile(&mut grad[c * d + j0..c * d + j0 + width], &coef, &tile);
                }
            }
        }
        Sums { loss, grad, resid }
    }

    /// Standardised features of `rows` rows from `row0`, columns `j0..j0 + width`,
    /// into the first `width` columns of `tile`; missing rows are zero.
    #[inline(always)]
    fn load_tile(
        &self,
        row0: usize,
        rows: usize,
        j0: usize,
        width: usize,
        tile: &mut [[f64; TILE_COLS]; TILE_ROWS],
    ) {
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

/// Dot products of `w` with each row of `tile` (first `w.len()` columns). Each row keeps
/// `LANES` partial sums combined in a fixed order, so vectorisation never changes the bits.
#[inline(always)]
fn dot_tile(tile: &[[f64; TILE_COLS]; TILE_ROWS], w: &[f64]) -> [f64; TILE_ROWS] {
    let len = w.len();
    let (x0, x1, x2, x3) = (
        &tile[0][..len],
        &tile[1][..len],
        &tile[2][..len],
        &tile[3][..len],
    );
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f64; LANES], [0.0; LANES], [0.0; LANES], [0.0; LANES]);
    let chunks = w
        .chunks_exact(LANES)
        .zip(x0.chunks_exact(LANES))
        .zip(x1.chunks_exact(LANES))
        .zip(x2.chunks_exact(LANES))
        .zip(x3.chunks_exact(LANES));
    for ((((wc, c0), c1), c2), c3) in chunks {
        for l in 0..LANES {
            a0[l] += c0[l] * wc[l];
            a1[l] += c1[l] * wc[l];
            a2[l] += c2[l] * wc[l];
            a3[l] += c3[l] * wc[l];
        }
    }
    let main = len - len % LANES;
    for o in main..len {
        a0[o - main] += x0[o] * w[o];
        a1[o - main] += x1[o] * w[o];
        a2[o - main] += x2[o] * w[o];
        a3[o - main] += x3[o] * w[o];
    }
    [fold_lanes(a0), fold_lanes(a1), fold_lanes(a2), fold_lanes(a3)]
}

/// Pairwise sum of the lanes: a fixed order, and a little more accurate than a chain.
#[inline(always)]
fn fold_lanes(mut v: [f64; LANES]) -> f64 {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            v[l] += v[l + half];
        }
        half /= 2;
    }
    v[0]
}

/// `g += sum_r coef[r] * tile[r]` over the first `g.len()` columns.
#[inline(always)]
fn axpy_tile(g: &mut [f64], coef: &[f64; TILE_ROWS], tile: &[[f64; TILE_COLS]; TILE_ROWS]) {
    let len = g.len();
    let (t0, t1, t2, t3) = (&tile[0][..len], &tile[1][..len], &tile[2][..len], &tile[3][..len]);
    for (j, gj) in g.iter_mut().enumerate() {
        *gj += (coef[0] * t0[j] + coef[1] * t1[j]) + (coef[2] * t2[j] + coef[3] * t3[j]);
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
        if !(dot(&dir, &pg) < 0.0) {
            history.pairs.clear();
            for (d, &g) in dir.iter_mut().zip(&pg) {
                *d = -g;
            }
        }
        // Quasi-Newton steps are well scaled; a steepest-descent one is not, so start it
        // at unit length.
        let mut step = if history.pairs.is_empty() {
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
        let change = (objective - value).abs() / value.abs().max(objective.abs()).max(f64::MIN_POSITIVE);
        objective = value;
        iterations += 1;
        on_iter(iterations, objective);
        if change < tol {
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
