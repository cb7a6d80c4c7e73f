//! A matrix product against weights packed once at load, for the AVX-512 path of the NHWC
//! engine: `dst = a * w`, `a` being rows of activations read where they lie (any row stride),
//! `w` a layer's `k x n` weights.
//!
//! Why not the `gemm` crate here: it packs both operands on every call. For a network the
//! weights never change, and at batch 1 the calls are small (a Winograd position's GEMM on a
//! 17x17 map is 25 rows), so that packing and the crate's blocking were about a tenth of the
//! time of a batch-1 InceptionV3 forward pass, beside half in its microkernels. Here the
//! weights are laid out at load as 16-column panels (`[n / 16][k][16]`, each panel contiguous),
//! and the activations are broadcast straight from their rows, so a call packs nothing.
//!
//! Every output is one chain of fused multiply-adds over `k` in order from zero (a `k` block
//! carries its partial sums into the next through `dst`): the order im2col + GEMM has always
//! promised the direct kernels (`direct_conv`), whose bits must equal it. Its bits depend on
//! its own row and column alone, never on `m`, the row's place in the call or the columns
//! asked for. (Summing each block from zero and adding it to the blocks before was a little
//! more accurate, 0.9e-4 against 1.2e-4 at InceptionV3's deepest stage, but broke that
//! equality for first layers deeper than a block.)

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Floats in one vector register.
const LANES: usize = 16;

/// Rows of one strip: its activations (`MC * KC` floats, 24 KB) stay in L1 while every column
/// block of the call passes over them (one pass over all rows per column block ran large-`m`
/// small-`n` products at 0.8x the `gemm` crate; strips of 24-96 rows at 0.93-1.0x).
const MC: usize = 48;

/// Depth of one block of `k`: a 48-column block's weights (`KC * 48` floats, 24 KB) stay in the
/// 48 KB L1 cache while every row block of the call passes over them.
const KC: usize = 128;

/// Sixteen floats on a 64-byte boundary, so that every panel row is one aligned vector.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lanes([f32; LANES]);

/// A `k x n` weight matrix as 16-column panels, `n` a multiple of 16.
#[derive(Clone)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    /// `[n / 16][k]`
    panels: Vec<Lanes>,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeights({} x {})", self.k, self.n)
    }
}

impl PackedWeights {
    /// Whether [`PackedWeights::matmul`] runs on this CPU (AVX-512F with FMA, as
    /// `crate::engine::cpu` decides, so `DLTOOL_SIMD` turns it off too) for `n` columns.
    pub fn applies(n: usize) -> bool {
        n.is_multiple_of(LANES)
            && n > 0
            && crate::engine::cpu::simd() == crate::engine::cpu::Simd::Avx512
    }

    /// Packs `w`, `k` rows of `n` floats (`w[kk * n + c]`).
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert!(n.is_multiple_of(LANES), "packed weights need whole vectors");
        assert_eq!(w.len(), k * n, "weight length");
        let mut panels = vec![Lanes([0.0; LANES]); n / LANES * k];
        for (p, panel) in panels.chunks_mut(k.max(1)).enumerate().take(n / LANES) {
            for (kk, lanes) in panel.iter_mut().enumerate() {
                lanes.0.copy_from_slice(&w[kk * n + p * LANES..][..LANES]);
            }
        }
        Self { k, n, panels }
    }

    /// The weights back in `[k][n]` order.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0.0; k * n];
        for (p, panel) in self.panels.chunks(k.max(1)).enumerate().take(n / LANES) {
            for (kk, lanes) in panel.iter().enumerate() {
                w[kk * n + p * LANES..][..LANES].copy_from_slice(&lanes.0);
            }
        }
        w
    }

    /// `dst[r * dst_rs + c] = sum_kk a[r * a_rs + kk] * w[kk][c]` for rows `r < m` and the
    /// columns `cols` (whole vectors); other columns of `dst` are left alone.
    ///
    /// # Safety
    /// [`PackedWeights::applies`] holds; `dst` points at `m` rows of `dst_rs` floats whose
    /// columns `cols` are writable and written by nobody else meanwhile.
    pub unsafe fn matmul(
        &self,
        m: usize,
        a: &[f32],
        a_rs: usize,
        cols: std::ops::Range<usize>,
        dst: *mut f32,
        dst_rs: usize,
    ) {
        if m == 0 || cols.is_empty() {
            return;
        }
        if self.k == 0 {
            for r in 0..m {
                // SAFETY: the caller vouches for row r's columns `cols` of dst.
                unsafe {
                    std::slice::from_raw_parts_mut(dst.add(r * dst_rs + cols.start), cols.len())
                }
                .fill(0.0);
            }
            return;
        }
        assert!(
            a.len() >= (m - 1) * a_rs + self.k,
            "activation rows too short"
        );
        assert!(
            cols.start.is_multiple_of(LANES)
                && cols.end.is_multiple_of(LANES)
                && cols.end <= self.n
                && cols.end <= dst_rs,
            "columns out of range"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller vouches for AVX-512 and for dst; the asserts keep a and the
        // panels in bounds.
        unsafe {
            matmul_avx512(self, m, a.as_ptr(), a_rs, cols, dst, dst_rs)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a_rs, dst, dst_rs);
            unreachable!("packed weights apply on x86-64 only");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn matmul_avx512(
    w: &PackedWeights,
    m: usize,
    a: *const f32,
    a_rs: usize,
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    dst_rs: usize,
) {
    let k = w.k;
    let panel_len = k * LANES;
    let panels = w.panels.as_ptr() as *const f32;
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let first = k0 == 0;
        for s0 in (0..m).step_by(MC) {
            let s1 = (s0 + MC).min(m);
            let mut c0 = cols.start;
            while c0 < cols.end {
                // Blocks of 3 vectors, and 4 rather than 3 + 1 (a 1-vector block does one
                // multiply-add per load; 2 + 2 ran large-`m` 64-column products at 0.8x the
                // `gemm` crate, 4 at 1.0x).
                let v = match (cols.end - c0) / LANES {
                    4 => 4,
                    left => left.min(3),
                };
                // SAFETY (all below): panels c0 / 16.. c0 / 16 + v lie below n / 16 and
                // k0 + kc <= k, so the weight reads are in bounds; rows below s1 <= m and
                // columns below c0 + 16 v <= cols.end keep a and dst in bounds (as the caller
                // and matmul's asserts vouch).
                let b = unsafe { panels.add(c0 / LANES * panel_len + k0 * LANES) };
                let at = |r: usize| unsafe {
                    (
                        kc,
                        a.add(r * a_rs + k0),
                        a_rs,
                        b,
                        panel_len,
                        dst.add(r * dst_rs + c0),
                        dst_rs,
                        first,
                    )
                };
                macro_rules! rows {
                    ($v:literal, $mr:literal) => {{
                        let mut r0 = s0;
                        while r0 + $mr <= s1 {
                            unsafe { call::<$mr, $v>(at(r0)) };
                            r0 += $mr;
                        }
                        unsafe {
                            match s1 - r0 {
                                0 => {}
                                1 => call::<1, $v>(at(r0)),
                                2 => call::<2, $v>(at(r0)),
                                3 => call::<3, $v>(at(r0)),
                                4 => call::<4, $v>(at(r0)),
                                5 => call::<5, $v>(at(r0)),
                                6 => call::<6, $v>(at(r0)),
                                7 => call::<7, $v>(at(r0)),
                                8 => call::<8, $v>(at(r0)),
                                9 => call::<9, $v>(at(r0)),
                                10 => call::<10, $v>(at(r0)),
                                _ => call::<11, $v>(at(r0)),
                            }
                        }
                    }};
                }
                // 24 accumulators, the weight vectors and a broadcast: at most 29 of 32 registers.
                match v {
                    4 => rows!(4, 6),
                    3 => rows!(3, 8),
                    2 => rows!(2, 12),
                    _ => rows!(1, 12),
                }
                c0 += v * LANES;
            }
        }
    }
}

type TileArgs = (
    usize,
    *const f32,
    usize,
    *const f32,
    usize,
    *mut f32,
    usize,
    bool,
);

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn call<const R: usize, const V: usize>(t: TileArgs) {
    unsafe { tile::<R, V>(t.0, t.1, t.2, t.3, t.4, t.5, t.6, t.7) }
}

/// `R` rows by `V` vectors of columns over `kc` of `k`: the accumulators start from zero
/// (`first`) or from the partial sums the blocks before left in `dst`, and end there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    panel_len: usize,
    dst: *mut f32,
    dst_rs: usize,
    first: bool,
) {
    // SAFETY (all below): the caller keeps R rows of a (kc floats each), V panels (kc vectors
    // each, 64-byte aligned) and R x V vectors of dst in bounds.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if !first {
            for r in 0..R {
                for v in 0..V {
                    acc[r][v] = _mm512_loadu_ps(dst.add(r * dst_rs + v * LANES));
                }
            }
        }
        for kk in 0..kc {
            let mut wv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                wv[v] = _mm512_load_ps(b.add(v * panel_len + kk * LANES));
            }
            for r in 0..R {
                let x = _mm512_set1_ps(*a.add(r * a_rs + kk));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(x, wv[v], acc[r][v]);
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                _mm512_storeu_ps(dst.add(r * dst_rs + v * LANES), acc[r][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: &[f32], a_rs: usize, w: &[f32]) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] = (0..k)
                    .map(|kk| a[r * a_rs + kk] as f64 * w[kk * n + c] as f64)
                    .sum();
            }
        }
        out
    }

    /// Whether the CPU can run the kernel (whatever `DLTOOL_SIMD` says: the tests call it
    /// directly). Where it cannot, all there is to check is that the engine never takes it.
    fn avx512_hardware() -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return true;
        }
        assert!(
            !PackedWeights::applies(16),
            "the packed path is chosen on a CPU without AVX-512"
        );
        eprintln!("not run: this CPU has no AVX-512 (checked only that the path is not taken)");
        false
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_product_for_every_edge_of_rows_columns_and_depth() {
        if !avx512_hardware() {
            return;
        }
        for &(m, k, n) in &[
            (3, 0, 32),
            (1, 1, 16),
            (7, 3, 32),
            (9, 129, 48),
            (17, 300, 80),
            (33, 256, 112),
        ] {
            let a_rs = k + 5;
            let a = values(m * a_rs, 1);
            let w = values(k * n, 2);
            let packed = PackedWeights::new(&w, k, n);
            let want = reference(m, k, n, &a, a_rs, &w);
            let dst_rs = n + 16;
            let mut dst = vec![7.0f32; m * dst_rs];
            unsafe { packed.matmul(m, &a, a_rs, 0..n, dst.as_mut_ptr(), dst_rs) };
            for r in 0..m {
                for c in 0..n {
                    let (got, want) = (dst[r * dst_rs + c], want[r * n + c]);
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * (k as f64).sqrt() + 1e-6,
                        "m {m} k {k} n {n}: [{r}][{c}] {got} vs {want}"
                    );
                }
                assert!(
                    dst[r * dst_rs + n..(r + 1) * dst_rs]
                        .iter()
                        .all(|&v| v == 7.0)
                );
            }
        }
    }

    #[test]
    fn a_row_and_column_give_the_same_bits_whatever_the_call() {
        if !avx512_hardware() {
            return;
        }
        let (m, k, n) = (21, 300, 96);
        let a = values(m * k, 3);
        let w = values(k * n, 4);
        let packed = PackedWeights::new(&w, k, n);
        let mut whole = vec![0.0f32; m * n];
        unsafe { packed.matmul(m, &a, k, 0..n, whole.as_mut_ptr(), n) };
        // Row 13 alone, columns 32..64 alone.
        let mut one = vec![0.0f32; n];
        unsafe { packed.matmul(1, &a[13 * k..], k, 32..64, one.as_mut_ptr(), n) };
        assert_eq!(one[32..64], whole[13 * n + 32..13 * n + 64]);
    }

    #[test]
    fn unpacking_gives_the_weights_back() {
        let (k, n) = (37, 80);
        let w = values(k * n, 5);
        assert_eq!(PackedWeights::new(&w, k, n).unpack(), w);
    }
}
