//! The trainable top of `fine-tune` against the inference engine, and its gradients against
//! finite differences.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use common::{Golden, max_abs_diff, shared};
use dltool::finetune::FineTunedNet;
use dltool::inception_fast::FastInceptionV3;
use dltool::inception_v3::{self, BlockVariant, Layer};

fn load() -> inception_v3::InceptionV3 {
    inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        None,
        &Device::flex(),
    )
    .expect("shared weights load")
    .0
}

#[test]
fn top_initialised_from_pretrained_weights_computes_what_the_engine_does() {
    let model = load();
    let fast = FastInceptionV3::from_model(&model);
    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];
    let reference = fast.forward_to(&input, n, Layer::Mixed7c);
    for cut in [Layer::Mixed6e, Layer::Mixed7a] {
        let act = fast.forward_to(&input, n, cut);
        let [c, h, w] = cut.shape();
        let net = FineTunedNet::from_pretrained(model.clone(), cut, 5, &Device::flex()).unwrap();
        let x = Tensor::<4>::from_data(TensorData::new(act, [n, c, h, w]), &Device::flex());
        let ours = net
            .top
            .forward(x)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let (diff, scale) = max_abs_diff(&ours, &reference);
        eprintln!("{}: max |diff| = {diff:e}, max |ref| = {scale}", cut.name());
        assert!(scale > 0.0);
        assert!(
            diff <= 1e-4 * scale,
            "cut at {}: max |diff| {diff} exceeds 1e-4 x max |ref| ({scale})",
            cut.name()
        );
    }
}

/// Collects the gradient of the parameter at `target` (a dotted module path).
struct GradOf<'a> {
    target: &'a str,
    path: Vec<String>,
    grads: &'a GradientsParams,
    found: Option<Vec<f32>>,
    seen: Vec<String>,
}

impl ModuleVisitor for GradOf<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path: Vec<&str> = self
            .path
            .iter()
            .map(String::as_str)
            .filter(|p| !p.is_empty())
            .collect();
        let path = path.join(".");
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

/// A deterministic pseudo-random stream in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = dltool::split::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

/// `sum(top(x) * r)`, summed in f64 so that the finite differences see the network's rounding,
/// not the sum's.
fn objective(net: &FineTunedNet, x: &[f32], xs: [usize; 4], r: &[f32]) -> f64 {
    let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), xs), &Device::flex());
    let y = net
        .top
        .forward(x)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// `net` with `direction * h` added to the tensor `name`.
fn perturbed(net: &FineTunedNet, name: &str, direction: &[f32], h: f32) -> FineTunedNet {
    let tensors = net.tensors();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, shape, mut values) in tensors {
        if n == name {
            for (v, d) in values.iter_mut().zip(direction) {
                *v += h * d;
            }
        }
        bytes.push((
            n,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let file = safetensors::serialize(views, &None).unwrap();
    let mut out =
        FineTunedNet::architecture(BlockVariant::Tf2015, Layer::Mixed7a, 3, &Device::flex())
            .unwrap();
    out.load_bytes(file).unwrap();
    out
}

#[test]
fn gradients_of_the_trainable_blocks_match_finite_differences() {
    let net = FineTunedNet::from_pretrained(load(), Layer::Mixed7a, 3, &Device::flex()).unwrap();
    // A tiny input: 3x3 positions instead of 8x8, non-negative like the ReLU output it stands for.
    let xs = [1, 1280, 3, 3];
    let x: Vec<f32> = noise(xs.iter().product(), 1)
        .into_iter()
        .map(|v| v.abs())
        .collect();
    let r = noise(2048 * 9, 2);

    let ad = Device::flex().autodiff();
    let net_ad = net.clone().fork(&ad).train();
    let x_ad = Tensor::<4>::from_data(TensorData::new(x.clone(), xs), &ad);
    let r_ad = Tensor::<4>::from_data(TensorData::new(r.clone(), [1, 2048, 3, 3]), &ad);
    let loss = (net_ad.top.forward(x_ad) * r_ad).sum();
    let mut grads = loss.backward();
    let grads = GradientsParams::from_module(&mut grads, &net_ad);

    // A 1x1 convolution of the first block, a 3x3 one deep in its double branch, and the bias
    // of the last block's max-pool branch: three different paths back to the input.
    for (i, name) in [
        "top.Mixed_7b.branch1x1.conv.weight",
        "top.Mixed_7b.branch3x3dbl_2.conv.weight",
        "top.Mixed_7c.branch_pool.conv.bias",
    ]
    .into_iter()
    .enumerate()
    {
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
            .unwrap_or_else(|| panic!("{name} not among {:?}", &visitor.seen[..5]));
        let direction = noise(grad.len(), 10 + i as u64);
        let analytic: f64 = grad
            .iter()
            .zip(&direction)
            .map(|(&g, &d)| g as f64 * d as f64)
            .sum();
        // Small enough that few ReLUs change side between the two evaluations (each one that
        // does bends the difference quotient), large enough that f32 rounding stays far below
        // the signal (about 1e-5 on sums of this size against derivatives of order 10).
        let h = 1e-4;
        let plus = objective(&perturbed(&net, name, &direction, h), &x, xs, &r);
        let minus = objective(&perturbed(&net, name, &direction, -h), &x, xs, &r);
        let numeric = (plus - minus) / (2.0 * h as f64);
        eprintln!("{name}: analytic {analytic:.6}, finite differences {numeric:.6}");
        assert!(
            analytic.abs() > 1e-3,
            "{name}: the check needs a non-zero gradient"
        );
        assert!(
            (analytic - numeric).abs() <= 1e-2 * analytic.abs().max(numeric.abs()),
            "{name}: directional derivative {analytic} vs finite differences {numeric}"
        );
    }
}
