//! Direct convolution for shallow inputs: a network's first layer on RGB pixels, and 1x1
//! convolutions from few channels (an inverted-residual block's expansion from 16-48).
//!
//! Why not im2col + GEMM there: with three input channels each im2col row is built from a few
//! 3-float pieces (9 for a 3x3 kernel), and at depths of 16-48 (27 for a 3x3 first layer) the
//! GEMM spends about as long packing and storing as multiplying, then the epilogue reads and
//! writes the output once more. Measured on one thread: EfficientNet-Lite0's stem ran at
//! 21-36 GFLOP/s by im2col, and 1x1 expansions from 16 and 24 channels at 62 and 82 GFLOP/s
//! through the GEMM against 80-91 and 102-106 here (from 80 channels on the GEMM is as fast or
//! faster). Here each output pixel reads its window straight from the NHWC input: a run of
//! [`PIXELS`] neighbouring pixels and up to 48 output channels live in vector registers while
//! the taps stream past, each tap's weights loaded once for the run, and the bias and
//! activation are applied before the one store.
//!
//! Taps are summed in im2col's order (kernel row, kernel column, input channel) with one fused
//! multiply-add each, starting from zero, and taps in the padding are skipped (im2col's zeros
//! add nothing): the same bits as im2col + GEMM, and each output depends on its own window
//! alone, whatever the batch, band or thread count.

use crate::engine::cpu::{self, Simd};
use crate::engine::cpu_conv::Epilogue;
#[cfg(target_arch = "x86_64")]
use crate::engine::depthwise::Fused;
use crate::engine::depthwise::{MulAdd, Plain};

/// Output pixels computed together: independent accumulator chains that share each tap's
/// weight vectors.
const PIXELS: usize = 6;

/// Lanes of one accumulator vector.
const LANES: usize = 16;

/// Sizes of one call: an image `h` x `w` x `cin` in, `wo` output columns of `cout` channels.
pub struct Geometry {
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding before the first row and column.
    pub pad: [usize; 2],
    pub wo: usize,
    pub cout: usize,
}

/// A convolution's weights as im2col's `[kh * kw * cin][cout]`, its biases, and what to apply
/// before storing.
pub struct Weights<'a> {
    pub w: &'a [f32],
    pub bias: &'a [f32],
    pub epilogue: Epilogue,
}

/// Whether [`row`] computes a convolution of this shape: few input channels, output channels
/// in whole vectors.
pub fn applies(cin: usize, cout: usize) -> bool {
    cin <= 4 && cout.is_multiple_of(LANES)
}

/// Input channels up to which a 1x1 convolution runs here rather than through the GEMM: at such
/// depths the GEMM spends as long packing and storing as multiplying (an inverted-residual
/// block's expansion from 16-48 channels).
pub const POINTWISE_MAX_CIN: usize = 48;

/// Whether [`pointwise`] computes a 1x1 convolution from `cin` to `cout` channels.
pub fn applies_pointwise(cin: usize, cout: usize) -> bool {
    cin <= POINTWISE_MAX_CIN && cout.is_multiple_of(LANES)
}

/// Output row `oy` of one image (`src`: `[h][w][cin]`) into `dst` (`[wo][cout]`).
pub fn row(g: &Geometry, src: &[f32], k: &Weights<'_>, oy: usize, dst: &mut [f32]) {
    assert!(g.cout.is_multiple_of(LANES) && k.bias.len() >= g.cout);
    assert!(src.len() >= g.h * g.w * g.cin && dst.len() >= g.wo * g.cout);
    assert!(k.w.len() >= g.kernel[0] * g.kernel[1] * g.cin * g.cout);
    match cpu::simd() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `cpu::simd` only gives paths the CPU has.
        Simd::Avx512 => unsafe { row_avx512(g, src, k, oy, dst) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { row_avx2(g, src, k, oy, dst) },
        _ => row_generic::<Plain>(g, src, k, oy, dst),
    }
}

/// A 1x1 convolution of `m` pixels (`src`: `[m][cin]`) into `dst` (`[m][cout]`): the pixels
/// as one row of an image one pixel high.
pub fn pointwise(src: &[f32], m: usize, cin: usize, cout: usize, k: &Weights<'_>, dst: &mut [f32]) {
    let g = Geometry {
        h: 1,
        w: m,
        cin,
        kernel: [1, 1],
        stride: [1, 1],
        pad: [0, 0],
        wo: m,
        cout,
    };
    row(&g, src, k, 0, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_avx512(g: &Geometry, src: &[f32], k: &Weights<'_>, oy: usize, dst: &mut [f32]) {
    row_generic::<Fused>(g, src, k, oy, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(g: &Geometry, src: &[f32], k: &Weights<'_>, oy: usize, dst: &mut [f32]) {
    row_generic::<Fused>(g, src, k, oy, dst)
}

/// The epilogue as a constant of [`block`], so that the store stays a vector operation.
const E_NONE: u8 = 0;
const E_BIAS: u8 = 1;
const E_RELU: u8 = 2;
const E_RELU6: u8 = 3;

/// Output channels in blocks of 48 (18 accumulators: more spilled), then 32, then 16.
#[inline(always)]
fn row_generic<M: MulAdd>(g: &Geometry, src: &[f32], k: &Weights<'_>, oy: usize, dst: &mut [f32]) {
    let (w, bias) = (k.w, k.bias);
    macro_rules! blocks {
        ($e:expr) => {{
            let mut co = 0;
            while co + 48 <= g.cout {
                block::<M, 3, { $e }>(g, src, w, bias, oy, co, dst);
                co += 48;
            }
            while co + 32 <= g.cout {
                block::<M, 2, { $e }>(g, src, w, bias, oy, co, dst);
                co += 32;
            }
            while co < g.cout {
                block::<M, 1, { $e }>(g, src, w, bias, oy, co, dst);
                co += 16;
            }
        }};
    }
    match k.epilogue {
        Epilogue::None => blocks!(E_NONE),
        Epilogue::Bias => blocks!(E_BIAS),
        Epilogue::BiasRelu => blocks!(E_RELU),
        Epilogue::BiasRelu6 => blocks!(E_RELU6),
    }
}

/// Channels `co..co + 16 * V` of output row `oy`.
// Index loops over fixed-size arrays, which the compiler keeps in registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
// max then min as in cpu_conv's epilogue (NaN -> 0 on every path).
#[allow(clippy::manual_clamp)]
fn block<M: MulAdd, const V: usize, const E: u8>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
    bias: &[f32],
    oy: usize,
    co: usize,
    dst: &mut [f32],
) {
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let (cin, cout) = (g.cin, g.cout);
    let kwc = kw * cin;
    let iy0 = (oy * sh) as isize - g.pad[0] as isize;
    let ky_lo = (-iy0).max(0) as usize;
    let ky_hi = (g.h as isize - iy0).clamp(0, kh as isize) as usize;
    let weights = |t: usize| weights_at::<V>(w, t * cout + co);
    let b = weights_at::<V>(bias, co);
    let store = |ox: usize, acc: &[[f32; LANES]; V], dst: &mut [f32]| {
        for i in 0..V {
            let out = &mut dst[ox * cout + co + i * LANES..][..LANES];
            for l in 0..LANES {
                let (a, b) = (acc[i][l], b[i][l]);
                out[l] = match E {
                    E_NONE => a,
                    E_BIAS => a + b,
                    E_RELU => (a + b).max(0.0),
                    _ => (a + b).max(0.0).min(6.0),
                };
            }
        }
    };
    let mut ox = 0;
    while ox < g.wo {
        let ix0 = (ox * sw) as isize - g.pad[1] as isize;
        let last_ix = ix0 + ((PIXELS - 1) * sw + kw) as isize;
        if ky_lo == 0 && ky_hi == kh && ix0 >= 0 && ox + PIXELS <= g.wo && last_ix <= g.w as isize {
            // Every window of the run lies inside the image.
            let base = (iy0 as usize * g.w + ix0 as usize) * cin;
            let mut acc = [[[0.0f32; LANES]; V]; PIXELS];
            let (sp, wp) = (src.as_ptr(), w.as_ptr());
            for ky in 0..kh {
                for j in 0..kwc {
                    // SAFETY: tap ky * kwc + j < kh * kw * cin and co + 16 * V <= cout, so
                    // these weights lie inside w (length asserted in `row`).
                    let wv = unsafe {
                        *(wp.add((ky * kwc + j) * cout + co) as *const [[f32; LANES]; V])
                    };
                    for p in 0..PIXELS {
                        // SAFETY: every window of the run lies inside the image, so pixel p's
                        // tap lies inside src (length asserted in `row`).
                        let xv = unsafe { *sp.add(base + ky * g.w * cin + p * sw * cin + j) };
                        for i in 0..V {
                            for l in 0..LANES {
                                acc[p][i][l] = M::mul_add(xv, wv[i][l], acc[p][i][l]);
                            }
                        }
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                store(ox + p, a, dst);
            }
            ox += PIXELS;
            continue;
        }
        // A window that crosses the padding (or the row's last few pixels): one pixel, the
        // taps outside the image skipped.
        let kx_lo = (-ix0).max(0) as usize;
        let kx_hi = (g.w as isize - ix0).clamp(0, kw as isize) as usize;
        let mut acc = [[0.0f32; LANES]; V];
        for ky in ky_lo..ky_hi {
            let iy = (iy0 + ky as isize) as usize;
            for kx in kx_lo..kx_hi {
                let ix = (ix0 + kx as isize) as usize;
                let pixel = &src[(iy * g.w + ix) * cin..][..cin];
                for (ci, &xv) in pixel.iter().enumerate() {
                    let wv = weights((ky * kw + kx) * cin + ci);
                    for i in 0..V {
                        for l in 0..LANES {
                            acc[i][l] = M::mul_add(xv, wv[i][l], acc[i][l]);
                        }
                    }
                }
            }
        }
        store(ox, &acc, dst);
        ox += 1;
    }
}

/// `V` vectors of lanes from `at` on.
#[inline(always)]
fn weights_at<const V: usize>(w: &[f32], at: usize) -> [[f32; LANES]; V] {
    let mut v = [[0.0; LANES]; V];
    for (i, lanes) in v.iter_mut().enumerate() {
        lanes.copy_from_slice(&w[at + i * LANES..][..LANES]);
    }
    v
}
