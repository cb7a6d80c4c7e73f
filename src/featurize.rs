//! The featurizing loop: decode and resize, run the network, hand results back in input order.
//!
//! On the CPU, each thread of the pool is a whole pipeline of its own: it takes a share of a
//! batch (the group [`batch_split::groups`] gives it), decodes and resizes those images itself,
//! and runs the network over them in a pool of its one thread. Why: with decoding on the pool
//! beside a network that used every thread, the two time-sliced the same cores, the network's
//! threads waited for each other at every layer and at every batch, and EfficientNet-Lite0's
//! network ran a quarter slower end to end than alone (two cores kept 1.75 busy). A pipeline
//! per thread waits for no other thread, and its decoded pixels are still in its core's cache.
//! On a GPU, decoding of batch k+1 runs on the rayon pool while the network works on batch k.
//! Every result is delivered in the order of the input list, so the output does not depend on
//! thread timing (and a layer computes each image from that image alone, so neither do the
//! features).
//!
//! Several networks (a [`BackboneSet`]) share the decoding: each image is decoded once and
//! resized and normalized once per network, from the same pixels.

use crate::backbone_set::BackboneSet;
use crate::engine::batch_split;
use crate::image_io::{self, Preprocess};
use crate::inputs::{Found, Input};
use rayon::prelude::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Condvar, Mutex};
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

/// What the loop runs over each batch of decoded images.
pub struct Network<'a, N> {
    /// Each image is preprocessed each of these ways (one per network of a set).
    pub preprocesses: &'a [Preprocess],
    /// `run(pixels, n)` returns `dim` floats per image.
    pub run: N,
    pub dim: usize,
    /// The network runs on the CPU engine's pool (one pipeline per thread) rather than a GPU.
    pub on_cpu: bool,
}

/// The loop's [`Network`] for the features of `set`, with `preprocesses` as the set's.
pub fn features_of<'a>(
    set: &'a BackboneSet,
    preprocesses: &'a [Preprocess],
) -> Network<'a, impl Fn(Pixels, usize) -> Vec<f32> + Sync + 'a> {
    Network {
        preprocesses,
        run: move |pixels, n| set.features(pixels, n),
        dim: set.dim(),
        on_cpu: set.parts.iter().all(|p| p.is_cpu()),
    }
}

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
    let preprocesses = set.preprocesses();
    let network = features_of(set, &preprocesses);
    run_network(network, inputs, batch_size, max_pixels, emit)
}

/// [`run`] with another use of the decoded images (the pretrained classifier's probabilities,
/// for `classify`).
pub fn run_network<N, E>(
    network: Network<'_, N>,
    inputs: &[Input],
    batch_size: usize,
    max_pixels: u64,
    mut emit: E,
) -> anyhow::Result<()>
where
    N: Fn(Pixels, usize) -> Vec<f32> + Sync,
    E: FnMut(usize, Outcome<'_>) -> anyhow::Result<()>,
{
    let batches = inputs
        .chunks(batch_size.max(1))
        .map(|chunk| chunk.iter().cloned().map(Found::Input).collect());
    run_batches(network, batches, max_pixels, |i, _, outcome| {
        emit(i, outcome)
    })
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
    // Set when `emit` fails (stdout closed): the thread waiting for paths then stops waiting
    // for paths that may never come, instead of keeping the run alive on an idle pipe.
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
    let preprocesses = set.preprocesses();
    run_batches(
        features_of(set, &preprocesses),
        batches,
        max_pixels,
        |i, item, outcome| {
            let result = emit(i, item, outcome);
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            result
        },
    )
}

/// The loop behind [`run`] and [`run_stream`]: `batches` is consumed as the network goes, and
/// `emit(index, item, outcome)` sees every item in order, here on the calling thread.
fn run_batches<B, N, E>(
    network: Network<'_, N>,
    batches: B,
    max_pixels: u64,
    emit: E,
) -> anyhow::Result<()>
where
    B: Iterator<Item = Vec<Found>> + Send,
    N: Fn(Pixels, usize) -> Vec<f32> + Sync,
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    if network.on_cpu {
        per_thread(network, batches, max_pixels, emit)
    } else {
        overlapped(network, batches, max_pixels, emit)
    }
}

/// A share of a batch, as one pipeline takes it.
struct Job {
    /// Jobs are numbered in input order; results are emitted in this order.
    seq: usize,
    /// Input index of `items[0]`.
    start: usize,
    items: Vec<Found>,
    /// The batch had fewer images than threads: its one job runs the network on every thread
    /// (one image alone still gets every core, as a trickle of paths on stdin wants).
    whole_pool: bool,
}

/// A job done: for each item, why it was skipped or `None`; the decoded ones' rows back to back.
struct Done {
    job: Job,
    status: Vec<Option<String>>,
    rows: Vec<f32>,
}

/// What a pipeline hands the emitting thread.
enum Message {
    Done(Done),
    /// A job to run on the whole pool: the emitting thread runs it, as it runs inside the
    /// caller's pool (the pipelines' own threads are outside every pool).
    Whole(Job),
}

/// Jobs taken ahead of the oldest one not yet emitted, per thread: bounds the results waiting
/// to be put in order when one pipeline is slow (a huge image), however long the run.
const AHEAD_PER_THREAD: usize = 4;

/// Where the pipelines take their jobs: the batches, cut into one group per thread.
struct Source<B> {
    batches: B,
    waiting: VecDeque<Job>,
    next_seq: usize,
    next_start: usize,
    threads: usize,
}

impl<B: Iterator<Item = Vec<Found>>> Source<B> {
    fn next(&mut self) -> Option<Job> {
        if let Some(job) = self.waiting.pop_front() {
            return Some(job);
        }
        let mut batch = self.batches.next()?;
        let groups = batch_split::groups(batch.len(), self.threads);
        let whole_pool = groups.len() == 1 && self.threads > 1;
        // Cut from the back so each group's items move out without copying.
        for range in groups.into_iter().rev() {
            let items = batch.split_off(range.start);
            self.waiting.push_front(Job {
                seq: 0,
                start: self.next_start + range.start,
                items,
                whole_pool,
            });
        }
        for job in &mut self.waiting {
            job.seq = self.next_seq;
            self.next_seq += 1;
        }
        self.next_start += self.waiting.iter().map(|j| j.items.len()).sum::<usize>();
        self.waiting.pop_front()
    }
}

/// Shared between the pipelines and the emitting thread.
struct Progress {
    /// Jobs emitted so far (all of seq < this).
    emitted: Mutex<usize>,
    moved: Condvar,
    /// Set when the run ends early (`emit` failed, a pipeline panicked): the pipelines stop.
    stop: AtomicBool,
}

impl Progress {
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.emitted.lock();
        self.moved.notify_all();
    }

    /// Waits until job `seq` is within the window of jobs ahead; false when the run stopped.
    fn wait_turn(&self, seq: usize, ahead: usize) -> bool {
        let mut emitted = self.emitted.lock().unwrap_or_else(|e| e.into_inner());
        while seq >= *emitted + ahead && !self.stop.load(Ordering::SeqCst) {
            emitted = self.moved.wait(emitted).unwrap_or_else(|e| e.into_inner());
        }
        !self.stop.load(Ordering::SeqCst)
    }

    fn advance(&self, emitted: usize) {
        *self.emitted.lock().unwrap_or_else(|e| e.into_inner()) = emitted;
        self.moved.notify_all();
    }
}

/// Halts the run when dropped while panicking, so the other threads do not wait for a job
/// that will never be done.
struct HaltOnPanic<'a>(&'a Progress);

impl Drop for HaltOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.halt();
        }
    }
}

/// One pipeline per thread of the pool (see the module doc).
fn per_thread<B, N, E>(
    network: Network<'_, N>,
    batches: B,
    max_pixels: u64,
    mut emit: E,
) -> anyhow::Result<()>
where
    B: Iterator<Item = Vec<Found>> + Send,
    N: Fn(Pixels, usize) -> Vec<f32> + Sync,
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    let threads = rayon::current_num_threads().max(1);
    // `None` when the system refuses the threads: each pipeline then runs its network on the
    // shared pool (slower, not wrong).
    let pools = batch_split::pools(threads);
    let source = Mutex::new(Source {
        batches,
        waiting: VecDeque::new(),
        next_seq: 0,
        next_start: 0,
        threads,
    });
    let progress = Progress {
        emitted: Mutex::new(0),
        moved: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    let ahead = AHEAD_PER_THREAD * threads;
    let network = &network;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Message>();
        for k in 0..threads {
            let (tx, source, progress) = (tx.clone(), &source, &progress);
            let pool = pools.as_ref().map(|p| p[k].clone());
            scope.spawn(move || {
                let _halt = HaltOnPanic(progress);
                loop {
                    if progress.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let job = source.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some(job) = job else { return };
                    if !progress.wait_turn(job.seq, ahead) {
                        return;
                    }
                    let message = match &pool {
                        _ if job.whole_pool => Message::Whole(job),
                        Some(pool) => {
                            Message::Done(pool.install(|| process(network, job, max_pixels)))
                        }
                        None => Message::Done(process(network, job, max_pixels)),
                    };
                    if tx.send(message).is_err() {
                        return; // the emitting thread stopped early
                    }
                }
            });
        }
        drop(tx);

        let _halt = HaltOnPanic(&progress);
        let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
        let mut next = 0;
        for message in rx {
            let done = match message {
                Message::Done(done) => done,
                // Here, in the caller's pool, so that every one of its threads can take part.
                Message::Whole(job) => process(network, job, max_pixels),
            };
            pending.insert(done.job.seq, done);
            while let Some(done) = pending.remove(&next) {
                if let Err(e) = emit_job(network.dim, &done, &mut emit) {
                    progress.halt();
                    return Err(e);
                }
                next += 1;
                progress.advance(next);
            }
        }
        Ok(())
    })
}

/// Decodes a job's images one after another and runs the network over them, on this thread
/// (and its pool).
fn process<N>(network: &Network<'_, N>, job: Job, max_pixels: u64) -> Done
where
    N: Fn(Pixels, usize) -> Vec<f32>,
{
    let mut pixels: Pixels = network
        .preprocesses
        .iter()
        .map(|p| Vec::with_capacity(p.tensor_len() * job.items.len()))
        .collect();
    let mut status = Vec::with_capacity(job.items.len());
    for item in &job.items {
        let decoded = match item {
            Found::Input(input) => {
                decode_into(&input.path, network.preprocesses, max_pixels, &mut pixels)
            }
            Found::Skip(skip) => Err(skip.reason.clone()),
        };
        status.push(decoded.err());
    }
    finish(network, job, pixels, status)
}

/// Runs the network over a job's decoded images (`status[i]` is `None` for those).
fn finish<N>(
    network: &Network<'_, N>,
    job: Job,
    pixels: Pixels,
    status: Vec<Option<String>>,
) -> Done
where
    N: Fn(Pixels, usize) -> Vec<f32>,
{
    let n_ok = status.iter().filter(|s| s.is_none()).count();
    let rows = if n_ok == 0 {
        Vec::new()
    } else {
        (network.run)(pixels, n_ok)
    };
    Done { job, status, rows }
}

/// Emits a job's items in order.
fn emit_job<E>(dim: usize, done: &Done, emit: &mut E) -> anyhow::Result<()>
where
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    let mut rows = done.rows.chunks_exact(dim);
    for (i, (item, reason)) in done.job.items.iter().zip(&done.status).enumerate() {
        let outcome = match reason {
            None => Outcome::Features(rows.next().expect("one row per decoded image")),
            Some(reason) => Outcome::Skipped(reason),
        };
        emit(done.job.start + i, item, outcome)?;
    }
    Ok(())
}

/// Decoding on the pool, the network (on a GPU) here: batch k+1 decodes while batch k runs.
fn overlapped<B, N, E>(
    network: Network<'_, N>,
    batches: B,
    max_pixels: u64,
    mut emit: E,
) -> anyhow::Result<()>
where
    B: Iterator<Item = Vec<Found>> + Send,
    N: Fn(Pixels, usize) -> Vec<f32>,
    E: FnMut(usize, &Found, Outcome<'_>) -> anyhow::Result<()>,
{
    let preprocesses = network.preprocesses;
    std::thread::scope(|scope| {
        // One decoded batch waits while the network runs: enough to hide decoding, and memory
        // stays at two batches of pixels.
        let (tx, rx) = mpsc::sync_channel::<(Vec<Found>, Decoded)>(1);
        scope.spawn(move || {
            for batch in batches {
                let decoded: Decoded = batch
                    .par_iter()
                    .map(|item| match item {
                        Found::Input(input) => {
                            let mut images = vec![Vec::new(); preprocesses.len()];
                            decode_into(&input.path, preprocesses, max_pixels, &mut images)
                                .map(|()| images)
                        }
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
            let status = decoded
                .into_iter()
                .map(|result| match result {
                    Ok(images) => {
                        for (buffer, image) in pixels.iter_mut().zip(images) {
                            buffer.extend_from_slice(&image);
                        }
                        None
                    }
                    Err(reason) => Some(reason),
                })
                .collect();
            let job = Job {
                seq: 0,
                start,
                items: batch,
                whole_pool: true,
            };
            start += job.items.len();
            emit_job(
                network.dim,
                &finish(&network, job, pixels, status),
                &mut emit,
            )?;
        }
        Ok(())
    })
}

/// Decodes `path` once and appends it to `pixels[k]` preprocessed the `k`-th way of
/// `preprocesses`; on an error, `pixels` is as before.
fn decode_into(
    path: &std::path::Path,
    preprocesses: &[Preprocess],
    max_pixels: u64,
    pixels: &mut Pixels,
) -> Result<(), String> {
    let image = image_io::decode_rgb8(path, max_pixels).map_err(|e| e.to_string())?;
    for (k, p) in preprocesses.iter().enumerate() {
        let len = pixels[k].len();
        pixels[k].resize(len + p.tensor_len(), 0.0);
        if let Err(e) = image_io::preprocess_rgb8_into(&image, p, &mut pixels[k][len..]) {
            for (buffer, p) in pixels.iter_mut().zip(preprocesses).take(k + 1) {
                buffer.truncate(buffer.len() - p.tensor_len());
            }
            return Err(e.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_io::{ChannelOrder, Resize};
    use std::path::Path;

    /// 4x4 pixels, each channel `x` - 0 mean, 1 std: an image's pixels are its value.
    const PRE: Preprocess = Preprocess {
        width: 4,
        height: 4,
        mean: [0.0; 3],
        std: [1.0; 3],
        resize: Resize::Stretch,
        channels: ChannelOrder::Rgb,
    };

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Grey images of values `0..n` (`bad` ones are not images), as featurize's inputs.
    fn images(dir: &Path, n: usize, bad: &[usize]) -> Vec<Input> {
        (0..n)
            .map(|i| {
                let path = dir.join(format!("{i:03}.png"));
                if bad.contains(&i) {
                    std::fs::write(&path, b"not an image").unwrap();
                } else {
                    image::RgbImage::from_pixel(4, 4, image::Rgb([i as u8; 3]))
                        .save(&path)
                        .unwrap();
                }
                Input {
                    display: path.display().to_string(),
                    path,
                    label: String::new(),
                }
            })
            .collect()
    }

    /// Runs `inputs` through a network whose row is `[value, threads it saw]` of each image,
    /// sleeping longer for some values so that jobs finish out of order; returns what `emit`
    /// saw, in the order it saw it.
    fn collect(
        inputs: &[Input],
        batch: usize,
        threads: usize,
        on_cpu: bool,
    ) -> Vec<(usize, Result<Vec<f32>, String>)> {
        let pool = pool(threads);
        let network = Network {
            preprocesses: &[PRE],
            run: |pixels: Pixels, n: usize| {
                let image = PRE.tensor_len();
                assert_eq!(pixels[0].len(), n * image);
                let first = pixels[0][0] as u64;
                std::thread::sleep(Duration::from_millis((first % 3) * 4));
                let threads = rayon::current_num_threads() as f32;
                (0..n)
                    .flat_map(|i| [pixels[0][i * image], threads])
                    .collect()
            },
            dim: 2,
            on_cpu,
        };
        let mut seen = Vec::new();
        pool.install(|| {
            run_network(network, inputs, batch, u64::MAX, |i, outcome| {
                seen.push(match outcome {
                    Outcome::Features(row) => (i, Ok(row.to_vec())),
                    Outcome::Skipped(reason) => (i, Err(reason.to_string())),
                });
                Ok(())
            })
        })
        .unwrap();
        seen
    }

    #[test]
    fn pipelines_emit_in_input_order_whatever_finishes_first() {
        let dir = tempfile::tempdir().unwrap();
        // Batches of 5 on 3 threads: groups of 2, 2, 1, and a last batch of 2 (fewer images
        // than threads) that runs on the whole pool.
        let inputs = images(dir.path(), 22, &[6]);
        let seen = collect(&inputs, 5, 3, true);
        assert_eq!(
            seen.iter().map(|s| s.0).collect::<Vec<_>>(),
            (0..22).collect::<Vec<_>>()
        );
        for (i, result) in &seen {
            match result {
                Ok(row) => {
                    assert_eq!(row[0], *i as f32, "image {i}");
                    let threads = if *i >= 20 { 3.0 } else { 1.0 };
                    assert_eq!(row[1], threads, "threads of image {i}");
                }
                Err(reason) => {
                    assert_eq!(*i, 6);
                    assert!(!reason.is_empty());
                }
            }
        }
        // The GPU's loop (decoding on the pool beside the network) gives the same rows.
        let overlapped = collect(&inputs, 5, 3, false);
        assert_eq!(seen.len(), overlapped.len());
        for ((i, a), (j, b)) in seen.iter().zip(&overlapped) {
            assert_eq!(i, j);
            assert_eq!(a.as_ref().map(|r| r[0]), b.as_ref().map(|r| r[0]));
        }
    }

    #[test]
    fn a_failing_emit_stops_every_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = images(dir.path(), 40, &[]);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let network = Network {
            preprocesses: &[PRE],
            run: |_: Pixels, n: usize| {
                calls.fetch_add(n, Ordering::SeqCst);
                vec![0.0; n]
            },
            dim: 1,
            on_cpu: true,
        };
        let pool = pool(2);
        let result = pool.install(|| {
            run_network(network, &inputs, 2, u64::MAX, |i, _| {
                anyhow::ensure!(i < 3, "disk full at {i}");
                Ok(())
            })
        });
        assert_eq!(result.unwrap_err().to_string(), "disk full at 3");
        // At most the window of jobs ahead (4 per thread, one image each) past the failure.
        let ran = calls.load(Ordering::SeqCst);
        assert!(ran <= 4 + AHEAD_PER_THREAD * 2 + 2, "{ran} images ran");
    }

    #[test]
    fn a_panicking_network_ends_the_run_instead_of_hanging_it() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = images(dir.path(), 12, &[]);
        let network = Network {
            preprocesses: &[PRE],
            run: |pixels: Pixels, n: usize| {
                assert!(pixels[0][0] != 4.0, "boom");
                vec![0.0; n]
            },
            dim: 1,
            on_cpu: true,
        };
        let pool = pool(2);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| run_network(network, &inputs, 2, u64::MAX, |_, _| Ok(())))
        }));
        assert!(result.is_err());
    }
}
