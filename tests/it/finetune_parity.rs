//! The trainable top of `fine-tune` against the inference engine, and its gradients against
//! finite differences.

use crate::common;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use common::{Golden, max_abs_diff, shared};
use dltool::backbones::efficientnet_lite::{EfficientNetLite, FoldedLite, LITE2, LiteLayer};
use dltool::finetune::top::Pretrained;
use dltool::finetune::{Cut, FineTunedNet};
use dltool::inception_fast::FastInceptionV3;
use dltool::inception_v3::{self, Layer};

fn load_inception() -> inception_v3::InceptionV3 {
    inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        None,
        &Device::flex(),
    )
    .expect("shared weights load")
    .0
}

fn load_lite2() -> FoldedLite {
    FoldedLite::load(
        &shared("weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth"),
        Some("efficientnet_lite2"),
    )
    .expect("shared Lite2 weights load")
}

fn top_forward(net: &FineTunedNet, act: Vec<f32>, shape: [usize; 4]) -> Vec<f32> {
    let x = Tensor::<4>::from_data(TensorData::new(act, shape), &Device::flex());
    net.top
        .forward(x)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

fn assert_close(what: &str, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths");
    let (diff, scale) = max_abs_diff(ours, reference);
    eprintln!("{what}: max |diff| = {diff:e}, max |ref| = {scale}");
    assert!(scale > 0.0, "{what}: an all-zero reference checks nothing");
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |diff| {diff} exceeds 1e-4 x max |ref| ({scale})"
    );
}

#[test]
fn inception_top_initialised_from_pretrained_weights_computes_what_the_engine_does() {
    let model = load_inception();
    let fast = FastInceptionV3::from_model(&model);
    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];
    let reference = fast.forward_to(&input, n, Layer::Mixed7c);
    for layer in [Layer::Mixed6e, Layer::Mixed7a] {
        let act = fast.forward_to(&input, n, layer);
        let [c, h, w] = layer.shape();
        let net = FineTunedNet::from_pretrained(
            Pretrained::Inception(Box::new(model.clone())),
            Cut::Inception(layer),
            5,
            &Device::flex(),
        )
        .unwrap();
        let ours = top_forward(&net, act, [n, c, h, w]);
        assert_close(&format!("cut at {}", layer.name()), &ours, &reference);
    }
}

#[test]
fn lite_top_initialised_from_pretrained_weights_computes_what_the_engine_does() {
    let folded = load_lite2();
    let engine = EfficientNetLite::from_folded(&folded);
    let golden = Golden::open("golden/efficientnet_lite2/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];
    let reference = engine.forward_act(&input, n, LiteLayer::Head).to_nchw();
    // The default cut (its first trainable block has stride 2 and a 5x5 kernel) and the last
    // stage end (only block 20 and the head train).
    for stage in [4, 5] {
        let cut = Cut::Lite {
            spec: &LITE2,
            stage,
        };
        let act = engine
            .forward_act(&input, n, LiteLayer::Stage(stage))
            .to_nchw();
        let [c, h, w] = cut.shape();
        let net = FineTunedNet::from_pretrained(
            Pretrained::Lite(Box::new(folded.clone())),
            cut,
            5,
            &Device::flex(),
        )
        .unwrap();
        let ours = top_forward(&net, act, [n, c, h, w]);
        assert_close(&format!("Lite2 cut at {}", cut.layer()), &ours, &reference);
    }
}

#[test]
fn a_classifier_set_from_a_linear_probe_computes_its_logits_on_the_pooled_features() {
    let folded = load_lite2();
    let engine = EfficientNetLite::from_folded(&folded);
    let golden = Golden::open("golden/efficientnet_lite2/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];
    let cut = Cut::Lite {
        spec: &LITE2,
        stage: 5,
    };
    let act = engine.forward_act(&input, n, LiteLayer::Stage(5)).to_nchw();
    let classes = 3;
    let mut net = FineTunedNet::from_pretrained(
        Pretrained::Lite(Box::new(folded.clone())),
        cut,
        classes,
        &Device::flex(),
    )
    .unwrap();
    let device = Device::flex();
    let pooled = net.pooled_features(&act, n, cut.shape(), &device);
    let d = net.pooled();
    assert_eq!(pooled.len(), n * d);
    // The pooled features are the mean of the top's last map over its positions.
    let map = top_forward(
        &net,
        act.clone(),
        [n, cut.shape()[0], cut.shape()[1], cut.shape()[2]],
    );
    let positions = map.len() / (n * d);
    let mean: Vec<f32> = map
        .chunks_exact(positions)
        .map(|p| p.iter().sum::<f32>() / positions as f32)
        .collect();
    assert_close("pooled features", &pooled, &mean);

    let coefficients: Vec<f64> = noise(classes * d, 5)
        .iter()
        .map(|&v| v as f64 * 0.1)
        .collect();
    let intercepts = [0.5, -0.25, 0.0];
    net.set_classifier(&coefficients, &intercepts);
    let ours = net.log_proba(&act, n, cut.shape(), &device);
    let mut reference = Vec::new();
    for row in pooled.chunks_exact(d) {
        let logits: Vec<f64> = (0..classes)
            .map(|k| {
                intercepts[k]
                    + (0..d)
                        .map(|i| coefficients[k * d + i] * row[i] as f64)
                        .sum::<f64>()
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        reference.extend(logits.iter().map(|l| (l - lse) as f32));
    }
    assert_close("log-probabilities", &ours, &reference);
}

/// Collects the gradient of the parameter at `target` (a dotted module path).
struct GradOf<'a> {
    target: &'a str,
    path: Vec<String>,
    grads: &'a GradientsParams,
    found: Option<Vec<f32>>,
    seen: Vec<String>,
}

fn dotted(path: &[String]) -> String {
    path.iter()
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

impl ModuleVisitor for GradOf<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = dotted(&self.path);
        if path == self.target {
            let g = self
                .grads
                .get::<D>(param.id)
                .expect("a gradient for the parameter");
            self.found = Some(g.into_data().try_into_vec::<f32>().unwrap());
        }
        self.seen.push(path);
    }
}

/// Every parameter cast to f64, and `h * direction` added to the one at `target`: the finite
/// differences are taken in f64, where rounding (1e-16 relative) is far below the O(h^2)
/// truncation error, instead of in f32, whose rounding of sums over thousands of terms swamped
/// the difference quotient.
struct Perturb<'a> {
    target: &'a str,
    path: Vec<String>,
    direction: &'a [f32],
    h: f64,
    hit: bool,
}

impl ModuleMapper for Perturb<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let hit = dotted(&self.path) == self.target;
        self.hit |= hit;
        let (direction, h) = (self.direction, self.h);
        param.map(|t| {
            let t = t.cast(FloatDType::F64);
            if hit {
                let shape = t.shape();
                let d: Vec<f64> = direction.iter().map(|&v| v as f64 * h).collect();
                let d = Tensor::<D>::from_data(TensorData::new(d, shape), &t.device())
                    .cast(FloatDType::F64);
                t + d
            } else {
                t
            }
        })
    }
}

/// A deterministic pseudo-random stream in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = dltool::split::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

/// `sum(top(x) * r)` in f64, the tensor `name` moved by `h * direction`.
fn objective(
    net: &FineTunedNet,
    name: &str,
    direction: &[f32],
    h: f64,
    x: &[f32],
    xs: [usize; 4],
    r: &[f32],
) -> f64 {
    let mut mapper = Perturb {
        target: name,
        path: Vec::new(),
        direction,
        h,
        hit: false,
    };
    let net = net.clone().map(&mut mapper);
    assert!(mapper.hit, "{name} is not a parameter of the top");
    let device = Device::flex();
    let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), xs), &device).cast(FloatDType::F64);
    let y = net.top.forward(x);
    let r = Tensor::<4>::from_data(TensorData::new(r.to_vec(), y.shape()), &device)
        .cast(FloatDType::F64);
    (y * r)
        .sum()
        .into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .unwrap()[0]
}

/// The directional derivative of `sum(top(x) * r)` along a random direction of each named
/// tensor, by autodiff (f32) and by central differences (f64).
fn check_gradients(net: &FineTunedNet, xs: [usize; 4], names: &[&str]) {
    // Non-negative like the ReLU/ReLU6 output the input stands for.
    let x: Vec<f32> = noise(xs.iter().product(), 1)
        .into_iter()
        .map(f32::abs)
        .collect();
    let ad = Device::flex().autodiff();
    let net_ad = net.clone().fork(&ad).train();
    let x_ad = Tensor::<4>::from_data(TensorData::new(x.clone(), xs), &ad);
    let y = net_ad.top.forward(x_ad);
    let r = noise(y.shape().num_elements(), 2);
    let r_ad = Tensor::<4>::from_data(TensorData::new(r.clone(), y.shape()), &ad);
    let mut grads = (y * r_ad).sum().backward();
    let grads = GradientsParams::from_module(&mut grads, &net_ad);

    for (i, &name) in names.iter().enumerate() {
        let mut visitor = GradOf {
            target: name,
            path: Vec::new(),
            grads: &grads,
            found: None,
            seen: Vec::new(),
        };
        net_ad.visit(&mut visitor);
        let grad = visitor
            .found
            .unwrap_or_else(|| panic!("{name} not among {:?}", visitor.seen));
        let direction = noise(grad.len(), 10 + i as u64);
        let analytic: f64 = grad
            .iter()
            .zip(&direction)
            .map(|(&g, &d)| g as f64 * d as f64)
            .sum();
        // In f64, h = 1e-6 leaves truncation error ~1e-12 and rounding ~1e-10 relative, and
        // makes a ReLU/ReLU6 changing side between the two evaluations (which bends the
        // quotient) unlikely.
        let h = 1e-6;
        let plus = objective(net, name, &direction, h, &x, xs, &r);
        let minus = objective(net, name, &direction, -h, &x, xs, &r);
        let numeric = (plus - minus) / (2.0 * h);
        eprintln!("{name}: analytic {analytic:.8}, finite differences {numeric:.8}");
        assert!(
            analytic.abs() > 1e-3,
            "{name}: the check needs a non-zero gradient"
        );
        // The analytic side is f32: each gradient entry sums thousands of products with
        // relative rounding ~6e-8 each, and the directional derivative sums thousands of
        // entries; 1e-3 relative is far above that and far below any wrong term (a missing
        // branch or a wrong padding side moves it by whole percents).
        assert!(
            (analytic - numeric).abs() <= 1e-3 * analytic.abs().max(numeric.abs()),
            "{name}: directional derivative {analytic} vs finite differences {numeric}"
        );
    }
}

#[test]
fn inception_gradients_match_finite_differences() {
    let net = FineTunedNet::from_pretrained(
        Pretrained::Inception(Box::new(load_inception())),
        Cut::Inception(Layer::Mixed7a),
        3,
        &Device::flex(),
    )
    .unwrap();
    // A 1x1 convolution of the first block, a 3x3 one deep in its double branch, and the bias
    // of the last block's max-pool branch: three different paths back to the input. A tiny
    // input: 3x3 positions instead of 8x8.
    check_gradients(
        &net,
        [1, 1280, 3, 3],
        &[
            "top.Inception.Mixed_7b.branch1x1.conv.weight",
            "top.Inception.Mixed_7b.branch3x3dbl_2.conv.weight",
            "top.Inception.Mixed_7c.branch_pool.conv.bias",
        ],
    );
}

#[test]
fn lite_gradients_match_finite_differences() {
    let net = FineTunedNet::from_pretrained(
        Pretrained::Lite(Box::new(load_lite2())),
        Cut::Lite {
            spec: &LITE2,
            stage: 4,
        },
        3,
        &Device::flex(),
    )
    .unwrap();
    // 4x4 positions instead of 17x17: the first block's stride-2 5x5 depthwise convolution
    // then pads asymmetrically (one row above, two below), as TensorFlow's SAME does.
    // Expansion, depthwise (grouped) and projection of the stride-2 block, a residual block's
    // depthwise, and the head convolution's bias.
    check_gradients(
        &net,
        [1, 120, 4, 4],
        &[
            "top.Lite.blocks.0.expand.weight",
            "top.Lite.blocks.0.depthwise.weight",
            "top.Lite.blocks.0.project.weight",
            "top.Lite.blocks.2.depthwise.weight",
            "top.Lite.head.bias",
        ],
    );
}
