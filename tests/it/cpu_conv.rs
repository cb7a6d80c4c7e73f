//! The NHWC convolution and pooling kernels against straightforward definitions.

use dltool::cpu_conv::*;

/// Straightforward NCHW convolution with bias and ReLU.
#[allow(clippy::too_many_arguments)]
fn reference_conv(
    x: &[f32],
    [n, cin, h, w]: [usize; 4],
    wt: &[f32],
    b: &[f32],
    [cout, kh, kw]: [usize; 3],
    [sh, sw]: [usize; 2],
    [ph, pw]: [usize; 2],
) -> (Vec<f32>, usize, usize) {
    let ho = (h + 2 * ph - kh) / sh + 1;
    let wo = (w + 2 * pw - kw) / sw + 1;
    let mut out = vec![0.0; n * cout * ho * wo];
    for i in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = b[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * sh + ky) as isize - ph as isize;
                                let ix = (ox * sw + kx) as isize - pw as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((i * cin + ci) * h + iy as usize) * w + ix as usize];
                                let wv = wt[((co * cin + ci) * kh + ky) * kw + kx];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((i * cout + co) * ho + oy) * wo + ox] = s.max(0.0) as f32;
                }
            }
        }
    }
    (out, ho, wo)
}

fn pseudo(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Runs `conv` on `x` (NCHW) held as channels 2.. of a wider activation, into channels 1.. of a
/// wider output; returns the result in NHWC and NCHW order and its max |difference| from
/// `want`, after checking that the channels around the written range stay untouched.
fn run_wide(
    conv: &Conv,
    x: &[f32],
    [n, cin, h, w]: [usize; 4],
    want: &[f32],
    [cout, ho, wo]: [usize; 3],
) -> (Act, f32) {
    let mut wide = Act::zeros(n, h, w, cin + 3);
    wide.copy_channels(2, &Act::from_nchw(x, n, cin, h, w), 0, cin);
    let mut out = Act::zeros(n, ho, wo, cout + 4);
    conv.forward_into(&wide, 2, &mut out, 1);
    assert!(
        out.data
            .chunks(cout + 4)
            .all(|r| r[0] == 0.0 && r[cout + 1..] == [0.0; 3]),
        "channels outside the range written"
    );
    let mut got = Act::zeros(n, ho, wo, cout);
    got.copy_channels(0, &out, 1, cout);
    let diff = got
        .to_nchw()
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    (got, diff)
}

#[test]
fn conv_matches_direct_convolution_for_every_kernel_shape_inception_uses() {
    // (cin, cout, kh, kw, stride, pad): 1x1, 3x3 valid/same/stride 2, 5x5, 1x7, 7x1.
    let cases = [
        (5, 7, 1, 1, 1, [0, 0]),
        (3, 4, 3, 3, 2, [0, 0]),
        (6, 5, 3, 3, 1, [1, 1]),
        (4, 3, 5, 5, 1, [2, 2]),
        (4, 6, 1, 7, 1, [0, 3]),
        (4, 6, 7, 1, 1, [3, 0]),
        (8, 9, 3, 3, 2, [0, 0]),
        // Wide outputs on a small map: output columns split into parts run in parallel.
        (8, 200, 3, 3, 1, [1, 1]),
        (12, 300, 1, 1, 1, [0, 0]),
    ];
    let (n, h, w) = (2, 11, 9);
    for (i, &(cin, cout, kh, kw, s, pad)) in cases.iter().enumerate() {
        let x = pseudo(n * cin * h * w, 1 + i as u64);
        let wt = pseudo(cout * cin * kh * kw, 100 + i as u64);
        let b = pseudo(cout, 200 + i as u64);
        let (want, ho, wo) =
            reference_conv(&x, [n, cin, h, w], &wt, &b, [cout, kh, kw], [s, s], pad);
        let conv = Conv::new(&wt, &b, [cout, cin, kh, kw], [s, s], pad);
        let (_, diff) = run_wide(&conv, &x, [n, cin, h, w], &want, [cout, ho, wo]);
        assert!(diff < 1e-5, "case {i}: max diff {diff}");
    }
}

#[test]
fn fused_1x1_equals_separate_convolutions() {
    let (n, h, w, cin) = (1, 5, 4, 6);
    let x = Act::from_nchw(&pseudo(n * cin * h * w, 7), n, cin, h, w);
    let a = Conv::new(
        &pseudo(3 * cin, 8),
        &pseudo(3, 9),
        [3, cin, 1, 1],
        [1, 1],
        [0, 0],
    );
    let b = Conv::new(
        &pseudo(4 * cin, 10),
        &pseudo(4, 11),
        [4, cin, 1, 1],
        [1, 1],
        [0, 0],
    )
    .with_epilogue(Epilogue::None);
    let fused = Conv::fuse_1x1(&[a.clone(), b.clone()]).forward(&x, 0);
    let (ya, yb) = (a.forward(&x, 0), b.forward(&x, 0));
    for r in 0..x.rows() {
        assert_eq!(fused.data[r * 7..r * 7 + 3], ya.data[r * 3..r * 3 + 3]);
        assert_eq!(fused.data[r * 7 + 3..r * 7 + 7], yb.data[r * 4..r * 4 + 4]);
    }
    // Epilogue::None leaves negative values: the bare product, no bias.
    assert!(yb.data.iter().any(|v| *v < 0.0));
}

#[test]
fn pools_match_their_definitions() {
    let (n, h, w, c) = (2, 5, 6, 3);
    let x = Act::from_nchw(&pseudo(n * c * h * w, 3), n, c, h, w);
    let at = |img: usize, y: usize, xx: usize, ch: usize| x.data[((img * h + y) * w + xx) * c + ch];
    for kind in [
        Pool3x3::Max,
        Pool3x3::Avg { include_pad: true },
        Pool3x3::Avg { include_pad: false },
    ] {
        let mut out = Act::zeros(n, h, w, c);
        pool_3x3_s1_into(kind, &x, 0, c, None, &mut out, 0);
        for img in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..c {
                        let mut vals = vec![];
                        for dy in -1isize..=1 {
                            for dx in -1isize..=1 {
                                let (yy, x2) = (y as isize + dy, xx as isize + dx);
                                if yy >= 0 && x2 >= 0 && yy < h as isize && x2 < w as isize {
                                    vals.push(at(img, yy as usize, x2 as usize, ch));
                                }
                            }
                        }
                        let want = match kind {
                            Pool3x3::Max => vals.iter().copied().fold(f32::MIN, f32::max),
                            Pool3x3::Avg { include_pad: true } => vals.iter().sum::<f32>() / 9.0,
                            Pool3x3::Avg { include_pad: false } => {
                                vals.iter().sum::<f32>() / vals.len() as f32
                            }
                        };
                        let got = out.data[((img * h + y) * w + xx) * c + ch];
                        assert!((got - want).abs() < 1e-6, "{kind:?}");
                    }
                }
            }
        }
    }
    let pooled = max_pool_3x3_s2(&x);
    assert_eq!((pooled.h, pooled.w), (2, 2));
    let want = (0..3)
        .flat_map(|y| (0..3).map(move |xx| (y, xx)))
        .map(|(y, xx)| at(1, 2 + y, 2 + xx, 2))
        .fold(f32::MIN, f32::max);
    // Image 1, output pixel (1, 1), channel 2.
    assert_eq!(pooled.data[((2 + 1) * 2 + 1) * c + 2], want);
}

#[test]
fn winograd_transforms_are_exact_correlations() {
    use dltool::winograd::Transform1d;
    for (m, r) in [(2, 3), (4, 3), (6, 3), (2, 5), (2, 7), (4, 7), (3, 1)] {
        let t = Transform1d::new(m, r);
        let (g, d) = (pseudo(r, m as u64), pseudo(t.alpha, 50 + r as u64));
        let a = t.alpha;
        let gg: Vec<f64> = (0..a)
            .map(|j| (0..r).map(|k| t.g[j * r + k] * g[k] as f64).sum())
            .collect();
        let bd: Vec<f64> = (0..a)
            .map(|j| (0..a).map(|l| t.bt[j * a + l] * d[l] as f64).sum())
            .collect();
        for i in 0..m {
            let got: f64 = (0..a).map(|j| t.at[i * a + j] * gg[j] * bd[j]).sum();
            let want: f64 = (0..r).map(|k| g[k] as f64 * d[i + k] as f64).sum();
            assert!(
                (got - want).abs() < 1e-9,
                "F({m}, {r}) output {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn winograd_convolutions_match_direct_convolution_and_ignore_the_batch() {
    // (cin, cout, kh, kw, pad, tile): the shapes the engine runs with Winograd, on maps that
    // leave partial tiles at the right and bottom edges.
    let cases = [
        (6, 5, 3, 3, [1, 1], [4, 4]),
        (6, 5, 3, 3, [0, 0], [4, 4]),
        (5, 7, 3, 3, [1, 1], [2, 2]),
        (4, 3, 5, 5, [2, 2], [2, 2]),
        (4, 6, 1, 7, [0, 3], [1, 2]),
        (4, 6, 7, 1, [3, 0], [2, 1]),
        (4, 6, 1, 7, [0, 3], [1, 4]),
        (4, 6, 7, 1, [3, 0], [4, 1]),
        // Whole 16-channel vectors: the AVX-512 transforms, where the CPU has them.
        (16, 32, 3, 3, [1, 1], [4, 4]),
        (32, 16, 3, 3, [0, 0], [4, 4]),
        (16, 16, 5, 5, [2, 2], [2, 2]),
        (32, 16, 1, 7, [0, 3], [1, 4]),
        (16, 32, 7, 1, [3, 0], [4, 1]),
    ];
    let (n, h, w) = (3, 13, 11);
    for (i, &(cin, cout, kh, kw, pad, tile)) in cases.iter().enumerate() {
        let x = pseudo(n * cin * h * w, 300 + i as u64);
        let wt = pseudo(cout * cin * kh * kw, 400 + i as u64);
        let b = pseudo(cout, 500 + i as u64);
        let (want, ho, wo) =
            reference_conv(&x, [n, cin, h, w], &wt, &b, [cout, kh, kw], [1, 1], pad);
        let conv = Conv::new(&wt, &b, [cout, cin, kh, kw], [1, 1], pad).with_winograd(tile);
        let (got, diff) = run_wide(&conv, &x, [n, cin, h, w], &want, [cout, ho, wo]);
        // F(4, 7) takes points up to +-3, so its rounding error grows with the values' scale.
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff < 2e-5 * scale,
            "case {i}: max diff {diff}, max |value| {scale}"
        );
        // The last image alone gives the same bits as inside the batch.
        let one = &x[(n - 1) * cin * h * w..];
        let alone = conv.forward(&Act::from_nchw(one, 1, cin, h, w), 0);
        assert_eq!(
            alone.data[..],
            got.data[(n - 1) * ho * wo * cout..],
            "case {i}"
        );
    }
}

/// `conv` on `x` (NCHW) by [`Conv::forward`] (which takes the direct kernel for the shapes
/// tested below) and by im2col + GEMM (which the same layer takes when its input is part of a
/// wider activation): both sum the taps in the same order with one FMA each, so their bits
/// agree; the portable path (no FMA hardware, or DLTOOL_SIMD=scalar) rounds the product
/// separately and is held to 1e-5. Returns the direct result.
fn direct_equals_gemm(conv: &Conv, x: &[f32], [n, cin, h, w]: [usize; 4], case: usize) -> Act {
    let direct = conv.forward(&Act::from_nchw(x, n, cin, h, w), 0);
    let (ho, wo) = conv.out_hw(h, w);
    let mut wide = Act::zeros(n, h, w, cin + 1);
    wide.copy_channels(1, &Act::from_nchw(x, n, cin, h, w), 0, cin);
    let mut gemm = Act::zeros(n, ho, wo, conv.cout);
    conv.forward_into(&wide, 1, &mut gemm, 0);
    if dltool::engine::cpu::simd() != dltool::engine::cpu::Simd::Scalar {
        assert!(
            direct.data == gemm.data,
            "case {case}: direct differs from the GEMM"
        );
    } else {
        let diff = direct
            .data
            .iter()
            .zip(&gemm.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-5,
            "case {case}: portable path {diff} from the GEMM"
        );
    }
    direct
}

/// A first layer (few input channels, whole vectors of outputs) takes the direct kernel; it
/// must match the definition and the GEMM's bits on every edge: TF "SAME" and symmetric
/// padding, strides 1 and 2, 3x3, 5x5 and 7x7, 1-4 input channels, 16-96 outputs.
#[test]
fn first_layer_direct_kernel_equals_im2col() {
    // (cin, cout, k, stride, pad, tf_same)
    let cases = [
        (3, 32, 3, 2, 0, true),
        (3, 32, 3, 2, 0, false),
        (3, 64, 7, 2, 3, false),
        (3, 64, 3, 1, 1, false),
        (1, 16, 3, 1, 1, false),
        (4, 48, 3, 2, 1, false),
        (3, 96, 5, 2, 0, true),
    ];
    let (n, h, w) = (2, 23, 17);
    for (i, &(cin, cout, k, s, pad, same)) in cases.iter().enumerate() {
        let x = pseudo(n * cin * h * w, 300 + i as u64);
        let wt = pseudo(cout * cin * k * k, 400 + i as u64);
        let b = pseudo(cout, 500 + i as u64);
        let mut conv = Conv::new(&wt, &b, [cout, cin, k, k], [s, s], [pad, pad]);
        if same {
            conv = conv.with_tf_same();
        }
        let direct = direct_equals_gemm(&conv, &x, [n, cin, h, w], i);
        if !same {
            let (want, _, _) = reference_conv(
                &x,
                [n, cin, h, w],
                &wt,
                &b,
                [cout, k, k],
                [s, s],
                [pad, pad],
            );
            let diff = direct
                .to_nchw()
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "case {i}: max diff {diff} from the definition");
        }
    }
}

/// Shallow 1x1 convolutions (an expansion from 16-48 channels) also take the direct kernel,
/// with every epilogue applied in registers: the same bits as the GEMM and its epilogue pass,
/// on output widths of 48, 32 and 16 lanes and a pixel count no run of six divides.
#[test]
fn shallow_pointwise_direct_kernel_equals_gemm() {
    let epilogues = [
        Epilogue::BiasRelu6,
        Epilogue::Bias,
        Epilogue::BiasRelu,
        Epilogue::None,
    ];
    // (cin, cout)
    let cases = [(16, 96), (24, 144), (40, 240), (48, 16), (7, 80), (33, 32)];
    let (n, h, w) = (2, 9, 7);
    for (i, &(cin, cout)) in cases.iter().enumerate() {
        let x = pseudo(n * cin * h * w, 600 + i as u64);
        let wt = pseudo(cout * cin, 700 + i as u64);
        let b = pseudo(cout, 800 + i as u64);
        let conv = Conv::new(&wt, &b, [cout, cin, 1, 1], [1, 1], [0, 0])
            .with_epilogue(epilogues[i % epilogues.len()]);
        direct_equals_gemm(&conv, &x, [n, cin, h, w], i);
    }
}
