//! An inverted-residual block (MobileNet v2, EfficientNet-Lite): a 1x1 expansion (absent when
//! the ratio is 1), a depthwise convolution and a 1x1 projection, plus the input when the
//! block keeps its shape.
//!
//! Why fused: the expansion widens the block six times, and on the large early maps the
//! widened activation does not fit in any core's cache (112 x 112 x 96 floats is 4.8 MB an
//! image). Run layer by layer, the expansion writes it to memory, the depthwise reads it back
//! and writes as much again, and the projection reads that: measured at batch 4, these layers
//! ran at 25-75 GFLOP/s (of 330), waiting on memory. Here each work item is one band of an
//! image's output rows: it expands just the input rows the band's depthwise windows read,
//! convolves them, and projects the result, all in per-thread scratch sized to stay in the
//! core's L2. Bands overlap by the depthwise kernel's halo, whose few expanded rows are
//! computed twice.
//!
//! Results are the same bits as layer by layer: each output of a 1x1 convolution sums its
//! pixel's row in the same order however many rows its GEMM gets (the gemm crate blocks the
//! depth by the depth alone, and every block here has more than one row), and the depthwise
//! kernel computes each output from its own window in a fixed order.

use crate::engine::cpu_conv::{Act, Conv, SyncPtr};
use crate::engine::depthwise::DepthwiseConv;
use rayon::prelude::*;
use std::cell::RefCell;

/// Scratch bytes one band may use (expanded input rows and depthwise output rows): well inside
/// a 1-2 MB L2, leaving room for the GEMM's packed weights and its own buffers.
const BAND_BYTES: usize = 1 << 20;

/// A whole image's widened activation at or below this many bytes stays in cache anyway: the
/// block then runs layer by layer over all of a pass's images, which gives the small late
/// maps' GEMMs several images' rows.
const FUSE_ABOVE_BYTES: usize = 512 << 10;

/// Expansion, depthwise, projection, and whether the input is added to the output.
pub struct InvertedResidual {
    pub expand: Option<Conv>,
    pub depthwise: DepthwiseConv,
    pub project: Conv,
    pub residual: bool,
}

thread_local! {
    /// Per-thread band scratch: the expanded rows, then the depthwise output.
    static BAND: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl InvertedResidual {
    pub fn new(
        expand: Option<Conv>,
        depthwise: DepthwiseConv,
        project: Conv,
        residual: bool,
    ) -> Self {
        let mid = depthwise.channels;
        if let Some(e) = &expand {
            assert_eq!(e.cout, mid, "expansion width differs from the depthwise's");
        }
        assert_eq!(
            project.cin, mid,
            "projection input differs from the depthwise's"
        );
        if residual {
            assert_eq!(depthwise.stride, 1, "a shortcut needs stride 1");
            let cin = expand.as_ref().map_or(mid, |e| e.cin);
            assert_eq!(
                project.cout, cin,
                "a shortcut needs equal in and out widths"
            );
        }
        Self {
            expand,
            depthwise,
            project,
            residual,
        }
    }

    fn cin(&self) -> usize {
        self.expand
            .as_ref()
            .map_or(self.depthwise.channels, |e| e.cin)
    }

    pub fn forward(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin(), "input channels");
        match self.band_rows(x.h, x.w) {
            Some(band) => self.forward_bands(x, band),
            None => self.forward_layers(x),
        }
    }

    /// Layer by layer over the whole batch.
    pub fn forward_layers(&self, x: &Act) -> Act {
        let d = match &self.expand {
            Some(e) => self.depthwise.forward(&e.forward(x, 0)),
            None => self.depthwise.forward(x),
        };
        if self.residual {
            self.project.forward_residual(&d, x)
        } else {
            self.project.forward(&d, 0)
        }
    }

    /// Output rows per band for an `h` x `w` input, or `None` when the block is better run
    /// layer by layer (its widened image fits in cache).
    fn band_rows(&self, h: usize, w: usize) -> Option<usize> {
        let mid = self.depthwise.channels;
        if h * w * mid * 4 <= FUSE_ABOVE_BYTES {
            return None;
        }
        let (ho, wo) = self.depthwise.out_hw(h, w);
        let bytes = |rows: usize| {
            let (lo, hi) = self.depthwise.input_rows(h, 0, rows);
            let expanded = if self.expand.is_some() { hi - lo } else { 0 };
            (expanded * w + rows * wo) * mid * 4
        };
        let mut band = 1;
        while band < ho && bytes(band + 1) <= BAND_BYTES {
            band += 1;
        }
        // Equal bands (the last no shorter than needed), and at least two per image so that
        // one image keeps two cores busy.
        let bands = ho.div_ceil(band).max(2).min(ho);
        Some(ho.div_ceil(bands))
    }

    /// Band by band, each band through all three layers in per-thread scratch.
    fn forward_bands(&self, x: &Act, band: usize) -> Act {
        let (h, w, cin, mid) = (x.h, x.w, x.c, self.depthwise.channels);
        let (ho, wo) = self.depthwise.out_hw(h, w);
        let cout = self.project.cout;
        let bands = ho.div_ceil(band);
        let mut out = Act::new(x.n, ho, wo, cout);
        let dst = SyncPtr(out.data.as_mut_ptr());
        (0..x.n * bands).into_par_iter().for_each(|item| {
            let (img, b) = (item / bands, item % bands);
            let oy0 = b * band;
            let rows = band.min(ho - oy0);
            let (lo, hi) = self.depthwise.input_rows(h, oy0, rows);
            let image = &x.data[img * h * w * cin..(img + 1) * h * w * cin];
            BAND.with(|scratch| {
                let (expanded, dw) = &mut *scratch.borrow_mut();
                let dw_in: &[f32] = match &self.expand {
                    Some(e) => {
                        let len = (hi - lo) * w * mid;
                        if expanded.len() < len {
                            expanded.resize(len, 0.0);
                        }
                        let src = &image[lo * w * cin..hi * w * cin];
                        e.pointwise_rows(src, cin, (hi - lo) * w, &mut expanded[..len], None);
                        &expanded[..len]
                    }
                    None => &image[lo * w * cin..hi * w * cin],
                };
                let len = rows * wo * mid;
                if dw.len() < len {
                    dw.resize(len, 0.0);
                }
                self.depthwise
                    .forward_band(dw_in, lo, h, w, oy0, rows, &mut dw[..len]);
                let first = (img * ho + oy0) * wo * cout;
                // SAFETY: output rows oy0..oy0 + rows of image img are this item's alone
                // (bands and images do not overlap) and lie inside `out`.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(first), rows * wo * cout)
                };
                // With a shortcut the output has the input's shape: the same offsets.
                let res = self
                    .residual
                    .then(|| &x.data[first..first + rows * wo * cout]);
                self.project
                    .pointwise_rows(&dw[..len], mid, rows * wo, o, res);
            });
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_conv::Epilogue;
    use crate::engine::depthwise::tests::pseudo;

    fn pointwise(cin: usize, cout: usize, e: Epilogue, seed: u64) -> Conv {
        let w = pseudo(cout * cin, seed);
        let b = pseudo(cout, seed + 1);
        Conv::new(&w, &b, [cout, cin, 1, 1], [1, 1], [0, 0]).with_epilogue(e)
    }

    fn block(
        cin: usize,
        mid: usize,
        cout: usize,
        k: usize,
        s: usize,
        expand: bool,
    ) -> InvertedResidual {
        let dw = DepthwiseConv::new(
            &pseudo(mid * k * k, 7),
            &pseudo(mid, 8),
            mid,
            k,
            s,
            Epilogue::BiasRelu6,
        );
        InvertedResidual::new(
            expand.then(|| pointwise(cin, mid, Epilogue::BiasRelu6, 3)),
            dw,
            pointwise(mid, cout, Epilogue::Bias, 5),
            s == 1 && cin == cout,
        )
    }

    /// Every band height gives the same bits as running the three layers one after another,
    /// for both kernels and strides, odd and even sizes, with and without expansion and
    /// shortcut, bands that do not divide the map, and a batch of two.
    #[test]
    fn bands_equal_layer_by_layer() {
        let cases = [
            // (cin, mid, cout, k, stride, expand, h, w)
            (8, 48, 8, 3, 1, true, 13, 11),
            (8, 48, 16, 3, 2, true, 13, 12),
            (16, 40, 16, 5, 1, true, 12, 9),
            (16, 40, 24, 5, 2, true, 15, 15),
            (24, 24, 16, 3, 1, false, 10, 14),
            (24, 24, 24, 5, 1, false, 9, 9),
        ];
        for (cin, mid, cout, k, s, expand, h, w) in cases {
            let b = block(cin, mid, cout, k, s, expand);
            let x = Act::from_vec(2, h, w, cin, pseudo(2 * h * w * cin, 11));
            let want = b.forward_layers(&x);
            let (ho, _) = b.depthwise.out_hw(h, w);
            for band in 1..=ho {
                let got = b.forward_bands(&x, band);
                assert_eq!(
                    (got.n, got.h, got.w, got.c),
                    (want.n, want.h, want.w, want.c)
                );
                assert!(
                    got.data == want.data,
                    "cin {cin} mid {mid} k {k} s {s} expand {expand} {h}x{w}: band {band} differs"
                );
            }
        }
    }

    /// Large maps are cut into bands that fit the scratch budget (at least two an image);
    /// small ones run layer by layer.
    #[test]
    fn bands_only_where_the_widened_map_leaves_the_cache() {
        let b = block(16, 96, 24, 3, 2, true);
        let band = b.band_rows(112, 112).expect("112x112x96 is fused");
        let (ho, _) = b.depthwise.out_hw(112, 112);
        assert!(ho.div_ceil(band) >= 2);
        let (lo, hi) = b.depthwise.input_rows(112, 0, band);
        assert!(((hi - lo) * 112 + band * 56) * 96 * 4 <= BAND_BYTES);
        assert_eq!(b.band_rows(14, 14), None);
    }
}
