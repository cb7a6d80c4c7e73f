//! `dltool fine-tune`: train the top of the network and a new classifier on labelled images.

use super::Status;
use crate::backbone::{Backbone, BackboneOptions, Pool, Tta};
use crate::finetune::{self, FineTuneParams, FineTunedNet, cache, top::Pretrained};
use crate::head::{Head, HeadModel, TrainingSummary};
use crate::inputs;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  dltool fine-tune flowers/ -o flowers.safetensors --weights efficientnet-lite2-9656183e.pth
  dltool fine-tune flowers/ -o flowers.safetensors --weights inception_v3_tf2015.safetensors

The network below --from-layer stays frozen: it runs once per image and view (the image and its \
mirror) on the CPU engine, and its activations are cached (--cache-dir; keyed by image path, size \
and modification time, network SHA-256, layer and views), so an interrupted run resumes and a \
second run on the same images starts training at once. The blocks above it (BatchNorm held in \
inference mode) and a new linear classifier on their average pool train with AdamW: separate \
learning rates for the pretrained blocks (--lr) and the classifier (--head-lr), decoupled weight \
decay, dropout before the classifier, a cosine schedule, and early stopping on a stratified \
validation split; the model with the best validation loss is kept, also when Ctrl-C stops the \
training (exit code 130).

The model file is a head file: `predict MODEL IMAGES...`, `evaluate MODEL DIR` and `bench` \
accept it, with --weights for the frozen part (checked against the SHA-256 the model records).")]
pub struct Args {
    /// Image files or directories (recursive; the first-level subfolder is the label), or - for
    /// paths on stdin.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,

    /// Where to write the model.
    #[arg(short = 'o', long = "output", value_name = "MODEL")]
    pub output: PathBuf,

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

    /// Where activations are cached [default: the user cache dir, dltool/finetune].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Activations kept in memory, in MiB; the rest are read back from the cache files.
    #[arg(long, default_value_t = cache::DEFAULT_MEMORY_LIMIT >> 20, value_name = "MIB")]
    pub cache_memory: u64,

    #[command(flatten)]
    pub run: super::NetworkArgs,

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
        }
    }
}

/// Images per class, refusing what cannot be trained and validated: unlabelled images, one
/// class, a class too small to give both splits an image.
fn check_classes<'a>(
    labels: impl Iterator<Item = &'a str>,
    what: &str,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in labels {
        if l.is_empty() {
            bail!(
                "{what}: an image has no label (images directly in the folder given); put each \
                 class in its own subfolder"
            );
        }
        *counts.entry(l.to_string()).or_default() += 1;
    }
    if counts.len() < 2 {
        bail!(
            "{what}: only one class ({}): a classifier needs at least two",
            counts.keys().next().map(String::as_str).unwrap_or("none")
        );
    }
    if let Some((class, n)) = counts.iter().find(|(_, n)| **n < 2) {
        bail!(
            "{what}: class '{class}' has {n} image(s); the validation split needs at least 2 per \
             class (one to train on, one to validate)"
        );
    }
    Ok(counts)
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    let params = args.params();
    params.check()?;
    if args.run.device != crate::device::DeviceChoice::Cpu {
        bail!("--device: fine-tune runs on the CPU only");
    }
    let list = inputs::collect(&args.paths, &mut std::io::stdin().lock())?;
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    if list.inputs.is_empty() {
        bail!("no images found in {}", args.paths.join(" "));
    }
    let given = args.paths.join(" ");
    check_classes(list.inputs.iter().map(|i| i.label.as_str()), &given)?;

    let mut opts = BackboneOptions {
        pool: Pool::None,
        tta: Tta::None,
        ..args.network.options()?
    };
    let (weights_path, kind) = Backbone::resolve(&opts)?;
    let layer = match &args.from_layer {
        Some(l) => l.clone(),
        None => finetune::default_cut(kind.name())?.to_string(),
    };
    let cut = finetune::cut_layer(kind, &layer)?;
    opts.layer = Some(cut.layer());
    let params = FineTuneParams {
        epochs: args.epochs.unwrap_or_else(|| finetune::default_epochs(cut)),
        ..params
    };
    let device = super::open_device(args.run.device, args.quiet)?;
    let backbone = Backbone::load_file(&weights_path, kind, &opts, device.clone())?;
    let shape = cut.shape();
    let root = match &args.cache_dir {
        Some(d) => d.clone(),
        None => cache::default_dir().context("no cache directory: pass --cache-dir")?,
    };
    let mut act_cache = cache::ActivationCache::open(
        &root,
        &backbone.meta,
        &backbone.preprocess,
        backbone.dim(),
        args.cache_memory << 20,
    )?;

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

    let started = std::time::Instant::now();
    let bar = super::progress_bar(
        list.inputs.len() as u64,
        args.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images cached  ETA {eta}",
    );
    let filled = finetune::fill(
        &mut act_cache,
        &backbone,
        &list.inputs,
        args.run.batch_size as usize,
        args.run.max_pixels,
        &stop,
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
            act_cache.dir().display()
        );
        return Ok(Status::Interrupted);
    }
    if act_cache.images().is_empty() {
        bail!(
            "no image could be read: all {} failed to decode",
            list.inputs.len()
        );
    }
    let cache_seconds = started.elapsed().as_secs_f64();
    if !args.quiet {
        crate::note!(
            "activations at {} for {} image(s) x {} views: {} reused, {} computed ({cache_seconds:.0} s), cache {}",
            cut.layer(),
            act_cache.images().len(),
            cache::VIEWS.len(),
            filled.reused,
            filled.computed,
            act_cache.dir().display()
        );
    }
    let counts = check_classes(
        act_cache.images().iter().map(|i| i.label.as_str()),
        &format!("{given} (images that decoded)"),
    )?;
    let classes: Vec<String> = counts.into_keys().collect();
    let labels: Vec<usize> = act_cache
        .images()
        .iter()
        .map(|i| classes.binary_search(&i.label).expect("class listed"))
        .collect();

    let flex = burn::prelude::Device::flex();
    let (pretrained, variant) = match cut {
        finetune::Cut::Inception(_) => {
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
        finetune::Cut::Lite { spec, .. } => (
            Pretrained::Lite(Box::new(
                crate::backbones::efficientnet_lite::FoldedLite::load(
                    &backbone.weights_path,
                    Some(spec.name),
                )?,
            )),
            None,
        ),
    };
    let net = FineTunedNet::from_pretrained(pretrained, cut, classes.len(), &flex)?;

    let bar = super::progress_bar(
        params.epochs as u64,
        args.quiet,
        "{elapsed_precise} [{bar:30}] epoch {pos}/{len}  {msg}",
    );
    let last_val = std::cell::RefCell::new(String::new());
    let train_started = std::time::Instant::now();
    let epoch_started = std::cell::Cell::new(train_started);
    let result = finetune::train::train(
        net,
        &mut act_cache,
        shape,
        &labels,
        classes.len(),
        &params,
        &stop,
        |s| {
            bar.set_message(format!(
                "step {}/{}  loss {:.4}{}",
                s.step,
                s.steps,
                s.loss,
                last_val.borrow()
            ))
        },
        |e| {
            bar.set_position(e.epoch as u64);
            *last_val.borrow_mut() =
                format!("  val loss {:.4} acc {:.3}", e.val_loss, e.val_accuracy);
            // Printed, not recorded: the model file stays the same for the same seed.
            let seconds = epoch_started.get().elapsed().as_secs_f64();
            epoch_started.set(std::time::Instant::now());
            if !args.quiet {
                bar.suspend(|| {
                    crate::note!(
                        "epoch {}: train loss {:.4}, validation loss {:.4}, accuracy {:.4} ({seconds:.0} s)",
                        e.epoch, e.train_loss, e.val_loss, e.val_accuracy
                    )
                });
            }
        },
    );
    bar.finish_and_clear();
    let (net, report) = match result {
        Ok(r) => r,
        Err(finetune::FineTuneError::Interrupted) => {
            crate::note!("interrupted before the first epoch finished: nothing saved");
            return Ok(Status::Interrupted);
        }
        Err(e) => return Err(e.into()),
    };
    let summary = TrainingSummary {
        rows: report.train_images,
        train_accuracy: f64::NAN,
        iterations: report.epochs_run,
        converged: !report.interrupted,
    };
    let head = Head {
        feature_dim: backbone.dim(),
        model: HeadModel::FineTuned {
            model: Box::new(finetune::top::FineTuned {
                net,
                cut,
                variant,
                report: report.clone(),
            }),
            params,
        },
        classes,
        provenance: backbone.meta.clone(),
        preprocess: Some(backbone.preprocess),
        dltool_version: env!("CARGO_PKG_VERSION").to_string(),
        training: summary,
    };
    head.save(&args.output).map_err(anyhow::Error::msg)?;
    if !args.quiet {
        crate::note!(
            "{} {}: best epoch {} of {} (validation loss {:.4}, accuracy {:.4} on {} images), \
             training {:.0} s, total {:.0} s",
            if report.interrupted {
                "interrupted, kept the best model so far in"
            } else {
                "wrote"
            },
            args.output.display(),
            report.best_epoch,
            report.epochs_run,
            report.best_val_loss,
            report.best_val_accuracy,
            report.val_images,
            train_started.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(if report.interrupted {
        Status::Interrupted
    } else {
        Status::Ok
    })
}
