//! The integration tests, as one test binary: each file here was a binary of its own, and every
//! one linked the whole library and its dependencies (burn, tract, parquet, axum) again, which
//! was a large part of the CI build on two cores; one binary also lets libtest run the tests of
//! all files side by side instead of one file after another. `cargo test --release --test it
//! NAME` runs one file's tests (`NAME` filters on the module path, e.g. `inception_parity`).
//! tests/simd_paths.rs stays a binary of its own: it forces the engine's SIMD path for the whole
//! process.

#[path = "../common/mod.rs"]
mod common;

mod backbones_cli;
mod bench_backbones_cli;
mod bench_cli;
mod chain_cli;
mod classic_cli;
mod classic_parity;
mod cpu_conv;
mod device_cli;
mod efficientnet_cli;
mod efficientnet_loading;
mod efficientnet_parity;
mod fast_parity;
mod featurize_cli;
mod finetune_cli;
mod finetune_parity;
mod flowers_accuracy;
mod hardening_cli;
mod inception_parity;
mod info_cli;
mod mobilenet_parity;
mod multi_cli;
mod onnx_cli;
mod onnx_net;
mod pipeline_cosine;
mod scale_cli;
mod serve_cli;
mod tta_cli;
mod tune_cli;
mod weight_files;
mod weights_fetch;
mod weights_loading;
