//! Winograd (Toom-Cook) convolution for the NHWC CPU engine: stride-1 kxk, 1xk and kx1
//! convolutions with fewer multiplications than im2col + GEMM.
//!
//! `F(m, r)` computes `m` outputs of an `r`-tap correlation from `alpha = m + r - 1` inputs with
//! `alpha` products instead of `m * r`: `y = At [(G g) * (Bt d)]`. In two dimensions the
//! transforms nest, so a 3x3 convolution with `F(4x4, 3x3)` needs 36 products per 16 outputs
//! instead of 144. Per tile of `alpha_y x alpha_x` input pixels the input is transformed
//! (`Bt d B`, every channel), then each of the `alpha_y * alpha_x` transformed positions is one
//! GEMM (tiles x cin) x (cin x cout) against weights transformed once at load (`G g Gt`), and
//! the output transform (`At m A`) gives `m_y x m_x` output pixels, with bias and ReLU added.
//!
//! The transforms are built at load from interpolation points (0, 1, -1, 2, -2, 1/2, -1/2, ...)
//! in f64: `At` and `G` by their textbook formulas and `Bt` by solving the bilinear identity
//! that makes the algorithm an exact correlation, so any `F(m, r)` in reach of those points
//! comes out of one routine (checked on construction and in tests/it/cpu_conv.rs).
//!
//! Why by hand: no maintained crate does Winograd convolution on NHWC f32 data. The
//! multiplications go through [`crate::engine::packed_gemm`] (the transformed weights packed at
//! load) on the AVX-512 path, else through the `gemm` crate.

use crate::engine::cpu_conv::Act;
use crate::engine::packed_gemm::PackedWeights;
use std::cell::RefCell;

/// Calls `$f` compiled for AVX-512 or AVX2 when the CPU has them: the transforms are long
/// element-wise loops that the portable x86-64 baseline (SSE2) runs four lanes at a time.
/// Results differ in the last bits between paths (fused or separate multiply-add), like the
/// GEMM kernels' do; on one machine they never depend on the batch.
macro_rules! simd_dispatch {
    ($f:ident($($a:ident: $t:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,fma")]
            fn avx512($($a: $t),*) {
                $f::<true>($($a),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($a: $t),*) {
                $f::<true>($($a),*)
            }
            match $crate::engine::cpu::simd() {
                // SAFETY: `simd()` names a path only when the CPU has it (AVX-512F and FMA).
                $crate::engine::cpu::Simd::Avx512 => return unsafe { avx512($($a),*) },
                // SAFETY: as above, AVX2 and FMA.
                $crate::engine::cpu::Simd::Avx2 => return unsafe { avx2($($a),*) },
                $crate::engine::cpu::Simd::Scalar => {}
            }
        }
        $f::<false>($($a),*)
    }};
}

/// Interpolation points in the order they are taken; small magnitudes keep the transforms
/// well conditioned in f32.
const POINTS: [f64; 9] = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0];

/// The one-dimensional transforms of `F(m, r)`.
#[derive(Debug, Clone)]
pub struct Transform1d {
    pub m: usize,
    pub r: usize,
    pub alpha: usize,
    /// `m x alpha`
    pub at: Vec<f64>,
    /// `alpha x r`
    pub g: Vec<f64>,
    /// `alpha x alpha`
    pub bt: Vec<f64>,
}

impl Transform1d {
    /// `F(m, r)`; `F(1, 1)` is the identity (for the axis of a 1xk or kx1 kernel).
    pub fn new(m: usize, r: usize) -> Self {
        assert!(m >= 1 && r >= 1, "F(m, r) needs m, r >= 1");
        let alpha = m + r - 1;
        if alpha == 1 {
            return Self {
                m,
                r,
                alpha,
                at: vec![1.0],
                g: vec![1.0],
                bt: vec![1.0],
            };
        }
        // alpha - 1 finite points and the point at infinity.
        let f = alpha - 1;
        assert!(
            f <= POINTS.len(),
            "F({m}, {r}) needs more interpolation points"
        );
        let p = &POINTS[..f];
        let mut at = vec![0.0; m * alpha];
        for i in 0..m {
            for j in 0..f {
                at[i * alpha + j] = p[j].powi(i as i32);
            }
            at[i * alpha + f] = if i == m - 1 { 1.0 } else { 0.0 };
        }
        let mut g = vec![0.0; alpha * r];
        for j in 0..f {
            let fj: f64 = (0..f).filter(|&l| l != j).map(|l| p[j] - p[l]).product();
            for k in 0..r {
                g[j * r + k] = p[j].powi(k as i32) / fj;
            }
        }
        g[f * r + r - 1] = 1.0;
        // Bt: for each input position l, sum_j At[i][j] G[j][k] Bt[j][l] = [l == i + k] for
        // every output i and tap k. The system is consistent (Toom-Cook guarantees a solution)
        // and overdetermined; least squares by QR finds it.
        let rows = m * r;
        let mut coef = vec![0.0; rows * alpha];
        for i in 0..m {
            for k in 0..r {
                for j in 0..alpha {
                    coef[(i * r + k) * alpha + j] = at[i * alpha + j] * g[j * r + k];
                }
            }
        }
        let mut bt = vec![0.0; alpha * alpha];
        for l in 0..alpha {
            let rhs: Vec<f64> = (0..rows)
                .map(|ik| if ik / r + ik % r == l { 1.0 } else { 0.0 })
                .collect();
            let x = least_squares(&coef, rows, alpha, &rhs);
            for j in 0..alpha {
                bt[j * alpha + l] = x[j];
            }
        }
        let t = Self {
            m,
            r,
            alpha,
            at,
            g,
            bt,
        };
        let err = t.identity_error();
        assert!(err < 1e-9, "F({m}, {r}): transforms off by {err}");
        t
    }

    /// Largest deviation of `At diag(G e_k) Bt` from the correlation's 0/1 pattern.
    fn identity_error(&self) -> f64 {
        let (m, r, a) = (self.m, self.r, self.alpha);
        let mut worst: f64 = 0.0;
        for i in 0..m {
            for k in 0..r {
                for l in 0..a {
                    let s: f64 = (0..a)
                        .map(|j| self.at[i * a + j] * self.g[j * r + k] * self.bt[j * a + l])
                        .sum();
                    let want = if l == i + k { 1.0 } else { 0.0 };
                    worst = worst.max((s - want).abs());
                }
            }
        }
        worst
    }
}

/// Least-squares solution of the `rows x cols` system `a x = b` (Householder QR, f64).
fn least_squares(a: &[f64], rows: usize, cols: usize, b: &[f64]) -> Vec<f64> {
    assert!(rows >= cols);
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    for c in 0..cols {
        let norm = (c..rows)
            .map(|r| a[r * cols + c].powi(2))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 {
            continue;
        }
        let alpha = if a[c * cols + c] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (c..rows).map(|r| a[r * cols + c]).collect();
        v[0] -= alpha;
        let vv: f64 = v.iter().map(|x| x * x).sum();
        if vv == 0.0 {
            continue;
        }
        for cc in c..cols {
            let d: f64 = (c..rows).map(|r| v[r - c] * a[r * cols + cc]).sum::<f64>() * 2.0 / vv;
            for r in c..rows {
                a[r * cols + cc] -= d * v[r - c];
            }
        }
        let d: f64 = (c..rows).map(|r| v[r - c] * b[r]).sum::<f64>() * 2.0 / vv;
        for r in c..rows {
            b[r] -= d * v[r - c];
        }
    }
    let mut x = vec![0.0; cols];
    for c in (0..cols).rev() {
        let s: f64 = (c + 1..cols).map(|j| a[c * cols + j] * x[j]).sum();
        let diag = a[c * cols + c];
        assert!(diag.abs() > 1e-12, "singular Winograd system");
        x[c] = (b[c] - s) / diag;
    }
    x
}

/// Rows of a small dense matrix as (column, coefficient) lists without the zeros: the
/// transforms are about half zeros.
fn sparse_rows(mat: &[f64], rows: usize, cols: usize) -> Vec<Vec<(usize, f32)>> {
    (0..rows)
        .map(|i| {
            (0..cols)
                .filter(|&j| mat[i * cols + j].abs() > 1e-12)
                .map(|j| (j, mat[i * cols + j] as f32))
                .collect()
        })
        .collect()
}

/// A stride-1 convolution run the Winograd way, with its weights transformed.
#[derive(Debug, Clone)]
pub struct WinogradConv {
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 2],
    pub pad: [usize; 2],
    /// Output pixels per tile along y and x.
    pub tile: [usize; 2],
    alpha: [usize; 2],
    /// `bt` rows of the y and x transforms.
    bt: [Vec<Vec<(usize, f32)>>; 2],
    /// `at` rows of the y and x transforms.
    at: [Vec<Vec<(usize, f32)>>; 2],
    /// Transformed weights `[alpha_y * alpha_x][cin][cout]`.
    u: Transformed,
    bias: Vec<f32>,
}

/// The transformed weights as the GEMMs of the path chosen at load read them.
#[derive(Debug, Clone)]
enum Transformed {
    /// `[alpha_y * alpha_x][cin][cout]`, for the `gemm` crate.
    Plain(Vec<f32>),
    /// One `cin x cout` matrix per position, packed for the AVX-512 path (kept alone: the
    /// plain copy would be as large again, and only a path forced later in the process, as
    /// tests do, reads it, unpacked on the fly).
    Packed(Vec<PackedWeights>),
}

impl WinogradConv {
    /// From a weight in the im2col order [`crate::engine::cpu_conv::Conv`] keeps it in (`w[k][cout]`,
    /// `k = (ky * kw + kx) * cin + ci`), its bias, and `m_y x m_x` outputs per tile (1 along an
    /// axis where the kernel is 1). Bias and ReLU follow every output.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        [cout, cin, kh, kw]: [usize; 4],
        pad: [usize; 2],
        tile: [usize; 2],
    ) -> Self {
        assert_eq!(weight.len(), cout * cin * kh * kw, "weight length");
        assert_eq!(bias.len(), cout, "bias length");
        let ty = Transform1d::new(tile[0], kh);
        let tx = Transform1d::new(tile[1], kw);
        let (ay, ax) = (ty.alpha, tx.alpha);
        // One input channel at a time, in parallel, all output channels innermost: the weight
        // rows it reads and the `u` rows it fills are contiguous (by output channel first, the
        // transform read and wrote with a stride of `cout` floats: ~2 s of ResNet50's loading).
        // Each value is the same sum in the same order as before.
        use rayon::prelude::*;
        let planes: Vec<Vec<f32>> = (0..cin)
            .into_par_iter()
            .map(|ci| {
                let w = |y: usize, x: usize| &weight[((y * kw + x) * cin + ci) * cout..][..cout];
                // G_y g, then (G_y g) G_x^T; gw is [a][x][co].
                let mut gw = vec![0.0f64; ay * kw * cout];
                for a in 0..ay {
                    for x in 0..kw {
                        for co in 0..cout {
                            gw[(a * kw + x) * cout + co] =
                                (0..kh).map(|y| ty.g[a * kh + y] * w(y, x)[co] as f64).sum();
                        }
                    }
                }
                let mut plane = vec![0.0f32; ay * ax * cout];
                for a in 0..ay {
                    for b in 0..ax {
                        for co in 0..cout {
                            let v: f64 = (0..kw)
                                .map(|x| gw[(a * kw + x) * cout + co] * tx.g[b * kw + x])
                                .sum();
                            plane[(a * ax + b) * cout + co] = v as f32;
                        }
                    }
                }
                plane
            })
            .collect();
        let mut u = vec![0.0f32; ay * ax * cin * cout];
        for (ci, plane) in planes.iter().enumerate() {
            for p in 0..ay * ax {
                u[(p * cin + ci) * cout..][..cout].copy_from_slice(&plane[p * cout..][..cout]);
            }
        }
        let mut conv = Self {
            cin,
            cout,
            kernel: [kh, kw],
            pad,
            tile,
            alpha: [ay, ax],
            bt: [sparse_rows(&ty.bt, ay, ay), sparse_rows(&tx.bt, ax, ax)],
            at: [
                sparse_rows(&ty.at, tile[0], ay),
                sparse_rows(&tx.at, tile[1], ax),
            ],
            u: Transformed::Plain(Vec::new()),
            bias: bias.to_vec(),
        };
        conv.u = if conv.avx512() && PackedWeights::applies(cout) {
            Transformed::Packed(
                u.chunks_exact(cin * cout)
                    .map(|up| PackedWeights::new(up, cin, cout))
                    .collect(),
            )
        } else {
            Transformed::Plain(u)
        };
        conv
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let [kh, kw] = self.kernel;
        let [ph, pw] = self.pad;
        (h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)
    }

    /// Convolves channels `x_c0..x_c0 + cin` of `x` into channels `out_c0..out_c0 + cout` of
    /// `out` with bias and ReLU.
    ///
    /// Work is split per image into bands of tile rows whose size depends on the layer alone,
    /// so no GEMM ever mixes images and features do not depend on the batch size.
    pub fn forward_into(&self, x: &Act, x_c0: usize, out: &mut Act, out_c0: usize) {
        use rayon::prelude::*;
        let (ho, wo) = self.out_hw(x.h, x.w);
        assert!(x_c0 + self.cin <= x.c, "input channels out of range");
        assert!(out_c0 + self.cout <= out.c, "output channels out of range");
        assert_eq!((out.n, out.h, out.w), (x.n, ho, wo), "output shape");
        let [my, mx] = self.tile;
        let tiles_y = ho.div_ceil(my);
        let tiles_x = wo.div_ceil(mx);
        let band = self.band_rows(tiles_x, tiles_y);
        let row_len = wo * out.c;
        let img_len = ho * row_len;
        // (first image, images, first tile row, output rows)
        let mut work: Vec<(usize, usize, usize, &mut [f32])> = Vec::new();
        if band >= tiles_y {
            // A whole image is one band (small maps: 4 tiles an image at 7x7): several images
            // go through each GEMM, as the im2col path's row tiles do, so the GEMMs are not a
            // few rows tall. GEMM rows do not depend on each other (`gemm` blocks k by k
            // alone), so an image's features stay the same bits whatever its batch.
            let per_image = tiles_y * tiles_x;
            let group = (self.band_tiles() / per_image).clamp(1, x.n);
            let group = x.n.div_ceil(x.n.div_ceil(group));
            let mut img = 0;
            for part in out.data.chunks_mut(group * img_len) {
                let imgs = part.len() / img_len;
                work.push((img, imgs, 0, part));
                img += imgs;
            }
        } else {
            for (img, img_out) in out.data.chunks_mut(img_len).enumerate() {
                let mut rest = img_out;
                let mut ty0 = 0;
                while ty0 < tiles_y {
                    let ty1 = (ty0 + band).min(tiles_y);
                    let rows = (ty1 * my).min(ho) - ty0 * my;
                    let (head, tail) = rest.split_at_mut(rows * row_len);
                    work.push((img, 1, ty0, head));
                    rest = tail;
                    ty0 = ty1;
                }
            }
        }
        let out_c = out.c;
        work.into_par_iter().for_each(|(img, imgs, ty0, dst)| {
            let rows = dst.len() / imgs / row_len;
            let ty1 = ty0 + rows.div_ceil(my);
            let band = Band {
                img,
                imgs,
                tys: ty0..ty1,
                tiles_x,
                out_c,
                out_c0,
                ho,
                wo,
            };
            self.band(x, x_c0, &band, dst);
        });
    }

    /// Tiles per band (rows of each GEMM) the layer aims at: 64-256, fewer when the layer is
    /// wide so the transformed band stays near 1 MB (0.25-2 MB measured within noise).
    fn band_tiles(&self) -> usize {
        let per_tile = self.alpha[0] * self.alpha[1] * (self.cin + self.cout) * 4;
        ((1 << 20) / per_tile).clamp(64, 256)
    }

    /// Tile rows per band of one image: [`Self::band_tiles`] tiles or the whole image.
    fn band_rows(&self, tiles_x: usize, tiles_y: usize) -> usize {
        let rows = self.band_tiles().div_ceil(tiles_x).clamp(1, tiles_y);
        // Even bands, so the last is not a sliver.
        let bands = tiles_y.div_ceil(rows);
        tiles_y.div_ceil(bands)
    }

    fn band(&self, x: &Act, x_c0: usize, b: &Band, dst: &mut [f32]) {
        use rayon::prelude::*;
        let [ay, ax] = self.alpha;
        let [my, mx] = self.tile;
        let positions = ay * ax;
        let (cin, cout) = (self.cin, self.cout);
        // Tile rows of the band, image after image.
        let nty = b.tys.len();
        let tiles = b.imgs * nty * b.tiles_x;
        let row_of = |i: usize| (b.img + i / nty, b.tys.start + i % nty);
        let row_len = b.wo * b.out_c;
        // Taken out of the thread-local rather than borrowed: while this thread waits for the
        // parallel GEMMs below, rayon may run another band on it, which takes (or makes) its
        // own buffers.
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        {
            let Scratch { v, m, d, t } = &mut scratch;
            grow(v, positions * tiles * cin);
            grow(m, positions * tiles * cout);
            grow(d, positions * cin.max(cout));
            grow(t, positions * cin.max(cout));
            let fast = self.avx512();
            if fast {
                // Tile rows in parallel: each writes its own rows of every position's plane.
                let vp = crate::engine::cpu_conv::SyncPtr(v.as_mut_ptr());
                let v_len = positions * tiles * cin;
                (0..b.imgs * nty).into_par_iter().for_each(|i| {
                    let (img, ty) = row_of(i);
                    for tx in 0..b.tiles_x {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: avx512() checked the CPU and the channel counts; tile
                        // i * tiles_x + tx's rows of v are written by this tile row alone.
                        unsafe {
                            avx512::input(
                                self,
                                x,
                                x_c0,
                                img,
                                [ty, tx],
                                vp.get(),
                                v_len,
                                i * b.tiles_x + tx,
                                tiles,
                            )
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (i, img, ty, tx, &vp, v_len);
                    }
                });
            } else {
                for i in 0..b.imgs * nty {
                    let (img, ty) = row_of(i);
                    for tx in 0..b.tiles_x {
                        self.gather(x, x_c0, img, ty, tx, d);
                        transform_input(self, d, t, v, i * b.tiles_x + tx, tiles);
                    }
                }
            }
            // The positions' GEMMs are independent: on the rayon pool they keep every core
            // busy even when one image gives fewer bands than there are threads.
            let v = &v[..positions * tiles * cin];
            m[..positions * tiles * cout]
                .par_chunks_mut(tiles * cout)
                .enumerate()
                .for_each(|(p, mp)| {
                    let vp = &v[p * tiles * cin..(p + 1) * tiles * cin];
                    let up = match &self.u {
                        Transformed::Packed(packed) if fast => {
                            // SAFETY: avx512() checked the CPU and the channel counts; mp
                            // holds tiles x cout floats.
                            return unsafe {
                                packed[p].matmul(tiles, vp, cin, 0..cout, mp.as_mut_ptr(), cout)
                            };
                        }
                        Transformed::Packed(packed) => std::borrow::Cow::Owned(packed[p].unpack()),
                        Transformed::Plain(u) => {
                            std::borrow::Cow::Borrowed(&u[p * cin * cout..(p + 1) * cin * cout])
                        }
                    };
                    // SAFETY: mp holds tiles x cout floats, v's plane p tiles x cin and u's
                    // plane p cin x cout.
                    unsafe {
                        gemm::gemm(
                            tiles,
                            cout,
                            cin,
                            mp.as_mut_ptr(),
                            1,
                            cout as isize,
                            false,
                            vp.as_ptr(),
                            1,
                            cin as isize,
                            up.as_ptr(),
                            1,
                            cout as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
            if fast {
                // Tile rows in parallel, each writing its own output rows.
                let m = &m[..positions * tiles * cout];
                let per_image = dst.len() / b.imgs;
                dst.par_chunks_mut(per_image)
                    .enumerate()
                    .flat_map(|(ii, d)| {
                        d.par_chunks_mut(my * row_len)
                            .enumerate()
                            .map(move |(i, rows)| (ii * nty + i, rows))
                    })
                    .for_each(|(i, rows)| {
                        let mut offsets = [usize::MAX; 64];
                        for tx in 0..b.tiles_x {
                            for yy in 0..my {
                                for xx in 0..mx {
                                    let ox = tx * mx + xx;
                                    offsets[yy * mx + xx] =
                                        if (yy + 1) * row_len <= rows.len() && ox < b.wo {
                                            yy * row_len + ox * b.out_c + b.out_c0
                                        } else {
                                            usize::MAX
                                        };
                                }
                            }
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: avx512() checked the CPU and the channel counts; the
                            // offsets point at cout floats inside rows.
                            unsafe {
                                avx512::output(self, m, i * b.tiles_x + tx, tiles, rows, &offsets)
                            };
                        }
                    });
            } else {
                let per_image = dst.len() / b.imgs;
                for (ii, i) in (0..b.imgs).flat_map(|ii| (0..nty).map(move |i| (ii, i))) {
                    for tx in 0..b.tiles_x {
                        let tile = (ii * nty + i) * b.tiles_x + tx;
                        transform_output(self, m, t, d, tile, tiles);
                        // d now holds the tile's my x mx x cout outputs.
                        for yy in 0..my {
                            let oy = i * my + yy;
                            if b.tys.start * my + oy >= b.ho {
                                break;
                            }
                            for xx in 0..mx.min(b.wo - tx * mx) {
                                let src = &d[(yy * mx + xx) * cout..(yy * mx + xx + 1) * cout];
                                let o = ii * per_image
                                    + oy * row_len
                                    + (tx * mx + xx) * b.out_c
                                    + b.out_c0;
                                for ((o, s), bias) in
                                    dst[o..o + cout].iter_mut().zip(src).zip(&self.bias)
                                {
                                    *o = (s + bias).max(0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }

    /// Whether the AVX-512 transforms apply: the CPU has them and the channels come in whole
    /// vectors (every InceptionV3 layer's do).
    fn avx512(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.cin.is_multiple_of(16)
                && self.cout.is_multiple_of(16)
                && self.alpha[0] * self.alpha[1] <= 64
                && self.tile[0] * self.tile[1] <= 64
                && crate::engine::cpu::simd() == crate::engine::cpu::Simd::Avx512
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The input tile `(ty, tx)` of image `img`, `alpha_y x alpha_x x cin`, zeros outside.
    fn gather(&self, x: &Act, x_c0: usize, img: usize, ty: usize, tx: usize, d: &mut [f32]) {
        let [ay, ax] = self.alpha;
        let cin = self.cin;
        let y0 = (ty * self.tile[0]) as isize - self.pad[0] as isize;
        let x0 = (tx * self.tile[1]) as isize - self.pad[1] as isize;
        for a in 0..ay {
            let iy = y0 + a as isize;
            for b in 0..ax {
                let ix = x0 + b as isize;
                let dst = &mut d[(a * ax + b) * cin..(a * ax + b + 1) * cin];
                if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                    dst.fill(0.0);
                } else {
                    let p = ((img * x.h + iy as usize) * x.w + ix as usize) * x.c + x_c0;
                    dst.copy_from_slice(&x.data[p..p + cin]);
                }
            }
        }
    }
}

/// One work item: a band of tile rows of one image, or the whole of `imgs` images (then
/// `tys` is every tile row), and where its outputs go.
struct Band {
    img: usize,
    imgs: usize,
    tys: std::ops::Range<usize>,
    tiles_x: usize,
    /// Channels of the output activation (its row stride per pixel).
    out_c: usize,
    out_c0: usize,
    ho: usize,
    wo: usize,
}

#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    d: Vec<f32>,
    t: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { v: Vec::new(), m: Vec::new(), d: Vec::new(), t: Vec::new() })
    };
}

/// `dst = sum coef * src[col]` over the listed columns, each `src[col]` a run of `len` floats;
/// with fused multiply-adds where `FMA` says the CPU has them.
#[inline(always)]
fn combine<const FMA: bool>(
    dst: &mut [f32],
    row: &[(usize, f32)],
    src: &[f32],
    stride: usize,
    len: usize,
) {
    let dst = &mut dst[..len];
    let (c0, k0) = row[0];
    for (o, s) in dst.iter_mut().zip(&src[c0 * stride..c0 * stride + len]) {
        *o = k0 * s;
    }
    for &(c, k) in &row[1..] {
        for (o, s) in dst.iter_mut().zip(&src[c * stride..c * stride + len]) {
            *o = if FMA { k.mul_add(*s, *o) } else { *o + k * s };
        }
    }
}

/// `Bt d B` of one gathered tile `d` (`alpha_y x alpha_x x cin`) into row `tile` of each
/// position's GEMM operand in `v`.
fn transform_input(
    w: &WinogradConv,
    d: &[f32],
    t: &mut [f32],
    v: &mut [f32],
    tile: usize,
    tiles: usize,
) {
    simd_dispatch!(transform_input_impl(w: &WinogradConv, d: &[f32], t: &mut [f32], v: &mut [f32], tile: usize, tiles: usize))
}

#[inline(always)]
fn transform_input_impl<const FMA: bool>(
    w: &WinogradConv,
    d: &[f32],
    t: &mut [f32],
    v: &mut [f32],
    tile: usize,
    tiles: usize,
) {
    let [ay, ax] = w.alpha;
    let cin = w.cin;
    // Along x: t[a][bx] = sum_b Bt_x[bx][b] d[a][b]
    for a in 0..ay {
        for (bx, row) in w.bt[1].iter().enumerate() {
            let (dst, src) = (
                &mut t[(a * ax + bx) * cin..],
                &d[a * ax * cin..(a + 1) * ax * cin],
            );
            combine::<FMA>(dst, row, src, cin, cin);
        }
    }
    // Along y: v[by][bx][tile] = sum_a Bt_y[by][a] t[a][bx]
    for (by, row) in w.bt[0].iter().enumerate() {
        for bx in 0..ax {
            let p = by * ax + bx;
            let dst = &mut v[(p * tiles + tile) * cin..(p * tiles + tile + 1) * cin];
            combine::<FMA>(dst, row, &t[bx * cin..], ax * cin, cin);
        }
    }
}

/// `At m A` of tile `tile` from the GEMM results `m` into `out` (`m_y x m_x x cout`), using `t`
/// as scratch.
fn transform_output(
    w: &WinogradConv,
    m: &[f32],
    t: &mut [f32],
    out: &mut [f32],
    tile: usize,
    tiles: usize,
) {
    simd_dispatch!(transform_output_impl(w: &WinogradConv, m: &[f32], t: &mut [f32], out: &mut [f32], tile: usize, tiles: usize))
}

#[inline(always)]
fn transform_output_impl<const FMA: bool>(
    w: &WinogradConv,
    m: &[f32],
    t: &mut [f32],
    out: &mut [f32],
    tile: usize,
    tiles: usize,
) {
    let [ay, ax] = w.alpha;
    let mx = w.tile[1];
    let cout = w.cout;
    // Along x: t[by][j] = sum_bx At_x[j][bx] m[by][bx][tile]; the positions of one tile lie
    // tiles * cout apart.
    let stride = tiles * cout;
    for by in 0..ay {
        for (j, row) in w.at[1].iter().enumerate() {
            let src = &m[(by * ax * tiles + tile) * cout..];
            combine::<FMA>(&mut t[(by * mx + j) * cout..], row, src, stride, cout);
        }
    }
    // Along y: out[i][j] = sum_by At_y[i][by] t[by][j]
    for (i, row) in w.at[0].iter().enumerate() {
        for j in 0..mx {
            combine::<FMA>(
                &mut out[(i * mx + j) * cout..],
                row,
                &t[j * cout..],
                mx * cout,
                cout,
            );
        }
    }
}

/// The transforms with AVX-512 intrinsics, sixteen channels at a time with the whole tile in
/// registers: the portable loops above make one pass over memory per transform coefficient,
/// which cost as much as the GEMMs they save on InceptionV3's narrow stem layers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::WinogradConv;
    use crate::engine::cpu_conv::Act;
    use std::arch::x86_64::*;

    /// `sum k * vals[col * stride + off]` over a sparse transform row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn dot(row: &[(usize, f32)], vals: &[__m512; 64], stride: usize, off: usize) -> __m512 {
        let (c0, k0) = row[0];
        let mut acc = _mm512_mul_ps(_mm512_set1_ps(k0), vals[c0 * stride + off]);
        for &(c, k) in &row[1..] {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(k), vals[c * stride + off], acc);
        }
        acc
    }

    /// `Bt d B` of input tile `[ty, tx]` of image `img`, straight from the activation, into
    /// row `tile` of each position's GEMM operand in `v`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w.cin` is a multiple of 16 and `alpha_y * alpha_x <= 64`;
    /// `v` points at `v_len >= alpha_y * alpha_x * tiles * cin` floats, of which row `tile`
    /// of every position's plane is written by nobody else meanwhile.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn input(
        w: &WinogradConv,
        x: &Act,
        x_c0: usize,
        img: usize,
        [ty, tx]: [usize; 2],
        v: *mut f32,
        v_len: usize,
        tile: usize,
        tiles: usize,
    ) {
        let [ay, ax] = w.alpha;
        let cin = w.cin;
        assert!(v_len >= ay * ax * tiles * cin && tile < tiles && x_c0 + cin <= x.c);
        let y0 = (ty * w.tile[0]) as isize - w.pad[0] as isize;
        let x0 = (tx * w.tile[1]) as isize - w.pad[1] as isize;
        let mut d = [_mm512_setzero_ps(); 64];
        let mut t = [_mm512_setzero_ps(); 64];
        for c in (0..cin).step_by(16) {
            for a in 0..ay {
                let iy = y0 + a as isize;
                for b in 0..ax {
                    let ix = x0 + b as isize;
                    d[a * ax + b] = if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize
                    {
                        _mm512_setzero_ps()
                    } else {
                        let p = ((img * x.h + iy as usize) * x.w + ix as usize) * x.c;
                        // SAFETY: the pixel is inside the image and c + 16 <= cin.
                        unsafe { _mm512_loadu_ps(x.data.as_ptr().add(p + x_c0 + c)) }
                    };
                }
            }
            for a in 0..ay {
                for (bx, row) in w.bt[1].iter().enumerate() {
                    t[a * ax + bx] = dot(row, &d, 1, a * ax);
                }
            }
            for (by, row) in w.bt[0].iter().enumerate() {
                for bx in 0..ax {
                    let o = ((by * ax + bx) * tiles + tile) * cin + c;
                    // SAFETY: o + 16 <= v_len by the assert above; the caller vouches that no
                    // one else writes this row.
                    unsafe { _mm512_storeu_ps(v.add(o), dot(row, &t, ax, bx)) };
                }
            }
        }
    }

    /// `At m A` of tile `tile` plus bias, ReLU, stored at `dst[offsets[i * m_x + j]..]` for
    /// each output pixel `(i, j)` of the tile that lies inside the image (`usize::MAX` marks
    /// the others).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w.cout` is a multiple of 16; `m` holds
    /// `alpha_y * alpha_x * tiles * cout` floats; each offset other than `usize::MAX` leaves
    /// `cout` floats inside `dst`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output(
        w: &WinogradConv,
        m: &[f32],
        tile: usize,
        tiles: usize,
        dst: &mut [f32],
        offsets: &[usize; 64],
    ) {
        let [ay, ax] = w.alpha;
        let [my, mx] = w.tile;
        let cout = w.cout;
        assert!(m.len() >= ay * ax * tiles * cout && w.bias.len() == cout);
        let mut mm = [_mm512_setzero_ps(); 64];
        let mut t = [_mm512_setzero_ps(); 64];
        let zero = _mm512_setzero_ps();
        for c in (0..cout).step_by(16) {
            for (p, slot) in mm.iter_mut().enumerate().take(ay * ax) {
                // SAFETY: inside m by the assert above.
                *slot = unsafe { _mm512_loadu_ps(m.as_ptr().add((p * tiles + tile) * cout + c)) };
            }
            for by in 0..ay {
                for (j, row) in w.at[1].iter().enumerate() {
                    t[by * mx + j] = dot(row, &mm, 1, by * ax);
                }
            }
            // SAFETY: c + 16 <= cout = bias.len().
            let bias = unsafe { _mm512_loadu_ps(w.bias.as_ptr().add(c)) };
            for (i, row) in w.at[0].iter().enumerate().take(my) {
                for j in 0..mx {
                    let o = offsets[i * mx + j];
                    if o == usize::MAX {
                        continue;
                    }
                    assert!(o + cout <= dst.len());
                    let y = dot(row, &t, mx, j);
                    let y = _mm512_max_ps(_mm512_add_ps(y, bias), zero);
                    // SAFETY: o + cout <= dst.len() (asserted).
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(o + c), y) };
                }
            }
        }
    }
}
