//! dltool: transfer learning on images from the command line.
//!
//! The pipeline stages live here as a library (`inputs` → `image_io` → `backbone` →
//! `featurize` → `features`); `commands` holds the thin subcommand layers the binary calls.

pub mod backbone;
pub mod bench;
pub mod commands;
pub mod cpu_conv;
pub mod device;
pub mod feature_parquet;
pub mod features;
pub mod featurize;
pub mod finetune;
pub mod head;
pub mod image_io;
pub mod inception_fast;
pub mod inception_v3;
pub mod inputs;
pub mod journal;
pub mod labels;
pub mod logistic;
pub mod metrics;
pub mod mlp;
pub mod mobilenet_v1;
pub mod registry;
pub mod split;
pub mod tune;
pub mod weights;
pub mod winograd;
