//! One module per subcommand: argument parsing and output, over the library.

pub mod bench;
pub mod classify;
pub mod completions;
pub mod evaluate;
pub mod featurize;
pub mod fine_tune;
pub mod info;
pub mod man;
pub mod predict;
pub mod split;
pub mod train_head;
pub mod tune;
pub mod weights;

use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufWriter, IsTerminal, Write};

/// How images go through a network: shared by the commands that run one on images.
#[derive(clap::Args, Debug, Clone)]
pub struct NetworkArgs {
    /// Images per network batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,

    /// Worker threads for decoding and the network [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = crate::image_io::DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,

    /// Where the network runs: cpu, wgpu (a GPU; needs a build with --features wgpu) or auto
    /// (the GPU if there is one, else the CPU with a warning).
    #[arg(long, default_value = "cpu", value_name = "cpu|wgpu|auto")]
    pub device: crate::device::DeviceChoice,
}

/// Which network and weights: shared by the commands that load one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NetworkChoice {
    /// Weights: a file (InceptionV3 safetensors or PyTorch state dict; MobileNet v1 TF.js
    /// model.json), a TF.js model folder, or a fetched registry name [default: $DLTOOL_WEIGHTS,
    /// then assets/weights/, then the user cache].
    #[arg(long, value_name = "FILE")]
    pub weights: Option<std::path::PathBuf>,

    /// Network to run [default: what --weights holds, else inception_v3].
    #[arg(long, value_enum)]
    pub backbone: Option<crate::backbone::BackboneKind>,

    /// InceptionV3 block layout, when the weight file does not say [tf2015|torchvision].
    #[arg(long, value_name = "VARIANT")]
    pub variant: Option<crate::inception_v3::BlockVariant>,
}

/// The network and what features to read from it: shared by every command that runs a network
/// for features (featurize) or records where features came from (train-head, tune).
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    #[command(flatten)]
    pub choice: NetworkChoice,

    /// Layer to read features from: mixed_5d, mixed_6e or mixed_7c for InceptionV3
    /// [default: mixed_7c]; conv_pw_13_relu for MobileNet v1.
    #[arg(long, value_name = "LAYER")]
    pub layer: Option<String>,

    /// Spatial pooling of the layer: avg, max, or none (flatten C*H*W, channel-major).
    #[arg(long, default_value = "avg", value_name = "avg|max|none")]
    pub pool: crate::backbone::Pool,

    /// Test-time augmentation: flip also runs each image mirrored left-right and averages the
    /// two feature vectors (twice the network time; recorded in the output's provenance).
    #[arg(long, default_value = "none", value_name = "none|flip")]
    pub tta: crate::backbone::Tta,
}

impl NetworkChoice {
    /// The options with this choice and the defaults for the rest.
    pub fn options(&self) -> crate::backbone::BackboneOptions {
        crate::backbone::BackboneOptions {
            kind: self.backbone,
            weights: self.weights.clone(),
            variant: self.variant.map(|v| v.name().to_string()),
            ..Default::default()
        }
    }
}

impl BackboneArgs {
    pub fn options(&self) -> crate::backbone::BackboneOptions {
        crate::backbone::BackboneOptions {
            layer: self.layer.clone(),
            pool: self.pool,
            tta: self.tta,
            ..self.choice.options()
        }
    }
}

/// Opens the device `--device` names; unless `quiet`, says which GPU the network runs on (the
/// CPU, the default, goes unsaid).
pub fn open_device(
    choice: crate::device::DeviceChoice,
    quiet: bool,
) -> anyhow::Result<burn::prelude::Device> {
    let (device, description) = crate::device::open(choice).map_err(anyhow::Error::msg)?;
    if !quiet && !crate::device::is_cpu(&device) {
        crate::note!("running on {description}");
    }
    Ok(device)
}

/// How a command ended, for the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The command ran but its result is not complete (nothing featurized, or `--strict` and
    /// something skipped): exit code 2.
    Incomplete,
    /// Ctrl-C stopped the command before it finished: exit code 130, as a shell reports a
    /// process killed by SIGINT.
    Interrupted,
}

/// True when `err` is a closed stdout (`dltool featurize x | head`): not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || e.downcast_ref::<crate::features::FeatureError>()
                .is_some_and(|fe| matches!(fe, crate::features::FeatureError::Io { error, .. } if error.kind() == std::io::ErrorKind::BrokenPipe))
    })
}

/// A failed write to stdout, named as such (a closed pipe is recognised by [`is_broken_pipe`]).
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("cannot write to stdout")
}

/// Refuses `table` (read from `file`) if its features are not the head's kind; when they carry
/// no provenance (CSV) but the head does, says that only their width could be checked: 768
/// columns of MobileNet 0.75 and of InceptionV3's mixed_6e look alike.
pub fn check_head_features(
    head: &crate::head::Head,
    table: &crate::features::FeatureTable,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    head.check_features(table.dim, table.meta.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let h = &head.provenance;
    if table.meta.is_none() && !h.backbone.is_empty() {
        crate::note!(
            "{}: these features carry no provenance: only their width ({}) was checked against \
             the head's ({}, layer {})",
            file.display(),
            table.dim,
            h.backbone,
            h.layer
        );
    }
    Ok(())
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal or `quiet`.
pub fn progress_bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Sets the size of rayon's global pool (decoding, the network, training).
pub fn set_threads(threads: Option<u32>) {
    if let Some(n) = threads {
        // Fails only if a pool already exists (a second command in one process): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global();
    }
}

/// stdout, or a temporary file renamed into place when everything is written.
pub enum Sink {
    Stdout(std::io::StdoutLock<'static>),
    File(BufWriter<crate::features::AtomicFile>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(s) => s.write(buf).map_err(named_stdout),
            Sink::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush().map_err(named_stdout),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The same error, its message saying stdout; the kind stays, so a closed pipe is still one.
fn named_stdout(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("cannot write to stdout: {e}"))
}

impl Sink {
    /// `path`, or stdout for `None` and `-`.
    pub fn open(path: Option<&std::path::Path>) -> anyhow::Result<Sink> {
        Ok(match path {
            Some(p) if p.as_os_str() != "-" => {
                Sink::File(BufWriter::new(crate::features::AtomicFile::create(p)?))
            }
            _ => Sink::Stdout(std::io::stdout().lock()),
        })
    }

    /// Flushes, and for a file renames it into place.
    pub fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Stdout(mut s) => Ok(s.flush().map_err(named_stdout)?),
            Sink::File(f) => {
                let file = f.into_inner().map_err(|e| e.into_error())?;
                Ok(file.commit()?)
            }
        }
    }
}

/// Runs `network` (`dim` floats per image) over the images of `list` and writes what `format`
/// makes of each result to `sink` as soon as it is ready, in input order; reports skipped
/// inputs on stderr and, unless `quiet`, a summary (`{verb} N image(s)`). `Incomplete` when no
/// image got through.
#[allow(clippy::too_many_arguments)]
pub fn stream_images<N, F>(
    backbone: &crate::backbone::Backbone,
    list: &crate::inputs::InputList,
    run: &NetworkArgs,
    quiet: bool,
    verb: &str,
    dim: usize,
    network: N,
    sink: &mut Sink,
    mut format: F,
) -> anyhow::Result<Status>
where
    N: Fn(Vec<f32>, usize) -> Vec<f32>,
    F: FnMut(&str, &[f32], &mut Vec<u8>) -> anyhow::Result<()>,
{
    use crate::featurize::Outcome;
    if let Sink::File(file) = sink {
        crate::features::refuse_output_over_input(
            file.get_ref().path(),
            list.inputs.iter().map(|i| &i.path),
        )?;
    }
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    let progress = progress_bar(
        list.inputs.len() as u64,
        quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
    );
    let (mut done, mut skipped) = (0usize, list.skipped.len());
    let mut line = Vec::new();
    crate::featurize::run_network(
        backbone,
        &list.inputs,
        run.batch_size as usize,
        run.max_pixels,
        dim,
        network,
        |i, outcome| {
            let input = &list.inputs[i];
            match outcome {
                Outcome::Features(values) => {
                    line.clear();
                    format(&input.display, values, &mut line)?;
                    sink.write_all(&line)?;
                    // Each row reaches a pipe as soon as it exists.
                    sink.flush()?;
                    done += 1;
                }
                Outcome::Skipped(reason) => {
                    progress.suspend(|| crate::note!("skipped {}: {reason}", input.display));
                    skipped += 1;
                }
            }
            progress.inc(1);
            Ok(())
        },
    )?;
    progress.finish_and_clear();
    if !quiet {
        crate::note!("{verb} {done} image(s), skipped {skipped}");
    }
    Ok(if done == 0 {
        crate::note!("dltool: no image was {verb}");
        Status::Incomplete
    } else {
        Status::Ok
    })
}
