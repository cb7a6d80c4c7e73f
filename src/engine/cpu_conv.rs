//! Inference-only convolution and pooling on the CPU in NHWC layout, for networks whose weights
//! are known at load time.
//!
//! Why not the burn backend: burn-flex keeps activations NCHW and converts, im2cols and
//! concatenates per call; on InceptionV3 that costs about three times the arithmetic. Here
//! activations stay NHWC (one image pixel = one row of `c` floats), so
//!
//! * a 1x1 convolution is one GEMM over the activation as it lies in memory, and several 1x1
//!   convolutions reading the same input are one GEMM with their weights side by side;
//! * a kxk (or 1x7, 7x1) convolution builds im2col rows for a tile of output pixels, small
//!   enough to stay in cache, and multiplies them in the same tile;
//! * every convolution writes into a channel range of a wider output (the GEMM's row stride), so
//!   an Inception block's concatenation costs nothing;
//! * bias and ReLU run on each output tile right after its GEMM, while it is still in cache.
//!
//! The GEMM is [`crate::engine::packed_gemm`] over weights packed at load on the AVX-512 path,
//! else the `gemm` crate (AVX2/NEON microkernels chosen at run time); work is split over
//! output-pixel tiles on the rayon pool, one single-threaded GEMM per tile.

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

use crate::engine::direct_conv;
use crate::engine::packed_gemm::PackedWeights;
use crate::engine::winograd::WinogradConv;

/// `n` images of `h` x `w` pixels with `c` channels each, stored `[n][h][w][c]`.
///
/// Buffers of dropped activations are kept for the next ones: a network allocates the same
/// few sizes batch after batch, and fresh multi-megabyte allocations cost page faults and
/// zeroing on every layer.
#[derive(Debug)]
pub struct Act {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
    /// Floats at the start of `data`'s allocation known to be initialised (at least its
    /// length), and the allocation they belong to (address and capacity: `data` is public and
    /// could be replaced, and a replacement is then recycled by its length alone). A recycled
    /// buffer grows within this prefix without zeroing it again. Code that swaps `data` for a
    /// `Vec` whose tail is uninitialised and that lands at the same address with the same
    /// capacity would defeat the check; nothing in the crate replaces `data`.
    init: (usize, usize, usize),
}

/// A dropped [`Act`]'s buffer and how many of its floats are initialised.
struct Spare {
    data: Vec<f32>,
    init: usize,
}

/// Buffers of dropped [`Act`]s, for reuse.
static SPARE: Mutex<Vec<Spare>> = Mutex::new(Vec::new());
/// Spare buffers kept at most (an InceptionV3 forward pass has fewer live at once).
const SPARE_MAX: usize = 24;

impl Clone for Act {
    fn clone(&self) -> Self {
        Self::from_vec(self.n, self.h, self.w, self.c, self.data.clone())
    }
}

impl Drop for Act {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.capacity() == 0 {
            return;
        }
        let init = if (self.init.1, self.init.2) == (data.as_ptr() as usize, data.capacity()) {
            self.init.0.clamp(data.len(), data.capacity())
        } else {
            data.len()
        };
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_MAX {
            spare.push(Spare { data, init });
        }
    }
}

impl Act {
    /// An activation holding `data` (`n * h * w * c` floats, NHWC).
    pub fn from_vec(n: usize, h: usize, w: usize, c: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            n * h * w * c,
            "activation data has the wrong length"
        );
        let init = (data.len(), data.as_ptr() as usize, data.capacity());
        Self {
            n,
            h,
            w,
            c,
            data,
            init,
        }
    }

    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        let mut act = Self::new(n, h, w, c);
        act.data.fill(0.0);
        act
    }

    /// An activation whose values are left over from an earlier one: every element must be
    /// written before it is read.
    pub fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        let len = n * h * w * c;
        let recycled = {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest spare that is large enough, so big buffers stay for big layers. By
            // capacity: a big buffer that last held a small activation is still big (judged by
            // length, networks whose sizes vary a lot, like EfficientNet, kept allocating).
            let best = (0..spare.len())
                .filter(|&i| spare[i].data.capacity() >= len)
                .min_by_key(|&i| spare[i].data.capacity());
            best.map(|i| spare.swap_remove(i))
        };
        let (data, init) = match recycled {
            Some(Spare { mut data, init }) => {
                if len <= init {
                    // SAFETY: len <= init <= capacity, and the first `init` floats of this
                    // allocation were written before (by `vec!` or a resize below), so the
                    // new length covers initialised floats only.
                    unsafe { data.set_len(len) };
                } else {
                    // Within capacity: no allocation; only the never-written tail is zeroed.
                    // SAFETY: as above, for the first `init` floats.
                    unsafe { data.set_len(init) };
                    data.resize(len, 0.0);
                }
                (data, init.max(len))
            }
            None => (vec![0.0; len], len),
        };
        let init = (init, data.as_ptr() as usize, data.capacity());
        Self {
            n,
            h,
            w,
            c,
            data,
            init,
        }
    }

    /// Pixels (rows) in the whole batch.
    pub fn rows(&self) -> usize {
        self.n * self.h * self.w
    }

    /// Converts `n` images stored `[n][c][h][w]` (the usual tensor order) to NHWC.
    pub fn from_nchw(src: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        assert_eq!(src.len(), n * c * h * w, "NCHW input has the wrong length");
        let mut out = Self::new(n, h, w, c);
        transpose_each(src, &mut out.data, c, h * w);
        out
    }

    /// The activation in `[n][c][h][w]` order.
    pub fn to_nchw(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.data.len()];
        transpose_each(&self.data, &mut out, self.h * self.w, self.c);
        out
    }

    /// Mean of every channel over each image's pixels: `[n][c]`.
    pub fn global_avg(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut out = vec![0.0; self.n * self.c];
        for (dst, img) in out.chunks_mut(self.c).zip(self.data.chunks(plane * self.c)) {
            for px in img.chunks_exact(self.c) {
                for (d, v) in dst.iter_mut().zip(px) {
                    *d += v;
                }
            }
            for d in dst.iter_mut() {
                *d /= plane as f32;
            }
        }
        out
    }

    /// Maximum of every channel over each image's pixels: `[n][c]`.
    pub fn global_max(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut out = vec![f32::NEG_INFINITY; self.n * self.c];
        for (dst, img) in out.chunks_mut(self.c).zip(self.data.chunks(plane * self.c)) {
            for px in img.chunks_exact(self.c) {
                for (d, v) in dst.iter_mut().zip(px) {
                    *d = d.max(*v);
                }
            }
        }
        out
    }

    /// Copies channels `src_c0..src_c0 + len` of `src` into channels `dst_c0..` of `self`.
    pub fn copy_channels(&mut self, dst_c0: usize, src: &Act, src_c0: usize, len: usize) {
        assert_eq!(self.rows(), src.rows(), "copy between different shapes");
        assert!(dst_c0 + len <= self.c && src_c0 + len <= src.c);
        let (dc, sc) = (self.c, src.c);
        self.data
            .par_chunks_mut(dc * 256)
            .zip(src.data.par_chunks(sc * 256))
            .for_each(|(d, s)| {
                for (drow, srow) in d.chunks_exact_mut(dc).zip(s.chunks_exact(sc)) {
                    drow[dst_c0..dst_c0 + len].copy_from_slice(&srow[src_c0..src_c0 + len]);
                }
            });
    }
}

/// Transposes each `rows x cols` block of `src` (one per image) into `dst`.
pub(crate) fn transpose_each<T: Copy + Send + Sync>(
    src: &[T],
    dst: &mut [T],
    rows: usize,
    cols: usize,
) {
    if rows * cols == 0 {
        return;
    }
    dst.par_chunks_mut(rows * cols)
        .zip(src.par_chunks(rows * cols))
        .for_each(|(dst, src)| {
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        });
}

/// What happens to a GEMM result before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `max(x + bias, 0)`
    BiasRelu,
    /// `min(max(x + bias, 0), 6)` (MobileNet v2 / EfficientNet-Lite).
    BiasRelu6,
    /// `x + bias`, no activation (a linear bottleneck's projection).
    Bias,
    /// Left as the bare product (bias and ReLU follow later, e.g. after a pool).
    None,
}

impl Epilogue {
    /// The epilogue of one value `v` with its column's bias `b`.
    #[inline(always)]
    // max then min rather than clamp: NaN becomes 0 as with BiasRelu's max, the same as the
    // vector paths' max/min instructions, so every path agrees.
    #[allow(clippy::manual_clamp)]
    pub fn apply(self, v: f32, b: f32) -> f32 {
        match self {
            Epilogue::BiasRelu => (v + b).max(0.0),
            Epilogue::BiasRelu6 => (v + b).max(0.0).min(6.0),
            Epilogue::Bias => v + b,
            Epilogue::None => v,
        }
    }
}

/// TensorFlow's "SAME" padding of one dimension: the output size `ceil(input / stride)` and
/// the padding before the first input; the padding after it is the rest (one more when the
/// total is odd, so the extra row or column goes at the bottom or right).
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (out, total / 2)
}

/// A convolution with its weights packed for `im2col x weights`: `w[k][cout]` with
/// `k = (ky * kw + kx) * cin + ci`, BatchNorm already folded into weights and bias.
#[derive(Debug, Clone)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    /// Pads like TensorFlow's "SAME" (see [`same_padding`]) instead of by `pad`.
    same: bool,
    /// `[k][cout]`, `k = (ky * kw + kx) * cin + ci` (im2col's order); empty when only
    /// `packed` holds the weights.
    w: Vec<f32>,
    pub bias: Vec<f32>,
    /// Per output column: which epilogue applies (several convolutions fused into one GEMM may
    /// want different ones).
    epilogue: Vec<Epilogue>,
    /// The same convolution the Winograd way, used instead when set.
    winograd: Option<Box<WinogradConv>>,
    /// `w` packed for the AVX-512 path: at construction when the CPU takes that path and the
    /// direct kernels (which read `w`) never apply, `w` then dropped (two copies cost a third
    /// more memory at batch 1); else on first use beside `w`.
    packed: std::sync::OnceLock<PackedWeights>,
}

impl Conv {
    /// From a weight in the usual `[cout][cin][kh][kw]` order and a bias of `cout` values.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        [cout, cin, kh, kw]: [usize; 4],
        stride: [usize; 2],
        pad: [usize; 2],
    ) -> Self {
        assert_eq!(weight.len(), cout * cin * kh * kw, "weight length");
        assert_eq!(bias.len(), cout, "bias length");
        let k = kh * kw * cin;
        let mut w = vec![0.0; k * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let src = ((co * cin + ci) * kh + ky) * kw + kx;
                        w[((ky * kw + kx) * cin + ci) * cout + co] = weight[src];
                    }
                }
            }
        }
        Self {
            cin,
            cout,
            kernel: [kh, kw],
            stride,
            pad,
            same: false,
            w,
            bias: bias.to_vec(),
            epilogue: vec![Epilogue::BiasRelu; cout],
            winograd: None,
            packed: Default::default(),
        }
        .settled()
    }

    /// Packs the weights and drops the plain copy when every forward pass on this CPU path
    /// reads the packed ones alone: the direct kernels take up to 48 input channels.
    fn settled(mut self) -> Self {
        let k = self.kernel[0] * self.kernel[1] * self.cin;
        if self.cin > direct_conv::POINTWISE_MAX_CIN && PackedWeights::applies(self.cout) {
            let packed = PackedWeights::new(&self.w, k, self.cout);
            self.w = Vec::new();
            let _ = self.packed.set(packed);
        }
        self
    }

    /// The weights as `[k][cout]`, unpacked when only the packed copy is kept (at load, or on
    /// a path forced after it).
    fn plain_weights(&self) -> std::borrow::Cow<'_, [f32]> {
        match self.packed.get() {
            Some(p) if self.w.is_empty() => std::borrow::Cow::Owned(p.unpack()),
            _ => std::borrow::Cow::Borrowed(&self.w),
        }
    }

    /// This convolution computed with Winograd `F(tile, kernel)` (stride 1, bias and ReLU
    /// epilogue only), unless `DLTOOL_WINOGRAD=0` asks for im2col everywhere.
    pub fn with_winograd(mut self, tile: [usize; 2]) -> Self {
        assert_eq!(self.stride, [1, 1], "Winograd needs stride 1");
        assert!(!self.same, "Winograd pads symmetrically");
        assert!(
            self.epilogue.iter().all(|e| *e == Epilogue::BiasRelu),
            "Winograd convolutions end in bias and ReLU"
        );
        if std::env::var_os("DLTOOL_WINOGRAD").is_some_and(|v| v == "0") {
            return self;
        }
        let [kh, kw] = self.kernel;
        self.winograd = Some(Box::new(WinogradConv::new(
            &self.plain_weights(),
            &self.bias,
            [self.cout, self.cin, kh, kw],
            self.pad,
            tile,
        )));
        // Every path of this convolution now reads the transformed weights alone.
        self.w = Vec::new();
        self.packed = Default::default();
        self
    }

    /// This convolution padded like TensorFlow's "SAME": output `ceil(input / stride)`, the
    /// odd padding row or column at the bottom or right.
    pub fn with_tf_same(mut self) -> Self {
        assert!(self.winograd.is_none(), "Winograd pads symmetrically");
        self.same = true;
        self
    }

    /// This convolution with a different epilogue on all its outputs.
    pub fn with_epilogue(mut self, e: Epilogue) -> Self {
        self.epilogue.fill(e);
        self
    }

    /// Several 1x1 convolutions of the same input as one, their outputs side by side in the
    /// given order: one GEMM with a wider right-hand side instead of several narrow ones.
    pub fn fuse_1x1(parts: &[Conv]) -> Self {
        let cin = parts[0].cin;
        for p in parts {
            assert!(
                p.cin == cin
                    && p.kernel == [1, 1]
                    && p.stride == [1, 1]
                    && p.pad == [0, 0]
                    && p.winograd.is_none(),
                "only 1x1 convolutions of one input fuse"
            );
        }
        let cout: usize = parts.iter().map(|p| p.cout).sum();
        let plain: Vec<_> = parts.iter().map(|p| p.plain_weights()).collect();
        let mut w = Vec::with_capacity(cin * cout);
        for ci in 0..cin {
            for (p, pw) in parts.iter().zip(&plain) {
                w.extend_from_slice(&pw[ci * p.cout..(ci + 1) * p.cout]);
            }
        }
        Self {
            cin,
            cout,
            kernel: [1, 1],
            stride: [1, 1],
            pad: [0, 0],
            same: false,
            w,
            bias: parts.iter().flat_map(|p| p.bias.iter().copied()).collect(),
            epilogue: parts.iter().flat_map(|p| p.epilogue.clone()).collect(),
            winograd: None,
            packed: Default::default(),
        }
        .settled()
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        if self.same {
            return (same_padding(h, kh, sh).0, same_padding(w, kw, sw).0);
        }
        let [ph, pw] = self.pad;
        ((h + 2 * ph - kh) / sh + 1, (w + 2 * pw - kw) / sw + 1)
    }

    /// Padding before the first row and column for an `h` x `w` input.
    fn pad_before(&self, h: usize, w: usize) -> [usize; 2] {
        if self.same {
            [
                same_padding(h, self.kernel[0], self.stride[0]).1,
                same_padding(w, self.kernel[1], self.stride[1]).1,
            ]
        } else {
            self.pad
        }
    }

    /// A fresh output activation holding this convolution's result of `x`.
    pub fn forward(&self, x: &Act, x_c0: usize) -> Act {
        let (ho, wo) = self.out_hw(x.h, x.w);
        let mut out = Act::new(x.n, ho, wo, self.cout);
        self.forward_into(x, x_c0, &mut out, 0);
        out
    }

    /// Convolves channels `x_c0..x_c0 + cin` of `x` into channels `out_c0..out_c0 + cout` of
    /// `out`, leaving the other channels of `out` alone.
    pub fn forward_into(&self, x: &Act, x_c0: usize, out: &mut Act, out_c0: usize) {
        self.forward_inner(x, x_c0, out, out_c0, None);
    }

    /// `self(x) + residual`, the sum taken on each output tile right after its epilogue (an
    /// inverted-residual block's skip connection, without another pass over memory).
    pub fn forward_residual(&self, x: &Act, residual: &Act) -> Act {
        self.with_residual(x, residual, false)
    }

    /// `max(self(x) + residual, 0)`, the end of a ResNet block in the same tile pass: a
    /// separate sum-and-ReLU pass reads and writes each block's whole output once more
    /// (layer1's is 26 MB at batch 8).
    pub fn forward_residual_relu(&self, x: &Act, residual: &Act) -> Act {
        self.with_residual(x, residual, true)
    }

    fn with_residual(&self, x: &Act, residual: &Act, relu: bool) -> Act {
        let (ho, wo) = self.out_hw(x.h, x.w);
        assert_eq!(
            (residual.n, residual.h, residual.w, residual.c),
            (x.n, ho, wo, self.cout),
            "residual shape does not match the convolution's output"
        );
        let mut out = Act::new(x.n, ho, wo, self.cout);
        self.forward_inner(x, 0, &mut out, 0, Some((residual, relu)));
        out
    }

    fn forward_inner(
        &self,
        x: &Act,
        x_c0: usize,
        out: &mut Act,
        out_c0: usize,
        // The residual, and whether a ReLU follows the sum.
        residual: Option<(&Act, bool)>,
    ) {
        let (ho, wo) = self.out_hw(x.h, x.w);
        assert!(x_c0 + self.cin <= x.c, "input channels out of range");
        assert!(out_c0 + self.cout <= out.c, "output channels out of range");
        assert_eq!(
            (out.n, out.h, out.w),
            (x.n, ho, wo),
            "output shape does not match the convolution"
        );
        if let Some(wg) = &self.winograd {
            assert!(residual.is_none(), "Winograd convolutions take no residual");
            return wg.forward_into(x, x_c0, out, out_c0);
        }
        let direct =
            self.kernel == [1, 1] && self.stride == [1, 1] && self.pad_before(1, 1) == [0, 0];
        let whole =
            residual.is_none() && x_c0 == 0 && x.c == self.cin && out_c0 == 0 && out.c == self.cout;
        if whole && direct_conv::applies(self.cin, self.cout) {
            return self.forward_few_channels(x, out);
        }
        if whole && direct && self.direct_pointwise() {
            let tile = tile_rows(0);
            let (cin, cout) = (self.cin, self.cout);
            let k = self.direct_weights(self.epilogue[0]);
            return out
                .data
                .par_chunks_mut(tile * cout)
                .zip(x.data.par_chunks(tile * cin))
                .for_each(|(dst, src)| {
                    direct_conv::pointwise(src, src.len() / cin, cin, cout, &k, dst);
                });
        }
        let k = self.kernel[0] * self.kernel[1] * self.cin;
        let out_c = out.c;
        let rows = out.rows();
        assert_eq!(out.data.len(), rows * out_c);
        let cols = self.column_parts(ho * wo);
        let items: Vec<(usize, usize, std::ops::Range<usize>)> =
            row_tiles(rows, tile_rows(if direct { 0 } else { k }))
                .into_iter()
                .flat_map(|(r0, m)| cols.iter().map(move |c| (r0, m, c.clone())))
                .collect();
        let dst = SyncPtr(out.data.as_mut_ptr());
        items.into_par_iter().for_each(|(r0, m, cols)| {
            COLS.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let a_rs = if direct { x.c } else { k };
                let a = if direct {
                    &x.data[r0 * x.c + x_c0..]
                } else {
                    if scratch.len() < m * k {
                        scratch.resize(m * k, 0.0);
                    }
                    self.im2col(x, x_c0, r0, m, ho, wo, &mut scratch[..m * k]);
                    &scratch[..m * k]
                };
                // SAFETY: rows r0..r0 + m, channels out_c0 + cols of `out` are this item's
                // alone (row tiles and column parts do not overlap), and lie inside it.
                unsafe {
                    let d = dst.get().add(r0 * out_c + out_c0);
                    self.gemm_tile(m, k, a, a_rs, d, out_c, cols.clone());
                    // Same shape as `out` and out_c0 == 0 (forward_residual): the residual's
                    // rows r0.. line up with this tile's.
                    let res = residual.map(|(res, relu)| (&res.data[r0 * out_c..], relu));
                    self.finish_tile(d, m, out_c, cols.clone(), res);
                }
            });
        });
    }

    /// `x` (all its channels, few of them) into all of `out`'s, by the direct kernel, one
    /// output row a work item.
    fn forward_few_channels(&self, x: &Act, out: &mut Act) {
        let (ho, wo) = (out.h, out.w);
        let geo = direct_conv::Geometry {
            h: x.h,
            w: x.w,
            cin: self.cin,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad_before(x.h, x.w),
            wo,
            cout: self.cout,
        };
        let image = x.h * x.w * x.c;
        let uniform = self.uniform_epilogue();
        let k = self.direct_weights(uniform.unwrap_or(Epilogue::None));
        out.data
            .par_chunks_mut(wo * self.cout)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, oy) = (row / ho, row % ho);
                let src = &x.data[img * image..(img + 1) * image];
                direct_conv::row(&geo, src, &k, oy, dst);
                if uniform.is_none() {
                    // SAFETY: dst is this row alone: wo rows of cout floats.
                    let d = dst.as_mut_ptr();
                    unsafe { self.finish_tile(d, wo, self.cout, 0..self.cout, None) };
                }
            });
    }

    fn direct_weights(&self, epilogue: Epilogue) -> direct_conv::Weights<'_> {
        // settled() keeps w wherever a direct kernel applies.
        debug_assert!(!self.w.is_empty() || self.cout * self.cin == 0);
        direct_conv::Weights {
            w: &self.w,
            bias: &self.bias,
            epilogue,
        }
    }

    /// The epilogue of every output column, when they share one.
    fn uniform_epilogue(&self) -> Option<Epilogue> {
        let e = self.epilogue[0];
        self.epilogue.iter().all(|x| *x == e).then_some(e)
    }

    /// Whether this (1x1) convolution is shallow enough for the direct kernel, whose
    /// in-register epilogue needs one for all columns.
    fn direct_pointwise(&self) -> bool {
        direct_conv::applies_pointwise(self.cin, self.cout) && self.uniform_epilogue().is_some()
    }

    /// This 1x1 convolution of `m` pixels on the calling thread: `src` holds them as rows of
    /// `src_rs` floats (the input channels first), `dst` receives `[m][cout]` with the
    /// epilogue applied and `residual` (`[m][cout]`) added when given. For callers that cut
    /// the work into tiles themselves (a fused block, band by band).
    pub fn pointwise_rows(
        &self,
        src: &[f32],
        src_rs: usize,
        m: usize,
        dst: &mut [f32],
        residual: Option<&[f32]>,
    ) {
        assert!(
            self.kernel == [1, 1] && self.stride == [1, 1] && self.pad_before(1, 1) == [0, 0],
            "pointwise_rows takes a plain 1x1 convolution"
        );
        assert!(self.winograd.is_none());
        assert!(src_rs >= self.cin && dst.len() >= m * self.cout);
        if let Some(r) = residual {
            assert!(r.len() >= m * self.cout, "residual too short");
        }
        if residual.is_none() && src_rs == self.cin && self.direct_pointwise() {
            let k = self.direct_weights(self.epilogue[0]);
            return direct_conv::pointwise(src, m, self.cin, self.cout, &k, dst);
        }
        // SAFETY: dst holds m rows of cout floats (asserted), this thread's alone; gemm_tile
        // asserts src's length.
        unsafe {
            let d = dst.as_mut_ptr();
            self.gemm_tile(m, self.cin, src, src_rs, d, self.cout, 0..self.cout);
            self.finish_tile(d, m, self.cout, 0..self.cout, residual.map(|r| (r, false)));
        }
    }

    /// Output columns split into parts run in parallel: only on small maps (17x17 and 8x8 in
    /// InceptionV3), which give one row tile per image, so one image alone still keeps every
    /// core busy. Depends on the layer alone, so features do not depend on the batch.
    fn column_parts(&self, pixels: usize) -> Vec<std::ops::Range<usize>> {
        let parts = if pixels > 512 {
            1
        } else {
            (self.cout / 96).clamp(1, 4)
        };
        let step = self.cout.div_ceil(parts).div_ceil(16) * 16;
        (0..self.cout)
            .step_by(step)
            .map(|c| c..(c + step).min(self.cout))
            .collect()
    }

    /// `dst[r * dst_rs + co] = sum_k a[r * a_rs + k] * w[k][co]` for `m` rows and the
    /// columns `cols`.
    ///
    /// # Safety
    /// `dst` points at `m` rows of `dst_rs` floats, columns `cols` of each writable and
    /// written by nobody else meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_tile(
        &self,
        m: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        dst: *mut f32,
        dst_rs: usize,
        cols: std::ops::Range<usize>,
    ) {
        if m == 0 {
            return;
        }
        assert!(a.len() >= (m - 1) * a_rs + k);
        assert!(cols.end <= self.cout && cols.end <= dst_rs);
        if PackedWeights::applies(self.cout) && cols.start.is_multiple_of(16) {
            let packed = self
                .packed
                .get_or_init(|| PackedWeights::new(&self.w, k, self.cout));
            // SAFETY: applies() checked the CPU; the caller vouches for dst.
            return unsafe { packed.matmul(m, a, a_rs, cols, dst, dst_rs) };
        }
        let w = self.plain_weights();
        // SAFETY: the assert keeps every read of `a` and of `self.w` (k x cout, columns
        // `cols`) in bounds; the caller vouches for `dst`.
        unsafe {
            gemm::gemm(
                m,
                cols.len(),
                k,
                dst.add(cols.start),
                1,
                dst_rs as isize,
                false,
                a.as_ptr(),
                1,
                a_rs as isize,
                w.as_ptr().add(cols.start),
                1,
                self.cout as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// Writes the im2col rows of output pixels `r0..r0 + m` (pixel order n, y, x) into `cols`.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        x: &Act,
        x_c0: usize,
        r0: usize,
        m: usize,
        ho: usize,
        wo: usize,
        cols: &mut [f32],
    ) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [ph, pw] = self.pad_before(x.h, x.w);
        let cin = self.cin;
        let k = kh * kw * cin;
        // With all of the input's channels, a kernel row's pixels lie side by side in memory.
        let whole = x_c0 == 0 && x.c == cin;
        for (i, row) in cols.chunks_exact_mut(k).enumerate().take(m) {
            let r = r0 + i;
            let img = r / (ho * wo);
            let oy = (r / wo) % ho;
            let ox = r % wo;
            for ky in 0..kh {
                let iy = (oy * sh + ky) as isize - ph as isize;
                let ix0 = (ox * sw) as isize - pw as isize;
                let inside = iy >= 0 && iy < x.h as isize && ix0 >= 0;
                if whole && inside && ix0 as usize + kw <= x.w {
                    let p = ((img * x.h + iy as usize) * x.w + ix0 as usize) * cin;
                    row[ky * kw * cin..(ky + 1) * kw * cin]
                        .copy_from_slice(&x.data[p..p + kw * cin]);
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * sw + kx) as isize - pw as isize;
                    let dst = &mut row[(ky * kw + kx) * cin..(ky * kw + kx + 1) * cin];
                    if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                        dst.fill(0.0);
                    } else {
                        let p = (img * x.h + iy as usize) * x.w + ix as usize;
                        dst.copy_from_slice(&x.data[p * x.c + x_c0..p * x.c + x_c0 + cin]);
                    }
                }
            }
        }
    }

    /// Each column's epilogue on columns `cols` of `m` rows, then `+ residual` (rows of
    /// `dst_rs` floats, the tile's first at `residual[0]`) and a ReLU when asked: one pass over
    /// the tile while it is in cache.
    ///
    /// # Safety
    /// As for [`Conv::gemm_tile`].
    unsafe fn finish_tile(
        &self,
        dst: *mut f32,
        m: usize,
        dst_rs: usize,
        cols: std::ops::Range<usize>,
        residual: Option<(&[f32], bool)>,
    ) {
        let bias = &self.bias[cols.clone()];
        let epilogue = &self.epilogue[cols.clone()];
        let uniform = epilogue.iter().all(|e| *e == epilogue[0]);
        let simd = crate::engine::cpu::simd();
        for r in 0..m {
            // SAFETY: the caller vouches for these columns of row r.
            let row = unsafe {
                std::slice::from_raw_parts_mut(dst.add(r * dst_rs + cols.start), cols.len())
            };
            let res =
                residual.map(|(res, relu)| (&res[r * dst_rs + cols.start..][..cols.len()], relu));
            if uniform {
                finish_row(simd, epilogue[0], row, bias, res);
            } else {
                for ((v, b), e) in row.iter_mut().zip(bias).zip(epilogue) {
                    *v = e.apply(*v, *b);
                }
                finish_row(simd, Epilogue::None, row, bias, res);
            }
        }
    }
}

/// [`finish_row_with`] for the epilogue `e`, compiled for the widest vectors `simd` allows
/// (the build targets baseline x86-64, whose SSE2 loops moved a quarter of AVX-512's).
#[inline]
fn finish_row(
    simd: crate::engine::cpu::Simd,
    e: Epilogue,
    row: &mut [f32],
    bias: &[f32],
    residual: Option<(&[f32], bool)>,
) {
    use crate::engine::cpu::Simd;
    if e == Epilogue::None && residual.is_none() {
        return;
    }
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `cpu::simd` only gives paths the CPU has.
        Simd::Avx512 => unsafe { finish_row_avx512(e, row, bias, residual) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { finish_row_avx2(e, row, bias, residual) },
        _ => finish_row_any(e, row, bias, residual),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn finish_row_avx512(e: Epilogue, row: &mut [f32], b: &[f32], res: Option<(&[f32], bool)>) {
    finish_row_any(e, row, b, res)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish_row_avx2(e: Epilogue, row: &mut [f32], b: &[f32], res: Option<(&[f32], bool)>) {
    finish_row_any(e, row, b, res)
}

// max then min as in `Epilogue::apply`.
#[allow(clippy::manual_clamp)]
#[inline(always)]
fn finish_row_any(e: Epilogue, row: &mut [f32], bias: &[f32], res: Option<(&[f32], bool)>) {
    match e {
        Epilogue::BiasRelu => finish_row_with(|v, b| (v + b).max(0.0), row, bias, res),
        Epilogue::BiasRelu6 => finish_row_with(|v, b| (v + b).max(0.0).min(6.0), row, bias, res),
        Epilogue::Bias => finish_row_with(|v, b| v + b, row, bias, res),
        Epilogue::None => finish_row_with(|v, _| v, row, bias, res),
    }
}

/// `row = f(row, bias) [+ residual [then ReLU]]`, the match outside the loop so it vectorises.
#[inline(always)]
fn finish_row_with(
    f: impl Fn(f32, f32) -> f32,
    row: &mut [f32],
    bias: &[f32],
    residual: Option<(&[f32], bool)>,
) {
    match residual {
        None => row.iter_mut().zip(bias).for_each(|(v, b)| *v = f(*v, *b)),
        Some((r, false)) => row
            .iter_mut()
            .zip(bias)
            .zip(r)
            .for_each(|((v, b), r)| *v = f(*v, *b) + r),
        Some((r, true)) => row
            .iter_mut()
            .zip(bias)
            .zip(r)
            .for_each(|((v, b), r)| *v = (f(*v, *b) + r).max(0.0)),
    }
}

/// The output's base pointer, shared by work items that write disjoint parts of it.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only used to write regions that no two work items share (see forward_into).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Through a method, so closures capture the wrapper (Send) rather than its field.
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Per-thread im2col scratch, reused across tiles and layers.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output pixels per tile: (for im2col) few enough that a tile's im2col matrix stays in the
/// per-core cache, never so few that the GEMM gets inefficient (measured: below ~128 rows it
/// loses 10-30%).
///
/// Tiles depend on the layer alone, never on the batch size or the thread count, and
/// [`row_tiles`] never leaves a short last tile: gemm takes other code paths for tiny
/// products (a GEMV for one row; another depth blocking at 64 x 64 and below) that round
/// differently, and features must not depend on how images were batched.
fn tile_rows(k: usize) -> usize {
    if k == 0 {
        256
    } else {
        ((256 * 1024) / (4 * k)).clamp(128, 512)
    }
}

/// `rows` cut into tiles of `tile` rows, the remainder joined to the last tile when shorter
/// than 65 rows (see [`tile_rows`]): (first row, rows) of each.
fn row_tiles(rows: usize, tile: usize) -> Vec<(usize, usize)> {
    let mut tiles = Vec::with_capacity(rows / tile + 1);
    let mut r0 = 0;
    while r0 < rows {
        let left = rows - r0;
        let m = if left < tile + 65 { left } else { tile };
        tiles.push((r0, m));
        r0 += m;
    }
    tiles
}

/// 3x3 max pool, stride 2, no padding, of `x` into channels `out_c0..` of `out`.
pub fn max_pool_3x3_s2_into(x: &Act, out: &mut Act, out_c0: usize) {
    let (ho, wo) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
    assert_eq!((out.n, out.h, out.w), (x.n, ho, wo));
    assert!(out_c0 + x.c <= out.c);
    let (c, out_c) = (x.c, out.c);
    out.data
        .par_chunks_mut(wo * out_c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (img, oy) = (row / ho, row % ho);
            for ox in 0..wo {
                let d = &mut dst[ox * out_c + out_c0..ox * out_c + out_c0 + c];
                d.fill(f32::NEG_INFINITY);
                for ky in 0..3 {
                    for kx in 0..3 {
                        let p = (img * x.h + oy * 2 + ky) * x.w + ox * 2 + kx;
                        for (a, v) in d.iter_mut().zip(&x.data[p * c..(p + 1) * c]) {
                            *a = if *v > *a { *v } else { *a };
                        }
                    }
                }
            }
        });
}

pub fn max_pool_3x3_s2(x: &Act) -> Act {
    let mut out = Act::new(x.n, (x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1, x.c);
    max_pool_3x3_s2_into(x, &mut out, 0);
    out
}

/// Kind of a 3x3, stride 1, padding 1 pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool3x3 {
    /// Average; `include_pad` divides by 9 everywhere, otherwise by the pixels inside the image.
    Avg { include_pad: bool },
    /// Maximum over the pixels inside the image.
    Max,
}

/// 3x3 stride-1 pool of channels `x_c0..x_c0 + c` of `x` into channels `out_c0..` of `out`,
/// then `max(v + bias, 0)` when `bias_relu` is given.
pub fn pool_3x3_s1_into(
    kind: Pool3x3,
    x: &Act,
    x_c0: usize,
    c: usize,
    bias_relu: Option<&[f32]>,
    out: &mut Act,
    out_c0: usize,
) {
    assert_eq!((out.n, out.h, out.w), (x.n, x.h, x.w));
    assert!(x_c0 + c <= x.c && out_c0 + c <= out.c);
    if let Some(b) = bias_relu {
        assert_eq!(b.len(), c);
    }
    let (h, w, xc, out_c) = (x.h, x.w, x.c, out.c);
    out.data
        .par_chunks_mut(w * out_c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (img, oy) = (row / h, row % h);
            let ys = oy.saturating_sub(1)..(oy + 2).min(h);
            for ox in 0..w {
                let xs = ox.saturating_sub(1)..(ox + 2).min(w);
                let d = &mut dst[ox * out_c + out_c0..ox * out_c + out_c0 + c];
                let init = if kind == Pool3x3::Max {
                    f32::NEG_INFINITY
                } else {
                    0.0
                };
                d.fill(init);
                for iy in ys.clone() {
                    for ix in xs.clone() {
                        let p = ((img * h + iy) * w + ix) * xc + x_c0;
                        let src = &x.data[p..p + c];
                        if kind == Pool3x3::Max {
                            for (a, v) in d.iter_mut().zip(src) {
                                *a = if *v > *a { *v } else { *a };
                            }
                        } else {
                            for (a, v) in d.iter_mut().zip(src) {
                                *a += v;
                            }
                        }
                    }
                }
                if let Pool3x3::Avg { include_pad } = kind {
                    let count = if include_pad { 9 } else { ys.len() * xs.len() };
                    let inv = 1.0 / count as f32;
                    for a in d.iter_mut() {
                        *a *= inv;
                    }
                }
                if let Some(b) = bias_relu {
                    for (a, b) in d.iter_mut().zip(b) {
                        *a = (*a + b).max(0.0);
                    }
                }
            }
        });
}
