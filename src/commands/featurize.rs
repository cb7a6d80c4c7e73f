//! `dltool featurize`: images in, one feature row per image out.

use super::Status;
use crate::backbone::Backbone;
use crate::features::{
    self, CsvFeatureWriter, FeatureError, Format, ParquetFeatureWriter, Row,
    SafetensorsFeatureWriter,
};
use crate::featurize::{self, Outcome};
use crate::inputs::{self, Found, Input, Shard};
use crate::journal::{FileStamp, Journal};
use anyhow::{Context, bail};
use indicatif::ProgressBar;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Output: CSV with header path,label,f0,...,fN-1 (RFC 4180), safetensors (tensors `features` \
[N,D] f32, `labels` [N] i32, `path_offsets`/`path_bytes`; label names and provenance in the \
metadata) or Parquet (columns path, label, features as a fixed-size list of float32; provenance \
in the key-value metadata). Rows follow the input order: arguments as given, directories walked \
in sorted order.

Streaming: with - and CSV on stdout, each path is featurized as soon as it arrives and its row \
written and flushed at once, in input order, with memory bounded by the batch size, so a pipe \
that stays open (Spark's RDD.pipe, a queue consumer) gets its rows as it goes. In this mode a \
path given twice gives two rows.

Sharding: --shard K/N keeps block K (from 0) of N contiguous blocks of the input list; the \
outputs of shards 0..N-1 in order are exactly the rows of one run (for CSV, give shards 1..N-1 \
--no-header). With -, the whole list is read before the block is taken. Inputs skipped while \
listing (missing files...) are reported by shard 0 only. An empty shard exits 0 and still \
writes its part (a header-only CSV, an empty safetensors/Parquet table), so N shards leave N \
parts; a folder of parts reads as one table.

With -o FILE, every computed row is also appended to FILE.journal as it is made, so an \
interrupted run loses nothing: run the same command with --resume to reuse the rows of unchanged \
images (same path, size and modification time) and featurize only the rest.

Exit status: 0 if at least one image was featurized, 2 if none was (or, with --strict, if any \
input was skipped), 1 on any other error.")]
pub struct Args {
    /// Image files, directories (recursive; the first-level subfolder is the label) or - to read
    /// newline-separated paths from stdin.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,

    /// Output file; - or none writes CSV to stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,

    /// Output format [default: from OUT's extension (.csv, .safetensors, .parquet), else csv].
    #[arg(long, value_name = "csv|safetensors|parquet")]
    pub format: Option<Format>,

    /// Featurize only block K of N of the input list (K from 0 to N-1), for N workers.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,

    /// CSV without the header line (for appending shards to a first one that has it).
    #[arg(long)]
    pub no_header: bool,

    #[command(flatten)]
    pub net: super::BackboneArgs,

    /// Reuse rows of unchanged images from OUT.journal (left by an earlier or interrupted run).
    #[arg(long)]
    pub resume: bool,

    /// Exit with status 2 if any input was skipped.
    #[arg(long)]
    pub strict: bool,

    /// No progress bar and no summary (skipped inputs are still reported).
    #[arg(short, long)]
    pub quiet: bool,

    #[command(flatten)]
    pub run: super::NetworkArgs,
}

/// Where rows go.
enum Target {
    Stdout,
    File { path: PathBuf, format: Format },
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    let target = match &args.output {
        None => Target::Stdout,
        Some(p) if p.as_os_str() == "-" => Target::Stdout,
        Some(p) => Target::File {
            path: p.clone(),
            format: args
                .format
                .or_else(|| Format::from_extension(p))
                .unwrap_or(Format::Csv),
        },
    };
    match &target {
        Target::Stdout => {
            if let Some(f @ (Format::Safetensors | Format::Parquet)) = args.format {
                bail!("--format {f} needs an output file: add -o FILE.{f}");
            }
            if args.resume {
                bail!("--resume needs an output file (-o FILE): stdout keeps no journal");
            }
        }
        Target::File { format, .. } => {
            if args.no_header && *format != Format::Csv {
                bail!("--no-header is for CSV output; {format} files have no header line");
            }
        }
    }

    // Paths on stdin, going to stdout, unsharded: rows flow out as paths flow in.
    let streaming = matches!(target, Target::Stdout)
        && args.shard.is_none()
        && args.paths.iter().any(|p| p == "-");
    let mut list = if streaming {
        inputs::InputList::default()
    } else {
        inputs::collect(&args.paths, &mut std::io::stdin().lock())
            .context("cannot read paths from stdin")?
    };
    if let Some(shard) = args.shard {
        let total = list.inputs.len();
        let range = shard.range(total);
        list.inputs = list.inputs[range.clone()].to_vec();
        // Listing problems are not part of any block; one shard reports them so that the N
        // logs together say what one run would.
        if shard.index != 0 {
            list.skipped.clear();
        }
        if !args.quiet {
            crate::note!(
                "shard {shard}: images {}..{} of {total}",
                range.start,
                range.end
            );
        }
    }
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    if let Target::File { path, .. } = &target {
        features::refuse_output_over_input(path, list.inputs.iter().map(|i| &i.path))?;
    }

    let opts = args.net.options();
    let device = super::open_device(args.run.device, args.quiet)?;
    let backbone = Backbone::load(&opts, device)?;

    let progress = super::progress_bar(
        if streaming {
            0
        } else {
            list.inputs.len() as u64
        },
        args.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
    );
    let started = Instant::now();
    let mut tally = Tally {
        skipped: list.skipped.len(),
        ..Tally::default()
    };
    let result = match &target {
        Target::Stdout if streaming => stream_to_stdout(&args, &backbone, &progress, &mut tally),
        Target::Stdout => to_stdout(&args, &backbone, &list.inputs, &progress, &mut tally),
        Target::File { path, format } => to_file(
            &args,
            &backbone,
            &list.inputs,
            path,
            *format,
            &progress,
            &mut tally,
        ),
    };
    progress.finish_and_clear();
    result?;

    let featurized = tally.computed + tally.reused;
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        let mut line = format!("featurized {featurized} image(s)");
        if tally.reused > 0 {
            line += &format!(" ({} reused from the journal)", tally.reused);
        }
        line += &format!(", skipped {}", tally.skipped);
        if tally.computed > 0 {
            line += &format!(
                ", in {secs:.1} s ({:.2} images/s)",
                tally.computed as f64 / secs
            );
        }
        crate::note!("{line}");
    }
    let empty_shard = args.shard.is_some() && list.inputs.is_empty();
    if empty_shard {
        if !args.quiet {
            crate::note!("dltool: this shard is empty (more shards than images); nothing to do");
        }
    } else if featurized == 0 {
        crate::note!("dltool: no image was featurized");
        return Ok(Status::Incomplete);
    }
    if args.strict && tally.skipped > 0 {
        crate::note!(
            "dltool: {} input(s) skipped and --strict is set",
            tally.skipped
        );
        return Ok(Status::Incomplete);
    }
    Ok(Status::Ok)
}

#[derive(Default)]
struct Tally {
    computed: usize,
    reused: usize,
    skipped: usize,
}

fn report_skip(progress: &ProgressBar, display: &str, reason: &str) {
    progress.suspend(|| crate::note!("skipped {display}: {reason}"));
}

fn to_stdout(
    args: &Args,
    backbone: &Backbone,
    inputs: &[Input],
    progress: &ProgressBar,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut out = StdoutRows::start(args, backbone)?;
    featurize::run(
        backbone,
        inputs,
        args.run.batch_size as usize,
        args.run.max_pixels,
        |i, outcome| out.emit(&inputs[i], outcome, progress, tally),
    )
}

/// Featurizes paths as they arrive on stdin (and the other PATH arguments, in order); see
/// "Streaming" in the help.
fn stream_to_stdout(
    args: &Args,
    backbone: &Backbone,
    progress: &ProgressBar,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut out = StdoutRows::start(args, backbone)?;
    // A few batches of paths may wait; the reader blocks beyond that, which bounds memory.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Found>(2 * args.run.batch_size as usize);
    let read_error = std::sync::Arc::new(std::sync::Mutex::new(None));
    let paths = args.paths.clone();
    let reader_error = read_error.clone();
    // Not scoped: if stdout closes while stdin stays open, the run must be able to end without
    // waiting for a line that may never come.
    std::thread::spawn(move || {
        let result = inputs::for_each(&paths, &mut std::io::stdin().lock(), &mut |found| {
            tx.send(found).is_ok()
        });
        if let Err(e) = result {
            *reader_error.lock().expect("lock") = Some(e);
        }
    });
    featurize::run_stream(
        backbone,
        rx,
        args.run.batch_size as usize,
        args.run.max_pixels,
        |_, item, outcome| match item {
            Found::Input(input) => out.emit(input, outcome, progress, tally),
            Found::Skip(skip) => {
                report_skip(progress, &skip.display, &skip.reason);
                tally.skipped += 1;
                Ok(())
            }
        },
    )?;
    if let Some(e) = read_error.lock().expect("lock").take() {
        return Err(e).context("cannot read paths from stdin");
    }
    Ok(())
}

/// CSV rows to stdout, each written and flushed whole as soon as it exists.
struct StdoutRows {
    stdout: std::io::StdoutLock<'static>,
    line: Vec<u8>,
}

impl StdoutRows {
    fn start(args: &Args, backbone: &Backbone) -> anyhow::Result<StdoutRows> {
        let mut stdout = std::io::stdout().lock();
        if !args.no_header {
            stdout
                .write_all(&features::csv_header(backbone.dim()))
                .and_then(|()| stdout.flush())
                .map_err(super::stdout_error)?;
        }
        Ok(StdoutRows {
            stdout,
            line: Vec::new(),
        })
    }

    fn emit(
        &mut self,
        input: &Input,
        outcome: Outcome,
        progress: &ProgressBar,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        match outcome {
            Outcome::Features(features) => {
                self.line.clear();
                features::format_csv_row(
                    &Row {
                        path: &input.display,
                        label: &input.label,
                        features,
                    },
                    &mut self.line,
                )?;
                // One write and a flush per row: a pipe reader gets whole rows at once, even
                // when a path holds a newline and line buffering would cut the row.
                self.stdout
                    .write_all(&self.line)
                    .and_then(|()| self.stdout.flush())
                    .map_err(super::stdout_error)?;
                tally.computed += 1;
            }
            Outcome::Skipped(reason) => {
                report_skip(progress, &input.display, reason);
                tally.skipped += 1;
            }
        }
        progress.inc(1);
        Ok(())
    }
}

/// A path as the journal knows it: its text when it is UTF-8 (as journals always had it), else
/// `x:` and the hex of its bytes, which no UTF-8 path (absolute: it starts with `/`) can be, so
/// two files whose names differ only in non-UTF-8 bytes never share a row.
fn journal_key(path: &Path) -> String {
    match path.to_str() {
        Some(text) => text.to_string(),
        None => {
            let bytes = path.as_os_str().as_encoded_bytes();
            let mut key = String::with_capacity(2 + 2 * bytes.len());
            key.push_str("x:");
            for b in bytes {
                key.push_str(&format!("{b:02x}"));
            }
            key
        }
    }
}

/// The bytes a safetensors file stores as an input's path: its own (raw) when its name is not
/// UTF-8, else the text shown everywhere.
fn raw_display(input: &Input) -> &[u8] {
    if input.path.to_str().is_none() {
        input.path.as_os_str().as_encoded_bytes()
    } else {
        input.display.as_bytes()
    }
}

/// Deletes a file when dropped (a run's private journal).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The journal kept beside an output file.
pub fn journal_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

fn to_file(
    args: &Args,
    backbone: &Backbone,
    inputs: &[Input],
    output: &Path,
    format: Format,
    progress: &ProgressBar,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    // A FIFO or a device gets the rows, but no journal beside it (in /dev, or next to a pipe
    // a reader is waiting on): the journal lives in the temp folder for this run only.
    let special = features::is_special_output(output);
    if special && args.resume {
        bail!(
            "{}: --resume needs a regular output file (this is a FIFO or a device, which keeps \
             no journal beside it)",
            output.display()
        );
    }
    // Before the journal, whose name would otherwise be the one in the message.
    features::check_output_folder(output)?;
    let journal_file = if special {
        std::env::temp_dir().join(format!(".dltool-{}.journal", std::process::id()))
    } else {
        journal_path(output)
    };
    let _cleanup = special.then(|| RemoveOnDrop(journal_file.clone()));
    if !args.resume {
        match std::fs::remove_file(&journal_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("{}", journal_file.display())),
        }
    }
    let (mut journal, index) = Journal::open_or_create(
        &journal_file,
        backbone.dim(),
        &backbone.meta,
    )
    .map_err(|e| match e {
        FeatureError::JournalMismatch { .. } => anyhow::anyhow!(
            "{e:#}; it was made with other weights, layer, pooling or --tta: run without --resume \
                 to start over"
        ),
        other => other.into(),
    })?;

    // The journal is keyed by the file's canonical path, so `flowers/` and `./flowers` resume
    // each other; the output shows the path as the user spelled it.
    let keys: Vec<String> = inputs
        .iter()
        .map(|i| journal_key(&std::fs::canonicalize(&i.path).unwrap_or_else(|_| i.path.clone())))
        .collect();
    let stamps: Vec<FileStamp> = inputs
        .iter()
        .map(|i| {
            std::fs::metadata(&i.path)
                .and_then(|m| FileStamp::of(&m))
                .unwrap_or(FileStamp::new(0, std::time::UNIX_EPOCH))
        })
        .collect();
    let mut offsets: Vec<Option<u64>> = (0..inputs.len())
        .map(|i| index.fresh(&keys[i], stamps[i]).map(|e| e.offset))
        .collect();
    let todo: Vec<usize> = (0..inputs.len())
        .filter(|&i| offsets[i].is_none())
        .collect();
    tally.reused = inputs.len() - todo.len();
    progress.inc(tally.reused as u64);
    if tally.reused > 0 && !args.quiet {
        progress.suspend(|| {
            crate::note!(
                "resuming: {} row(s) reused from {}",
                tally.reused,
                journal_file.display()
            )
        });
    }

    let todo_inputs: Vec<Input> = todo.iter().map(|&i| inputs[i].clone()).collect();
    featurize::run(
        backbone,
        &todo_inputs,
        args.run.batch_size as usize,
        args.run.max_pixels,
        |j, outcome| {
            let i = todo[j];
            match outcome {
                Outcome::Features(features) => {
                    let row = Row {
                        path: &keys[i],
                        label: &inputs[i].label,
                        features,
                    };
                    offsets[i] = Some(journal.append(&row, stamps[i])?);
                    tally.computed += 1;
                }
                Outcome::Skipped(reason) => {
                    report_skip(progress, &inputs[i].display, reason);
                    tally.skipped += 1;
                }
            }
            progress.inc(1);
            Ok(())
        },
    )?;

    let done: Vec<(usize, u64)> = offsets
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.map(|o| (i, o)))
        .collect();
    // An empty shard still writes its part (header-only CSV, empty table), so that N shards
    // always leave N parts; a run whose images all failed leaves any earlier output alone.
    if done.is_empty() && !(args.shard.is_some() && inputs.is_empty()) {
        return Ok(());
    }
    write_output(
        output,
        format,
        !args.no_header,
        backbone,
        inputs,
        &done,
        &mut journal,
    )
}

/// Writes the rows named by `done` (input index, journal offset), in input order, to a
/// temporary file renamed over `output`.
fn write_output(
    output: &Path,
    format: Format,
    csv_header: bool,
    backbone: &Backbone,
    inputs: &[Input],
    done: &[(usize, u64)],
    journal: &mut Journal,
) -> anyhow::Result<()> {
    let dim = backbone.dim();
    match format {
        Format::Csv => {
            let mut w = CsvFeatureWriter::create_with_header(output, dim, csv_header)?;
            journal_rows(inputs, done, journal, |row, _| w.write_row(row))?;
            w.commit()?;
        }
        Format::Safetensors => {
            let mut labels: Vec<String> =
                done.iter().map(|&(i, _)| inputs[i].label.clone()).collect();
            labels.sort();
            labels.dedup();
            let path_bytes: u64 = done
                .iter()
                .map(|&(i, _)| raw_display(&inputs[i]).len() as u64)
                .sum();
            let mut w = SafetensorsFeatureWriter::create(
                output,
                done.len(),
                dim,
                path_bytes,
                &labels,
                Some(&backbone.meta),
            )?;
            journal_rows(inputs, done, journal, |row, raw| w.write_row_raw(row, raw))?;
            w.commit()?;
        }
        Format::Parquet => {
            let mut w = ParquetFeatureWriter::create(output, dim, Some(&backbone.meta))?;
            journal_rows(inputs, done, journal, |row, _| w.write_row(row))?;
            w.commit()?;
        }
    }
    Ok(())
}

/// Calls `write` with each row of `done` in order (and its path's raw bytes), its features read
/// back from the journal into one reused buffer.
fn journal_rows(
    inputs: &[Input],
    done: &[(usize, u64)],
    journal: &mut Journal,
    mut write: impl FnMut(&Row, &[u8]) -> Result<(), FeatureError>,
) -> anyhow::Result<()> {
    let mut features = Vec::new();
    for &(i, offset) in done {
        journal.read_features_into(offset, &mut features)?;
        write(
            &Row {
                path: &inputs[i].display,
                label: &inputs[i].label,
                features: &features,
            },
            raw_display(&inputs[i]),
        )?;
    }
    Ok(())
}
