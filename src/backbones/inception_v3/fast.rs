//! InceptionV3 inference on the CPU with the NHWC kernels of [`crate::cpu_conv`].
//!
//! The burn model ([`InceptionV3`]) stays the reference implementation (and the way to other
//! backends); [`FastInceptionV3`] is built from its loaded, BatchNorm-folded tensors and computes
//! the same function, about three times faster on a CPU. Beyond the NHWC layout, two rewrites
//! of the graph save work:
//!
//! * the 1x1 convolutions of a block that read the block input are one GEMM;
//! * the average-pool branch runs its 1x1 convolution *before* the 3x3 average pool (both are
//!   linear, so they commute once the bias is added after the pool): the pool then averages
//!   the branch's 32..192 output channels instead of the block's 192..2048 input channels, and
//!   the convolution joins the block's fused GEMM.
//!
//! After a block's fused GEMM its two longest branches run side by side (`rayon::join`): at
//! batch 1 one convolution of a 17x17 or 8x8 map splits into only a few parts, and the other
//! branch's work keeps the second core busy (InceptionV3 at batch 1 on 2 threads: 0.88x ->
//! 0.94-0.98x ONNX Runtime, BENCHMARKS.md). Each convolution's parts depend on the layer alone, so
//! the values are the same however the branches are scheduled; the branch that cannot write
//! into the block's output while the other does costs one channel copy.

use super::{BlockVariant, InceptionV3, Layer};
use crate::engine::cpu_conv::{self, Act, Conv, Epilogue, Pool3x3};
use std::collections::HashMap;

/// Channels and sizes of the input the network takes.
pub const INPUT: [usize; 3] = [3, 299, 299];

/// Images that go through the stem together.
const STEM_IMAGES: usize = 2;

/// Reads one tensor: its shape and f32 values.
type Source = Box<dyn Fn() -> (Vec<usize>, Vec<f32>)>;

/// The network's tensors by name, each read when the engine packs it, so that only one
/// layer's weights exist twice at a time.
struct Tensors(HashMap<String, Source>);

impl Tensors {
    fn of(model: &InceptionV3) -> Self {
        use burn::store::ModuleSnapshot;
        let mut map = HashMap::new();
        for t in model.collect(None, None, true) {
            assert_eq!(
                t.dtype,
                burn::tensor::DType::F32,
                "{}: the CPU engine needs f32 weights",
                t.name
            );
            let name = t.name.clone();
            let read: Source = Box::new(move || {
                let bytes = t
                    .to_bytes()
                    .unwrap_or_else(|e| panic!("{}: tensor data unreadable: {e:?}", t.name));
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (t.shape.to_vec(), values)
            });
            map.insert(name, read);
        }
        Self(map)
    }

    fn read(&self, name: &str, why: &str) -> (Vec<usize>, Vec<f32>) {
        let source = self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the model{why}"));
        source()
    }

    /// The folded convolution `name` (`Mixed_5b.branch1x1`), checked against the kernel size
    /// this engine's graph expects.
    fn conv(&self, name: &str, kernel: [usize; 2], stride: usize, pad: [usize; 2]) -> Conv {
        assert!(
            !self.0.contains_key(&format!("{name}.bn.gamma")),
            "{name}: BatchNorm not folded"
        );
        let (shape, weight) = self.read(&format!("{name}.conv.weight"), "");
        let (_, bias) = self.read(&format!("{name}.conv.bias"), ": BatchNorm not folded");
        let dims: [usize; 4] = shape.as_slice().try_into().expect("4-d conv weight");
        assert_eq!([dims[2], dims[3]], kernel, "{name}: kernel size");
        Conv::new(&weight, &bias, dims, [stride, stride], pad)
    }
}

/// Output tiles of the Winograd convolutions, measured on a 2-core AVX-512 Xeon (network only,
/// batch 8, one thread; `DLTOOL_WINOGRAD=0` for the im2col baseline, 10.0 img/s): 3x3 at
/// 147..35 pixels F(4x4, 3x3) +15%, 1x7 and 7x1 F(4, 7) +8%, 5x5 F(2x2, 5x5) +3%. The 8x8
/// layers gain nothing (four tiles per image make GEMMs too short) and stay im2col.
const TILE_3X3: [usize; 2] = [4, 4];
const TILE_5X5: [usize; 2] = [2, 2];
const TILE_1X7: [usize; 2] = [1, 4];
const TILE_7X1: [usize; 2] = [4, 1];

fn k1(t: &Tensors, name: &str) -> Conv {
    t.conv(name, [1, 1], 1, [0, 0])
}

/// How the pool branch of a Mixed block is computed.
#[derive(Debug, Clone)]
enum PoolBranch {
    /// 1x1 convolution (inside the fused GEMM, no bias), then 3x3 average, then bias and ReLU.
    AvgAfterConv { bias: Vec<f32>, include_pad: bool },
    /// 3x3 max pool of the input, then the 1x1 convolution (max does not commute with it).
    MaxThenConv(Conv),
}

impl PoolBranch {
    fn new(t: &Tensors, name: &str, variant: BlockVariant, last: bool) -> (Self, Option<Conv>) {
        let conv = k1(t, name);
        match (variant, last) {
            (BlockVariant::Tf2015, true) => (PoolBranch::MaxThenConv(conv), None),
            _ => {
                let bias = conv.bias.clone();
                (
                    PoolBranch::AvgAfterConv {
                        bias,
                        include_pad: variant == BlockVariant::Torchvision,
                    },
                    Some(conv.with_epilogue(Epilogue::None)),
                )
            }
        }
    }

    /// Writes the branch into channels `out_c0..` of `out`; `g_c0` is where the fused GEMM put
    /// the pre-pool convolution (AvgAfterConv only).
    fn run(&self, x: &Act, g: &Act, g_c0: usize, out: &mut Act, out_c0: usize) {
        match self {
            PoolBranch::AvgAfterConv { bias, include_pad } => cpu_conv::pool_3x3_s1_into(
                Pool3x3::Avg {
                    include_pad: *include_pad,
                },
                g,
                g_c0,
                bias.len(),
                Some(bias),
                out,
                out_c0,
            ),
            PoolBranch::MaxThenConv(conv) => {
                let mut pooled = Act::new(x.n, x.h, x.w, x.c);
                cpu_conv::pool_3x3_s1_into(Pool3x3::Max, x, 0, x.c, None, &mut pooled, 0);
                conv.forward_into(&pooled, 0, out, out_c0);
            }
        }
    }
}

/// Fuses the 1x1 convolutions that read a block's input, the pre-pool one last if any.
fn fuse(mut parts: Vec<Conv>, pool: Option<Conv>) -> Conv {
    parts.extend(pool);
    Conv::fuse_1x1(&parts)
}

/// Runs `block` (which makes the block's output and writes every branch but one into it) beside
/// `branch` (the remaining branch, into an activation of its own), then copies that branch into
/// the output's channels from `branch_c0`.
fn side_by_side(
    block: impl FnOnce() -> Act + Send,
    branch: impl FnOnce() -> Act + Send,
    branch_c0: usize,
) -> Act {
    let (mut out, branch) = rayon::join(block, branch);
    out.copy_channels(branch_c0, &branch, 0, branch.c);
    out
}

/// Mixed_5b..5d. Fused GEMM columns: branch1x1 (64) | 5x5_1 (48) | 3x3dbl_1 (64) | pool.
struct BlockA {
    fused: Conv,
    b5x5_2: Conv,
    dbl_2: Conv,
    dbl_3: Conv,
    pool: PoolBranch,
}

impl BlockA {
    fn new(t: &Tensors, p: &str, variant: BlockVariant) -> Self {
        let (pool, pre) = PoolBranch::new(t, &format!("{p}.branch_pool"), variant, false);
        Self {
            fused: fuse(
                vec![
                    k1(t, &format!("{p}.branch1x1")),
                    k1(t, &format!("{p}.branch5x5_1")),
                    k1(t, &format!("{p}.branch3x3dbl_1")),
                ],
                pre,
            ),
            b5x5_2: t
                .conv(&format!("{p}.branch5x5_2"), [5, 5], 1, [2, 2])
                .with_winograd(TILE_5X5),
            dbl_2: t
                .conv(&format!("{p}.branch3x3dbl_2"), [3, 3], 1, [1, 1])
                .with_winograd(TILE_3X3),
            dbl_3: t
                .conv(&format!("{p}.branch3x3dbl_3"), [3, 3], 1, [1, 1])
                .with_winograd(TILE_3X3),
            pool,
        }
    }

    fn forward(&self, x: &Act) -> Act {
        let pool_c = match &self.pool {
            PoolBranch::AvgAfterConv { bias, .. } => bias.len(),
            PoolBranch::MaxThenConv(c) => c.cout,
        };
        let g = self.fused.forward(x, 0);
        side_by_side(
            || {
                let mut out = Act::new(x.n, x.h, x.w, 64 + 64 + 96 + pool_c);
                out.copy_channels(0, &g, 0, 64);
                self.b5x5_2.forward_into(&g, 64, &mut out, 64);
                self.pool.run(x, &g, 176, &mut out, 224);
                out
            },
            || self.dbl_3.forward(&self.dbl_2.forward(&g, 112), 0),
            128,
        )
    }
}

/// Mixed_6a: 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool.
struct BlockB {
    b3x3: Conv,
    dbl_1: Conv,
    dbl_2: Conv,
    dbl_3: Conv,
}

impl BlockB {
    fn new(t: &Tensors, p: &str) -> Self {
        Self {
            b3x3: t.conv(&format!("{p}.branch3x3"), [3, 3], 2, [0, 0]),
            dbl_1: k1(t, &format!("{p}.branch3x3dbl_1")),
            dbl_2: t
                .conv(&format!("{p}.branch3x3dbl_2"), [3, 3], 1, [1, 1])
                .with_winograd(TILE_3X3),
            dbl_3: t.conv(&format!("{p}.branch3x3dbl_3"), [3, 3], 2, [0, 0]),
        }
    }

    fn forward(&self, x: &Act) -> Act {
        let (h, w) = self.b3x3.out_hw(x.h, x.w);
        side_by_side(
            || {
                let mut out = Act::new(x.n, h, w, 384 + 96 + x.c);
                self.b3x3.forward_into(x, 0, &mut out, 0);
                cpu_conv::max_pool_3x3_s2_into(x, &mut out, 480);
                out
            },
            || {
                let d = self.dbl_2.forward(&self.dbl_1.forward(x, 0), 0);
                self.dbl_3.forward(&d, 0)
            },
            384,
        )
    }
}

/// Mixed_6b..6e. Fused GEMM columns: branch1x1 (192) | 7x7_1 (c7) | 7x7dbl_1 (c7) | pool.
struct BlockC {
    c7: usize,
    fused: Conv,
    b7: [Conv; 2],
    dbl: [Conv; 4],
    pool: PoolBranch,
}

impl BlockC {
    fn new(t: &Tensors, p: &str, variant: BlockVariant) -> Self {
        let (pool, pre) = PoolBranch::new(t, &format!("{p}.branch_pool"), variant, false);
        let b7_1 = k1(t, &format!("{p}.branch7x7_1"));
        let c7 = b7_1.cout;
        let row = |name: &str| {
            t.conv(&format!("{p}.{name}"), [1, 7], 1, [0, 3])
                .with_winograd(TILE_1X7)
        };
        let col = |name: &str| {
            t.conv(&format!("{p}.{name}"), [7, 1], 1, [3, 0])
                .with_winograd(TILE_7X1)
        };
        Self {
            c7,
            fused: fuse(
                vec![
                    k1(t, &format!("{p}.branch1x1")),
                    b7_1,
                    k1(t, &format!("{p}.branch7x7dbl_1")),
                ],
                pre,
            ),
            b7: [row("branch7x7_2"), col("branch7x7_3")],
            dbl: [
                col("branch7x7dbl_2"),
                row("branch7x7dbl_3"),
                col("branch7x7dbl_4"),
                row("branch7x7dbl_5"),
            ],
            pool,
        }
    }

    fn forward(&self, x: &Act) -> Act {
        let c7 = self.c7;
        let g = self.fused.forward(x, 0);
        side_by_side(
            || {
                let mut out = Act::new(x.n, x.h, x.w, 768);
                out.copy_channels(0, &g, 0, 192);
                let t = self.b7[0].forward(&g, 192);
                self.b7[1].forward_into(&t, 0, &mut out, 192);
                self.pool.run(x, &g, 192 + 2 * c7, &mut out, 576);
                out
            },
            || {
                let mut t = self.dbl[0].forward(&g, 192 + c7);
                for conv in &self.dbl[1..] {
                    t = conv.forward(&t, 0);
                }
                t
            },
            384,
        )
    }
}

/// Mixed_7a. Fused GEMM columns: 3x3_1 (192) | 7x7x3_1 (192).
struct BlockD {
    fused: Conv,
    b3x3_2: Conv,
    b7: [Conv; 3],
}

impl BlockD {
    fn new(t: &Tensors, p: &str) -> Self {
        Self {
            fused: fuse(
                vec![
                    k1(t, &format!("{p}.branch3x3_1")),
                    k1(t, &format!("{p}.branch7x7x3_1")),
                ],
                None,
            ),
            b3x3_2: t.conv(&format!("{p}.branch3x3_2"), [3, 3], 2, [0, 0]),
            b7: [
                t.conv(&format!("{p}.branch7x7x3_2"), [1, 7], 1, [0, 3])
                    .with_winograd(TILE_1X7),
                t.conv(&format!("{p}.branch7x7x3_3"), [7, 1], 1, [3, 0])
                    .with_winograd(TILE_7X1),
                t.conv(&format!("{p}.branch7x7x3_4"), [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Act) -> Act {
        let g = self.fused.forward(x, 0);
        let (h, w) = self.b3x3_2.out_hw(x.h, x.w);
        side_by_side(
            || {
                let mut out = Act::new(x.n, h, w, 320 + 192 + x.c);
                self.b3x3_2.forward_into(&g, 0, &mut out, 0);
                cpu_conv::max_pool_3x3_s2_into(x, &mut out, 512);
                out
            },
            || {
                let t = self.b7[1].forward(&self.b7[0].forward(&g, 192), 0);
                self.b7[2].forward(&t, 0)
            },
            320,
        )
    }
}

/// Mixed_7b, 7c. Fused GEMM columns: branch1x1 (320) | 3x3_1 (384) | 3x3dbl_1 (448) | pool.
struct BlockE {
    fused: Conv,
    b3x3_2a: Conv,
    b3x3_2b: Conv,
    dbl_2: Conv,
    dbl_3a: Conv,
    dbl_3b: Conv,
    pool: PoolBranch,
}

impl BlockE {
    fn new(t: &Tensors, p: &str, variant: BlockVariant, last: bool) -> Self {
        let (pool, pre) = PoolBranch::new(t, &format!("{p}.branch_pool"), variant, last);
        Self {
            fused: fuse(
                vec![
                    k1(t, &format!("{p}.branch1x1")),
                    k1(t, &format!("{p}.branch3x3_1")),
                    k1(t, &format!("{p}.branch3x3dbl_1")),
                ],
                pre,
            ),
            b3x3_2a: t.conv(&format!("{p}.branch3x3_2a"), [1, 3], 1, [0, 1]),
            b3x3_2b: t.conv(&format!("{p}.branch3x3_2b"), [3, 1], 1, [1, 0]),
            dbl_2: t.conv(&format!("{p}.branch3x3dbl_2"), [3, 3], 1, [1, 1]),
            dbl_3a: t.conv(&format!("{p}.branch3x3dbl_3a"), [1, 3], 1, [0, 1]),
            dbl_3b: t.conv(&format!("{p}.branch3x3dbl_3b"), [3, 1], 1, [1, 0]),
            pool,
        }
    }

    fn forward(&self, x: &Act) -> Act {
        let g = self.fused.forward(x, 0);
        side_by_side(
            || {
                let mut out = Act::new(x.n, x.h, x.w, 2048);
                out.copy_channels(0, &g, 0, 320);
                self.b3x3_2a.forward_into(&g, 320, &mut out, 320);
                self.b3x3_2b.forward_into(&g, 320, &mut out, 704);
                self.pool.run(x, &g, 1152, &mut out, 1856);
                out
            },
            || {
                let d = self.dbl_2.forward(&g, 704);
                let mut dbl = Act::new(x.n, x.h, x.w, 768);
                self.dbl_3a.forward_into(&d, 0, &mut dbl, 0);
                self.dbl_3b.forward_into(&d, 0, &mut dbl, 384);
                dbl
            },
            1088,
        )
    }
}

/// InceptionV3 up to `mixed_7c` (the features), NHWC on the CPU.
pub struct FastInceptionV3 {
    stem: [Conv; 5],
    a: [BlockA; 3],
    b: BlockB,
    c: [BlockC; 4],
    d: BlockD,
    e: [BlockE; 2],
}

/// Every stage the parity test compares against the reference network, NCHW.
pub struct FastStages {
    pub stem: Vec<f32>,
    pub mixed_5d: Vec<f32>,
    pub mixed_6e: Vec<f32>,
    pub mixed_7c: Vec<f32>,
    /// `[n][2048]`
    pub pool: Vec<f32>,
}

impl FastInceptionV3 {
    /// Packs the weights of a loaded (BatchNorm-folded) model, reading its tensors once.
    pub fn from_model(model: &InceptionV3) -> Self {
        Self::from_tensors(&Tensors::of(model), model.variant())
    }

    fn from_tensors(t: &Tensors, v: BlockVariant) -> Self {
        Self {
            stem: [
                t.conv("Conv2d_1a_3x3", [3, 3], 2, [0, 0]),
                t.conv("Conv2d_2a_3x3", [3, 3], 1, [0, 0])
                    .with_winograd(TILE_3X3),
                t.conv("Conv2d_2b_3x3", [3, 3], 1, [1, 1])
                    .with_winograd(TILE_3X3),
                k1(t, "Conv2d_3b_1x1"),
                t.conv("Conv2d_4a_3x3", [3, 3], 1, [0, 0])
                    .with_winograd(TILE_3X3),
            ],
            a: ["Mixed_5b", "Mixed_5c", "Mixed_5d"].map(|p| BlockA::new(t, p, v)),
            b: BlockB::new(t, "Mixed_6a"),
            c: ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"].map(|p| BlockC::new(t, p, v)),
            d: BlockD::new(t, "Mixed_7a"),
            e: [
                BlockE::new(t, "Mixed_7b", v, false),
                BlockE::new(t, "Mixed_7c", v, true),
            ],
        }
    }

    fn stem(&self, pixels: &[f32], n: usize) -> Act {
        let [c, h, w] = INPUT;
        assert_eq!(
            pixels.len(),
            n * c * h * w,
            "expected {n} images of 3x299x299"
        );
        let image = c * h * w;
        let mut out: Option<Act> = None;
        let mut done = 0;
        // The stem's activations are the network's largest (147x147x64 floats, 5.5 MB per
        // image): a few images at a time keep them small whatever the batch size, and each
        // part still has tens of thousands of output pixels to share among the threads.
        for part in pixels.chunks(STEM_IMAGES * image) {
            let k = part.len() / image;
            let x = Act::from_nchw(part, k, c, h, w);
            let x = self.stem[0].forward(&x, 0);
            let x = self.stem[1].forward(&x, 0);
            let x = self.stem[2].forward(&x, 0);
            let x = cpu_conv::max_pool_3x3_s2(&x);
            let x = self.stem[3].forward(&x, 0);
            let x = self.stem[4].forward(&x, 0);
            let x = cpu_conv::max_pool_3x3_s2(&x);
            let out = out.get_or_insert_with(|| Act::new(n, x.h, x.w, x.c));
            let per_image = x.data.len() / k;
            out.data[done * per_image..(done + k) * per_image].copy_from_slice(&x.data);
            done += k;
        }
        out.expect("at least one image")
    }

    fn to_5d(&self, x: Act) -> Act {
        self.a.iter().fold(x, |x, b| b.forward(&x))
    }

    fn to_6e(&self, x: &Act) -> Act {
        let x = self.b.forward(x);
        self.c.iter().fold(x, |x, b| b.forward(&x))
    }

    fn to_7c(&self, x: &Act) -> Act {
        let x = self.d.forward(x);
        self.e.iter().fold(x, |x, b| b.forward(&x))
    }

    /// Runs `n` preprocessed images (`pixels`: NCHW, 3x299x299 each) up to `layer`; the result
    /// stays NHWC (see [`Act::to_nchw`], [`Act::global_avg`], [`Act::global_max`]).
    pub fn forward_act(&self, pixels: &[f32], n: usize, layer: Layer) -> Act {
        let x = self.to_5d(self.stem(pixels, n));
        if layer == Layer::Mixed5d {
            return x;
        }
        let x = self.to_6e(&x);
        if layer == Layer::Mixed6e {
            return x;
        }
        let x = self.d.forward(&x);
        if layer == Layer::Mixed7a {
            return x;
        }
        self.e.iter().fold(x, |x, b| b.forward(&x))
    }

    /// [`Self::forward_act`] in NCHW order, like [`InceptionV3::forward_to`].
    pub fn forward_to(&self, pixels: &[f32], n: usize, layer: Layer) -> Vec<f32> {
        self.forward_act(pixels, n, layer).to_nchw()
    }

    /// Every stage at once, for comparing against reference activations.
    pub fn forward_stages(&self, pixels: &[f32], n: usize) -> FastStages {
        let stem = self.stem(pixels, n);
        let mixed_5d = self.to_5d(stem.clone());
        let mixed_6e = self.to_6e(&mixed_5d);
        let mixed_7c = self.to_7c(&mixed_6e);
        FastStages {
            stem: stem.to_nchw(),
            mixed_5d: mixed_5d.to_nchw(),
            mixed_6e: mixed_6e.to_nchw(),
            pool: mixed_7c.global_avg(),
            mixed_7c: mixed_7c.to_nchw(),
        }
    }
}

/// Environment variable that picks the engine `dltool` runs InceptionV3 on: `cpu` (default,
/// [`FastInceptionV3`]) or `burn` (the reference burn model, for comparisons).
pub const ENGINE_ENV: &str = "DLTOOL_ENGINE";

/// The fast engine for `model`, unless `DLTOOL_ENGINE=burn` asks for the burn model.
pub fn engine_from_env(model: &InceptionV3) -> anyhow::Result<Option<FastInceptionV3>> {
    match std::env::var(ENGINE_ENV).as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Ok(Some(FastInceptionV3::from_model(model))),
        Ok("burn") => Ok(None),
        Ok(other) => anyhow::bail!("{ENGINE_ENV}={other}: unknown engine (expected cpu or burn)"),
    }
}
