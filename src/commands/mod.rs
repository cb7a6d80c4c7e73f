//! One module per subcommand: argument parsing and output, over the library.

pub mod featurize;

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
