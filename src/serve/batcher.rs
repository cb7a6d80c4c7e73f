//! Dynamic batching: the images of concurrent requests are gathered into network batches, by
//! one batching loop per thread on the CPU.
//!
//! A loop's batch is whatever is already waiting when the loop is free, topped up for at most
//! `max_wait` after its first image, up to its share of `max_batch` (so that at most
//! `max_batch` images are in the network at once). It tops up only while the server has
//! lately had company ([`Company`]): a lone client's images never overlap, and waiting for
//! another would only add `max_wait` to each of them. The loop decodes its batch itself and runs
//! the network over it in a pool of its own one thread, as `featurize`'s pipelines do (see
//! [`crate::featurize`]): decoding never time-slices a core with the network, and no loop
//! waits for another at the end of a batch. Under load every loop is busy and the queue
//! refills while they run. A batch that finds no other running (a lone client's image, or
//! the images of a few clients in lockstep, which all reach one loop at once) runs on the
//! whole pool instead, so that it gets every core (the network splits several images into one
//! group per thread itself); no other batch starts until it is through.
//!
//! On a GPU there is one loop, which decodes its batch on the whole pool.

use super::metrics::Metrics;
use crate::engine::batch_split;
use axum::body::Bytes;
use rayon::prelude::*;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the network computes for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The backbone's features (what a head reads).
    Features,
    /// The pretrained classifier's probabilities.
    Classify,
}

/// Why an image got no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The bytes are not an image dltool reads (the reason, one lowercase line).
    BadImage(String),
    /// A bug: a panic in the decoder or the network, or a network that returned nothing.
    Internal(String),
}

pub type Reply = Result<Vec<f32>, Failure>;

/// An image's pixels and where its answer goes.
type Decoded = (Vec<f32>, oneshot::Sender<Reply>);

/// One image waiting for the network.
pub struct Job {
    /// The image file as the client sent it: the loop that runs the image decodes it.
    pub bytes: Bytes,
    pub task: Task,
    pub reply: oneshot::Sender<Reply>,
}

pub enum Msg {
    Job(Job),
    /// Sent once every request is answered: the loops end after the jobs before it.
    Stop,
}

/// The limits of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Images in the network at once, over all loops together.
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// Whether more than one image has lately been in the server at once: only then is an image
/// worth holding back for `max_wait` in the hope of a batch. A sequential client (one request
/// at a time, the next sent when the last is answered) never has company, so its images start
/// as soon as a loop takes them; under concurrent load the loops wait as configured.
#[derive(Debug)]
pub struct Company {
    epoch: Instant,
    /// When more than one image was last seen in the server: nanoseconds after `epoch`, plus
    /// one (0: never).
    last: AtomicU64,
}

impl Default for Company {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Company {
    /// How long company is remembered: long beside a batch (a returning cohort of closed-loop
    /// clients comes back within one), short enough that a lone client after a burst stops
    /// waiting within a second.
    pub const MEMORY: Duration = Duration::from_secs(1);

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    /// `in_flight` images are in the server now, a request's own included: told as its
    /// images are admitted and again as they leave, so that requests that overlapped for
    /// longer than the memory (a long batch) are still company when they end.
    pub fn saw(&self, in_flight: usize) {
        if in_flight > 1 {
            self.last.store(self.now(), Ordering::Relaxed);
        }
    }

    /// More than one image was in the server within [`Company::MEMORY`].
    pub fn lately(&self) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last != 0 && self.now().saturating_sub(last) <= Self::MEMORY.as_nanos() as u64
    }
}

/// Runs batches on `loops` loops until [`Msg::Stop`] or until every sender is gone (one loop,
/// on the calling thread, when `loops` is 1 or no other thread can be had).
/// `decode(bytes)` gives an image's pixels or why there are none; `network(task, pixels, n)`
/// returns `n` equal rows. A panic or an error in the network answers every job of its batch
/// with [`Failure::Internal`], a panic in the decoder that image's job; the loops go on.
pub fn run<D, N>(
    rx: Receiver<Msg>,
    batching: Batching,
    company: &Company,
    metrics: &Metrics,
    loops: usize,
    decode: D,
    network: N,
) where
    D: Fn(&[u8]) -> Result<Vec<f32>, String> + Sync,
    N: Fn(Task, Vec<f32>, usize) -> Result<Vec<f32>, String> + Sync,
{
    let pools = match loops {
        0 | 1 => Vec::new(),
        count => batch_split::pools(count).unwrap_or_default(),
    };
    let loops = pools.len().max(1);
    let shared = Shared {
        rx: Mutex::new(rx),
        stopped: AtomicBool::new(false),
        turns: RwLock::new(()),
        // Each loop's share, so that at most `max_batch` images are in the network at once.
        most: batching.max_batch.div_ceil(loops).max(1),
        max_wait: batching.max_wait,
        company,
        metrics,
        decode: &decode,
        network: &network,
    };
    if pools.is_empty() {
        return shared.run_loop(None);
    }
    std::thread::scope(|scope| {
        let shared = &shared;
        for (i, pool) in pools.iter().enumerate().skip(1) {
            let spawned = std::thread::Builder::new()
                .name(format!("dltool-batch-{i}"))
                .spawn_scoped(scope, move || shared.run_loop(Some(pool)));
            // A thread refused leaves fewer loops: slower, not wrong.
            drop(spawned);
        }
        shared.run_loop(Some(&pools[0]));
    });
}

/// What the loops share.
struct Shared<'a, D, N> {
    /// Held by the loop gathering a batch: the others wait their turn to gather.
    rx: Mutex<Receiver<Msg>>,
    /// A loop saw [`Msg::Stop`] or a closed channel: the others end at their next turn.
    stopped: AtomicBool,
    /// Read by every batch on a loop's own thread, written by a batch on the whole pool: so
    /// a batch gets every core only while no other batch runs, and no batch starts while
    /// it does (a thread more than there are cores stalls the whole-pool batch at each
    /// layer's barrier).
    turns: RwLock<()>,
    /// Images in one loop's batch at most.
    most: usize,
    max_wait: Duration,
    company: &'a Company,
    metrics: &'a Metrics,
    decode: &'a D,
    network: &'a N,
}

impl<D, N> Shared<'_, D, N>
where
    D: Fn(&[u8]) -> Result<Vec<f32>, String> + Sync,
    N: Fn(Task, Vec<f32>, usize) -> Result<Vec<f32>, String> + Sync,
{
    /// One loop: gathers a batch, runs it (on the whole pool when no other loop runs, else
    /// in `pool`), and again.
    fn run_loop(&self, pool: Option<&rayon::ThreadPool>) {
        loop {
            let (jobs, stop) = {
                let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
                if self.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let gathered = gather(&rx, self.most, || {
                    if self.company.lately() {
                        self.max_wait
                    } else {
                        Duration::ZERO
                    }
                });
                if gathered.1 {
                    self.stopped.store(true, Ordering::SeqCst);
                }
                gathered
            };
            // A request that timed out has dropped its receiver: its image is not worth a slot.
            let jobs: Vec<Job> = jobs
                .into_iter()
                .filter(|job| !job.reply.is_closed())
                .collect();
            match pool {
                _ if jobs.is_empty() => {}
                Some(pool) => self.run_in(pool, jobs),
                None => self.batch(jobs),
            }
            if stop {
                return;
            }
        }
    }

    /// Runs a batch on the whole pool when no other batch runs, else in the loop's `pool`.
    /// Clients in lockstep (a few, each sending its next image when its answer comes) hand
    /// one loop all their images at once while the others have nothing: on its own thread
    /// that batch left every other core idle (4 clients: 11 images/s where the network alone
    /// does 22 at batch 4). On the whole pool the network splits a batch of several images
    /// into one group per thread itself, and a lone image gets every core.
    fn run_in(&self, pool: &rayon::ThreadPool, jobs: Vec<Job>) {
        let alone = match self.turns.try_write() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(_alone) = alone {
            return self.batch(jobs);
        }
        let _shared = self.turns.read().unwrap_or_else(|e| e.into_inner());
        pool.install(|| self.batch(jobs));
    }

    /// Decodes the jobs' images (side by side on the current pool's threads) and runs the
    /// network over those that decoded, one batch per task.
    fn batch(&self, jobs: Vec<Job>) {
        let decoded: Vec<Reply> = jobs
            .par_iter()
            .map(
                |job| match panic::catch_unwind(AssertUnwindSafe(|| (self.decode)(&job.bytes))) {
                    Ok(decoded) => decoded.map_err(Failure::BadImage),
                    Err(payload) => Err(Failure::Internal(format!(
                        "the decoder panicked: {}",
                        panic_text(payload.as_ref())
                    ))),
                },
            )
            .collect();
        let mut groups: [(Task, Vec<Decoded>); 2] =
            [(Task::Features, Vec::new()), (Task::Classify, Vec::new())];
        for (job, pixels) in jobs.into_iter().zip(decoded) {
            match pixels {
                Ok(pixels) => {
                    let group = &mut groups[usize::from(job.task == Task::Classify)].1;
                    group.push((pixels, job.reply));
                }
                // The client may have gone meanwhile; nothing to tell it.
                Err(failure) => drop(job.reply.send(Err(failure))),
            }
        }
        for (task, group) in groups {
            if !group.is_empty() {
                run_group(task, group, self.metrics, self.network);
            }
        }
    }
}

/// A batch from the queue: the first message, then whatever else is waiting or comes within
/// `wait()` of it (asked once the first is in), up to `most` images; `true` when the queue
/// said stop (or closed) meanwhile.
fn gather(rx: &Receiver<Msg>, most: usize, wait: impl FnOnce() -> Duration) -> (Vec<Job>, bool) {
    let first = match rx.recv() {
        Ok(Msg::Job(job)) => job,
        Ok(Msg::Stop) | Err(_) => return (Vec::new(), true),
    };
    let deadline = Instant::now() + wait();
    let mut jobs = vec![first];
    while jobs.len() < most {
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(TryRecvError::Disconnected) => return (jobs, true),
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return (jobs, true),
                }
            }
        };
        match msg {
            Msg::Job(job) => jobs.push(job),
            Msg::Stop => return (jobs, true),
        }
    }
    (jobs, false)
}

fn run_group<N>(task: Task, group: Vec<Decoded>, metrics: &Metrics, network: &N)
where
    N: Fn(Task, Vec<f32>, usize) -> Result<Vec<f32>, String>,
{
    let n = group.len();
    let mut pixels = Vec::with_capacity(group.iter().map(|(p, _)| p.len()).sum());
    let mut replies = Vec::with_capacity(n);
    for (image, reply) in group {
        pixels.extend_from_slice(&image);
        replies.push(reply);
    }
    let started = Instant::now();
    let result = panic::catch_unwind(AssertUnwindSafe(|| network(task, pixels, n)))
        .unwrap_or_else(|payload| {
            Err(format!(
                "the network panicked: {}",
                panic_text(payload.as_ref())
            ))
        })
        .and_then(|out| {
            if out.is_empty() || out.len() % n != 0 {
                Err(format!(
                    "the network returned {} floats for {n} images",
                    out.len()
                ))
            } else {
                Ok(out)
            }
        });
    metrics.batch(n, started.elapsed().as_secs_f64());
    match result {
        Ok(out) => {
            let dim = out.len() / n;
            for (reply, row) in replies.into_iter().zip(out.chunks_exact(dim)) {
                // The client may have gone meanwhile; nothing to tell it.
                let _ = reply.send(Ok(row.to_vec()));
            }
        }
        Err(reason) => {
            for reply in replies {
                let _ = reply.send(Err(Failure::Internal(reason.clone())));
            }
        }
    }
}

/// The message of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A job whose "image" is one byte: the test decoder makes two pixels of that value.
    fn job(value: u8, task: Task) -> (Msg, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Job(Job {
            bytes: Bytes::from(vec![value]),
            task,
            reply: tx,
        });
        (msg, rx)
    }

    /// 0 is not an image, 255 panics the decoder.
    fn decode(bytes: &[u8]) -> Result<Vec<f32>, String> {
        match bytes[0] {
            0 => Err("not an image".into()),
            255 => panic!("decoder bug"),
            v => Ok(vec![v as f32; 2]),
        }
    }

    /// One output per image: the sum of its pixels, to check each reply is its own.
    fn sums(pixels: &[f32]) -> Vec<f32> {
        pixels.chunks(2).map(|p| p.iter().sum()).collect()
    }

    fn batching(max_batch: usize, wait_ms: u64) -> Batching {
        Batching {
            max_batch,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    /// A queue holding feature jobs of `values`, then [`Msg::Stop`]; their replies in order.
    fn queued(
        values: std::ops::RangeInclusive<u8>,
    ) -> (mpsc::Receiver<Msg>, Vec<oneshot::Receiver<Reply>>) {
        let (tx, rx) = mpsc::channel();
        let replies = values
            .map(|i| {
                let (msg, reply) = job(i, Task::Features);
                tx.send(msg).unwrap();
                reply
            })
            .collect();
        tx.send(Msg::Stop).unwrap();
        (rx, replies)
    }

    /// Runs the loops over `rx` with a network that answers each image with its pixel sum;
    /// the batch sizes in the order the batches ran.
    fn sizes_of_run(
        rx: mpsc::Receiver<Msg>,
        batching: Batching,
        company: &Company,
        loops: usize,
    ) -> Vec<usize> {
        let sizes = Mutex::new(Vec::new());
        run(
            rx,
            batching,
            company,
            &Metrics::default(),
            loops,
            decode,
            |_, p, n| {
                sizes.lock().unwrap().push(n);
                Ok(sums(&p))
            },
        );
        sizes.into_inner().unwrap()
    }

    #[test]
    fn waiting_jobs_share_batches_of_at_most_max_batch() {
        let (rx, replies) = queued(1..=5);
        assert_eq!(
            sizes_of_run(rx, batching(2, 0), &Company::default(), 1),
            vec![2, 2, 1]
        );
        for (i, mut reply) in replies.into_iter().enumerate() {
            assert_eq!(reply.try_recv().unwrap(), Ok(vec![2.0 * (i + 1) as f32]));
        }
    }

    #[test]
    fn several_loops_answer_every_job_with_its_own_row_in_shares_of_max_batch() {
        let (rx, replies) = queued(1..=40);
        let sizes = Mutex::new(Vec::new());
        let threads = Mutex::new(std::collections::HashSet::new());
        // Four loops share a max batch of 8: at most 2 images a batch.
        run(
            rx,
            batching(8, 0),
            &Company::default(),
            &Metrics::default(),
            4,
            decode,
            |_, p, n| {
                sizes.lock().unwrap().push(n);
                threads.lock().unwrap().insert(std::thread::current().id());
                // Slow enough that the other loops take their turns.
                std::thread::sleep(Duration::from_millis(5));
                Ok(sums(&p))
            },
        );
        let sizes = sizes.into_inner().unwrap();
        assert!(sizes.iter().all(|&n| n <= 2), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(
            threads.into_inner().unwrap().len() > 1,
            "one loop ran it all"
        );
        for (i, mut reply) in replies.into_iter().enumerate() {
            assert_eq!(reply.try_recv().unwrap(), Ok(vec![2.0 * (i + 1) as f32]));
        }
    }

    #[test]
    fn a_bad_or_panicking_image_fails_alone() {
        for loops in [1, 2] {
            let (tx, rx) = mpsc::channel();
            let (a, mut ra) = job(3, Task::Features);
            let (b, mut rb) = job(0, Task::Features);
            let (c, mut rc) = job(255, Task::Features);
            let (d, mut rd) = job(4, Task::Features);
            for m in [a, b, c, d, Msg::Stop] {
                tx.send(m).unwrap();
            }
            let sizes = sizes_of_run(rx, batching(8, 0), &Company::default(), loops);
            // Only the two good images reached the network.
            assert_eq!(sizes.iter().sum::<usize>(), 2);
            assert_eq!(ra.try_recv().unwrap(), Ok(vec![6.0]));
            assert_eq!(rd.try_recv().unwrap(), Ok(vec![8.0]));
            assert_eq!(
                rb.try_recv().unwrap(),
                Err(Failure::BadImage("not an image".into()))
            );
            match rc.try_recv().unwrap() {
                Err(Failure::Internal(m)) => assert!(m.contains("decoder bug"), "{m}"),
                other => panic!("expected an internal failure, got {other:?}"),
            }
        }
    }

    /// A second job `after_ms` after a first, then stop: the batch sizes that ran.
    fn two_jobs_apart(after_ms: u64, batching: Batching, company: &Company) -> Vec<usize> {
        let (tx, rx) = mpsc::channel();
        let (first, _r1) = job(1, Task::Features);
        tx.send(first).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(after_ms));
            let (second, r2) = job(2, Task::Features);
            tx.send(second).unwrap();
            tx.send(Msg::Stop).unwrap();
            r2
        });
        let sizes = sizes_of_run(rx, batching, company, 1);
        drop(late.join().unwrap());
        sizes
    }

    fn crowded() -> Company {
        let company = Company::default();
        company.saw(2);
        company
    }

    #[test]
    fn with_company_a_job_waits_for_more_only_until_max_wait() {
        // The second job came 50 ms after the first, within the 1 s wait: one batch of two.
        assert_eq!(two_jobs_apart(50, batching(8, 1000), &crowded()), vec![2]);
        // With a 20 ms wait the first job goes alone.
        assert_eq!(two_jobs_apart(300, batching(8, 20), &crowded()), vec![1, 1]);
    }

    #[test]
    fn without_company_a_job_starts_at_once() {
        // A lone client's image does not wait for a second that a 2 s wait would have taken.
        let lone = Company::default();
        lone.saw(1);
        assert_eq!(two_jobs_apart(300, batching(8, 2000), &lone), vec![1, 1]);
        // What is already waiting is still taken together.
        let (rx, _replies) = queued(1..=3);
        assert_eq!(sizes_of_run(rx, batching(8, 2000), &lone, 1), vec![3]);
    }

    #[test]
    fn company_is_more_than_one_image_in_the_server_within_its_memory() {
        let company = Company::default();
        assert!(!company.lately(), "nothing admitted yet");
        company.saw(1);
        assert!(!company.lately(), "one image alone is no company");
        company.saw(3);
        assert!(company.lately());
        // Company seen longer ago than the memory is forgotten.
        let Some(epoch) = Instant::now().checked_sub(Company::MEMORY * 3) else {
            panic!("the clock cannot go {:?} back", Company::MEMORY * 3)
        };
        let old = Company {
            epoch,
            last: AtomicU64::new(1),
        };
        assert!(!old.lately());
        old.saw(2);
        assert!(old.lately());
    }

    #[test]
    fn tasks_run_as_separate_batches_and_a_panic_fails_only_its_batch() {
        let (tx, rx) = mpsc::channel();
        let (a, mut ra) = job(1, Task::Classify);
        let (b, mut rb) = job(2, Task::Features);
        let (c, mut rc) = job(3, Task::Classify);
        for m in [a, b, c, Msg::Stop] {
            tx.send(m).unwrap();
        }
        let calls = Mutex::new(Vec::new());
        run(
            rx,
            batching(8, 0),
            &Company::default(),
            &Metrics::default(),
            1,
            decode,
            |task, p, n| {
                calls.lock().unwrap().push((task, n));
                if task == Task::Classify {
                    panic!("boom");
                }
                Ok(p[..n].to_vec())
            },
        );
        assert_eq!(
            calls.into_inner().unwrap(),
            vec![(Task::Features, 1), (Task::Classify, 2)]
        );
        assert_eq!(rb.try_recv().unwrap(), Ok(vec![2.0]));
        for r in [&mut ra, &mut rc] {
            match r.try_recv().unwrap() {
                Err(Failure::Internal(m)) => assert!(m.contains("boom"), "{m}"),
                other => panic!("expected an internal failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn jobs_whose_client_left_are_dropped_before_the_network() {
        let (tx, rx) = mpsc::channel();
        let (a, ra) = job(1, Task::Features);
        let (b, mut rb) = job(2, Task::Features);
        drop(ra);
        for m in [a, b, Msg::Stop] {
            tx.send(m).unwrap();
        }
        let sizes = sizes_of_run(rx, batching(8, 0), &Company::default(), 1);
        assert_eq!(sizes, vec![1]);
        assert_eq!(rb.try_recv().unwrap(), Ok(vec![4.0]));
    }

    #[test]
    fn every_loop_ends_when_the_senders_are_gone() {
        let (tx, rx) = mpsc::channel();
        let (a, mut ra) = job(5, Task::Features);
        tx.send(a).unwrap();
        drop(tx);
        assert_eq!(
            sizes_of_run(rx, batching(4, 0), &Company::default(), 3),
            vec![1]
        );
        assert_eq!(ra.try_recv().unwrap(), Ok(vec![10.0]));
    }

    #[test]
    fn a_batch_alone_runs_on_the_whole_pool_and_one_beside_another_on_its_loops_thread() {
        let whole = rayon::current_num_threads();
        // On a pool of one thread the whole pool and a loop's own thread look the same.
        assert!(
            whole > 1,
            "this test needs a pool of 2 threads or more (RAYON_NUM_THREADS)"
        );
        // (images queued, max batch, pool sizes the batches ran on, sorted). 1 and 2: one
        // batch, nothing beside it (a lone client; clients in lockstep). 4 with a max batch
        // of 4: two loops take 2 each, the second while the first is in the network.
        for (images, max_batch, expected) in [
            (1, 4, vec![whole]),
            (2, 4, vec![whole]),
            (4, 4, vec![1, whole]),
        ] {
            let (rx, mut replies) = queued(1..=images);
            let epoch = Instant::now();
            let runs = Mutex::new(Vec::new());
            run(
                rx,
                batching(max_batch, 0),
                &Company::default(),
                &Metrics::default(),
                2,
                decode,
                |_, p, _| {
                    let start = epoch.elapsed();
                    // Long enough that the other loop gathers its batch meanwhile.
                    std::thread::sleep(Duration::from_millis(300));
                    let end = epoch.elapsed();
                    runs.lock()
                        .unwrap()
                        .push((rayon::current_num_threads(), start, end));
                    Ok(sums(&p))
                },
            );
            let runs = runs.into_inner().unwrap();
            let mut pools: Vec<usize> = runs.iter().map(|r| r.0).collect();
            pools.sort_unstable();
            assert_eq!(pools, expected, "{images} images: {runs:?}");
            // A batch on the whole pool overlaps no other.
            for (i, a) in runs.iter().enumerate() {
                for b in &runs[i + 1..] {
                    let overlap = a.1 < b.2 && b.1 < a.2;
                    assert!(!(overlap && (a.0 == whole || b.0 == whole)), "{runs:?}");
                }
            }
            assert!(replies.iter_mut().all(|r| r.try_recv().unwrap().is_ok()));
        }
    }
}
