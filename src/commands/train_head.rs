//! `dltool train-head`: a classifier on feature rows, saved as a self-describing head file.

use super::Status;
use crate::backbone::{Backbone, BackboneOptions, Pool};
use crate::features::{self, FeatureMeta, FeatureTable};
use crate::head::{Head, HeadModel, TrainingSummary};
use crate::inception_v3::{BlockVariant, InceptionV3Config, Layer};
use crate::logistic::{self, LogisticParams};
use crate::mlp::{self, Activation, MlpParams};
use anyhow::bail;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadKind {
    Logistic,
    Mlp,
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  dltool train-head train.csv -o head.safetensors --head logistic --reg 0.05 --elastic-net 0.3
  dltool train-head train.csv -o head.safetensors --head mlp --hidden 256,128 --dropout 0.2

Logistic: multinomial softmax regression minimising mean log loss + reg * (elastic_net * L1 + \
(1 - elastic_net) / 2 * L2), MLlib's regParam/elasticNetParam, on standardized features (OWL-QN). \
MLP: hidden layers with relu or sigmoid, softmax output, Adam, early stopping on a stratified \
validation fraction; trained with burn on the CPU.

The head file records the classes, the feature dimension and where the features came from \
(backbone, weights SHA-256, layer, pooling). Safetensors features carry that themselves; for CSV \
features it is taken from --weights/--layer/--pool (the featurize defaults).")]
pub struct Args {
    /// Training features (CSV or safetensors, as written by featurize or split).
    #[arg(value_name = "FEATURES")]
    pub input: PathBuf,

    /// Where to write the head.
    #[arg(short = 'o', long = "output", value_name = "HEAD")]
    pub output: PathBuf,

    /// Head type.
    #[arg(long = "head", value_enum, default_value = "logistic")]
    pub kind: HeadKind,

    /// Logistic: regularization strength (MLlib regParam).
    #[arg(long, default_value_t = 0.0, help_heading = "Logistic")]
    pub reg: f64,
    /// Logistic: L1 share of the penalty, 0 = L2 (ridge), 1 = L1 (lasso) (MLlib elasticNetParam).
    #[arg(long, default_value_t = 0.0, help_heading = "Logistic")]
    pub elastic_net: f64,
    /// Logistic: most solver iterations.
    #[arg(long, default_value_t = 100, help_heading = "Logistic")]
    pub max_iter: usize,
    /// Logistic: stop when the relative change of the objective is below this.
    #[arg(long, default_value_t = 1e-6, help_heading = "Logistic")]
    pub tol: f64,
    /// Logistic: fit on raw instead of standardized features.
    #[arg(long, help_heading = "Logistic")]
    pub no_standardize: bool,
    /// Logistic: no intercept terms.
    #[arg(long, help_heading = "Logistic")]
    pub no_intercept: bool,

    /// MLP: hidden layer sizes, comma-separated (empty for softmax regression).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "256",
        help_heading = "MLP"
    )]
    pub hidden: Vec<usize>,
    /// MLP: hidden activation.
    #[arg(long, default_value = "relu", value_parser = parse_activation, help_heading = "MLP")]
    pub activation: Activation,
    /// MLP: most epochs.
    #[arg(long, default_value_t = 100, help_heading = "MLP")]
    pub epochs: usize,
    /// MLP: mini-batch size.
    #[arg(long, default_value_t = 64, help_heading = "MLP")]
    pub batch_size: usize,
    /// MLP: Adam learning rate.
    #[arg(long, default_value_t = 1e-3, help_heading = "MLP")]
    pub lr: f64,
    /// MLP: dropout after each hidden layer.
    #[arg(long, default_value_t = 0.0, help_heading = "MLP")]
    pub dropout: f64,
    /// MLP: rows held out (stratified) for early stopping; 0 disables it.
    #[arg(long, default_value_t = 0.1, help_heading = "MLP")]
    pub validation_fraction: f64,
    /// MLP: epochs without validation improvement before stopping.
    #[arg(long, default_value_t = 10, help_heading = "MLP")]
    pub patience: usize,
    /// MLP: seed of initialization, shuffling, dropout and the validation split.
    #[arg(long, default_value_t = 0, help_heading = "MLP")]
    pub seed: u64,

    /// For features without provenance (CSV; Parquet from other tools): the weights they were
    /// made with [default: as featurize finds them].
    #[arg(long, value_name = "FILE", help_heading = "Provenance of CSV features")]
    pub weights: Option<PathBuf>,
    /// For CSV features: the layer they were read from.
    #[arg(
        long,
        default_value = "mixed_7c",
        help_heading = "Provenance of CSV features"
    )]
    pub layer: Layer,
    /// For CSV features: their pooling.
    #[arg(
        long,
        default_value = "avg",
        help_heading = "Provenance of CSV features"
    )]
    pub pool: Pool,

    /// Worker threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_activation(s: &str) -> Result<Activation, String> {
    match s {
        "relu" => Ok(Activation::Relu),
        "sigmoid" => Ok(Activation::Sigmoid),
        other => Err(format!(
            "unknown activation '{other}' (expected relu or sigmoid)"
        )),
    }
}

/// Class names (sorted) and each row's class index. Rows without a label, or a single class,
/// cannot train a classifier.
pub fn classes_of(table: &FeatureTable, file: &Path) -> anyhow::Result<(Vec<String>, Vec<usize>)> {
    let unlabelled = table.labels.iter().filter(|l| l.is_empty()).count();
    if unlabelled > 0 {
        bail!(
            "{}: {unlabelled} row(s) have no label (images directly in the featurized folder); \
             put each class in its own subfolder",
            file.display()
        );
    }
    let classes = table.distinct_labels();
    if classes.len() < 2 {
        bail!(
            "{}: only one class ({}) in {} rows: a classifier needs at least two",
            file.display(),
            classes.first().map(String::as_str).unwrap_or(""),
            table.len()
        );
    }
    let index: std::collections::HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let y = table.labels.iter().map(|l| index[l.as_str()]).collect();
    Ok((classes, y))
}

/// Where the features came from: their own metadata, or (CSV) what the flags say.
fn provenance(args: &Args, table: &FeatureTable) -> anyhow::Result<FeatureMeta> {
    if let Some(meta) = &table.meta {
        return Ok(meta.clone());
    }
    let opts = BackboneOptions {
        weights: args.weights.clone(),
        variant: None,
        layer: args.layer,
        pool: args.pool,
    };
    // Loading the network checks the weights really are a backbone and names its variant.
    let backbone = Backbone::load(&opts, burn::prelude::Device::flex()).map_err(|e| {
        anyhow::anyhow!(
            "{}: CSV features carry no provenance, and the weights they came from are needed \
             to record it: {e:#}",
            args.input.display()
        )
    })?;
    if table.dim != backbone.dim() {
        bail!(
            "{}: rows have {} features, but --layer {} --pool {} gives {}: pass the \
             --layer/--pool the features were made with",
            args.input.display(),
            table.dim,
            args.layer.name(),
            args.pool.name(),
            backbone.dim()
        );
    }
    Ok(backbone.meta)
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.threads);
    let table = features::read_features(&args.input)?;
    let (classes, y) = classes_of(&table, &args.input)?;
    let meta = provenance(&args, &table)?;
    let preprocess = meta
        .backbone
        .strip_prefix("inception_v3/")
        .and_then(|v| v.parse::<BlockVariant>().ok())
        .map(|v| InceptionV3Config::new(v).preprocess());
    let k = classes.len();
    let n = table.len();

    let (model, summary) = match args.kind {
        HeadKind::Logistic => {
            let params = LogisticParams {
                reg: args.reg,
                elastic_net: args.elastic_net,
                max_iter: args.max_iter,
                tol: args.tol,
                fit_intercept: !args.no_intercept,
                standardize: !args.no_standardize,
            };
            let bar = super::progress_bar(
                params.max_iter as u64,
                args.quiet,
                "{elapsed_precise} [{bar:30}] iteration {pos}/{len}  loss {msg}",
            );
            let (model, report) =
                logistic::fit(&table.data, table.dim, &y, k, &params, |it, obj| {
                    bar.set_position(it as u64);
                    bar.set_message(format!("{obj:.6}"));
                })
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
            bar.finish_and_clear();
            let correct = (0..n)
                .filter(|&i| argmax(&model.predict_proba(table.row(i))) == y[i])
                .count();
            let summary = TrainingSummary {
                rows: n,
                train_accuracy: correct as f64 / n as f64,
                iterations: report.iterations,
                converged: report.converged,
            };
            if !args.quiet {
                eprintln!(
                    "logistic: {} iterations, objective {:.6}{}",
                    report.iterations,
                    report.objective,
                    if report.converged {
                        ""
                    } else {
                        " (not converged: raise --max-iter)"
                    }
                );
            }
            (HeadModel::Logistic { model, params }, summary)
        }
        HeadKind::Mlp => {
            let params = MlpParams {
                hidden: args.hidden.clone(),
                activation: args.activation,
                epochs: args.epochs,
                batch_size: args.batch_size,
                lr: args.lr,
                dropout: args.dropout,
                seed: args.seed,
                validation_fraction: args.validation_fraction,
                patience: args.patience,
            };
            let bar = super::progress_bar(
                params.epochs as u64,
                args.quiet,
                "{elapsed_precise} [{bar:30}] epoch {pos}/{len}  {msg}",
            );
            let (model, report) = mlp::fit(&table.data, table.dim, &y, k, &params, |e| {
                bar.set_position(e.epoch as u64);
                let mut msg = format!("loss {:.5}", e.train_loss);
                if let Some(v) = e.val_loss {
                    msg += &format!("  val loss {v:.5}");
                }
                if let Some(a) = e.val_accuracy {
                    msg += &format!("  val acc {a:.4}");
                }
                bar.set_message(msg);
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
            bar.finish_and_clear();
            let summary = TrainingSummary {
                rows: n,
                train_accuracy: report.train_accuracy,
                iterations: report.epochs_run,
                converged: true,
            };
            if !args.quiet {
                eprintln!(
                    "mlp: {} epochs{}, best epoch {}",
                    report.epochs_run,
                    if report.stopped_early {
                        " (stopped early)"
                    } else {
                        ""
                    },
                    report.best_epoch
                );
            }
            (HeadModel::Mlp { model, params }, summary)
        }
    };

    let head = Head {
        model,
        classes,
        feature_dim: table.dim,
        provenance: meta,
        preprocess,
        dltool_version: env!("CARGO_PKG_VERSION").into(),
        training: summary,
    };
    head.save(&args.output).map_err(anyhow::Error::msg)?;
    if !args.quiet {
        eprintln!(
            "trained a {} head on {n} rows, {k} classes: training accuracy {:.4}; wrote {}",
            head.model.kind(),
            head.training.train_accuracy,
            args.output.display()
        );
    }
    Ok(Status::Ok)
}

/// Index of the largest value (first on ties).
pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}
