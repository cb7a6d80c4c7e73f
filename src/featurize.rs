//! The featurizing loop: decode and resize in parallel, run the network batch by batch, hand
//! results back in input order.
//!
//! Decoding of batch k+1 runs on the rayon pool while the network works on batch k, so the
//! network (which also uses the pool) never waits for JPEG decoding. Every result is delivered
//! in the order of the input list, so the output does not depend on thread timing.

use crate::backbone::Backbone;
use crate::image_io;
use crate::inputs::Input;
use rayon::prelude::*;
use std::sync::mpsc;

/// What became of one input.
pub enum Outcome<'a> {
    Features(&'a [f32]),
    Skipped(&'a str),
}

/// Decoded pixels of one batch: for each input of the chunk, its CHW floats or why not.
type Decoded = Vec<Result<Vec<f32>, String>>;

/// Featurizes `inputs` in batches of `batch_size`, calling `emit(index, outcome)` in input
/// order. Stops at the first error `emit` returns (a closed pipe, a full disk) and returns it.
pub fn run<E>(
    backbone: &Backbone,
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    emit: E,
) -> anyhow::Result<()>
where
    E: FnMut(usize, Outcome<'_>) -> anyhow::Result<()>,
{
    let network = |pixels, n| backbone.features(pixels, n);
    run_network(
        backbone,
        inputs,
        batch_size,
        max_pixels,
        backbone.dim(),
        network,
        emit,
    )
}

/// [`run`] with another use of the decoded batches: `network(pixels, n)` returns `dim` floats
/// per image (the pretrained classifier's probabilities, for `classify`).
pub fn run_network<N, E>(
    backbone: &Backbone,
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    dim: usize,
    network: N,
    mut emit: E,
) -> anyhow::Result<()>
where
    N: Fn(Vec<f32>, usize) -> Vec<f32>,
    E: FnMut(usize, Outcome<'_>) -> anyhow::Result<()>,
{
    let batch_size = batch_size.max(1);
    let pre = backbone.preprocess;
    let input_len = backbone.input_len();
    std::thread::scope(|scope| {
        // One decoded batch waits while the network runs: enough to hide decoding, and memory
        // stays at two batches of pixels.
        let (tx, rx) = mpsc::sync_channel::<(usize, Decoded)>(1);
        scope.spawn(move || {
            for (k, chunk) in inputs.chunks(batch_size).enumerate() {
                let decoded: Decoded = chunk
                    .par_iter()
                    .map(|input| {
                        image_io::load_for_network(&input.path, &pre, max_pixels)
                            .map_err(|e| e.to_string())
                    })
                    .collect();
                if tx.send((k * batch_size, decoded)).is_err() {
                    return; // the consumer stopped early
                }
            }
        });

        for (start, decoded) in rx {
            // Pixels move into one batch buffer; only the reasons of the failures stay behind.
            let mut pixels = Vec::new();
            let mut status: Vec<Option<String>> = Vec::with_capacity(decoded.len());
            for result in decoded {
                match result {
                    Ok(p) => {
                        if pixels.is_empty() {
                            pixels.reserve(p.len() * batch_size);
                        }
                        debug_assert_eq!(p.len(), input_len);
                        pixels.extend_from_slice(&p);
                        status.push(None);
                    }
                    Err(reason) => status.push(Some(reason)),
                }
            }
            let n_ok = pixels.len() / input_len;
            let features = if n_ok == 0 {
                Vec::new()
            } else {
                network(pixels, n_ok)
            };
            let mut rows = features.chunks_exact(dim);
            for (i, reason) in status.iter().enumerate() {
                let outcome = match reason {
                    None => Outcome::Features(rows.next().expect("one row per decoded image")),
                    Some(reason) => Outcome::Skipped(reason),
                };
                emit(start + i, outcome)?;
            }
        }
        Ok(())
    })
}
