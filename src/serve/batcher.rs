//! Dynamic batching: images decoded for concurrent requests are gathered into one network
//! batch on the thread that owns the network.
//!
//! A batch is whatever is already waiting when the network is free, topped up for at most
//! `max_wait` after its first image, up to `max_batch` images. Under load the queue refills while
//! the network runs, so batches fill without waiting; a lone client waits at most `max_wait`.

use super::metrics::Metrics;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
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

/// One decoded image waiting for the network.
pub struct Job {
    /// CHW floats, as the network reads them.
    pub pixels: Vec<f32>,
    pub task: Task,
    pub reply: oneshot::Sender<Reply>,
}

pub enum Msg {
    Job(Job),
    /// Sent once every request is answered: the loop ends after the jobs before it.
    Stop,
}

/// The limits of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// Runs batches until [`Msg::Stop`] or until every sender is gone. `network(task, pixels, n)`
/// returns `n` equal rows; a panic or an error there answers every job of the batch with
/// [`Failure::Internal`] and the loop goes on.
pub fn run<N>(rx: &Receiver<Msg>, batching: Batching, metrics: &Metrics, mut network: N)
where
    N: FnMut(Task, Vec<f32>, usize) -> Result<Vec<f32>, String>,
{
    let max_batch = batching.max_batch.max(1);
    loop {
        let first = match rx.recv() {
            Ok(Msg::Job(job)) => job,
            Ok(Msg::Stop) | Err(_) => return,
        };
        let deadline = Instant::now() + batching.max_wait;
        let mut jobs = vec![first];
        let mut stop = false;
        while jobs.len() < max_batch {
            let msg = match rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(msg) => msg,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match msg {
                Msg::Job(job) => jobs.push(job),
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        // A request that timed out has dropped its receiver: its image is not worth a slot.
        jobs.retain(|job| !job.reply.is_closed());
        for task in [Task::Features, Task::Classify] {
            let (group, rest): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|job| job.task == task);
            jobs = rest;
            if !group.is_empty() {
                run_group(task, group, metrics, &mut network);
            }
        }
        if stop {
            return;
        }
    }
}

fn run_group<N>(task: Task, group: Vec<Job>, metrics: &Metrics, network: &mut N)
where
    N: FnMut(Task, Vec<f32>, usize) -> Result<Vec<f32>, String>,
{
    let n = group.len();
    let mut pixels = Vec::with_capacity(group.iter().map(|j| j.pixels.len()).sum());
    let mut replies = Vec::with_capacity(n);
    for job in group {
        pixels.extend_from_slice(&job.pixels);
        replies.push(job.reply);
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

    fn job(value: f32, task: Task) -> (Msg, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Job(Job {
            pixels: vec![value; 2],
            task,
            reply: tx,
        });
        (msg, rx)
    }

    fn batching(max_batch: usize, wait_ms: u64) -> Batching {
        Batching {
            max_batch,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    #[test]
    fn waiting_jobs_share_batches_of_at_most_max_batch() {
        let (tx, rx) = mpsc::channel();
        let mut replies = Vec::new();
        for i in 0..5 {
            let (msg, reply) = job(i as f32, Task::Features);
            tx.send(msg).unwrap();
            replies.push(reply);
        }
        tx.send(Msg::Stop).unwrap();
        let mut sizes = Vec::new();
        let metrics = Metrics::default();
        run(&rx, batching(2, 0), &metrics, |_, pixels, n| {
            sizes.push(n);
            // One output per image: the sum of its pixels, to check each reply is its own.
            Ok(pixels.chunks(2).map(|p| p.iter().sum()).collect())
        });
        assert_eq!(sizes, vec![2, 2, 1]);
        for (i, mut reply) in replies.into_iter().enumerate() {
            assert_eq!(reply.try_recv().unwrap(), Ok(vec![2.0 * i as f32]));
        }
    }

    #[test]
    fn a_lone_job_waits_for_company_only_until_max_wait() {
        let (tx, rx) = mpsc::channel();
        let (first, r1) = job(1.0, Task::Features);
        tx.send(first).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let (second, r2) = job(2.0, Task::Features);
            tx.send(second).unwrap();
            tx.send(Msg::Stop).unwrap();
            r2
        });
        let mut sizes = Vec::new();
        run(&rx, batching(8, 1000), &Metrics::default(), |_, p, n| {
            sizes.push(n);
            Ok(p[..n].to_vec())
        });
        // The second job came 50 ms after the first, within the 1 s wait: one batch of two.
        assert_eq!(sizes, vec![2]);
        drop(r1);
        drop(late.join().unwrap());

        let (tx, rx) = mpsc::channel();
        let (first, _r1) = job(1.0, Task::Features);
        tx.send(first).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let (second, r2) = job(2.0, Task::Features);
            tx.send(second).unwrap();
            tx.send(Msg::Stop).unwrap();
            r2
        });
        let mut sizes = Vec::new();
        run(&rx, batching(8, 20), &Metrics::default(), |_, p, n| {
            sizes.push(n);
            Ok(p[..n].to_vec())
        });
        // With a 20 ms wait the first job goes alone.
        assert_eq!(sizes, vec![1, 1]);
        drop(late.join().unwrap());
    }

    #[test]
    fn tasks_run_as_separate_batches_and_a_panic_fails_only_its_batch() {
        let (tx, rx) = mpsc::channel();
        let (a, mut ra) = job(1.0, Task::Classify);
        let (b, mut rb) = job(2.0, Task::Features);
        let (c, mut rc) = job(3.0, Task::Classify);
        for m in [a, b, c, Msg::Stop] {
            tx.send(m).unwrap();
        }
        let mut calls = Vec::new();
        run(&rx, batching(8, 0), &Metrics::default(), |task, p, n| {
            calls.push((task, n));
            if task == Task::Classify {
                panic!("boom");
            }
            Ok(p[..n].to_vec())
        });
        assert_eq!(calls, vec![(Task::Features, 1), (Task::Classify, 2)]);
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
        let (a, ra) = job(1.0, Task::Features);
        let (b, mut rb) = job(2.0, Task::Features);
        drop(ra);
        for m in [a, b, Msg::Stop] {
            tx.send(m).unwrap();
        }
        let mut sizes = Vec::new();
        run(&rx, batching(8, 0), &Metrics::default(), |_, p, n| {
            sizes.push(n);
            Ok(p[..n].to_vec())
        });
        assert_eq!(sizes, vec![1]);
        assert_eq!(rb.try_recv().unwrap(), Ok(vec![2.0]));
    }
}
