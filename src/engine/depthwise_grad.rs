//! Depthwise convolution on NCHW maps with both of its gradients, for training.
//!
//! Why beside [`super::depthwise`]: inference runs NHWC with the taps packed per channel block;
//! training runs in burn's NCHW layout and needs the input and weight gradients, which burn's
//! generic grouped convolution computes one channel at a time (a slice, a one-output
//! convolution and a `slice_assign` per channel; most of a fine-tuning epoch). Here every
//! gradient is one pass over the maps, an image per task; the weight gradient adds the images'
//! partial sums in image order. Results never depend on the thread count.
//!
//! Padding is given per side, so TensorFlow's "SAME" (the odd row and column at the bottom and
//! right) and symmetric padding are both expressible; the bottom and right padding only set the
//! output size.

use crate::engine::cpu_conv::transpose_each;
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Mul};

/// The element types the kernels run in: f32 for training, f64 for gradient checks.
pub trait Real:
    Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self> + AddAssign
{
    const ONE: Self;
}

impl Real for f32 {
    const ONE: Self = 1.0;
}
impl Real for f64 {
    const ONE: Self = 1.0;
}

/// The shape of one depthwise convolution: `kernel x kernel` taps per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwGeometry {
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl DwGeometry {
    /// `pads` is `[(top, bottom), (left, right)]`.
    pub fn new(
        channels: usize,
        kernel: usize,
        stride: usize,
        [in_h, in_w]: [usize; 2],
        pads: [(usize, usize); 2],
    ) -> Self {
        assert!(kernel > 0 && stride > 0, "kernel and stride are positive");
        let out = |size: usize, (before, after): (usize, usize)| {
            let padded = size + before + after;
            assert!(
                padded >= kernel,
                "the padded map is smaller than the kernel"
            );
            (padded - kernel) / stride + 1
        };
        Self {
            channels,
            kernel,
            stride,
            in_h,
            in_w,
            pad_top: pads[0].0,
            pad_left: pads[1].0,
            out_h: out(in_h, pads[0]),
            out_w: out(in_w, pads[1]),
        }
    }

    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Calls `f(out_pixel, in_pixel, tap)` for every output pixel and every tap that reads a
    /// real input pixel (not padding), in a fixed order.
    #[inline(always)]
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        for oy in 0..self.out_h {
            for ty in 0..self.kernel {
                let Some(iy) = (oy * self.stride + ty)
                    .checked_sub(self.pad_top)
                    .filter(|&iy| iy < self.in_h)
                else {
                    continue;
                };
                for ox in 0..self.out_w {
                    for tx in 0..self.kernel {
                        let Some(ix) = (ox * self.stride + tx)
                            .checked_sub(self.pad_left)
                            .filter(|&ix| ix < self.in_w)
                        else {
                            continue;
                        };
                        f(
                            oy * self.out_w + ox,
                            iy * self.in_w + ix,
                            ty * self.kernel + tx,
                        );
                    }
                }
            }
        }
    }
}

// The kernels work channels-innermost (each image `[pixel][channel]`, the weight
// `[tap][channel]`): every step is then a multiply-add over a run of 720-1248 channels, which
// vectorises, where rows of 9-17 pixels in NCHW would not. Transposing in and out costs a pass
// over the maps each.

/// `src` as consecutive row-major `[rows][cols]` matrices -> each transposed to `[cols][rows]`.
fn transpose<T: Real>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    transpose_each(src, &mut out, rows, cols);
    out
}

/// `acc += a * b`, elementwise.
#[inline(always)]
fn mul_add<T: Real>(acc: &mut [T], a: &[T], b: &[T]) {
    for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
        *acc += a * b;
    }
}

/// Per image, `dst[d] += src[s] * weight[t]` over every output pixel `o`, input pixel `i` and
/// tap `t` that reads it: `(d, s) = (o, i)` is the forward, `(i, o)` with the output's gradient
/// as `src` is the input's gradient.
fn tap_products<T: Real, const TO_INPUT: bool>(src: &[T], weight: &[T], g: &DwGeometry) -> Vec<T> {
    let (c, taps) = (g.channels, g.kernel * g.kernel);
    let (src_plane, dst_plane) = if TO_INPUT {
        (g.out_plane(), g.in_plane())
    } else {
        (g.in_plane(), g.out_plane())
    };
    assert_eq!(weight.len(), c * taps, "depthwise weight length");
    let images = src.len().checked_div(c * src_plane).unwrap_or(0);
    let mut out = vec![T::default(); images * c * dst_plane];
    if out.is_empty() {
        return out;
    }
    let (src, w) = (transpose(src, c, src_plane), transpose(weight, c, taps));
    out.par_chunks_mut(dst_plane * c)
        .zip(src.par_chunks(src_plane * c))
        .for_each(|(dst, src)| {
            g.for_each_tap(|o, i, t| {
                // A constant: each instance compiles to one of the two loops.
                let (d, s) = if TO_INPUT { (i, o) } else { (o, i) };
                mul_add(&mut dst[d * c..][..c], &src[s * c..][..c], &w[t * c..][..c])
            });
        });
    transpose(&out, dst_plane, c)
}

/// `x` `[n][channels][in_h][in_w]`, `weight` `[channels][kernel][kernel]` -> `[n][channels][out_h][out_w]`.
pub fn forward<T: Real>(x: &[T], weight: &[T], g: &DwGeometry) -> Vec<T> {
    let ip = g.in_plane();
    assert_eq!(
        x.len() % (g.channels * ip).max(1),
        0,
        "depthwise input length"
    );
    tap_products::<T, false>(x, weight, g)
}

/// The gradient of the input: `grad` `[n][channels][out_h][out_w]` -> `[n][channels][in_h][in_w]`.
pub fn input_grad<T: Real>(grad: &[T], weight: &[T], g: &DwGeometry) -> Vec<T> {
    tap_products::<T, true>(grad, weight, g)
}

/// The gradient of the weight, summed over the batch: -> `[channels][kernel][kernel]`.
pub fn weight_grad<T: Real>(x: &[T], grad: &[T], g: &DwGeometry) -> Vec<T> {
    let (c, ip, op, taps) = (g.channels, g.in_plane(), g.out_plane(), g.kernel * g.kernel);
    let images = x.len().checked_div(c * ip).unwrap_or(0);
    assert_eq!(grad.len(), images * c * op, "depthwise gradient length");
    let mut total = vec![T::default(); taps * c];
    if images > 0 && op > 0 {
        let (x, gy) = (transpose(x, c, ip), transpose(grad, c, op));
        // One partial sum per image, added up in image order: the same result on any number
        // of threads.
        let partials: Vec<Vec<T>> = x
            .par_chunks(ip * c)
            .zip(gy.par_chunks(op * c))
            .map(|(x, gy)| {
                let mut gw = vec![T::default(); taps * c];
                g.for_each_tap(|o, i, t| {
                    mul_add(&mut gw[t * c..][..c], &gy[o * c..][..c], &x[i * c..][..c])
                });
                gw
            })
            .collect();
        for partial in &partials {
            for (t, &p) in total.iter_mut().zip(partial) {
                *t += p;
            }
        }
    }
    transpose(&total, taps, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight from the definition, padding read as zeros.
    fn reference(x: &[f32], w: &[f32], g: &DwGeometry) -> Vec<f32> {
        let images = x.len() / (g.channels * g.in_h * g.in_w);
        let mut out = vec![0.0; images * g.channels * g.out_h * g.out_w];
        for n in 0..images {
            for c in 0..g.channels {
                for oy in 0..g.out_h {
                    for ox in 0..g.out_w {
                        let mut s = 0.0;
                        for ty in 0..g.kernel {
                            for tx in 0..g.kernel {
                                let iy = (oy * g.stride + ty) as isize - g.pad_top as isize;
                                let ix = (ox * g.stride + tx) as isize - g.pad_left as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xi = ((n * g.channels + c) * g.in_h + iy as usize) * g.in_w
                                    + ix as usize;
                                s += w[(c * g.kernel + ty) * g.kernel + tx] * x[xi];
                            }
                        }
                        out[((n * g.channels + c) * g.out_h + oy) * g.out_w + ox] = s;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn geometries() -> Vec<DwGeometry> {
        let mut all = Vec::new();
        for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
            for (h, w) in [(7, 6), (9, 9), (4, 5), (1, 1)] {
                let total = |size: usize| {
                    let out = size.div_ceil(s);
                    ((out - 1) * s + k).saturating_sub(size)
                };
                let same = |size| (total(size) / 2, total(size) - total(size) / 2);
                all.push(DwGeometry::new(3, k, s, [h, w], [same(h), same(w)]));
                all.push(DwGeometry::new(
                    3,
                    k,
                    s,
                    [h, w],
                    [(k / 2, k / 2), (0, k - 1)],
                ));
            }
        }
        all
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries() {
            let x = values(2 * g.channels * g.in_h * g.in_w, 1);
            let w = values(g.channels * g.kernel * g.kernel, 2);
            let got = forward(&x, &w, &g);
            let want = reference(&x, &w, &g);
            assert_eq!(got.len(), want.len(), "{g:?}");
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5, "{g:?}: {a} vs {b}");
            }
        }
    }

    /// Both gradients against the adjoint identity <forward(x), y> = <x, input_grad(y)> and
    /// <forward(x; w), y> = <w, weight_grad(x, y)>: the forward is linear in each argument.
    #[test]
    fn gradients_are_the_adjoints_of_the_forward() {
        for g in geometries() {
            let x = values(2 * g.channels * g.in_h * g.in_w, 3);
            let w = values(g.channels * g.kernel * g.kernel, 4);
            let y = values(2 * g.channels * g.out_h * g.out_w, 5);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let fy = dot(&reference(&x, &w, &g), &y);
            let gx = input_grad(&y, &w, &g);
            assert_eq!(gx.len(), x.len());
            assert!((fy - dot(&x, &gx)).abs() <= 1e-4, "{g:?}: input gradient");
            let gw = weight_grad(&x, &y, &g);
            assert_eq!(gw.len(), w.len());
            assert!((fy - dot(&w, &gw)).abs() <= 1e-4, "{g:?}: weight gradient");
        }
    }
}
