//! NHWC kernels beside [`crate::cpu_conv`]'s for the classic networks (ResNet, VGG): max pools
//! of any size, stride and padding, the residual join, the adaptive average pool in front of
//! VGG's classifier, and fully connected layers. None of them knows a network.

use crate::engine::cpu_conv::{Act, SyncPtr};
use rayon::prelude::*;

/// `f` applied to `n` NCHW images of `[c, h, w]`, `chunk` images at a time, the results
/// joined into one batch: keeps the first layers' large activations small whatever the batch
/// size (each image's result does not depend on the others in its chunk).
pub fn chunked(
    pixels: &[f32],
    n: usize,
    [c, h, w]: [usize; 3],
    chunk: usize,
    f: impl Fn(&Act) -> Act,
) -> Act {
    let image = c * h * w;
    assert_eq!(
        pixels.len(),
        n * image,
        "expected {n} images of {c}x{h}x{w}"
    );
    assert!(n > 0, "no images");
    let mut out: Option<Act> = None;
    let mut done = 0;
    for part in pixels.chunks(chunk * image) {
        let k = part.len() / image;
        let y = f(&Act::from_nchw(part, k, c, h, w));
        let out = out.get_or_insert_with(|| Act::new(n, y.h, y.w, y.c));
        let per_image = y.data.len() / k;
        out.data[done * per_image..(done + k) * per_image].copy_from_slice(&y.data);
        done += k;
    }
    out.expect("at least one image")
}

/// `k` x `k` max pool with stride `s` and `p` pixels of padding on every side (padding never
/// wins: PyTorch's `MaxPool2d` pads with -inf).
pub fn max_pool(x: &Act, k: usize, s: usize, p: usize) -> Act {
    assert!(
        x.h + 2 * p >= k && x.w + 2 * p >= k,
        "pool larger than its input"
    );
    let ho = (x.h + 2 * p - k) / s + 1;
    let wo = (x.w + 2 * p - k) / s + 1;
    let mut out = Act::new(x.n, ho, wo, x.c);
    let c = x.c;
    out.data
        .par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (img, oy) = (row / ho, row % ho);
            let y0 = (oy * s) as isize - p as isize;
            let ys = y0.max(0) as usize..((y0 + k as isize) as usize).min(x.h);
            for ox in 0..wo {
                let x0 = (ox * s) as isize - p as isize;
                let xs = x0.max(0) as usize..((x0 + k as isize) as usize).min(x.w);
                let d = &mut dst[ox * c..(ox + 1) * c];
                d.fill(f32::NEG_INFINITY);
                for iy in ys.clone() {
                    for ix in xs.clone() {
                        let q = ((img * x.h + iy) * x.w + ix) * c;
                        for (a, v) in d.iter_mut().zip(&x.data[q..q + c]) {
                            *a = if *v > *a { *v } else { *a };
                        }
                    }
                }
            }
        });
    out
}

/// The end of a residual block without an activation after the sum (Xception's): `y += shortcut`,
/// in place.
pub fn residual_add(y: &mut Act, shortcut: &Act) {
    assert_eq!(
        (y.n, y.h, y.w, y.c),
        (shortcut.n, shortcut.h, shortcut.w, shortcut.c),
        "residual shapes differ"
    );
    y.data
        .par_chunks_mut(1 << 14)
        .zip(shortcut.data.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(v, r)| *v += r));
}

/// PyTorch's `AdaptiveAvgPool2d((oh, ow))` then `flatten(1)`: `[n][c * oh * ow]`, channel-major
/// as torchvision's classifiers expect. Window `i` covers input rows
/// `floor(i * h / oh) .. ceil((i + 1) * h / oh)` (the identity when `h == oh`).
pub fn adaptive_avg_flat(x: &Act, oh: usize, ow: usize) -> Vec<f32> {
    let (h, w, c) = (x.h, x.w, x.c);
    let mut out = vec![0.0f32; x.n * c * oh * ow];
    out.par_chunks_mut(c * oh * ow)
        .enumerate()
        .for_each(|(img, dst)| {
            for oy in 0..oh {
                let ys = (oy * h / oh)..((oy + 1) * h).div_ceil(oh);
                for ox in 0..ow {
                    let xs = (ox * w / ow)..((ox + 1) * w).div_ceil(ow);
                    let count = (ys.len() * xs.len()) as f32;
                    for ch in 0..c {
                        let mut sum = 0.0f32;
                        for iy in ys.clone() {
                            for ix in xs.clone() {
                                sum += x.data[((img * h + iy) * w + ix) * c + ch];
                            }
                        }
                        dst[(ch * oh + oy) * ow + ox] = sum / count;
                    }
                }
            }
        });
    out
}

/// A fully connected layer `y = x W^T + b` (PyTorch's `Linear`, weight `[out][in]` kept as it
/// is in the file: the GEMM reads it transposed through its strides).
#[derive(Debug, Clone)]
pub struct Linear {
    pub cin: usize,
    pub cout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    relu: bool,
}

/// Output columns per work item: VGG's 25088 x 4096 layer is 400 MB of weights, read once per
/// image; split so both cores stream their own half.
const LINEAR_COLS: usize = 256;

impl Linear {
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, cout: usize, cin: usize, relu: bool) -> Self {
        assert_eq!(weight.len(), cout * cin, "linear weight length");
        assert_eq!(bias.len(), cout, "linear bias length");
        Self {
            cin,
            cout,
            w: weight,
            b: bias,
            relu,
        }
    }

    /// `n` rows of `cin` inputs to `n` rows of `cout` outputs.
    ///
    /// One image at a time (a GEMV each): the gemm crate rounds differently for other row
    /// counts, and an image's features must not depend on the batch it came in.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cin, "linear input length");
        let mut out = vec![0.0f32; n * self.cout];
        let dst = SyncPtr(out.as_mut_ptr());
        let items: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (0..self.cout).step_by(LINEAR_COLS).map(move |c| (i, c)))
            .collect();
        items.into_par_iter().for_each(|(i, c0)| {
            let cols = LINEAR_COLS.min(self.cout - c0);
            // SAFETY: row i, columns c0..c0 + cols of `out` belong to this item alone and lie
            // inside it; the reads of `x` (row i) and `w` (rows c0.., all cin columns) are in
            // bounds by the asserts above.
            unsafe {
                gemm::gemm(
                    1,
                    cols,
                    self.cin,
                    dst.get().add(i * self.cout + c0),
                    1,
                    self.cout as isize,
                    false,
                    x.as_ptr().add(i * self.cin),
                    1,
                    self.cin as isize,
                    self.w.as_ptr().add(c0 * self.cin),
                    self.cin as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        for row in out.chunks_exact_mut(self.cout) {
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v += b;
                if self.relu {
                    *v = v.max(0.0);
                }
            }
        }
        out
    }
}

/// Softmax of each row of `cols` values, in place.
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(n: usize, h: usize, w: usize, c: usize, f: impl Fn(usize) -> f32) -> Act {
        let mut a = Act::new(n, h, w, c);
        for (i, v) in a.data.iter_mut().enumerate() {
            *v = f(i);
        }
        a
    }

    #[test]
    fn padded_max_pool_matches_a_direct_loop() {
        let x = act(2, 5, 6, 3, |i| ((i * 37) % 23) as f32 - 11.0);
        let out = max_pool(&x, 3, 2, 1);
        assert_eq!((out.h, out.w), (3, 3));
        for img in 0..2 {
            for oy in 0..3 {
                for ox in 0..3 {
                    for ch in 0..3 {
                        let mut m = f32::NEG_INFINITY;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy * 2 + ky, ox * 2 + kx);
                                if iy >= 1 && ix >= 1 && iy - 1 < 5 && ix - 1 < 6 {
                                    m = m.max(x.data[((img * 5 + iy - 1) * 6 + ix - 1) * 3 + ch]);
                                }
                            }
                        }
                        assert_eq!(out.data[((img * 3 + oy) * 3 + ox) * 3 + ch], m);
                    }
                }
            }
        }
    }

    #[test]
    fn adaptive_pool_is_the_identity_at_its_own_size_and_averages_otherwise() {
        let x = act(1, 7, 7, 2, |i| i as f32);
        let flat = adaptive_avg_flat(&x, 7, 7);
        assert_eq!(flat, x.to_nchw());
        // 3 -> 2: windows rows 0..2 and 1..3 overlap.
        let x = act(1, 3, 1, 1, |i| i as f32);
        assert_eq!(adaptive_avg_flat(&x, 2, 1), vec![0.5, 1.5]);
    }

    #[test]
    fn linear_matches_a_direct_product_whatever_the_batch() {
        let (cout, cin) = (300, 7);
        let w: Vec<f32> = (0..cout * cin)
            .map(|i| ((i % 13) as f32 - 6.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..cout).map(|i| i as f32 / 100.0 - 1.0).collect();
        let lin = Linear::new(w.clone(), b.clone(), cout, cin, true);
        let x: Vec<f32> = (0..3 * cin).map(|i| (i % 5) as f32 - 2.0).collect();
        let y = lin.forward(&x, 3);
        for i in 0..3 {
            for o in 0..cout {
                let want: f32 = (0..cin)
                    .map(|k| x[i * cin + k] * w[o * cin + k])
                    .sum::<f32>()
                    + b[o];
                assert!((y[i * cout + o] - want.max(0.0)).abs() < 1e-5);
            }
        }
        assert_eq!(lin.forward(&x[cin..2 * cin], 1), y[cout..2 * cout].to_vec());
    }
}
