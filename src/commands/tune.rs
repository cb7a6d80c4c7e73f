//! `dltool tune`: cross-validated grid search over a head's hyper-parameters.

use super::Status;
use super::train_head::{self, HeadFlags, ProvenanceFlags};
use crate::features;
use crate::tune::{self, CvData, FoldResult, Metric};
use anyhow::bail;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  dltool tune train.safetensors --head logistic --grid reg=0.01,0.05,0.1 --grid elastic-net=0,0.3,1
  dltool tune train.safetensors --head mlp --grid hidden=256,1024,256:128 --grid dropout=0,0.5 \\
      --seed 1 -o best.safetensors

Every combination of the --grid values is scored by stratified k-fold cross-validation (the \
mean and standard deviation over the folds of the --metric on the held-out fold); all \
(combination, fold) fits run in parallel. The table on stdout is sorted best first, the best \
marked '*'. With -o the best combination is trained again on all rows and saved like \
train-head saves a head.

Grid keys are the train-head flag names. Logistic: reg, elastic-net, max-iter, tol, \
standardize (true/false). MLP: hidden (layer sizes separated by ':', or in brackets: \
hidden=256,256:128 or hidden=[256],[256,128]; 'none' for no hidden layer), lr, epochs, dropout, \
batch-size, activation (relu/sigmoid), patience, validation-fraction, standardize. Parameters outside the \
grid take the flags' values; a grid value overrides its flag.

The result depends only on the data, the grid and --seed (it seeds the folds and the MLP), not \
on --threads. Ctrl-C stops the search and prints the combinations that finished every fold; \
then no head is written and the exit code is 130.

To search fine-tuning's settings (learning rates, cut layer, epochs) on images, give fine-tune \
the same --grid, --folds and --metric flags (see fine-tune --help).")]
pub struct Args {
    /// Training features (CSV or safetensors, as written by featurize or split).
    #[arg(value_name = "FEATURES")]
    pub input: PathBuf,

    #[command(flatten)]
    pub search: super::SearchFlags,

    /// Seed of the fold assignment and of the MLP (initialization, shuffling, dropout).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Train the best combination on all rows and write it here.
    #[arg(short = 'o', long = "output", value_name = "BEST_HEAD")]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub head: HeadFlags,

    #[command(flatten, next_help_heading = "Provenance of CSV features")]
    pub provenance: ProvenanceFlags,

    /// Worker threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// No progress bar and no messages on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `work` on its own thread and waits for it, unless `stop` is set first: then the work
/// is abandoned (it ends with the process) and `None` comes back at once.
fn unless_stopped<T: Send + 'static>(
    stop: &AtomicBool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let handle = std::thread::spawn(work);
    loop {
        if handle.is_finished() {
            return Some(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C sets `stop`; a second one exits at once.
fn on_ctrl_c(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot catch Ctrl-C: {e}"))
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.threads);
    let file = args.input.display().to_string();
    let folds = args.search.folds()?;
    let metric: Metric = args.search.metric();
    let base = args.head.params(args.seed);
    let grid = tune::parse_grid(&args.search.grid, &base).map_err(anyhow::Error::msg)?;
    let combinations = Arc::new(grid.combinations(&base));
    if let Some(output) = &args.output {
        features::check_output_folder(output)?;
        features::refuse_output_over_input(output, [&args.input])?;
    }

    let table = Arc::new(features::read_features(&args.input)?);
    let (classes, y) = train_head::classes_of(&table, &args.input)?;
    let fold_of = tune::stratified_folds(&table.labels, folds, args.seed)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    // Before the search, so that a missing provenance fails now and not after an hour.
    let meta = match &args.output {
        Some(_) => Some(train_head::provenance(
            &args.provenance,
            &table,
            &args.input,
        )?),
        None => None,
    };
    let data = Arc::new(CvData::new(
        &table.data,
        table.dim,
        &y,
        classes.clone(),
        &fold_of,
        folds,
    ));

    let stop = Arc::new(AtomicBool::new(false));
    on_ctrl_c(stop.clone())?;
    let total = combinations.len() * folds;
    let bar = super::progress_bar(
        total as u64,
        args.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} fits (combination x fold)  eta {eta}",
    );
    // A single MLP fit can take minutes: keep the clock moving between finished fits.
    bar.enable_steady_tick(Duration::from_millis(500));
    let finished: Arc<Mutex<Vec<FoldResult>>> = Arc::default();
    let results = {
        let (data, combinations, stop, bar, finished) = (
            data.clone(),
            combinations.clone(),
            stop.clone(),
            bar.clone(),
            finished.clone(),
        );
        unless_stopped(&stop.clone(), move || {
            tune::search(&data, &combinations, &stop, |r| {
                bar.inc(1);
                finished.lock().expect("no panic holds it").push(r.clone());
            })
        })
    };
    bar.finish_and_clear();
    let interrupted = results.is_none();
    let results = results.unwrap_or_else(|| finished.lock().expect("no panic holds it").clone());
    let summary = tune::summarise(combinations.len(), folds, &results, metric);

    if args.search.json {
        let doc = serde_json::json!({
            "input": file,
            "head": base.kind(),
            "metric": metric.name(),
            "folds": folds,
            "seed": args.seed,
            "rows": table.len(),
            "classes": classes,
            "combinations": summary.total,
            "finished": summary.ranked.len(),
            "incomplete": summary.incomplete,
            "interrupted": interrupted,
            "best": summary.best().map(|b| combinations[b.combination].settings_json()),
            "results": tune::results_json(&summary, &combinations),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else if !summary.ranked.is_empty() {
        crate::out!("{}", tune::table(&summary, &combinations))?;
    }

    if interrupted {
        crate::note!(
            "interrupted: {} of {} combinations finished all {} folds; the other {} ({} of them \
             partly done) are not shown{}",
            summary.ranked.len(),
            summary.total,
            folds,
            summary.total - summary.ranked.len(),
            summary.incomplete,
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
            "{file}: every combination failed; the first one: {}",
            first.unwrap_or_default()
        );
    };
    let winner = &combinations[best.combination];
    if !args.quiet {
        crate::note!(
            "best of {} combinations by {}-fold {}: {} ({:.4} ± {:.4})",
            summary.total,
            folds,
            metric.name(),
            winner.describe(),
            best.mean,
            best.std
        );
    }

    if let (Some(output), Some(meta)) = (&args.output, meta) {
        let params = winner.params.clone();
        let (table2, input, quiet) = (table.clone(), args.input.clone(), args.quiet);
        let k = classes.len();
        let fitted = unless_stopped(&stop, move || {
            train_head::fit_with_progress(&params, &table2, &y, k, &input, quiet)
        });
        let Some(fitted) = fitted else {
            crate::note!(
                "interrupted while training the best head on all rows; {} not written",
                output.display()
            );
            return Ok(Status::Interrupted);
        };
        let (model, training) = fitted?;
        train_head::save_head(
            model, training, classes, table.dim, meta, output, args.quiet,
        )?;
    }
    Ok(Status::Ok)
}
