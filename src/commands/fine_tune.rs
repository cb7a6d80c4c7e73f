//! `dltool fine-tune`: train the top of the network and a new classifier on labelled images.

use super::Status;
use crate::backbone::{Backbone, BackboneKind, BackboneOptions};
use crate::finetune::search::{self, FineTunePoint};
use crate::finetune::{self, FineTuneError, FineTuneParams, Prepared, cache};
use crate::inputs::{self, Input};
use crate::tune::{self, Combination, FoldResult, Key};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  dltool fine-tune flowers/ -o flowers.safetensors --weights efficientnet-lite2-9656183e.pth
  dltool fine-tune flowers/ -o flowers.safetensors --weights inception_v3_tf2015.safetensors
  dltool fine-tune flowers/ --weights efficientnet-lite2-9656183e.pth --grid lr=1e-4,3e-4 \\
      --grid from-layer=block10,block14 --folds 3 -o best.safetensors

The network below --from-layer stays frozen: it runs once per image and view (the image and its \
mirror) on the CPU engine, and its activations are cached (--cache-dir; keyed by image path, size \
and modification time, network SHA-256, layer and views), so an interrupted run resumes and a \
second run on the same images starts training at once. The blocks above it (BatchNorm held in \
inference mode) and a new linear classifier on their average pool (from zeros, or with \
--linear-probe from a logistic regression fitted on the pretrained blocks' pooled features) \
train with AdamW: separate learning rates for the pretrained blocks (--lr) and the classifier \
(--head-lr), decoupled weight decay, dropout before the classifier, label smoothing, optional \
mixup of the cached activations, a cosine schedule, and early stopping on a stratified \
validation split; the model with the best validation loss is written (with --refit, a fresh copy \
trained on every image for that many epochs). Ctrl-C keeps the best validated model so far (exit \
code 130).

The model file is a head file: `predict MODEL IMAGES...`, `evaluate MODEL DIR` and `bench` \
accept it, with --weights for the frozen part (checked against the SHA-256 the model records).

With --grid (or --folds) the command searches its own settings as `tune` searches a head's: \
every combination of the --grid values is fine-tuned on K-1 stratified folds of the images (with \
its validation split and early stopping inside them) and scored on the held-out fold, one fit \
after another (one fine-tune uses every core): K x combinations fine-tunes. Grid keys are the \
flag names: lr, head-lr, from-layer, epochs, weight-decay, dropout, train-batch, patience, \
validation-fraction, mixup, label-smoothing; the flags give the rest. Grid points that cut at the same layer share its \
activation cache. The table (or --json) ranks the combinations best first; with -o the best \
is fine-tuned again on all images and written. --seed also seeds the folds.")]
pub struct Args {
    /// Image files or directories (recursive; the first-level subfolder is the label), or - for
    /// paths on stdin.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,

    /// Where to write the model (with --grid: the best combination, trained on all images).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "MODEL",
        required_unless_present_any = ["grid", "folds"]
    )]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub network: super::NetworkChoice,

    /// Train the blocks above this layer [default: mixed_6e for inception_v3 (Mixed_7a..7c
    /// train; mixed_7a: 7b, 7c), block14 for efficientnet_lite2 (blocks 15-20 and the head
    /// conv), block10 for efficientnet_lite0]; EfficientNet-Lite cuts at any stage end.
    #[arg(long, value_name = "LAYER")]
    pub from_layer: Option<String>,

    /// Most epochs (early stopping may end sooner) [default: 3 for EfficientNet-Lite, 8 for
    /// InceptionV3].
    #[arg(long)]
    pub epochs: Option<usize>,

    /// Seed of the validation split, shuffling and dropout: the same seed, images and thread
    /// count give the same model.
    #[arg(long, default_value_t = FineTuneParams::default().seed)]
    pub seed: u64,

    /// Activations per optimizer step.
    #[arg(long, default_value_t = FineTuneParams::default().batch_size)]
    pub train_batch: usize,

    /// Peak learning rate of the pretrained blocks (cosine schedule down to 0).
    #[arg(long, default_value_t = FineTuneParams::default().lr)]
    pub lr: f64,

    /// Peak learning rate of the new classifier.
    #[arg(long, default_value_t = FineTuneParams::default().head_lr)]
    pub head_lr: f64,

    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = FineTuneParams::default().weight_decay)]
    pub weight_decay: f64,

    /// Dropout on the pooled features before the classifier.
    #[arg(long, default_value_t = FineTuneParams::default().dropout)]
    pub dropout: f64,

    /// Fraction of each class held out to pick the best epoch and stop early.
    #[arg(long, default_value_t = FineTuneParams::default().validation_fraction)]
    pub validation_fraction: f64,

    /// Epochs without a better validation loss before stopping.
    #[arg(long, default_value_t = FineTuneParams::default().patience)]
    pub patience: usize,

    /// After the validated run, train a fresh copy on every image (the validation split
    /// included) for the epochs validation chose, and write that model instead (the command
    /// takes 1.5-1.75x as long; on ../shared/flowers it did not beat the validated model).
    #[arg(long)]
    pub refit: bool,

    /// Start the new classifier from a logistic regression fitted on the pretrained top's
    /// pooled features (a linear probe, its L2 strength chosen on the validation split)
    /// instead of zeros.
    #[arg(long)]
    pub linear_probe: bool,

    /// Mixup on the cut layer's activations: each batch blended with a shuffled copy of
    /// itself (targets alike) by a weight drawn from Beta(ALPHA, ALPHA); 0: off.
    #[arg(long, value_name = "ALPHA", default_value_t = FineTuneParams::default().mixup)]
    pub mixup: f64,

    /// Label smoothing of the training targets (0: off).
    #[arg(long, default_value_t = FineTuneParams::default().label_smoothing)]
    pub label_smoothing: f64,

    /// Where activations are cached [default: the user cache dir, dltool/finetune].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Activations kept in memory, in MiB; the rest are read back from the cache files.
    #[arg(long, default_value_t = cache::DEFAULT_MEMORY_LIMIT >> 20, value_name = "MIB")]
    pub cache_memory: u64,

    #[command(flatten)]
    pub run: super::NetworkArgs,

    #[command(
        flatten,
        next_help_heading = "Cross-validated search of these settings"
    )]
    pub search: super::SearchFlags,

    /// No progress bars and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Args {
    fn params(&self) -> FineTuneParams {
        FineTuneParams {
            // Checked against the network once it is known.
            epochs: self.epochs.unwrap_or(FineTuneParams::default().epochs),
            batch_size: self.train_batch,
            lr: self.lr,
            head_lr: self.head_lr,
            weight_decay: self.weight_decay,
            dropout: self.dropout,
            validation_fraction: self.validation_fraction,
            patience: self.patience,
            seed: self.seed,
            refit: self.refit,
            linear_probe: self.linear_probe,
            mixup: self.mixup,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// Refuses a features file where images are expected: it would only fail to decode, one
/// "skipped" line per argument, and the user most likely meant `tune`.
fn refuse_features_files(paths: &[String]) -> anyhow::Result<()> {
    for p in paths {
        let path = Path::new(p);
        if path.is_file() && crate::features::Format::from_extension(path).is_some() {
            bail!(
                "{p}: a features file; fine-tune trains on images (a folder with one subfolder \
                 per class); to search a head on features, use tune"
            );
        }
    }
    Ok(())
}

/// What every fine-tune of a run shares: the images, the network, where its cache is.
struct Setup<'a> {
    args: &'a Args,
    inputs: Vec<Input>,
    weights: PathBuf,
    kind: BackboneKind,
    opts: BackboneOptions,
    cache_root: PathBuf,
    device: burn::prelude::Device,
    stop: Arc<AtomicBool>,
    /// When the network work began, for the final line's total.
    started: std::time::Instant,
}

impl Setup<'_> {
    /// The network cut at `cut` with every image's activations cached; `None` when Ctrl-C
    /// stopped the caching (what was computed is kept for the next run).
    fn prepare(&self, cut: finetune::Cut) -> anyhow::Result<Option<Prepared>> {
        let args = self.args;
        let started = std::time::Instant::now();
        let mut prepared = Prepared::open(
            &self.weights,
            self.kind,
            &self.opts,
            cut,
            &self.cache_root,
            args.cache_memory << 20,
            self.device.clone(),
        )?;
        let bar = super::progress_bar(
            self.inputs.len() as u64,
            args.quiet,
            "{elapsed_precise} [{bar:30}] {pos}/{len} images cached  ETA {eta}",
        );
        let filled = prepared.fill(
            &self.inputs,
            args.run.batch_size as usize,
            args.run.max_pixels,
            &self.stop,
            || bar.inc(1),
        )?;
        bar.finish_and_clear();
        for (path, reason) in &filled.skipped {
            crate::note!("skipped {path}: {reason}");
        }
        if filled.interrupted {
            crate::note!(
                "interrupted: {} image(s) cached in {}; run the same command again to resume",
                filled.reused + filled.computed,
                prepared.cache.dir().display()
            );
            return Ok(None);
        }
        if prepared.cache.images().is_empty() {
            bail!(
                "no image could be read: all {} failed to decode",
                self.inputs.len()
            );
        }
        if !args.quiet {
            crate::note!(
                "activations at {} for {} image(s) x {} views: {} reused, {} computed ({:.0} s), cache {}",
                cut.layer(),
                prepared.cache.images().len(),
                cache::VIEWS.len(),
                filled.reused,
                filled.computed,
                started.elapsed().as_secs_f64(),
                prepared.cache.dir().display()
            );
        }
        Ok(Some(prepared))
    }

    /// Class names and the class index of each cached image, refusing what cannot be trained.
    fn classes(&self, prepared: &Prepared) -> anyhow::Result<(Vec<String>, Vec<usize>)> {
        let counts = finetune::check_classes(
            prepared.cache.images().iter().map(|i| i.label.as_str()),
            &format!("{} (images that decoded)", self.args.paths.join(" ")),
        )?;
        let classes: Vec<String> = counts.into_keys().collect();
        let labels = prepared
            .cache
            .images()
            .iter()
            .map(|i| classes.binary_search(&i.label).expect("class listed"))
            .collect();
        Ok((classes, labels))
    }

    /// Fine-tunes on every cached image (with a progress bar and a line per epoch) and writes
    /// the model to `output`.
    fn train_and_save(
        &self,
        prepared: &mut Prepared,
        params: &FineTuneParams,
        output: &Path,
    ) -> anyhow::Result<Status> {
        let quiet = self.args.quiet;
        let started = std::time::Instant::now();
        let (classes, labels) = self.classes(prepared)?;
        let all: Vec<usize> = (0..labels.len()).collect();
        let bar = super::progress_bar(
            params.epochs as u64,
            quiet,
            "{elapsed_precise} [{bar:30}] epoch {pos}/{len}  {msg}",
        );
        let last_val = std::cell::RefCell::new(String::new());
        let epoch_started = std::cell::Cell::new(started);
        let refitting = std::cell::Cell::new(false);
        let result = prepared.train(
            &all,
            &labels,
            classes.len(),
            params,
            &self.stop,
            |s| {
                if s.refit && !refitting.replace(true) {
                    // The refit's own count of epochs.
                    bar.set_length(s.epochs as u64);
                    bar.set_position(0);
                    last_val.borrow_mut().clear();
                }
                bar.set_message(format!(
                    "{}step {}/{}  loss {:.4}{}",
                    if s.refit { "refit on all images, " } else { "" },
                    s.step,
                    s.steps,
                    s.loss,
                    last_val.borrow()
                ))
            },
            |e| {
                bar.set_position(e.epoch as u64);
                if !e.refit {
                    *last_val.borrow_mut() =
                        format!("  val loss {:.4} acc {:.3}", e.val_loss, e.val_accuracy);
                }
                // Printed, not recorded: the model file stays the same for the same seed.
                let seconds = epoch_started.get().elapsed().as_secs_f64();
                epoch_started.set(std::time::Instant::now());
                if !quiet {
                    bar.suspend(|| {
                        if e.refit {
                            crate::note!(
                                "refit epoch {}: train loss {:.4} ({seconds:.0} s)",
                                e.epoch,
                                e.train_loss
                            )
                        } else {
                            crate::note!(
                                "epoch {}: train loss {:.4}, validation loss {:.4}, accuracy {:.4} ({seconds:.0} s)",
                                e.epoch, e.train_loss, e.val_loss, e.val_accuracy
                            )
                        }
                    });
                }
            },
        );
        bar.finish_and_clear();
        let (net, report) = match result {
            Ok(r) => r,
            Err(FineTuneError::Interrupted) => {
                crate::note!("interrupted before the first epoch finished: nothing saved");
                return Ok(Status::Interrupted);
            }
            Err(e) => return Err(e.into()),
        };
        let interrupted = report.interrupted;
        if !quiet {
            if let Some(p) = &report.probe {
                crate::note!(
                    "the classifier started from a linear probe (L2 {}; validation loss {:.4}, \
                     accuracy {:.4})",
                    p.reg,
                    p.val_loss,
                    p.val_accuracy
                );
            }
            let refit = match &report.refit {
                Some(r) if r.interrupted => {
                    "; the refit on all images was interrupted: the validated model is kept".into()
                }
                Some(r) => format!(
                    "; then refitted on all {} images for {} epoch(s)",
                    r.images, r.epochs
                ),
                None => String::new(),
            };
            crate::note!(
                "{} {}: best epoch {} of {} (validation loss {:.4}, accuracy {:.4} on {} images){refit}, \
                 training {:.0} s, total {:.0} s",
                if interrupted {
                    "interrupted, kept the best model so far in"
                } else {
                    "wrote"
                },
                output.display(),
                report.best_epoch,
                report.epochs_run,
                report.best_val_loss,
                report.best_val_accuracy,
                report.val_images,
                started.elapsed().as_secs_f64(),
                self.started.elapsed().as_secs_f64(),
            );
        }
        let head = prepared.head(net, report, params.clone(), classes);
        head.save(output).map_err(anyhow::Error::msg)?;
        Ok(if interrupted {
            Status::Interrupted
        } else {
            Status::Ok
        })
    }
}

/// `--grid` values checked against the network: every point's cut and parameters.
fn resolve_points(
    combinations: &mut [Combination<FineTunePoint>],
    network: &str,
) -> anyhow::Result<Vec<finetune::Cut>> {
    combinations
        .iter_mut()
        .map(|c| {
            let from_grid = c.settings.iter().any(|s| s.key == Key::FromLayer);
            let described = c.describe();
            c.params.resolve(network).map_err(|e| match e {
                FineTuneError::NotACutPoint {
                    layer,
                    network,
                    points,
                } if from_grid => anyhow::anyhow!(
                    "--grid from-layer: '{layer}' is not a fine-tuning cut point of {network} \
                     (cut points: {})",
                    points.join(", ")
                ),
                FineTuneError::Params(m) if !c.settings.is_empty() => {
                    anyhow::anyhow!("--grid ({described}): {m}")
                }
                e => e.into(),
            })
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    args.params().check()?;
    if args.run.device != crate::device::DeviceChoice::Cpu {
        bail!("--device: fine-tune runs on the CPU only");
    }
    let searching = args.search.given();
    if !searching && (args.search.json || args.search.metric.is_some()) {
        bail!("--json and --metric report a search: give --grid (or --folds) with them");
    }
    refuse_features_files(&args.paths)?;
    let list = inputs::collect(&args.paths, &mut std::io::stdin().lock())?;
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    if list.inputs.is_empty() {
        bail!("no images found in {}", args.paths.join(" "));
    }
    let given = args.paths.join(" ");
    finetune::check_classes(list.inputs.iter().map(|i| i.label.as_str()), &given)?;

    let opts = args.network.options()?;
    let (weights, kind) = Backbone::resolve(&opts)?;
    let base = FineTunePoint {
        layer: match &args.from_layer {
            Some(l) => l.clone(),
            None => finetune::default_cut(kind.name())?.to_string(),
        },
        epochs: args.epochs,
        params: args.params(),
    };
    let grid = tune::parse_grid(&args.search.grid, &base).map_err(anyhow::Error::msg)?;
    let mut combinations = grid.combinations(&base);
    let cuts = resolve_points(&mut combinations, kind.name())?;
    let folds = args.search.folds()?;
    if searching {
        // Before any network runs: the images as listed (decoding may drop some later).
        let labels: Vec<String> = list.inputs.iter().map(|i| i.label.clone()).collect();
        tune::stratified_folds_of(&labels, folds, args.seed, "image")
            .map_err(|e| anyhow::anyhow!("{given}: {e}"))?;
        if let Some(output) = &args.output {
            crate::features::check_output_folder(output)?;
        }
    }
    let device = super::open_device(args.run.device, args.quiet)?;
    let cache_root = match &args.cache_dir {
        Some(d) => d.clone(),
        None => cache::default_dir().context("no cache directory: pass --cache-dir")?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot catch Ctrl-C: {e}"))?;
    }
    let setup = Setup {
        args: &args,
        inputs: list.inputs,
        weights,
        kind,
        opts,
        cache_root,
        device,
        stop,
        started: std::time::Instant::now(),
    };
    if !searching {
        let output = args
            .output
            .as_deref()
            .expect("clap requires -o without --grid");
        let Some(mut prepared) = setup.prepare(cuts[0])? else {
            return Ok(Status::Interrupted);
        };
        return setup.train_and_save(&mut prepared, &combinations[0].params.params, output);
    }
    run_search(&setup, &combinations, &cuts, folds)
}

/// The images of a search, taken from the first cut's cache (the ones that decoded).
struct Folded {
    classes: Vec<String>,
    /// Class index per image.
    labels: Vec<usize>,
    /// Fold per image.
    fold_of: Vec<usize>,
    /// To check that every other cut has the same images.
    paths: Vec<String>,
}

/// The search: the grid points grouped by cut layer (one cache open at a time, filled once),
/// every (point, fold) fit in turn, then the ranking and, with -o, the best point trained on
/// all images.
fn run_search(
    setup: &Setup,
    combinations: &[Combination<FineTunePoint>],
    cuts: &[finetune::Cut],
    folds: usize,
) -> anyhow::Result<Status> {
    let args = setup.args;
    let metric = args.search.metric();
    let given = args.paths.join(" ");
    let mut layers: Vec<finetune::Cut> = Vec::new();
    for cut in cuts {
        if !layers.contains(cut) {
            layers.push(*cut);
        }
    }
    let total = combinations.len() * folds;
    let mut results: Vec<FoldResult> = Vec::new();
    let mut interrupted = false;
    let mut data: Option<Folded> = None;
    let mut prepared: Option<Prepared> = None;
    'search: for &cut in &layers {
        // One network in memory at a time.
        prepared = None;
        let Some(mut p) = setup.prepare(cut)? else {
            interrupted = true;
            break;
        };
        let paths: Vec<String> = p.cache.images().iter().map(|i| i.path.clone()).collect();
        if data.is_none() {
            let (classes, labels) = setup.classes(&p)?;
            let names: Vec<String> = labels.iter().map(|&l| classes[l].clone()).collect();
            let fold_of = tune::stratified_folds_of(&names, folds, args.seed, "image")
                .map_err(|e| anyhow::anyhow!("{given} (images that decoded): {e}"))?;
            data = Some(Folded {
                classes,
                labels,
                fold_of,
                paths,
            });
        } else if data.as_ref().is_some_and(|d| d.paths != paths) {
            bail!(
                "{given}: the images that could be read changed during the search (at {}); run \
                 it again",
                cut.layer()
            );
        }
        let Folded {
            classes,
            labels,
            fold_of,
            ..
        } = data.as_ref().expect("set above");
        for (c, combination) in combinations.iter().enumerate() {
            if cuts[c] != cut {
                continue;
            }
            for fold in 0..folds {
                let params = &combination.params.params;
                let outcome = match search::fit_and_score(
                    &mut p,
                    labels,
                    classes,
                    fold_of,
                    fold,
                    params,
                    &setup.stop,
                ) {
                    Ok(score) => Ok(score),
                    Err(FineTuneError::Interrupted) => {
                        interrupted = true;
                        break 'search;
                    }
                    // A point that diverges (or cannot split its fold) loses; the search goes
                    // on.
                    Err(e @ (FineTuneError::Diverged { .. } | FineTuneError::Params(_))) => {
                        Err(e.to_string())
                    }
                    Err(e) => return Err(e.into()),
                };
                if !args.quiet {
                    let how = match &outcome {
                        Ok(s) => {
                            format!("{} {:.4} ({:.0} s)", metric.name(), metric.of(s), s.seconds)
                        }
                        Err(e) => format!("failed: {e}"),
                    };
                    crate::note!(
                        "[{}/{total}] {} fold {}/{folds}: {how}",
                        results.len() + 1,
                        combination.describe(),
                        fold + 1,
                    );
                }
                results.push(FoldResult {
                    combination: c,
                    fold,
                    outcome,
                });
            }
        }
        prepared = Some(p);
    }
    let summary = tune::summarise(combinations.len(), folds, &results, metric);
    let images = data.as_ref().map_or(0, |d| d.labels.len());
    if args.search.json {
        let doc = serde_json::json!({
            "input": given,
            "head": "fine-tuned",
            "network": setup.kind.name(),
            "metric": metric.name(),
            "folds": folds,
            "seed": args.seed,
            "images": images,
            "classes": data.as_ref().map(|d| d.classes.clone()).unwrap_or_default(),
            "combinations": summary.total,
            "finished": summary.ranked.len(),
            "incomplete": summary.incomplete,
            "interrupted": interrupted,
            "best": summary.best().map(|b| combinations[b.combination].settings_json()),
            "results": tune::results_json(&summary, combinations),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else if !summary.ranked.is_empty() {
        crate::out!("{}", tune::table(&summary, combinations))?;
    }
    if interrupted {
        crate::note!(
            "interrupted: {} of {} combinations finished all {folds} folds{}",
            summary.ranked.len(),
            summary.total,
            match &args.output {
                Some(p) => format!("; {} not written", p.display()),
                None => String::new(),
            }
        );
        return Ok(Status::Interrupted);
    }
    let Some(best) = summary.best() else {
        let first = summary.ranked.first().and_then(|r| r.error.clone());
        bail!(
            "{given}: every combination failed; the first one: {}",
            first.unwrap_or_default()
        );
    };
    let winner = &combinations[best.combination];
    if !args.quiet {
        crate::note!(
            "best of {} combinations by {folds}-fold {}: {} ({:.4} ± {:.4})",
            summary.total,
            metric.name(),
            winner.describe(),
            best.mean,
            best.std
        );
    }
    let Some(output) = &args.output else {
        return Ok(Status::Ok);
    };
    let cut = cuts[best.combination];
    let mut prepared = match prepared.filter(|p| p.cut == cut) {
        Some(p) => p,
        None => match setup.prepare(cut)? {
            Some(p) => p,
            None => return Ok(Status::Interrupted),
        },
    };
    setup.train_and_save(&mut prepared, &winner.params.params, output)
}
