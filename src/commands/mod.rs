//! One module per subcommand: argument parsing and output, over the library.

pub mod bench;
pub mod evaluate;
pub mod featurize;
pub mod predict;
pub mod split;
pub mod train_head;
pub mod weights;

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// How a command ended, for the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The command ran but its result is not complete (nothing featurized, or `--strict` and
    /// something skipped): exit code 2.
    Incomplete,
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
