//! The featurizing loop: decode and resize in parallel, run the network batch by batch, hand
//! results back in input order.
//!
//! Decoding of batch k+1 runs on the rayon pool while the network works on batch k, so the
//! network (which also uses the pool) never waits for JPEG decoding. Every result is delivered
//! in the order of the input list, so the output does not depend on thread timing.
//!
//! Several networks (a [`BackboneSet`]) share the decoding: each image is decoded once and
//! resized and normalized once per network, from the same pixels.

use crate::backbone_set::BackboneSet;
use crate::image_io::{self, Preprocess};
use crate::inputs::{Found, Input};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// What became of one input.
pub enum Outcome<'a> {
    Features(&'a [f32]),
    Skipped(&'a str),
}

/// Decoded pixels of one batch: for each item of the chunk, its CHW floats for each
/// preprocessing (network), or why not.
type Decoded = Vec<Result<Vec<Vec<f32>>, String>>;

/// One batch for the networks: `pixels[k]` holds the images preprocessed the `k`-th way, back
/// to back.
pub type Pixels = Vec<Vec<f32>>;

/// Featurizes `inputs` in batches of `batch_size`, calling `emit(index, outcome)` in input
/// order. Stops at the first error `emit` returns (a closed pipe, a full disk) and returns it.
pub fn run<E>(
    set: &BackboneSet,
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    emit: E,
) -> anyhow::Result<()>
where
    E: FnMut(usize, Outcome<'_>) -> anyhow::Result<()>,
{
    let network = |pixels, n| set.features(pixels, n);
    run_network(
        &set.preprocesses(),
        inputs,
        batch_size,
        max_pixels,
        set.dim(),
        network,
        emit,
    )
}

/// [`run`] with another use of the decoded batches: each image is preprocessed each way of
/// `preprocesses`, and `network(pixels, n)` returns `dim` floats per image (the pretrained
/// classifier's probabilities, for `classify`).
pub fn run_network<N, E>(
    preprocesses: &[Preprocess],
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    dim: usize,
    network: N,
    mut emit: E,
) -> anyhow::Result<()>
where
    N: Fn(Pixels, usize) -> Vec<f32>,
    E: FnMut(usize, Outcome<'_>) -> anyhow::Result<()>,
{
    let batches = inputs
        .chunks(batch_size.max(1))
        .map(|chunk| chunk.iter().cloned().map(Found::Input).collect());
    run_batches(
        preprocesses,
        batches,
        max_pixels,
        dim,
        network,
        |i, _, outcome| emit(i, outcome),
    )
}

/// Featurizes what arrives on `items` as soon as it arrives, calling `emit` for each item in
/// arrival order: a batch is whatever is waiting (at least one item, at most `batch_size`), so a
/// slow trickle of paths gets its rows at once and a fast stream still fills whole batches.
/// Memory stays at a few batches however long the stream. Listing problems (`Found::Skip`)
/// come out as `Outcome::Skipped` in their place.
pub fn run_stream<E>(
    set: &BackboneSet,
    items: mpsc::Receiver<Found>,
    batch_size: usize,
    max_pixels: u64,
    mut emit: E,
) -> anyhow::Result<()>
where
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    let batch_size = batch_size.max(1);
    // Set when `emit` fails (stdout closed): the decoding thread then stops waiting for paths
    // that may never come, instead of keeping the run alive on an idle pipe.
    let stop = AtomicBool::new(false);
    let stopped = &stop;
    let batches = std::iter::from_fn(move || {
        let first = loop {
            match items.recv_timeout(Duration::from_millis(100)) {
                Ok(item) => break item,
                Err(RecvTimeoutError::Timeout) if !stopped.load(Ordering::Relaxed) => {}
                Err(_) => return None,
            }
        };
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match items.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        Some(batch)
    });
    let network = |pixels, n| set.features(pixels, n);
    run_batches(
        &set.preprocesses(),
        batches,
        max_pixels,
        set.dim(),
        network,
        |i, item, outcome| {
            let result = emit(i, item, outcome);
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            result
        },
    )
}

/// The loop behind [`run`] and [`run_stream`]: `batches` is consumed on a decoding thread,
/// `network` (`dim` floats per image) runs here, and `emit(index, item, outcome)` sees every
/// item in order.
fn run_batches<B, N, E>(
    preprocesses: &[Preprocess],
    batches: B,
    max_pixels: u64,
    dim: usize,
    network: N,
    mut emit: E,
) -> anyhow::Result<()>
where
    B: Iterator<Item = Vec<Found>> + Send,
    N: Fn(Pixels, usize) -> Vec<f32>,
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    std::thread::scope(|scope| {
        // One decoded batch waits while the network runs: enough to hide decoding, and memory
        // stays at two batches of pixels.
        let (tx, rx) = mpsc::sync_channel::<(Vec<Found>, Decoded)>(1);
        scope.spawn(move || {
            for batch in batches {
                let decoded: Decoded = batch
                    .par_iter()
                    .map(|item| match item {
                        Found::Input(input) => decode(&input.path, preprocesses, max_pixels),
                        Found::Skip(skip) => Err(skip.reason.clone()),
                    })
                    .collect();
                if tx.send((batch, decoded)).is_err() {
                    return; // the consumer stopped early
                }
            }
        });

        let mut start = 0;
        for (batch, decoded) in rx {
            // Pixels move into one batch buffer per network; only the reasons of the failures
            // stay behind.
            let mut pixels: Pixels = preprocesses
                .iter()
                .map(|p| Vec::with_capacity(p.tensor_len() * batch.len()))
                .collect();
            let mut status: Vec<Option<String>> = Vec::with_capacity(decoded.len());
            let mut n_ok = 0;
            for result in decoded {
                match result {
                    Ok(images) => {
                        for (buffer, image) in pixels.iter_mut().zip(images) {
                            buffer.extend_from_slice(&image);
                        }
                        n_ok += 1;
                        status.push(None);
                    }
                    Err(reason) => status.push(Some(reason)),
                }
            }
            let features = if n_ok == 0 {
                Vec::new()
            } else {
                network(pixels, n_ok)
            };
            let mut rows = features.chunks_exact(dim);
            for (i, (item, reason)) in batch.iter().zip(&status).enumerate() {
                let outcome = match reason {
                    None => Outcome::Features(rows.next().expect("one row per decoded image")),
                    Some(reason) => Outcome::Skipped(reason),
                };
                emit(start + i, item, outcome)?;
            }
            start += batch.len();
        }
        Ok(())
    })
}

/// Decodes `path` once and preprocesses it each way of `preprocesses`.
fn decode(
    path: &std::path::Path,
    preprocesses: &[Preprocess],
    max_pixels: u64,
) -> Result<Vec<Vec<f32>>, String> {
    let image = image_io::decode_rgb8(path, max_pixels).map_err(|e| e.to_string())?;
    preprocesses
        .iter()
        .map(|p| image_io::preprocess_rgb8(&image, p).map_err(|e| e.to_string()))
        .collect()
}
