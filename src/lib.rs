//! dltool: transfer learning on images from the command line.
//!
//! The pipeline stages live here as a library (`inputs` → `image_io` → `backbone` →
//! `featurize` → `features`); `commands` holds the thin subcommand layers the binary calls.
//! The networks are in `backbones` (one module each, one table), the CPU kernels that know no
//! network in `engine`.

/// `eprintln!` that never panics: when stderr is full or closed (`2>/dev/full`) the message is
/// lost, not the run.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `println!` that returns the error (`anyhow`, saying stdout) instead of panicking: a closed
/// pipe ends the command quietly, a full disk is an error (see `main`).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::commands::stdout_error)
    }};
}

/// `print!` counterpart of [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::commands::stdout_error)
    }};
}

pub mod backbone;
pub mod backbone_set;
pub mod backbones;
pub mod bench;
pub mod burn_ops;
pub mod commands;
pub mod device;
pub mod engine;
pub mod feature_parquet;
pub mod features;
pub mod featurize;
pub mod finetune;
pub mod head;
pub mod image_io;
pub mod info;
pub mod inputs;
pub mod journal;
pub mod labels;
pub mod logistic;
pub mod metrics;
pub mod mlp;
pub mod model;
pub mod onnx_net;
pub mod registry;
pub mod serve;
pub mod split;
pub mod tune;
pub mod weights;

// The paths these modules had before `backbones/` and `engine/`, for the tests and tools that
// name them.
pub use backbones::inception_v3::fast as inception_fast;
pub use backbones::{inception_v3, mobilenet_v1};
pub use engine::{cpu_conv, winograd};
