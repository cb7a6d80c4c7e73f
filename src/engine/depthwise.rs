//! Depthwise convolution (one kxk filter per channel) on NHWC activations, the middle of every
//! inverted-residual block (MobileNet v2, EfficientNet-Lite).
//!
//! Why not a grouped GEMM: with one input channel per group the "GEMM" is a dot product of k*k
//! values, so packing and microkernel set-up would cost more than the arithmetic. The layer is
//! memory-bound instead (about 2*k*k flops per input value), so the kernel reads each input
//! once per tap from cache, keeps a block of channels in vector registers, and writes each
//! output once with bias and activation already applied.
//!
//! Layout: channels are innermost in NHWC, so a block of 16 (or 8) consecutive channels of a
//! pixel is one or two vector registers; the taps of a channel block are hoisted into a local
//! array before the row's pixels are swept. The same generic code is compiled three times:
//! portable (whatever the build target allows, mul then add), AVX2+FMA and AVX-512 (fused
//! multiply-add), picked by the engine's one dispatch ([`cpu::simd`], `DLTOOL_SIMD`). The
//! paths differ only in FMA rounding; each is
//! deterministic and computes every output from its own pixel's taps in a fixed order, so
//! results never depend on the batch size or the thread count.

use crate::engine::cpu::{self, Simd};
use crate::engine::cpu_conv::{Act, Epilogue, same_padding};
use rayon::prelude::*;

/// A depthwise convolution with its weights packed per tap: `w[ky][kx][c]`, BatchNorm folded.
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
    epilogue: Epilogue,
    /// Reads `max(x, 0)` instead of `x` (a ReLU before the convolution that must not change
    /// its input, which is also a shortcut: Xception's blocks).
    relu_input: bool,
    /// A path forced for this convolution alone (tests); `None`: [`cpu::simd`].
    simd: Option<Simd>,
}

impl DepthwiseConv {
    /// From a weight in PyTorch's `[c][1][k][k]` order and `c` biases; pads like TensorFlow's
    /// "SAME" (the odd row or column at the bottom or right). Only 3x3 and 5x5 kernels.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        channels: usize,
        kernel: usize,
        stride: usize,
        epilogue: Epilogue,
    ) -> Self {
        assert!(
            kernel == 3 || kernel == 5,
            "depthwise kernels are 3x3 or 5x5"
        );
        assert!(stride == 1 || stride == 2, "depthwise strides are 1 or 2");
        assert_eq!(weight.len(), channels * kernel * kernel, "weight length");
        assert_eq!(bias.len(), channels, "bias length");
        let taps = kernel * kernel;
        let mut w = vec![0.0; taps * channels];
        for c in 0..channels {
            for t in 0..taps {
                w[t * channels + c] = weight[c * taps + t];
            }
        }
        Self {
            channels,
            kernel,
            stride,
            w,
            bias: bias.to_vec(),
            epilogue,
            relu_input: false,
            simd: None,
        }
    }

    /// The same convolution of `max(x, 0)`, the ReLU applied to each value as it is loaded
    /// (no pass over the input, which stays as it is). Only with [`Epilogue::None`].
    pub fn with_relu_input(mut self) -> Self {
        assert_eq!(
            self.epilogue,
            Epilogue::None,
            "an input ReLU goes with a bare depthwise output"
        );
        self.relu_input = true;
        self
    }

    /// The same convolution computed by another path (tests compare them).
    pub fn with_simd(mut self, simd: Simd) -> Self {
        assert!(simd.available(), "{simd:?} is not available on this CPU");
        self.simd = Some(simd);
        self
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            same_padding(h, self.kernel, self.stride).0,
            same_padding(w, self.kernel, self.stride).0,
        )
    }

    /// Input rows `lo..hi` that output rows `oy0..oy0 + rows` of an `h`-row input read
    /// (padding excluded).
    pub fn input_rows(&self, h: usize, oy0: usize, rows: usize) -> (usize, usize) {
        let pad_top = same_padding(h, self.kernel, self.stride).1 as isize;
        let lo = (oy0 * self.stride) as isize - pad_top;
        let hi = ((oy0 + rows - 1) * self.stride + self.kernel) as isize - pad_top;
        (lo.max(0) as usize, (hi.max(0) as usize).min(h))
    }

    fn geometry(&self, h: usize, w: usize, row0: usize) -> Geometry {
        Geometry {
            h,
            w,
            c: self.channels,
            stride: self.stride,
            pad_top: same_padding(h, self.kernel, self.stride).1,
            pad_left: same_padding(w, self.kernel, self.stride).1,
            wo: self.out_hw(h, w).1,
            relu_input: self.relu_input,
            row0,
        }
    }

    /// Output rows `oy0..oy0 + rows` of one `h` x `w` image into `dst` (`[rows][wo][c]`),
    /// reading from `src` the image's input rows from `row0` on (`[..][w][c]`; at least those
    /// that [`Self::input_rows`] names): a band of a larger map, for callers that compute
    /// the input band by band.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_band(
        &self,
        src: &[f32],
        row0: usize,
        h: usize,
        w: usize,
        oy0: usize,
        rows: usize,
        dst: &mut [f32],
    ) {
        let geo = self.geometry(h, w, row0);
        let row_len = geo.wo * self.channels;
        assert!(
            dst.len() >= rows * row_len,
            "destination too short for the band"
        );
        for (i, d) in dst.chunks_exact_mut(row_len).take(rows).enumerate() {
            self.row(&geo, src, oy0 + i, d);
        }
    }

    pub fn forward(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.channels, "input channels");
        let (ho, wo) = self.out_hw(x.h, x.w);
        let mut out = Act::new(x.n, ho, wo, self.channels);
        let geo = self.geometry(x.h, x.w, 0);
        let image = x.h * x.w * x.c;
        out.data
            .par_chunks_mut(wo * self.channels)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, oy) = (row / ho, row % ho);
                let src = &x.data[img * image..(img + 1) * image];
                self.row(&geo, src, oy, dst);
            });
        out
    }

    /// One output row, through the chosen path.
    fn row(&self, g: &Geometry, src: &[f32], oy: usize, dst: &mut [f32]) {
        let (w, b, e) = (&self.w[..], &self.bias[..], self.epilogue);
        match (self.simd.unwrap_or_else(cpu::simd), self.kernel) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `cpu::simd` and `with_simd` only give paths the CPU has.
            (Simd::Avx512, 3) => unsafe { row_avx512::<3>(g, src, w, b, e, oy, dst) },
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512, _) => unsafe { row_avx512::<5>(g, src, w, b, e, oy, dst) },
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, 3) => unsafe { row_avx2::<3>(g, src, w, b, e, oy, dst) },
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, _) => unsafe { row_avx2::<5>(g, src, w, b, e, oy, dst) },
            (_, 3) => row_generic::<Plain, 3>(g, src, w, b, e, oy, dst),
            _ => row_generic::<Plain, 5>(g, src, w, b, e, oy, dst),
        }
    }
}

/// Sizes shared by every row of one call.
struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    wo: usize,
    relu_input: bool,
    /// The input row at the start of `src` (a band's first; 0 for a whole image).
    row0: usize,
}

/// `a * b + c`, fused or not.
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Separate multiply and add: without FMA hardware `f32::mul_add` is a slow library call.
pub(crate) struct Plain;
impl MulAdd for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One rounding: becomes a vector FMA inside functions compiled with the `fma` feature.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Fused;
#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const K: usize>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    e: Epilogue,
    oy: usize,
    dst: &mut [f32],
) {
    row_generic::<Fused, K>(g, src, w, bias, e, oy, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_avx512<const K: usize>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    e: Epilogue,
    oy: usize,
    dst: &mut [f32],
) {
    row_generic::<Fused, K>(g, src, w, bias, e, oy, dst)
}

/// Output row `oy` of one image (`src`: `[h][w][c]`) into `dst` (`[wo][c]`): channel blocks
/// of 16, then 8, then single channels (EfficientNet's widths are multiples of 8).
#[inline(always)]
fn row_generic<M: MulAdd, const K: usize>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    e: Epilogue,
    oy: usize,
    dst: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + 16 <= g.c {
        block::<M, K, 16>(g, src, w, bias, e, oy, c0, dst);
        c0 += 16;
    }
    while c0 + 8 <= g.c {
        block::<M, K, 8>(g, src, w, bias, e, oy, c0, dst);
        c0 += 8;
    }
    while c0 < g.c {
        block::<M, K, 1>(g, src, w, bias, e, oy, c0, dst);
        c0 += 1;
    }
}

/// The epilogue as a constant of [`block_with`], so that every variant's store is a vector
/// operation (a runtime match per lane kept the accumulator on the stack and stored it one
/// lane at a time: most of Xception's depthwise time, where the epilogue is `None`).
const E_NONE: u8 = 0;
const E_BIAS: u8 = 1;
const E_RELU: u8 = 2;
const E_RELU6: u8 = 3;

/// Output pixels one sweep of [`block_with`] computes together inside the image: their
/// accumulators are independent chains of FMAs (one chain per pixel left the FMA units waiting
/// on each other's latency), and with stride 1 neighbours share each loaded input column.
const PIXELS: usize = 4;

/// [`block_with`] for this call's stride, epilogue and input ReLU, all compile-time constants
/// there. The input ReLU only with a bare output (`with_relu_input`): five epilogue variants
/// per stride, not eight.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<M: MulAdd, const K: usize, const L: usize>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    e: Epilogue,
    oy: usize,
    c0: usize,
    dst: &mut [f32],
) {
    macro_rules! run {
        ($e:expr, $s:literal, $relu:literal) => {
            block_with::<M, K, L, { $e }, $s, $relu>(g, src, w, bias, oy, c0, dst)
        };
    }
    macro_rules! per_epilogue {
        ($s:literal) => {
            match (e, g.relu_input) {
                (Epilogue::None, true) => run!(E_NONE, $s, true),
                (Epilogue::None, false) => run!(E_NONE, $s, false),
                (Epilogue::Bias, _) => run!(E_BIAS, $s, false),
                (Epilogue::BiasRelu, _) => run!(E_RELU, $s, false),
                (Epilogue::BiasRelu6, _) => run!(E_RELU6, $s, false),
            }
        };
    }
    match g.stride {
        1 => per_epilogue!(1),
        _ => per_epilogue!(2),
    }
}

/// Channels `c0..c0 + L` of output row `oy`: the block's taps and biases are loaded once,
/// then each output pixel sums its taps inside the image (zero padding contributes nothing)
/// in a fixed order (ky, then kx) and is stored once, epilogue applied. Runs of [`PIXELS`]
/// pixels whose windows lie inside the image take a branch-free, fully unrolled path that
/// adds each pixel's taps in that same order, so both paths give the same bits.
#[allow(clippy::too_many_arguments)]
// Index loops over the L lanes and K taps: fixed-size arrays the compiler keeps in registers;
// max then min as in cpu_conv's epilogue (NaN -> 0 on every path).
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::manual_clamp)]
fn block_with<
    M: MulAdd,
    const K: usize,
    const L: usize,
    const E: u8,
    const S: usize,
    const RELU_IN: bool,
>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    oy: usize,
    c0: usize,
    dst: &mut [f32],
) {
    let c = g.c;
    let mut taps = [[[0.0f32; L]; K]; K];
    for ky in 0..K {
        for kx in 0..K {
            taps[ky][kx].copy_from_slice(&w[(ky * K + kx) * c + c0..][..L]);
        }
    }
    let b: [f32; L] = bias[c0..c0 + L].try_into().expect("L biases");
    let iy0 = (oy * S) as isize - g.pad_top as isize;
    let ky_lo = (-iy0).max(0) as usize;
    let ky_hi = (g.h as isize - iy0).clamp(0, K as isize) as usize;
    let rows_inside = ky_lo == 0 && ky_hi == K;
    // The rows this output row reads, as rows of `src` (which starts at input row `row0`).
    let first = (iy0 + ky_lo as isize) as usize;
    let last = (iy0 + ky_hi as isize) as usize;
    assert!(first >= g.row0 && (last - g.row0) * g.w * c <= src.len() && dst.len() >= g.wo * c);
    let iy0 = iy0 - g.row0 as isize;
    let src = src.as_ptr();
    let dst = dst.as_mut_ptr();
    let store = |ox: usize, acc: &[f32; L]| {
        // SAFETY: callers pass ox < wo, and c0 + L <= c: inside dst (asserted).
        let out = unsafe { &mut *(dst.add(ox * c + c0) as *mut [f32; L]) };
        for l in 0..L {
            out[l] = match E {
                E_NONE => acc[l],
                E_BIAS => acc[l] + b[l],
                E_RELU => (acc[l] + b[l]).max(0.0),
                _ => (acc[l] + b[l]).max(0.0).min(6.0),
            };
        }
    };
    // Input columns a run of PIXELS outputs reads.
    let span = (PIXELS - 1) * S + K;
    let mut ox = 0;
    while ox < g.wo {
        let ix0 = (ox * S) as isize - g.pad_left as isize;
        if rows_inside && ix0 >= 0 && ox + PIXELS <= g.wo && ix0 as usize + span <= g.w {
            let base = (iy0 as usize * g.w + ix0 as usize) * c + c0;
            let mut acc = [[0.0f32; L]; PIXELS];
            for ky in 0..K {
                for col in 0..span {
                    // SAFETY: every window of the run lies inside the image's rows that
                    // src holds, so this pixel's L channels from c0 lie inside src (asserted).
                    let xv = unsafe { load::<L, RELU_IN>(src.add(base + (ky * g.w + col) * c)) };
                    for j in 0..PIXELS {
                        // Column col is tap kx = col - j * S of output j, if that is a tap.
                        if col >= j * S && col - j * S < K {
                            let kx = col - j * S;
                            for l in 0..L {
                                acc[j][l] = M::mul_add(xv[l], taps[ky][kx][l], acc[j][l]);
                            }
                        }
                    }
                }
            }
            for (j, a) in acc.iter().enumerate() {
                store(ox + j, a);
            }
            ox += PIXELS;
            continue;
        }
        let mut acc = [0.0f32; L];
        let kx_lo = (-ix0).max(0) as usize;
        let kx_hi = (g.w as isize - ix0).clamp(0, K as isize) as usize;
        // Loops over all K taps with the bounds as tests, not as loop limits: the compiler
        // unrolls them, so the taps stay in registers instead of being indexed on the stack.
        for ky in 0..K {
            if ky < ky_lo || ky >= ky_hi {
                continue;
            }
            let line = (iy0 + ky as isize) as usize * g.w;
            for kx in 0..K {
                if kx < kx_lo || kx >= kx_hi {
                    continue;
                }
                let p = (line + (ix0 + kx as isize) as usize) * c + c0;
                // SAFETY: row iy0 + ky of src lies in first - row0..last - row0 and
                // ix0 + kx in 0..w (the tap ranges above), so p + L <= src.len() (asserted).
                let xv = unsafe { load::<L, RELU_IN>(src.add(p)) };
                for l in 0..L {
                    acc[l] = M::mul_add(xv[l], taps[ky][kx][l], acc[l]);
                }
            }
        }
        store(ox, &acc);
        ox += 1;
    }
}

/// The `L` floats at `p`, through a ReLU when `RELU_IN`.
///
/// # Safety
/// `p` points at `L` readable floats.
#[inline(always)]
unsafe fn load<const L: usize, const RELU_IN: bool>(p: *const f32) -> [f32; L] {
    // SAFETY: the caller vouches for p.
    let mut v = unsafe { *(p as *const [f32; L]) };
    if RELU_IN {
        v.iter_mut().for_each(|x| *x = x.max(0.0));
    }
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reproducible values in -2..2.
    pub(crate) fn pseudo(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Straight from the definition, in f64: NHWC input, `[c][k][k]` weights, TF SAME padding.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        wt: &[f32],
        b: &[f32],
        k: usize,
        s: usize,
        e: Epilogue,
    ) -> Vec<f32> {
        let (ho, pt) = same_padding(h, k, s);
        let (wo, pl) = same_padding(w, k, s);
        let mut out = vec![0.0; n * ho * wo * c];
        for i in 0..n {
            for oy in 0..ho {
                for ox in 0..wo {
                    for ch in 0..c {
                        let mut sum = 0.0f64;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - pt as isize;
                                let ix = (ox * s + kx) as isize - pl as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((i * h + iy as usize) * w + ix as usize) * c + ch];
                                sum += xv as f64 * wt[(ch * k + ky) * k + kx] as f64;
                            }
                        }
                        out[((i * ho + oy) * wo + ox) * c + ch] = e.apply(sum as f32, b[ch]);
                    }
                }
            }
        }
        out
    }

    /// Every available path, for every kernel, stride, odd/even size and channel tail, against
    /// the definition. Says which paths this CPU could check.
    #[test]
    fn every_path_matches_the_definition() {
        let paths = Simd::available_paths();
        eprintln!("depthwise paths checked on this CPU: {paths:?}");
        assert!(paths.contains(&Simd::Scalar));
        for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
            // 40 = 16 + 16 + 8; 27 = 16 + 8 + 3 single channels.
            for (h, w, c) in [(9, 8, 40), (8, 11, 27), (2, 3, 16), (1, 1, 8)] {
                let n = 2;
                let x = pseudo(n * h * w * c, (k * 100 + h * 10 + c) as u64);
                let wt = pseudo(c * k * k, 7 + c as u64);
                let b = pseudo(c, 3);
                let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
                for (e, relu_input) in [
                    (Epilogue::BiasRelu6, false),
                    (Epilogue::Bias, false),
                    (Epilogue::BiasRelu, false),
                    (Epilogue::None, false),
                    (Epilogue::None, true),
                ] {
                    let input = if relu_input { &relu } else { &x };
                    let want = naive(input, [n, h, w, c], &wt, &b, k, s, e);
                    // The ReLU'd convolution reads the input as it is.
                    let xa = Act::from_vec(n, h, w, c, x.clone());
                    for &isa in &paths {
                        let mut conv = DepthwiseConv::new(&wt, &b, c, k, s, e).with_simd(isa);
                        if relu_input {
                            conv = conv.with_relu_input();
                        }
                        let got = conv.forward(&xa);
                        assert_eq!(
                            (got.h, got.w),
                            (h.div_ceil(s), w.div_ceil(s)),
                            "SAME output size"
                        );
                        let worst = got
                            .data
                            .iter()
                            .zip(&want)
                            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(
                            worst <= 1e-5,
                            "{isa:?} k{k} s{s} {h}x{w}x{c} {e:?} relu input {relu_input}: \
                             max |diff| {worst}"
                        );
                    }
                }
            }
        }
    }

    /// ReLU6 clips at both ends, and the odd SAME padding row/column is at the bottom/right:
    /// a 3x3 stride-2 all-ones filter over a 4x4 ramp sees rows/cols 0..=2 at (0, 0), not the
    /// padding above and left of the image.
    #[test]
    fn same_padding_puts_the_extra_row_at_the_end() {
        let x: Vec<f32> = (0..16).map(|v| v as f32 / 10.0).collect();
        let xa = Act::from_vec(1, 4, 4, 1, x);
        let conv = DepthwiseConv::new(&[1.0; 9], &[0.0], 1, 3, 2, Epilogue::Bias);
        let got = conv.forward(&xa);
        // (0,0): rows 0..=2, cols 0..=2 → (0+1+2 + 4+5+6 + 8+9+10) / 10 = 4.5.
        // (1,1): rows 2..=3, cols 2..=3 (row/col 4 is padding) → (10+11+14+15) / 10 = 5.0.
        assert_eq!(got.data.len(), 4);
        assert!((got.data[0] - 4.5).abs() < 1e-6, "{:?}", got.data);
        assert!((got.data[3] - 5.0).abs() < 1e-6, "{:?}", got.data);
        let relu6 = DepthwiseConv::new(&[1.0; 9], &[-5.0], 1, 3, 2, Epilogue::BiasRelu6);
        let clipped = relu6.forward(&xa);
        assert_eq!(clipped.data[0], 0.0, "4.5 - 5 clips to 0");
        let big = DepthwiseConv::new(&[10.0; 9], &[0.0], 1, 3, 2, Epilogue::BiasRelu6);
        assert_eq!(big.forward(&xa).data[3], 6.0, "50 clips to 6");
    }

    /// An image's output does not depend on what else is in the batch or how many threads run.
    #[test]
    fn output_is_independent_of_batch_and_threads() {
        let (h, w, c) = (13, 13, 48);
        let x = pseudo(3 * h * w * c, 11);
        let wt = pseudo(c * 25, 5);
        let b = pseudo(c, 2);
        let conv = DepthwiseConv::new(&wt, &b, c, 5, 2, Epilogue::BiasRelu6);
        let batch = conv.forward(&Act::from_vec(3, h, w, c, x.clone()));
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let per = h * w * c;
        let out_per = batch.data.len() / 3;
        for i in 0..3 {
            let alone = Act::from_vec(1, h, w, c, x[i * per..(i + 1) * per].to_vec());
            let single = one_thread.install(|| conv.forward(&alone));
            assert_eq!(
                single.data[..],
                batch.data[i * out_per..(i + 1) * out_per],
                "image {i}: batch of 3 on the global pool vs alone on one thread"
            );
        }
    }
}
