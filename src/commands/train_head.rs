//! `dltool train-head`: a classifier on feature rows, saved as a self-describing head file.

use super::Status;
use crate::backbone::{Backbone, Pool, Tta};
use crate::features::{self, FeatureMeta, FeatureTable};
use crate::head::{self, FitProgress, FitReport, Head, HeadModel, HeadParams, TrainingSummary};
use crate::logistic::LogisticParams;
use crate::mlp::{Activation, MlpParams};
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

Both heads standardize features by default (each to zero mean and unit variance over the training \
rows). On InceptionV3 features --no-standardize is often better: standardizing lifts near-constant \
channels to the same scale as informative ones (`dltool tune --grid standardize=true,false` \
decides on your data).

The head file records the classes, the feature dimension and where the features came from \
(backbone, weights SHA-256, layer, pooling). Safetensors features carry that themselves; for CSV \
features it is taken from --weights/--backbone/--layer when one is given (the network is loaded \
and its width checked), else it is recorded as unknown (with --pool/--tta if given): such a head \
predicts from images only with --weights, and only the feature width is checked.")]
pub struct Args {
    /// Training features (CSV or safetensors, as written by featurize or split).
    #[arg(value_name = "FEATURES")]
    pub input: PathBuf,

    /// Where to write the head.
    #[arg(short = 'o', long = "output", value_name = "HEAD")]
    pub output: PathBuf,

    #[command(flatten)]
    pub head: HeadFlags,

    /// MLP: seed of initialization, shuffling, dropout and the validation split.
    #[arg(long, default_value_t = 0, help_heading = "MLP")]
    pub seed: u64,

    #[command(flatten, next_help_heading = "Provenance of CSV features")]
    pub provenance: ProvenanceFlags,

    /// Worker threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

/// The head type and its hyper-parameters, shared by `train-head` and `tune` (where a `--grid`
/// overrides the flags it names).
#[derive(clap::Args, Debug, Clone)]
pub struct HeadFlags {
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
    /// Fit on raw instead of standardized features (logistic and MLP).
    #[arg(long)]
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
}

impl HeadFlags {
    /// The parameters the flags describe; `seed` is the MLP's.
    pub fn params(&self, seed: u64) -> HeadParams {
        match self.kind {
            HeadKind::Logistic => HeadParams::Logistic(LogisticParams {
                reg: self.reg,
                elastic_net: self.elastic_net,
                max_iter: self.max_iter,
                tol: self.tol,
                fit_intercept: !self.no_intercept,
                standardize: !self.no_standardize,
            }),
            HeadKind::Mlp => HeadParams::Mlp(MlpParams {
                hidden: self.hidden.clone(),
                activation: self.activation,
                epochs: self.epochs,
                batch_size: self.batch_size,
                lr: self.lr,
                dropout: self.dropout,
                seed,
                validation_fraction: self.validation_fraction,
                patience: self.patience,
                standardize: !self.no_standardize,
            }),
        }
    }
}

/// Where CSV features came from (safetensors features say it themselves): the flags that make
/// features, under their own heading.
pub type ProvenanceFlags = super::BackboneArgs;

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

/// Where the features in `input` came from: their own metadata, or (CSV) what the flags say.
pub fn provenance(
    flags: &ProvenanceFlags,
    table: &FeatureTable,
    input: &Path,
) -> anyhow::Result<FeatureMeta> {
    if let Some(meta) = &table.meta {
        return Ok(meta.clone());
    }
    let choice = &flags.choice;
    if choice.weights.is_none()
        && choice.backbone.is_none()
        && choice.variant.is_none()
        && flags.layer.is_none()
    {
        // Guessing the default weights could record the wrong network; unknown is honest, and
        // predict then asks for --weights and checks the width. A pooling or augmentation
        // other than the default was given on purpose: that much is recorded.
        crate::note!(
            "{}: CSV features carry no provenance: the head records it as unknown (pass the \
             featurize --weights/--layer to record it); predicting from images will need --weights",
            input.display()
        );
        let given = |name: &str, default: &str| {
            if name == default {
                String::new()
            } else {
                name.to_string()
            }
        };
        return Ok(FeatureMeta {
            backbone: String::new(),
            weights_sha256: String::new(),
            layer: String::new(),
            pool: given(flags.pool.name(), Pool::Avg.name()),
            tta: given(flags.tta.name(), Tta::None.name()),
            dltool_version: String::new(),
        });
    }
    let opts = flags.options();
    // Loading the network checks the weights really are a backbone and names its variant.
    let backbone = Backbone::load(&opts, burn::prelude::Device::flex()).map_err(|e| {
        anyhow::anyhow!(
            "{}: CSV features carry no provenance, and the weights they came from are needed \
             to record it: {e:#}",
            input.display()
        )
    })?;
    if table.dim != backbone.dim() {
        bail!(
            "{}: rows have {} features, but --layer {} --pool {} gives {}: pass the \
             --layer/--pool the features were made with",
            input.display(),
            table.dim,
            backbone.meta.layer,
            opts.pool.name(),
            backbone.dim()
        );
    }
    Ok(backbone.meta)
}

/// Fits a head on every row of `table` (read from `input`) with a progress bar, and says on
/// stderr how the fit ended unless `quiet`.
pub fn fit_with_progress(
    params: &HeadParams,
    table: &FeatureTable,
    y: &[usize],
    num_classes: usize,
    input: &Path,
    quiet: bool,
) -> anyhow::Result<(HeadModel, TrainingSummary)> {
    let (len, template) = match params {
        HeadParams::Logistic(p) => (
            p.max_iter,
            "{elapsed_precise} [{bar:30}] iteration {pos}/{len}  loss {msg}",
        ),
        HeadParams::Mlp(p) => (
            p.epochs,
            "{elapsed_precise} [{bar:30}] epoch {pos}/{len}  {msg}",
        ),
    };
    let bar = super::progress_bar(len as u64, quiet, template);
    let (model, summary, report) = head::fit(
        params,
        &table.data,
        table.dim,
        y,
        num_classes,
        |progress| match progress {
            FitProgress::Iteration {
                iteration,
                objective,
            } => {
                bar.set_position(iteration as u64);
                bar.set_message(format!("{objective:.6}"));
            }
            FitProgress::Epoch(e) => {
                bar.set_position(e.epoch as u64);
                let mut msg = format!("loss {:.5}", e.train_loss);
                if let Some(v) = e.val_loss {
                    msg += &format!("  val loss {v:.5}");
                }
                if let Some(a) = e.val_accuracy {
                    msg += &format!("  val acc {a:.4}");
                }
                bar.set_message(msg);
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    bar.finish_and_clear();
    if !quiet {
        match report {
            FitReport::Logistic(report) => crate::note!(
                "logistic: {} iterations, objective {:.6}{}",
                report.iterations,
                report.objective,
                if report.converged {
                    ""
                } else {
                    " (not converged: raise --max-iter)"
                }
            ),
            FitReport::Mlp(report) => crate::note!(
                "mlp: {} epochs{}, best epoch {}",
                report.epochs_run,
                if report.stopped_early {
                    " (stopped early)"
                } else {
                    ""
                },
                report.best_epoch
            ),
        }
    }
    Ok((model, summary))
}

/// Writes a trained head with everything needed to use it later (classes, feature width,
/// provenance, the backbone's preprocessing, the dltool version).
pub fn save_head(
    model: HeadModel,
    training: TrainingSummary,
    classes: Vec<String>,
    feature_dim: usize,
    provenance: FeatureMeta,
    output: &Path,
    quiet: bool,
) -> anyhow::Result<()> {
    let preprocess = crate::backbone::preprocess_of(&provenance.backbone);
    let head = Head {
        model,
        classes,
        feature_dim,
        provenance,
        preprocess,
        dltool_version: env!("CARGO_PKG_VERSION").into(),
        training,
    };
    head.save(output).map_err(anyhow::Error::msg)?;
    if !quiet {
        crate::note!(
            "trained a {} head on {} rows, {} classes: training accuracy {:.4}; wrote {}",
            head.model.kind(),
            head.training.rows,
            head.classes.len(),
            head.training.train_accuracy,
            output.display()
        );
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.threads);
    // Before the training, not after it.
    features::check_output_folder(&args.output)?;
    features::refuse_output_over_input(&args.output, [&args.input])?;
    let table = features::read_features(&args.input)?;
    let (classes, y) = classes_of(&table, &args.input)?;
    let meta = provenance(&args.provenance, &table, &args.input)?;
    let params = args.head.params(args.seed);
    let (model, summary) =
        fit_with_progress(&params, &table, &y, classes.len(), &args.input, args.quiet)?;
    save_head(
        model,
        summary,
        classes,
        table.dim,
        meta,
        &args.output,
        args.quiet,
    )?;
    Ok(Status::Ok)
}
