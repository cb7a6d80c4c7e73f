//! A batch cut into one group of images per thread, each group run whole on its thread.
//!
//! Why: the engine's layers are parallel inside themselves (rows, bands, tiles), so a network
//! run over a batch meets every thread at a barrier after each layer: EfficientNet-Lite0 has
//! about fifty such layers, most of them small, and a profile of it at batch 8 on two threads
//! spent 5-6% of its samples in the kernel putting threads to sleep and waking them, besides
//! the time the faster thread waits for the slower at each barrier. When a batch has an image
//! for every thread, one group per thread needs no barrier at all, and each thread's
//! activations stay in its own core's cache. A batch smaller than the thread count still runs
//! as one group, every layer parallel inside, so that one image gets every core.
//!
//! Each group runs inside a pool of one thread of its own, so that the layers' parallel loops
//! run in order on that thread instead of handing work to the other group's thread. A layer
//! computes each image's outputs from that image alone, so the split changes no bit.

use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Single-thread pools, one per group, made the first time that many groups run.
static POOLS: Mutex<Vec<Arc<rayon::ThreadPool>>> = Mutex::new(Vec::new());

/// `count` of them, or `None` when the system refuses another thread (the batch then runs as
/// one group: slower, not wrong). Callers at once share them: their groups take turns.
pub fn pools(count: usize) -> Option<Vec<Arc<rayon::ThreadPool>>> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    while pools.len() < count {
        let i = pools.len();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("dltool-group-{i}"))
            .build()
            .ok()?;
        pools.push(Arc::new(pool));
    }
    Some(pools[..count].to_vec())
}

/// The groups [`run`] cuts `n` images into on `threads` threads: one group when there are
/// fewer images than threads, else `threads` groups of consecutive images, sizes differing by
/// at most one.
pub fn groups(n: usize, threads: usize) -> Vec<Range<usize>> {
    if n < threads.max(2) {
        return std::iter::once(0..n).collect();
    }
    let (base, extra) = (n / threads, n % threads);
    let mut start = 0;
    (0..threads)
        .map(|g| {
            let len = base + usize::from(g < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// `f` over the [`groups`] of `n` images on the current pool's threads, the results joined in
/// image order. `f(range)` returns the range's images' rows back to back.
pub fn run<F>(n: usize, f: F) -> Vec<f32>
where
    F: Fn(Range<usize>) -> Vec<f32> + Sync,
{
    let groups = groups(n, rayon::current_num_threads());
    let pools = match groups.len() {
        1 => None,
        count => pools(count),
    };
    let Some(pools) = pools else {
        return on_a_worker(|| f(0..n));
    };
    let parts: Vec<Vec<f32>> = groups
        .into_par_iter()
        .zip(pools)
        .map(|(range, pool)| pool.install(|| f(range)))
        .collect();
    parts.concat()
}

/// `f` on a thread of the current pool: called from outside the pool (the main thread, a
/// server's batching loop), every parallel loop inside `f` would otherwise be handed to the
/// pool from outside, the caller sleeping until it is done and woken after, hundreds of times
/// an image; from a worker, the caller's thread takes its share of each loop itself.
fn on_a_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() == 1 {
        return f();
    }
    rayon::scope(|_| f())
}

/// [`run`] over `n` images laid back to back in `pixels` (equal lengths): `f(part, k)` gets a
/// group's `k` images.
pub fn run_images<F>(pixels: &[f32], n: usize, f: F) -> Vec<f32>
where
    F: Fn(&[f32], usize) -> Vec<f32> + Sync,
{
    if n == 0 {
        // Nothing to split: the network says what no images give, as without the split.
        return f(pixels, 0);
    }
    assert!(pixels.len().is_multiple_of(n), "{n} images of equal size");
    let image = pixels.len() / n;
    run(n, |r| f(&pixels[r.start * image..r.end * image], r.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // One whole-batch group is the point of several of these cases.
    #[allow(clippy::single_range_in_vec_init)]
    fn groups_cover_the_batch_in_order() {
        assert_eq!(groups(1, 2), [0..1]);
        assert_eq!(groups(3, 1), [0..3]);
        assert_eq!(groups(8, 2), vec![0..4, 4..8]);
        assert_eq!(groups(9, 2), vec![0..5, 5..9]);
        assert_eq!(groups(5, 4), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(groups(3, 4), [0..3]);
    }

    #[test]
    fn results_join_in_image_order_and_each_group_has_one_thread() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let out = pool.install(|| {
            run(7, |r| {
                assert_eq!(rayon::current_num_threads(), 1);
                r.map(|i| i as f32).flat_map(|v| [v, -v]).collect()
            })
        });
        let want: Vec<f32> = (0..7).map(|i| i as f32).flat_map(|v| [v, -v]).collect();
        assert_eq!(out, want);
    }
}
