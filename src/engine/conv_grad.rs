//! The weight gradient of a dense 2-D convolution (NCHW, one group), as one GEMM over the
//! whole batch.
//!
//! Why: burn's default weight gradient is a convolution of the input with the output's
//! gradient as its kernel, the batch swapped with the channels. Its "batch" is then the input
//! channels (768-2048 in InceptionV3's top), each one a matrix-vector product that re-reads and
//! re-packs the whole output gradient: measured on an InceptionV3 fine-tune (perf), those
//! products and their packing were about half of an epoch. Here the input is unfolded once
//! into `[cin * kh * kw, batch * out_h * out_w]` (im2col), the output's gradient gathered into
//! `[cout, batch * out_h * out_w]`, and one GEMM contracts the batch and the positions.

use super::depthwise_grad::Real;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The shape of one convolution: `kh x kw` taps, `cin -> cout` channels; the batch comes from
/// the tensors' lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub in_h: usize,
    pub in_w: usize,
    pub pad_top: usize,
    pub pad_bottom: usize,
    pub pad_left: usize,
    pub pad_right: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeometry {
    /// `pads` is `[(top, bottom), (left, right)]`; the output size follows from them.
    pub fn new(
        [cin, cout]: [usize; 2],
        [kh, kw]: [usize; 2],
        stride: [usize; 2],
        [in_h, in_w]: [usize; 2],
        pads: [(usize, usize); 2],
    ) -> Self {
        let out =
            |size: usize, (a, b): (usize, usize), k: usize, s: usize| (size + a + b - k) / s + 1;
        ConvGeometry {
            cin,
            cout,
            kh,
            kw,
            stride,
            in_h,
            in_w,
            pad_top: pads[0].0,
            pad_bottom: pads[0].1,
            pad_left: pads[1].0,
            pad_right: pads[1].1,
            out_h: out(in_h, pads[0], kh, stride[0]),
            out_w: out(in_w, pads[1], kw, stride[1]),
        }
    }

    fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// `[(top, bottom), (left, right)]`.
    pub fn pads(&self) -> [(usize, usize); 2] {
        [
            (self.pad_top, self.pad_bottom),
            (self.pad_left, self.pad_right),
        ]
    }
}

/// `x` `[n, cin, in_h, in_w]` and the output's gradient `grad` `[n, cout, out_h, out_w]` ->
/// the weight's gradient `[cout, cin, kh, kw]`, summed over the batch.
pub fn weight_grad<T: Real + 'static>(x: &[T], grad: &[T], g: &ConvGeometry) -> Vec<T> {
    let plane = g.in_h * g.in_w;
    let l = g.positions();
    let n = x.len() / (g.cin * plane).max(1);
    debug_assert_eq!(x.len(), n * g.cin * plane);
    debug_assert_eq!(grad.len(), n * g.cout * l);
    let taps = g.cin * g.kh * g.kw;
    let cols = n * l;
    let mut out = vec![T::default(); g.cout * taps];
    if cols == 0 || taps == 0 || g.cout == 0 {
        return out;
    }

    // Row (ci, i, j) of the unfolded input: tap (i, j) of channel ci at every output position
    // of every image, zero where it falls in the padding.
    let unfolded = rows_filled(taps * cols, cols, |row, dst| {
        let (ci, tap) = (row / (g.kh * g.kw), row % (g.kh * g.kw));
        let (i, j) = (tap / g.kw, tap % g.kw);
        for b in 0..n {
            let src = &x[(b * g.cin + ci) * plane..][..plane];
            let dst = &mut dst[b * l..][..l];
            for oy in 0..g.out_h {
                let y = (oy * g.stride[0] + i).wrapping_sub(g.pad_top);
                let dst = &mut dst[oy * g.out_w..][..g.out_w];
                if y >= g.in_h {
                    dst.iter_mut().for_each(|d| {
                        d.write(T::default());
                    });
                    continue;
                }
                let src = &src[y * g.in_w..][..g.in_w];
                for (ox, d) in dst.iter_mut().enumerate() {
                    let xx = (ox * g.stride[1] + j).wrapping_sub(g.pad_left);
                    d.write(if xx < g.in_w { src[xx] } else { T::default() });
                }
            }
        }
    });

    // The output's gradient with the batch folded into the positions: `[cout, n * l]`.
    let gathered = rows_filled(g.cout * cols, cols, |co, dst| {
        for b in 0..n {
            let src = &grad[(b * g.cout + co) * l..][..l];
            for (d, &v) in dst[b * l..][..l].iter_mut().zip(src) {
                d.write(v);
            }
        }
    });

    // out[cout, taps] = gathered[cout, cols] x unfolded[taps, cols]^T.
    // SAFETY: the three buffers hold exactly the m x k, k x n and m x n elements the strides
    // address (m = cout, n = taps, k = cols), and `out` is not aliased.
    unsafe {
        gemm::gemm(
            g.cout,
            taps,
            cols,
            out.as_mut_ptr(),
            1,
            taps as isize,
            false,
            gathered.as_ptr(),
            1,
            cols as isize,
            unfolded.as_ptr(),
            cols as isize,
            1,
            T::default(),
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

/// `len` elements in rows of `row`, each row written whole by `fill(row index, row)` on the rayon
/// pool. Why not `vec![0; len]` first: these buffers are tens of MB, and glibc serves them from
/// its heap once a few have been freed, so the zeroing is a serial memset on the calling thread
/// (a few percent of an epoch in perf) for values overwritten right after.
fn rows_filled<T: Real>(
    len: usize,
    row: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(r, dst)| fill(r, dst));
    // SAFETY: every caller's `fill` writes each element of its row (the padding as zeros).
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, summed tap by tap.
    fn naive(x: &[f64], grad: &[f64], g: &ConvGeometry) -> Vec<f64> {
        let n = x.len() / (g.cin * g.in_h * g.in_w);
        let mut out = vec![0.0; g.cout * g.cin * g.kh * g.kw];
        for b in 0..n {
            for co in 0..g.cout {
                for ci in 0..g.cin {
                    for i in 0..g.kh {
                        for j in 0..g.kw {
                            let mut s = 0.0;
                            for oy in 0..g.out_h {
                                for ox in 0..g.out_w {
                                    let y = (oy * g.stride[0] + i) as isize - g.pad_top as isize;
                                    let xx = (ox * g.stride[1] + j) as isize - g.pad_left as isize;
                                    if y < 0
                                        || xx < 0
                                        || y >= g.in_h as isize
                                        || xx >= g.in_w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * g.cin + ci) * g.in_h + y as usize) * g.in_w
                                        + xx as usize];
                                    s += xv
                                        * grad[((b * g.cout + co) * g.out_h + oy) * g.out_w + ox];
                                }
                            }
                            out[((co * g.cin + ci) * g.kh + i) * g.kw + j] += s;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_for_inception_shapes() {
        let mut rng = crate::split::SplitMix64::new(7);
        // 1x1, 1x3 "same", 3x1 "same", 3x3 stride 2 "valid", 7x1 with uneven padding.
        for (k, s, pads) in [
            ([1, 1], 1, [(0, 0), (0, 0)]),
            ([1, 3], 1, [(0, 0), (1, 1)]),
            ([3, 1], 1, [(1, 1), (0, 0)]),
            ([3, 3], 2, [(0, 0), (0, 0)]),
            ([7, 1], 1, [(3, 2), (0, 0)]),
        ] {
            let g = ConvGeometry::new([3, 5], k, [s, s], [7, 6], pads);
            let n = 2;
            let x: Vec<f64> = (0..n * 3 * 42).map(|_| rng.next_f64() - 0.5).collect();
            let grad: Vec<f64> = (0..n * 5 * g.out_h * g.out_w)
                .map(|_| rng.next_f64() - 0.5)
                .collect();
            let want = naive(&x, &grad, &g);
            let got = weight_grad(&x, &grad, &g);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-12, "{k:?} stride {s}: max difference {worst}");
            let got32 = weight_grad(
                &x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &grad.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &g,
            );
            let worst = want
                .iter()
                .zip(&got32)
                .map(|(a, b)| (a - *b as f64).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{k:?} stride {s} f32: max difference {worst}");
        }
    }
}
