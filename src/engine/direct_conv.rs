//! Direct convolution for inputs with few channels: a network's first layer, on RGB pixels.
//!
//! Why not im2col + GEMM there: with three input channels each im2col row is built from a few
//! 3-float pieces (9 for a 3x3 kernel), and the GEMM's depth is only 27 (147 for 7x7), so
//! copying and packing cost as much as the arithmetic; measured, EfficientNet-Lite0's stem ran
//! at 21-36 GFLOP/s of 330, about 8% of the network's time. Here each output pixel reads its
//! window straight from the NHWC input: a run of [`PIXELS`] neighbouring pixels and up to 64
//! output channels live in vector registers while the taps stream past, each tap's weights
//! loaded once for the run.
//!
//! Taps are summed in im2col's order (kernel row, kernel column, input channel) with one fused
//! multiply-add each, starting from zero, and taps in the padding are skipped (im2col's zeros
//! add nothing), so each output depends on its own window alone, whatever the batch, band or
//! thread count.

use crate::engine::cpu::{self, Simd};

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

/// Whether [`row`] computes a convolution of this shape: few input channels, output channels
/// in whole vectors.
pub fn applies(cin: usize, cout: usize) -> bool {
    cin <= 4 && cout.is_multiple_of(LANES)
}

/// Output row `oy` of one image (`src`: `[h][w][cin]`) into `dst` (`[wo][cout]`), without
/// bias or activation; `w` holds the weights as im2col's `[kh * kw * cin][cout]`.
pub fn row(g: &Geometry, src: &[f32], w: &[f32], oy: usize, dst: &mut [f32]) {
    assert!(applies(g.cin, g.cout));
    assert!(src.len() >= g.h * g.w * g.cin && dst.len() >= g.wo * g.cout);
    assert!(w.len() >= g.kernel[0] * g.kernel[1] * g.cin * g.cout);
    match cpu::simd() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `cpu::simd` only gives paths the CPU has.
        Simd::Avx512 => unsafe { row_avx512(g, src, w, oy, dst) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { row_avx2(g, src, w, oy, dst) },
        _ => row_generic::<false>(g, src, w, oy, dst),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_avx512(g: &Geometry, src: &[f32], w: &[f32], oy: usize, dst: &mut [f32]) {
    row_generic::<true>(g, src, w, oy, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(g: &Geometry, src: &[f32], w: &[f32], oy: usize, dst: &mut [f32]) {
    row_generic::<true>(g, src, w, oy, dst)
}

/// `a * b + c`, with one rounding when `FMA` (a vector FMA inside functions compiled with the
/// `fma` feature; without it `f32::mul_add` is a slow library call).
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Output channels in blocks of 64, then 32, then 16.
#[inline(always)]
fn row_generic<const FMA: bool>(g: &Geometry, src: &[f32], w: &[f32], oy: usize, dst: &mut [f32]) {
    let mut co = 0;
    while co + 64 <= g.cout {
        block::<FMA, 4>(g, src, w, oy, co, dst);
        co += 64;
    }
    while co + 32 <= g.cout {
        block::<FMA, 2>(g, src, w, oy, co, dst);
        co += 32;
    }
    while co < g.cout {
        block::<FMA, 1>(g, src, w, oy, co, dst);
        co += 16;
    }
}

/// Channels `co..co + 16 * V` of output row `oy`.
// Index loops over fixed-size arrays, which the compiler keeps in registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn block<const FMA: bool, const V: usize>(
    g: &Geometry,
    src: &[f32],
    w: &[f32],
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
    let weights = |t: usize| -> [[f32; LANES]; V] {
        let mut v = [[0.0; LANES]; V];
        for (i, lanes) in v.iter_mut().enumerate() {
            lanes.copy_from_slice(&w[t * cout + co + i * LANES..][..LANES]);
        }
        v
    };
    let store = |ox: usize, acc: &[[f32; LANES]; V], dst: &mut [f32]| {
        for (i, lanes) in acc.iter().enumerate() {
            dst[ox * cout + co + i * LANES..][..LANES].copy_from_slice(lanes);
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
            for ky in 0..kh {
                let line = &src[base + ky * g.w * cin..];
                for j in 0..kwc {
                    let wv = weights(ky * kwc + j);
                    for p in 0..PIXELS {
                        let xv = line[p * sw * cin + j];
                        for i in 0..V {
                            for l in 0..LANES {
                                acc[p][i][l] = mul_add::<FMA>(xv, wv[i][l], acc[p][i][l]);
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
                            acc[i][l] = mul_add::<FMA>(xv, wv[i][l], acc[i][l]);
                        }
                    }
                }
            }
        }
        store(ox, &acc, dst);
        ox += 1;
    }
}
