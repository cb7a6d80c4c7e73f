use clap::{CommandFactory, Parser, Subcommand};
use dltool::commands::{self, Status};
use std::process::ExitCode;

/// Transfer learning on images: pretrained-network features, small heads, evaluation and
/// prediction, from the command line.
#[derive(Parser)]
#[command(name = "dltool", version, about, propagate_version = true)]
struct Cli {
    /// Never download weights: a network whose weights are not found locally is an error
    /// (also DLTOOL_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pretrained network over images and write one feature vector per image.
    Featurize(commands::featurize::Args),
    /// Split a feature file into stratified (or path-hashed) parts.
    Split(commands::split::Args),
    /// Train a logistic-regression or MLP head on feature rows.
    TrainHead(commands::train_head::Args),
    /// Train the top of the network and a new classifier on labelled images.
    FineTune(commands::fine_tune::Args),
    /// Cross-validated grid search over a head's hyper-parameters, in parallel.
    Tune(commands::tune::Args),
    /// Measure a head on labelled features: accuracy, F1, log loss, confusion matrix.
    Evaluate(commands::evaluate::Args),
    /// Classify images (backbone + head) or feature rows (head only).
    Predict(commands::predict::Args),
    /// ImageNet classes of images from the pretrained network's own classifier (top-K).
    Classify(commands::classify::Args),
    /// Serve a head (or a network) over HTTP, with dynamic batching.
    Serve(commands::serve::Args),
    /// Known pretrained weights: list, fetch, import, verify, path.
    Weights(commands::weights::Args),
    /// Layers a network offers for features, with shapes: an ONNX file's nodes, or a built-in
    /// network's layers.
    Inspect(commands::inspect::Args),
    /// Speed side by side with PyTorch and ONNX Runtime: images/s, peak RSS, GFLOP/s.
    Bench(commands::bench::Args),
    /// This build and machine: version, features, CPU paths, threads, GPUs, weights cache.
    Info(commands::info::Args),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completions(commands::completions::Args),
    /// Print the man page (or write one per subcommand with --out-dir).
    Man(commands::man::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.offline {
        dltool::registry::set_offline();
    }
    // A forced vector unit this CPU lacks is refused before any kernel runs.
    if let Err(e) = dltool::engine::cpu::from_env() {
        eprintln!("dltool: error: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Featurize(args) => commands::featurize::run(args),
        Command::Split(args) => commands::split::run(args),
        Command::TrainHead(args) => commands::train_head::run(args),
        Command::FineTune(args) => commands::fine_tune::run(args),
        Command::Tune(args) => commands::tune::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Classify(args) => commands::classify::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Weights(args) => commands::weights::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Info(args) => commands::info::run(args),
        Command::Completions(args) => commands::completions::run(args, Cli::command()),
        Command::Man(args) => commands::man::run(args, Cli::command()),
    };
    // stdout is line-buffered: what a last `print!` left must reach it, or fail, here.
    let result = result.and_then(|status| {
        std::io::Write::flush(&mut std::io::stdout().lock()).map_err(commands::stdout_error)?;
        Ok(status)
    });
    match result {
        Ok(Status::Ok) => ExitCode::SUCCESS,
        Ok(Status::Incomplete) => ExitCode::from(2),
        Ok(Status::Interrupted) => ExitCode::from(130),
        Err(err) if commands::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            dltool::note!("dltool: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
