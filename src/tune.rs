//! Hyper-parameter search for heads: Spark's `ParamGridBuilder` + `CrossValidator` on one
//! machine.
//!
//! A grid names values for some of a head's parameters (`reg=0.01,0.1`); every combination of
//! them is scored by stratified k-fold cross-validation, and all (combination, fold) fits run
//! in parallel on rayon's pool. Parameters outside the grid keep the values the caller gives
//! (the `train-head` flags).
//!
//! # Determinism
//!
//! The folds depend only on the labels and the seed, each fit is deterministic for its inputs
//! whatever the thread count (see `logistic` and `mlp`), and results are gathered by
//! (combination, fold) index rather than in completion order, so every score, the ranking and
//! the chosen combination are the same for a seed however many threads run and however they
//! are scheduled. Only the measured times vary.
//!
//! # Threads
//!
//! The outer parallelism is over (combination, fold) pairs. The fits themselves also use rayon
//! (logistic over row blocks, the MLP in burn-flex's kernels and prediction), but on the same
//! pool: rayon runs nested parallel work on the threads it already has, so nothing is
//! oversubscribed, and a core left idle by a finished fold is taken by another pair's blocks.

use crate::head::{self, HeadParams};
use crate::metrics;
use crate::mlp::Activation;
use crate::split::{SplitMix64, fnv1a};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// More combinations than this is surely a typo in a grid (and would take days).
pub const MAX_COMBINATIONS: usize = 100_000;

/// Salt for the fold shuffle, so that folds are not the same permutation `split` used for the
/// same seed.
const FOLD_STREAM: u64 = 0x6b66_6f6c_6473_0001;

/// What cross-validation ranks combinations by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// Weighted F1, MLlib's `MulticlassClassificationEvaluator` default; higher is better.
    F1,
    /// Share of rows classified right; higher is better.
    Accuracy,
    /// Mean log loss of the true class; lower is better.
    #[value(name = "logloss")]
    LogLoss,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::F1 => "f1",
            Metric::Accuracy => "accuracy",
            Metric::LogLoss => "logloss",
        }
    }

    pub fn higher_is_better(self) -> bool {
        self != Metric::LogLoss
    }

    pub fn of(self, score: &FoldScore) -> f64 {
        match self {
            Metric::F1 => score.f1,
            Metric::Accuracy => score.accuracy,
            Metric::LogLoss => score.log_loss,
        }
    }
}

/// A parameter a grid can vary; named like the `train-head` flag that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Reg,
    ElasticNet,
    MaxIter,
    Tol,
    Standardize,
    Hidden,
    Lr,
    Epochs,
    Dropout,
    BatchSize,
    Activation,
    Patience,
    ValidationFraction,
    // Fine-tuning's own (the `fine-tune` flags of the same names).
    HeadLr,
    WeightDecay,
    FromLayer,
    TrainBatch,
    Mixup,
    LabelSmoothing,
}

const LOGISTIC_KEYS: &[Key] = &[
    Key::Reg,
    Key::ElasticNet,
    Key::MaxIter,
    Key::Tol,
    Key::Standardize,
];
const MLP_KEYS: &[Key] = &[
    Key::Hidden,
    Key::Lr,
    Key::Epochs,
    Key::Dropout,
    Key::BatchSize,
    Key::Activation,
    Key::Patience,
    Key::ValidationFraction,
    Key::Standardize,
];
const FINE_TUNE_KEYS: &[Key] = &[
    Key::Lr,
    Key::HeadLr,
    Key::FromLayer,
    Key::Epochs,
    Key::WeightDecay,
    Key::Dropout,
    Key::TrainBatch,
    Key::Patience,
    Key::ValidationFraction,
    Key::Mixup,
    Key::LabelSmoothing,
];

impl Key {
    pub fn name(self) -> &'static str {
        match self {
            Key::Reg => "reg",
            Key::ElasticNet => "elastic-net",
            Key::MaxIter => "max-iter",
            Key::Tol => "tol",
            Key::Standardize => "standardize",
            Key::Hidden => "hidden",
            Key::Lr => "lr",
            Key::Epochs => "epochs",
            Key::Dropout => "dropout",
            Key::BatchSize => "batch-size",
            Key::Activation => "activation",
            Key::Patience => "patience",
            Key::ValidationFraction => "validation-fraction",
            Key::HeadLr => "head-lr",
            Key::WeightDecay => "weight-decay",
            Key::FromLayer => "from-layer",
            Key::TrainBatch => "train-batch",
            Key::Mixup => "mixup",
            Key::LabelSmoothing => "label-smoothing",
        }
    }

    fn from_name(name: &str) -> Option<Key> {
        LOGISTIC_KEYS
            .iter()
            .chain(MLP_KEYS)
            .chain(FINE_TUNE_KEYS)
            .copied()
            .find(|k| k.name() == name)
    }

    /// The keys a head type takes.
    pub fn all_for(params: &HeadParams) -> &'static [Key] {
        match params {
            HeadParams::Logistic(_) => LOGISTIC_KEYS,
            HeadParams::Mlp(_) => MLP_KEYS,
        }
    }

    /// The keys fine-tuning takes.
    pub fn fine_tune() -> &'static [Key] {
        FINE_TUNE_KEYS
    }

    /// Parses one value, checking the range `train-head` (or `fine-tune`) would accept.
    fn parse(self, text: &str) -> Result<Value, String> {
        let number = |ok: fn(f64) -> bool, range: &str| -> Result<Value, String> {
            let v: f64 = text
                .parse()
                .map_err(|_| format!("'{text}' is not a number"))?;
            if ok(v) {
                Ok(Value::Number(v))
            } else {
                Err(format!("{text} is out of range ({range})"))
            }
        };
        let count = |min: usize| -> Result<Value, String> {
            let v: usize = text
                .parse()
                .map_err(|_| format!("'{text}' is not a whole number"))?;
            if v >= min {
                Ok(Value::Count(v))
            } else {
                Err(format!("{text} is out of range (at least {min})"))
            }
        };
        match self {
            Key::Reg => number(|v| v.is_finite() && v >= 0.0, "must be >= 0"),
            Key::ElasticNet => number(|v| (0.0..=1.0).contains(&v), "must be in [0, 1]"),
            Key::Tol => number(|v| v.is_finite() && v >= 0.0, "must be >= 0"),
            Key::Lr | Key::HeadLr => number(|v| v.is_finite() && v > 0.0, "must be > 0"),
            Key::WeightDecay | Key::Mixup => number(|v| v.is_finite() && v >= 0.0, "must be >= 0"),
            Key::LabelSmoothing => number(|v| (0.0..1.0).contains(&v), "must be in [0, 1)"),
            Key::Dropout => number(|v| (0.0..1.0).contains(&v), "must be in [0, 1)"),
            Key::ValidationFraction => number(|v| (0.0..1.0).contains(&v), "must be in [0, 1)"),
            Key::MaxIter | Key::Epochs | Key::BatchSize | Key::TrainBatch => count(1),
            Key::Patience => count(0),
            Key::Standardize => match text {
                "true" => Ok(Value::Flag(true)),
                "false" => Ok(Value::Flag(false)),
                _ => Err(format!("'{text}' is not true or false")),
            },
            Key::Activation => match text {
                "relu" => Ok(Value::Activation(Activation::Relu)),
                "sigmoid" => Ok(Value::Activation(Activation::Sigmoid)),
                _ => Err(format!("'{text}' is not relu or sigmoid")),
            },
            Key::Hidden => parse_sizes(text).map(Value::Sizes),
            // Which layers are cut points depends on the network, known later: the caller
            // checks the names.
            Key::FromLayer => Ok(Value::Text(text.to_string())),
        }
    }
}

/// Hidden layer sizes: `256:128`, `[256,128]`, or `none` / `[]` for no hidden layer.
fn parse_sizes(text: &str) -> Result<Vec<usize>, String> {
    let inner = match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(inner) => inner,
        None if text == "none" => "",
        None => text,
    };
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split([':', ','])
        .map(|s| match s.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(format!(
                "'{text}' is not a list of layer sizes (positive whole numbers, e.g. 256:128)"
            )),
        })
        .collect()
}

/// A parsed grid value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Count(usize),
    Flag(bool),
    Sizes(Vec<usize>),
    Activation(Activation),
    /// A name (fine-tuning's cut layer).
    Text(String),
}

impl Value {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Number(v) => serde_json::json!(v),
            Value::Count(v) => serde_json::json!(v),
            Value::Flag(v) => serde_json::json!(v),
            Value::Sizes(v) => serde_json::json!(v),
            Value::Activation(a) => serde_json::to_value(a).expect("a plain enum"),
            Value::Text(t) => serde_json::json!(t),
        }
    }
}

/// One value of one grid parameter, with the text to show for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub key: Key,
    pub text: String,
    pub value: Value,
}

/// What a grid varies: a head's parameters ([`HeadParams`]) or a fine-tune's
/// (`finetune::search::FineTunePoint`). Combinations, the ranking table and its JSON
/// work the same for both.
pub trait GridParams: Clone {
    /// The keys this kind of parameters takes.
    fn keys(&self) -> &'static [Key];
    /// Its name in messages: "the logistic head".
    fn what(&self) -> String;
    /// Sets one value; `parse_grid` only pairs keys of [`GridParams::keys`] with values of
    /// their kind.
    fn apply(&mut self, setting: &Setting);
    /// All parameters as a JSON object.
    fn to_json(&self) -> serde_json::Value;
}

impl GridParams for HeadParams {
    fn keys(&self) -> &'static [Key] {
        Key::all_for(self)
    }

    fn what(&self) -> String {
        format!("the {} head", self.kind())
    }

    fn to_json(&self) -> serde_json::Value {
        HeadParams::to_json(self)
    }

    fn apply(&mut self, setting: &Setting) {
        let (params, s) = (self, setting);
        match (params, s.key, &s.value) {
            (HeadParams::Logistic(p), Key::Reg, Value::Number(v)) => p.reg = *v,
            (HeadParams::Logistic(p), Key::ElasticNet, Value::Number(v)) => p.elastic_net = *v,
            (HeadParams::Logistic(p), Key::MaxIter, Value::Count(v)) => p.max_iter = *v,
            (HeadParams::Logistic(p), Key::Tol, Value::Number(v)) => p.tol = *v,
            (HeadParams::Logistic(p), Key::Standardize, Value::Flag(v)) => p.standardize = *v,
            (HeadParams::Mlp(p), Key::Hidden, Value::Sizes(v)) => p.hidden = v.clone(),
            (HeadParams::Mlp(p), Key::Lr, Value::Number(v)) => p.lr = *v,
            (HeadParams::Mlp(p), Key::Epochs, Value::Count(v)) => p.epochs = *v,
            (HeadParams::Mlp(p), Key::Dropout, Value::Number(v)) => p.dropout = *v,
            (HeadParams::Mlp(p), Key::BatchSize, Value::Count(v)) => p.batch_size = *v,
            (HeadParams::Mlp(p), Key::Activation, Value::Activation(v)) => p.activation = *v,
            (HeadParams::Mlp(p), Key::Patience, Value::Count(v)) => p.patience = *v,
            (HeadParams::Mlp(p), Key::Standardize, Value::Flag(v)) => p.standardize = *v,
            (HeadParams::Mlp(p), Key::ValidationFraction, Value::Number(v)) => {
                p.validation_fraction = *v
            }
            (params, key, value) => unreachable!(
                "parse_grid pairs keys with their head and values with their key, not {} {} {value:?}",
                params.kind(),
                key.name()
            ),
        }
    }
}

/// One grid parameter and its values, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: Key,
    pub values: Vec<Setting>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grid {
    pub axes: Vec<Axis>,
}

/// One point of the grid: its settings and the full parameters they give.
#[derive(Debug, Clone, PartialEq)]
pub struct Combination<P = HeadParams> {
    pub settings: Vec<Setting>,
    pub params: P,
}

impl<P> Combination<P> {
    /// `reg=0.05 elastic-net=0`, or `(the flags' parameters)` for an empty grid.
    pub fn describe(&self) -> String {
        if self.settings.is_empty() {
            return "(the flags' parameters)".into();
        }
        self.settings
            .iter()
            .map(|s| format!("{}={}", s.key.name(), s.text))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The grid settings as a JSON object, key by key.
    pub fn settings_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .settings
            .iter()
            .map(|s| (s.key.name().to_string(), s.value.to_json()))
            .collect();
        serde_json::Value::Object(map)
    }
}

/// Splits `a,b,[c,d]` at the commas outside brackets.
fn split_list(list: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&list[start..]);
    out
}

/// Parses `--grid KEY=V1,V2,...` arguments for the kind of `base` (a head type, or
/// fine-tuning). Every problem (no `=`, unknown key or one of another kind, a key given twice,
/// an empty list or value, a bad or repeated value, too many combinations) is a one-line error
/// naming the argument.
pub fn parse_grid(specs: &[String], base: &impl GridParams) -> Result<Grid, String> {
    let keys = base.keys();
    let known = || keys.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    let mut grid = Grid::default();
    for spec in specs {
        let Some((name, list)) = spec.split_once('=') else {
            return Err(format!(
                "--grid {spec}: expected KEY=VALUE,VALUE,... (e.g. reg=0.01,0.1)"
            ));
        };
        let name = name.trim();
        let key = match Key::from_name(name) {
            Some(k) if keys.contains(&k) => k,
            Some(_) => {
                return Err(format!(
                    "--grid {spec}: '{name}' is not a parameter of {} (it takes {})",
                    base.what(),
                    known()
                ));
            }
            None => {
                return Err(format!(
                    "--grid {spec}: unknown parameter '{name}' ({} takes {})",
                    base.what(),
                    known()
                ));
            }
        };
        if grid.axes.iter().any(|a| a.key == key) {
            return Err(format!(
                "--grid {spec}: '{name}' is given twice; list all its values in one --grid"
            ));
        }
        if list.trim().is_empty() {
            return Err(format!("--grid {spec}: empty list of values for '{name}'"));
        }
        let mut values: Vec<Setting> = Vec::new();
        for text in split_list(list) {
            let text = text.trim();
            if text.is_empty() {
                return Err(format!("--grid {spec}: an empty value in the list"));
            }
            let value = key.parse(text).map_err(|e| format!("--grid {spec}: {e}"))?;
            if let Some(same) = values.iter().find(|s| s.value == value) {
                return Err(format!(
                    "--grid {spec}: {text} is listed twice (as {} already)",
                    same.text
                ));
            }
            let text = match &value {
                Value::Sizes(sizes) if sizes.is_empty() => "none".to_string(),
                Value::Sizes(sizes) => sizes
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
                _ => text.to_string(),
            };
            values.push(Setting { key, text, value });
        }
        grid.axes.push(Axis { key, values });
    }
    let count = grid
        .axes
        .iter()
        .try_fold(1usize, |n, a| n.checked_mul(a.values.len()))
        .filter(|&n| n <= MAX_COMBINATIONS);
    if count.is_none() {
        return Err(format!(
            "--grid: more than {MAX_COMBINATIONS} combinations; use fewer values"
        ));
    }
    Ok(grid)
}

impl Grid {
    /// Every combination, the first axis varying slowest (as nested loops in grid order).
    /// An empty grid gives one combination: `base` itself.
    pub fn combinations<P: GridParams>(&self, base: &P) -> Vec<Combination<P>> {
        let mut out = vec![Combination {
            settings: Vec::new(),
            params: base.clone(),
        }];
        for axis in &self.axes {
            out = out
                .into_iter()
                .flat_map(|c| {
                    axis.values.iter().map(move |s| {
                        let mut next = c.clone();
                        next.params.apply(s);
                        next.settings.push(s.clone());
                        next
                    })
                })
                .collect();
        }
        out
    }
}

/// Stratified k-fold assignment: the fold (in `0..folds`) of each row.
///
/// Each class's rows are shuffled with a generator seeded from `seed` and the class name, then
/// dealt to the folds in turn, the dealing carrying on from where the previous class stopped;
/// so every fold gets `floor` or `ceil` of each class's share and the fold sizes differ by at
/// most one row overall (scikit-learn's `StratifiedKFold` promises the same).
///
/// Errors when `folds < 2` or a class has fewer rows than folds (a fold would lack it).
pub fn stratified_folds(labels: &[String], folds: usize, seed: u64) -> Result<Vec<usize>, String> {
    stratified_folds_of(labels, folds, seed, "row")
}

/// [`stratified_folds`], its errors calling the things folded `unit`s ("image").
pub fn stratified_folds_of(
    labels: &[String],
    folds: usize,
    seed: u64,
    unit: &str,
) -> Result<Vec<usize>, String> {
    if folds < 2 {
        return Err(format!(
            "--folds {folds}: cross-validation needs at least 2 folds"
        ));
    }
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l.as_str()).or_default().push(i);
    }
    if let Some((label, rows)) = by_label.iter().min_by_key(|(_, rows)| rows.len())
        && rows.len() < folds
    {
        return Err(format!(
            "--folds {folds}: class '{label}' has only {} {unit}(s); every class needs at least \
             one {unit} per fold",
            rows.len()
        ));
    }
    let mut fold = vec![0usize; labels.len()];
    let mut next = 0;
    for (label, mut rows) in by_label {
        let mut rng = SplitMix64::new(seed ^ fnv1a(label.as_bytes()) ^ FOLD_STREAM);
        rng.shuffle(&mut rows);
        for r in rows {
            fold[r] = next;
            next = (next + 1) % folds;
        }
    }
    Ok(fold)
}

/// The training and held-out rows of one fold, copied out once and shared by every
/// combination.
#[derive(Debug, Clone)]
pub struct FoldData {
    pub x_train: Vec<f32>,
    pub y_train: Vec<usize>,
    pub x_test: Vec<f32>,
    pub y_test: Vec<usize>,
}

/// A labelled table cut into folds, ready for [`search`].
#[derive(Debug, Clone)]
pub struct CvData {
    pub classes: Vec<String>,
    pub dim: usize,
    pub folds: Vec<FoldData>,
}

impl CvData {
    /// `x` holds `y.len()` rows of `dim` features; `fold_of` is [`stratified_folds`]' output.
    pub fn new(
        x: &[f32],
        dim: usize,
        y: &[usize],
        classes: Vec<String>,
        fold_of: &[usize],
        folds: usize,
    ) -> CvData {
        let folds = (0..folds)
            .into_par_iter()
            .map(|f| {
                let mut d = FoldData {
                    x_train: Vec::new(),
                    y_train: Vec::new(),
                    x_test: Vec::new(),
                    y_test: Vec::new(),
                };
                for (i, (row, &label)) in x.chunks_exact(dim).zip(y).enumerate() {
                    let (xs, ys) = if fold_of[i] == f {
                        (&mut d.x_test, &mut d.y_test)
                    } else {
                        (&mut d.x_train, &mut d.y_train)
                    };
                    xs.extend_from_slice(row);
                    ys.push(label);
                }
                d
            })
            .collect();
        CvData {
            classes,
            dim,
            folds,
        }
    }
}

/// The held-out scores of one fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoldScore {
    pub accuracy: f64,
    pub f1: f64,
    pub log_loss: f64,
    /// Wall time of the fit and the held-out prediction.
    pub seconds: f64,
}

/// The outcome of one (combination, fold) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldResult {
    pub combination: usize,
    pub fold: usize,
    /// A fit can fail (an MLP that diverges at a large learning rate): that combination loses.
    pub outcome: Result<FoldScore, String>,
}

/// Fits combination `c` on fold `f`'s training rows and scores it on the held-out ones.
fn fit_and_score(data: &CvData, params: &HeadParams, f: usize) -> Result<FoldScore, String> {
    let start = Instant::now();
    let fold = &data.folds[f];
    let k = data.classes.len();
    let (model, _, _) = head::fit(params, &fold.x_train, data.dim, &fold.y_train, k, |_| {})?;
    let probs = model.predict_proba(&fold.x_test, fold.y_test.len(), data.dim);
    FoldScore::of(&data.classes, &fold.y_test, &probs, start)
}

impl FoldScore {
    /// Scores held-out class probabilities (`truth.len() x classes`) as `evaluate` does;
    /// `start` is when the fit began.
    pub fn of(
        classes: &[String],
        truth: &[usize],
        probs: &[f64],
        start: Instant,
    ) -> Result<FoldScore, String> {
        let eval = metrics::evaluate(classes, truth, probs)?;
        Ok(FoldScore {
            accuracy: eval.accuracy,
            f1: eval.weighted_f1,
            log_loss: eval.log_loss,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Runs every (combination, fold) pair in parallel on the current rayon pool and returns their
/// results ordered by (combination, fold). `on_result` sees each result as it finishes, from
/// whichever thread ran it. Once `stop` is set no further pair starts, and the pairs that did
/// not run are missing from the result.
pub fn search(
    data: &CvData,
    combinations: &[Combination],
    stop: &AtomicBool,
    on_result: impl Fn(&FoldResult) + Sync,
) -> Vec<FoldResult> {
    let folds = data.folds.len();
    // Combination-major order with single-pair work units: a combination's folds tend to run
    // close together, so an interrupted search has whole combinations to show, and idle
    // threads can steal any one pair.
    (0..combinations.len() * folds)
        .into_par_iter()
        .with_max_len(1)
        .filter_map(|t| {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let (c, f) = (t / folds, t % folds);
            let result = FoldResult {
                combination: c,
                fold: f,
                outcome: fit_and_score(data, &combinations[c].params, f),
            };
            on_result(&result);
            Some(result)
        })
        .collect()
}

/// A combination whose folds all ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// Index into the combinations.
    pub combination: usize,
    /// Per fold, in fold order (empty when `error` is set).
    pub folds: Vec<FoldScore>,
    /// Mean and population standard deviation (scikit-learn's `cv_results_` convention) of the
    /// metric over the folds; NaN when `error` is set.
    pub mean: f64,
    pub std: f64,
    /// Mean wall time per fold.
    pub seconds: f64,
    /// The first fold's error, if any fold failed.
    pub error: Option<String>,
}

/// The finished combinations, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub metric: Metric,
    pub folds: usize,
    /// Combinations with every fold done: successful ones by metric (best first, ties to the
    /// earlier combination), then failed ones in grid order.
    pub ranked: Vec<Ranked>,
    /// Combinations with some but not all folds done (an interrupted search).
    pub incomplete: usize,
    /// All combinations of the grid.
    pub total: usize,
}

impl Summary {
    /// The best successful combination, if any.
    pub fn best(&self) -> Option<&Ranked> {
        self.ranked.first().filter(|r| r.error.is_none())
    }
}

/// Gathers fold results (in any order, possibly not all pairs) into a ranking.
pub fn summarise(total: usize, folds: usize, results: &[FoldResult], metric: Metric) -> Summary {
    let mut by_combination: Vec<Vec<Option<&Result<FoldScore, String>>>> =
        vec![vec![None; folds]; total];
    for r in results {
        by_combination[r.combination][r.fold] = Some(&r.outcome);
    }
    let mut ranked = Vec::new();
    let mut incomplete = 0;
    for (c, outcomes) in by_combination.into_iter().enumerate() {
        let done: Vec<&Result<FoldScore, String>> = outcomes.iter().flatten().copied().collect();
        if done.len() < folds {
            incomplete += usize::from(!done.is_empty());
            continue;
        }
        if let Some(Err(e)) = done.iter().find(|o| o.is_err()) {
            ranked.push(Ranked {
                combination: c,
                folds: Vec::new(),
                mean: f64::NAN,
                std: f64::NAN,
                seconds: f64::NAN,
                error: Some(e.clone()),
            });
            continue;
        }
        let scores: Vec<FoldScore> = done.into_iter().flatten().cloned().collect();
        let values: Vec<f64> = scores.iter().map(|s| metric.of(s)).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let seconds = scores.iter().map(|s| s.seconds).sum::<f64>() / n;
        ranked.push(Ranked {
            combination: c,
            folds: scores,
            mean,
            std,
            seconds,
            error: None,
        });
    }
    ranked.sort_by(|a, b| {
        let (fa, fb) = (a.error.is_some(), b.error.is_some());
        let by_metric = if metric.higher_is_better() {
            b.mean.total_cmp(&a.mean)
        } else {
            a.mean.total_cmp(&b.mean)
        };
        fa.cmp(&fb)
            .then(if fa {
                std::cmp::Ordering::Equal
            } else {
                by_metric
            })
            .then(a.combination.cmp(&b.combination))
    });
    Summary {
        metric,
        folds,
        ranked,
        incomplete,
        total,
    }
}

/// The ranking as an aligned text table: rank (the best marked `*`), one column per grid
/// parameter, the metric's mean and standard deviation over the folds, seconds per fold.
pub fn table<P>(summary: &Summary, combinations: &[Combination<P>]) -> String {
    let metric = summary.metric.name();
    let keys: Vec<&str> = combinations
        .first()
        .map(|c| c.settings.iter().map(|s| s.key.name()).collect())
        .unwrap_or_default();
    let mut header: Vec<String> = vec!["rank".into()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend([format!("{metric} mean"), "std".into(), "s/fold".into()]);
    let numeric_from = 1 + keys.len();

    let mut rows: Vec<Vec<String>> = Vec::new();
    for (i, r) in summary.ranked.iter().enumerate() {
        let best = i == 0 && r.error.is_none();
        let mut row = vec![format!("{}{}", if best { "* " } else { "" }, i + 1)];
        row.extend(
            combinations[r.combination]
                .settings
                .iter()
                .map(|s| s.text.clone()),
        );
        match &r.error {
            None => row.extend([
                format!("{:.4}", r.mean),
                format!("{:.4}", r.std),
                format!("{:.2}", r.seconds),
            ]),
            Some(e) => row.extend(["failed".into(), "-".into(), "-".into(), e.clone()]),
        }
        rows.push(row);
    }

    let columns = header.len();
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .chain([&header[c]])
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let line = |cells: &[String]| -> String {
        let mut out = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c > 0 {
                out.push_str("  ");
            }
            match widths.get(c) {
                // The rank and the numbers right-aligned, parameter values left-aligned.
                Some(&w) if c == 0 || c >= numeric_from => out.push_str(&format!("{cell:>w$}")),
                Some(&w) => out.push_str(&format!("{cell:<w$}")),
                None => out.push_str(cell),
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// The ranking as JSON: one object per finished combination, best first.
pub fn results_json<P: GridParams>(
    summary: &Summary,
    combinations: &[Combination<P>],
) -> serde_json::Value {
    let number = |v: f64| {
        if v.is_finite() {
            serde_json::json!(v)
        } else {
            serde_json::Value::Null
        }
    };
    summary
        .ranked
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let c = &combinations[r.combination];
            let folds: Vec<serde_json::Value> = r
                .folds
                .iter()
                .enumerate()
                .map(|(f, s)| {
                    serde_json::json!({
                        "fold": f,
                        "accuracy": s.accuracy,
                        "f1": s.f1,
                        "log_loss": s.log_loss,
                        "seconds": s.seconds,
                    })
                })
                .collect();
            serde_json::json!({
                "rank": i + 1,
                "grid": c.settings_json(),
                "params": c.params.to_json(),
                "mean": number(r.mean),
                "std": number(r.std),
                "scores": r.folds.iter().map(|s| summary.metric.of(s)).collect::<Vec<_>>(),
                "folds": folds,
                "seconds": number(r.seconds),
                "error": r.error,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logistic::LogisticParams;
    use crate::mlp::MlpParams;

    fn logistic() -> HeadParams {
        HeadParams::Logistic(LogisticParams::default())
    }

    fn mlp() -> HeadParams {
        HeadParams::Mlp(MlpParams::default())
    }

    fn specs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grid_gives_every_combination_in_nested_loop_order() {
        let grid = parse_grid(
            &specs(&[
                "reg=0.01,0.05,0.1",
                "elastic-net=0, 0.3,1",
                "standardize=false",
            ]),
            &logistic(),
        )
        .unwrap();
        let combos = grid.combinations(&logistic());
        assert_eq!(combos.len(), 9);
        let described: Vec<String> = combos.iter().map(|c| c.describe()).collect();
        assert_eq!(
            described[..4],
            [
                "reg=0.01 elastic-net=0 standardize=false",
                "reg=0.01 elastic-net=0.3 standardize=false",
                "reg=0.01 elastic-net=1 standardize=false",
                "reg=0.05 elastic-net=0 standardize=false",
            ]
        );
        let HeadParams::Logistic(p) = &combos[5].params else {
            panic!("a logistic grid gives logistic parameters")
        };
        assert_eq!((p.reg, p.elastic_net, p.standardize), (0.05, 1.0, false));
        // Parameters outside the grid keep the base values.
        assert_eq!(p.max_iter, LogisticParams::default().max_iter);
        assert_eq!(
            combos[5].settings_json(),
            serde_json::json!({"reg": 0.05, "elastic-net": 1.0, "standardize": false})
        );

        let empty = parse_grid(&[], &logistic())
            .unwrap()
            .combinations(&logistic());
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].params, logistic());
    }

    #[test]
    fn mlp_grid_reads_layer_lists_in_both_spellings() {
        let grid = parse_grid(
            &specs(&[
                "hidden=256,512,256:128,[64,32],[],none",
                "activation=relu,sigmoid",
                "lr=1e-3",
                "epochs=5",
                "dropout=0,0.5",
                "batch-size=32",
                "patience=3",
                "validation-fraction=0.2",
            ]),
            &mlp(),
        );
        // `[]` and `none` are the same value.
        let err = grid.unwrap_err();
        assert!(err.contains("listed twice"), "{err}");

        let grid = parse_grid(
            &specs(&["hidden=256,512,256:128,[64,32],[]", "dropout=0,0.5"]),
            &mlp(),
        )
        .unwrap();
        let hidden: Vec<&str> = grid.axes[0]
            .values
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(hidden, ["256", "512", "256:128", "64:32", "none"]);
        let combos = grid.combinations(&mlp());
        assert_eq!(combos.len(), 10);
        let HeadParams::Mlp(p) = &combos[5].params else {
            panic!("an mlp grid gives mlp parameters")
        };
        assert_eq!((p.hidden.as_slice(), p.dropout), (&[256, 128][..], 0.5));
        let HeadParams::Mlp(p) = &combos[8].params else {
            panic!()
        };
        assert!(p.hidden.is_empty());

        let grid = parse_grid(&specs(&["standardize=true,false"]), &mlp()).unwrap();
        let standardize: Vec<bool> = grid
            .combinations(&mlp())
            .iter()
            .map(|c| match &c.params {
                HeadParams::Mlp(p) => p.standardize,
                _ => panic!("an mlp grid gives mlp parameters"),
            })
            .collect();
        assert_eq!(standardize, [true, false]);
    }

    #[test]
    fn bad_grids_are_one_line_errors() {
        let cases: &[(&[&str], &HeadParams, &str)] = &[
            (&["reg"], &logistic(), "expected KEY=VALUE"),
            (&["alpha=1"], &logistic(), "unknown parameter 'alpha'"),
            (
                &["lr=0.1"],
                &logistic(),
                "not a parameter of the logistic head",
            ),
            (&["reg=0.1"], &mlp(), "not a parameter of the mlp head"),
            (&["reg=0.1", "reg=0.2"], &logistic(), "given twice"),
            (&["reg="], &logistic(), "empty list"),
            (&["reg=0.1,,0.2"], &logistic(), "empty value"),
            (&["reg=abc"], &logistic(), "'abc' is not a number"),
            (&["reg=-1"], &logistic(), "out of range"),
            (&["elastic-net=1.5"], &logistic(), "must be in [0, 1]"),
            (&["max-iter=0"], &logistic(), "at least 1"),
            (&["max-iter=2.5"], &logistic(), "not a whole number"),
            (&["standardize=yes"], &logistic(), "not true or false"),
            (&["reg=0.1,0.10"], &logistic(), "listed twice"),
            (&["dropout=1"], &mlp(), "[0, 1)"),
            (&["lr=0"], &mlp(), "must be > 0"),
            (&["activation=tanh"], &mlp(), "not relu or sigmoid"),
            (&["hidden=256:0"], &mlp(), "not a list of layer sizes"),
            (&["hidden=[256,x]"], &mlp(), "not a list of layer sizes"),
        ];
        for (grid, base, needle) in cases {
            let err = parse_grid(&specs(grid), *base).unwrap_err();
            assert!(err.contains(needle), "{grid:?}: '{needle}' not in '{err}'");
            assert!(err.starts_with("--grid"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        // 20^4 = 160 000 combinations.
        let twenty = |f: fn(u32) -> String| (1..=20).map(f).collect::<Vec<_>>().join(",");
        let many = vec![
            format!("reg={}", twenty(|v| format!("{}", v as f64 / 20.0))),
            format!("elastic-net={}", twenty(|v| format!("{}", v as f64 / 20.0))),
            format!("tol={}", twenty(|v| format!("{}", v as f64 / 1e6))),
            format!("max-iter={}", twenty(|v| v.to_string())),
        ];
        assert!(
            parse_grid(&many, &logistic())
                .unwrap_err()
                .contains("combinations")
        );
    }

    fn labels(counts: &[(&str, usize)]) -> Vec<String> {
        // Interleaved, so class rows are not contiguous.
        let mut out = Vec::new();
        let most = counts.iter().map(|c| c.1).max().unwrap();
        for i in 0..most {
            for (name, n) in counts {
                if i < *n {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn folds_are_stratified_balanced_and_seeded() {
        let labels = labels(&[("a", 23), ("b", 50), ("c", 7)]);
        let folds = stratified_folds(&labels, 5, 3).unwrap();
        assert_eq!(folds.len(), labels.len());
        for class in ["a", "b", "c"] {
            let n = labels.iter().filter(|l| *l == class).count();
            for f in 0..5 {
                let in_fold = (0..labels.len())
                    .filter(|&i| labels[i] == class && folds[i] == f)
                    .count();
                assert!(
                    in_fold == n / 5 || in_fold == n.div_ceil(5),
                    "class {class} has {in_fold} rows in fold {f} of 5 ({n} rows)"
                );
            }
        }
        let sizes: Vec<usize> = (0..5)
            .map(|f| folds.iter().filter(|&&x| x == f).count())
            .collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "fold sizes {sizes:?}"
        );
        assert_eq!(folds, stratified_folds(&labels, 5, 3).unwrap());
        assert_ne!(folds, stratified_folds(&labels, 5, 4).unwrap());
    }

    #[test]
    fn folds_need_enough_rows_per_class() {
        let labels = labels(&[("a", 20), ("tiny", 3)]);
        let err = stratified_folds(&labels, 5, 0).unwrap_err();
        assert!(err.contains("class 'tiny' has only 3 row(s)"), "{err}");
        assert!(stratified_folds(&labels, 3, 0).is_ok());
        assert!(
            stratified_folds(&labels, 1, 0)
                .unwrap_err()
                .contains("at least 2")
        );
    }

    /// Three noisy blobs in 6 dimensions, hard enough that parameters change the scores.
    fn blobs(per_class: usize) -> (Vec<f32>, Vec<usize>, Vec<String>) {
        let mut rng = SplitMix64::new(11);
        let (mut x, mut y, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..per_class * 3 {
            let c = i % 3;
            for d in 0..6 {
                let centre = if d % 3 == c { 1.0 } else { 0.0 };
                x.push(centre + 1.5 * (rng.next_f64() as f32 - 0.5));
            }
            y.push(c);
            labels.push(["a", "b", "c"][c].to_string());
        }
        (x, y, labels)
    }

    fn cv(per_class: usize, folds: usize) -> CvData {
        let (x, y, labels) = blobs(per_class);
        let fold_of = stratified_folds(&labels, folds, 7).unwrap();
        CvData::new(
            &x,
            6,
            &y,
            vec!["a".into(), "b".into(), "c".into()],
            &fold_of,
            folds,
        )
    }

    fn without_times(mut results: Vec<FoldResult>) -> Vec<FoldResult> {
        for r in &mut results {
            if let Ok(s) = &mut r.outcome {
                s.seconds = 0.0;
            }
        }
        results
    }

    #[test]
    fn search_is_the_same_on_one_thread_and_many() {
        let data = cv(30, 4);
        let grid = parse_grid(&specs(&["reg=0,0.1,1", "elastic-net=0,1"]), &logistic()).unwrap();
        let combos = grid.combinations(&logistic());
        let mlp_combos = parse_grid(&specs(&["hidden=8,[]", "epochs=3"]), &mlp())
            .unwrap()
            .combinations(&mlp());
        let run = |threads: usize, combos: &[Combination]| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let seen = std::sync::atomic::AtomicUsize::new(0);
            let results = pool.install(|| {
                search(&data, combos, &AtomicBool::new(false), |_| {
                    seen.fetch_add(1, Ordering::Relaxed);
                })
            });
            assert_eq!(seen.into_inner(), combos.len() * 4);
            without_times(results)
        };
        for combos in [&combos, &mlp_combos] {
            let one = run(1, combos);
            assert_eq!(one.len(), combos.len() * 4);
            assert!(one.iter().all(|r| r.outcome.is_ok()), "{one:?}");
            assert_eq!(one, run(3, combos));
        }
        // The grid matters: strong L1 scores differently from no penalty.
        let summary = summarise(combos.len(), 4, &run(2, &combos), Metric::LogLoss);
        let means: Vec<f64> = summary.ranked.iter().map(|r| r.mean).collect();
        assert!(means.windows(2).all(|w| w[0] <= w[1]), "{means:?}");
        assert!(means[0] < means[means.len() - 1], "{means:?}");
    }

    #[test]
    fn stopped_search_runs_nothing_more() {
        let data = cv(10, 3);
        let combos = parse_grid(&specs(&["reg=0,0.1"]), &logistic())
            .unwrap()
            .combinations(&logistic());
        let stop = AtomicBool::new(false);
        let results = search(&data, &combos, &stop, |_| {
            stop.store(true, Ordering::Relaxed)
        });
        // Pairs already started when the flag was set may finish, later ones never start.
        assert!(
            !results.is_empty() && results.len() < 6,
            "{}",
            results.len()
        );
        assert!(search(&data, &combos, &AtomicBool::new(true), |_| {}).is_empty());
    }

    fn score(v: f64) -> Result<FoldScore, String> {
        Ok(FoldScore {
            accuracy: v,
            f1: v,
            log_loss: v,
            seconds: 1.0,
        })
    }

    #[test]
    fn summary_ranks_complete_combinations_and_counts_the_rest() {
        let r = |combination, fold, outcome| FoldResult {
            combination,
            fold,
            outcome,
        };
        let results = vec![
            r(0, 1, score(0.5)),
            r(0, 0, score(0.7)),
            r(1, 0, score(0.9)),
            r(1, 1, score(0.9)),
            r(2, 0, Err("mlp: training diverged".into())),
            r(2, 1, score(0.99)),
            r(3, 0, score(1.0)),
            r(4, 0, score(0.7)),
            r(4, 1, score(0.5)),
        ];
        let s = summarise(6, 2, &results, Metric::Accuracy);
        let order: Vec<usize> = s.ranked.iter().map(|r| r.combination).collect();
        // Ties (0 and 4) go to the earlier combination; the failed one comes last.
        assert_eq!(order, [1, 0, 4, 2]);
        assert_eq!((s.incomplete, s.total), (1, 6));
        assert!((s.ranked[1].mean - 0.6).abs() < 1e-12);
        assert!((s.ranked[1].std - 0.1).abs() < 1e-12);
        assert_eq!(s.ranked[1].folds[0].accuracy, 0.7, "folds in fold order");
        assert_eq!(s.best().unwrap().combination, 1);
        assert_eq!(s.ranked[3].error.as_deref(), Some("mlp: training diverged"));

        let s = summarise(6, 2, &results, Metric::LogLoss);
        let order: Vec<usize> = s.ranked.iter().map(|r| r.combination).collect();
        assert_eq!(order, [0, 4, 1, 2], "lower log loss is better");

        let failed_only = summarise(1, 1, &[r(0, 0, Err("bad".into()))], Metric::F1);
        assert!(failed_only.best().is_none());
    }

    #[test]
    fn table_is_aligned_and_marks_the_best() {
        let combos = parse_grid(&specs(&["reg=0.01,0.5", "elastic-net=0,1"]), &logistic())
            .unwrap()
            .combinations(&logistic());
        let results: Vec<FoldResult> = (0..4)
            .map(|c| FoldResult {
                combination: c,
                fold: 0,
                outcome: if c == 2 {
                    Err("boom".into())
                } else {
                    score(0.5 + c as f64 / 10.0)
                },
            })
            .collect();
        let s = summarise(4, 1, &results, Metric::F1);
        let text = table(&s, &combos);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].contains("reg") && lines[0].contains("f1 mean"),
            "{text}"
        );
        assert!(lines[1].trim_start().starts_with("* 1"), "{text}");
        assert!(
            lines[1].contains("0.5 ") && lines[1].contains("0.8000"),
            "{text}"
        );
        assert!(
            lines[4].contains("failed") && lines[4].ends_with("boom"),
            "{text}"
        );
        // The numeric columns line up: every mean ends where its header does.
        let end = lines[0].find("f1 mean").unwrap() + "f1 mean".len();
        for l in &lines[1..4] {
            assert!(l[..end].ends_with(|c: char| c.is_ascii_digit()), "{text}");
            assert_eq!(l.as_bytes()[end], b' ', "{text}");
        }
        let json = results_json(&s, &combos);
        assert_eq!(json[0]["rank"], 1);
        assert_eq!(json[0]["grid"]["reg"], 0.5);
        assert_eq!(json[0]["scores"], serde_json::json!([0.8]));
        assert_eq!(json[3]["error"], "boom");
        assert!(json[3]["mean"].is_null());
    }
}
