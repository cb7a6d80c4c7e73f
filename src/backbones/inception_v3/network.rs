//! InceptionV3's row in the network table and its [`Network`] form: the burn model, and on the
//! CPU the NHWC engine built from it.

use super::fast::{FastInceptionV3, engine_from_env};
use super::{BlockVariant, InceptionV3, InceptionV3Config, Layer};
use crate::backbones::{
    LayerShape, LayerSpec, LoadError, LoadOptions, Network, Pool, Spec, WeightIndex,
    weight_file::Container,
};
use crate::image_io::Preprocess;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use std::path::Path;

pub static SPEC: Spec = Spec {
    name: "inception_v3",
    title: "InceptionV3",
    help: "InceptionV3 (Google's 2015 ImageNet weights, or torchvision's), 299x299",
    input: [299, 299],
    preprocess: |variant| {
        let variant: BlockVariant = variant.parse().ok()?;
        Some(InceptionV3Config::new(variant).preprocess())
    },
    layers: &[
        LayerSpec {
            name: "mixed_5d",
            shape: Some([288, 35, 35]),
        },
        LayerSpec {
            name: "mixed_6e",
            shape: Some([768, 17, 17]),
        },
        LayerSpec {
            name: "mixed_7a",
            shape: Some([1280, 8, 8]),
        },
        LayerSpec {
            name: "mixed_7c",
            shape: Some([2048, 8, 8]),
        },
    ],
    default_layer: "mixed_7c",
    variants: &["tf2015", "torchvision"],
    recognise,
    files: crate::weights::INCEPTION_FILES,
    registry_entry: "inception_v3_tf2015",
    gpu: true,
    load,
};

/// torchvision's parameter names (which pytorch-fid's port of the 2015 graph shares).
fn recognise(index: &WeightIndex) -> bool {
    matches!(index.container, Container::Safetensors | Container::Pytorch)
        && index
            .names
            .iter()
            .any(|n| n.starts_with("Conv2d_1a_3x3.") || n.starts_with("Mixed_5b."))
}

fn load(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Network>, LoadError> {
    let variant = match opts.variant {
        Some(v) => Some(v.parse::<BlockVariant>().map_err(LoadError::Other)?),
        None => None,
    };
    let (model, loaded) = super::load(path, variant, opts.device)?;
    // The CPU engine replaces burn-flex only; on a GPU burn runs the model.
    let fast = if crate::device::is_cpu(opts.device) {
        engine_from_env(&model)
            .map_err(|e| LoadError::Other(e.to_string()))?
            .map(Box::new)
    } else {
        None
    };
    Ok(Box::new(InceptionNet {
        model,
        fast,
        config: loaded.config,
        device: opts.device.clone(),
    }))
}

/// A loaded InceptionV3.
pub struct InceptionNet {
    model: InceptionV3,
    /// The same network on the NHWC CPU engine; `None` runs burn (`DLTOOL_ENGINE=burn`, GPUs).
    fast: Option<Box<FastInceptionV3>>,
    config: InceptionV3Config,
    device: Device,
}

impl InceptionNet {
    fn input(&self, pixels: &[f32], n: usize) -> Tensor<4> {
        let [h, w] = SPEC.input;
        Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [n, 3, h, w]), &self.device)
    }
}

impl Network for InceptionNet {
    fn spec(&self) -> &'static Spec {
        &SPEC
    }

    fn provenance(&self) -> String {
        format!("{}/{}", SPEC.name, self.config.variant.name())
    }

    fn preprocess(&self) -> Preprocess {
        self.config.preprocess()
    }

    fn layers(&self) -> Vec<String> {
        SPEC.layers.iter().map(|l| l.name.to_string()).collect()
    }

    fn layer_shape(&self, layer: &str) -> Option<LayerShape> {
        layer
            .parse::<Layer>()
            .ok()
            .map(|l| LayerShape::Map(l.shape()))
    }

    fn features(&self, pixels: &[f32], n: usize, layer: &str, pool: Pool) -> Vec<f32> {
        let layer: Layer = layer.parse().expect("the layer was validated on load");
        if let Some(fast) = &self.fast {
            return crate::engine::batch_split::run_images(pixels, n, |part, k| {
                crate::backbones::engine_pool(&fast.forward_act(part, k, layer), pool)
            });
        }
        let act = self.model.forward_to(self.input(pixels, n), layer);
        crate::backbones::burn_pool(act, pool, n)
    }

    fn num_classes(&self) -> Option<usize> {
        self.model.num_classes()
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        self.model.num_classes()?;
        let x = self.input(pixels, n);
        let pooled = super::global_avg_pool(self.model.forward_to(x, Layer::Mixed7c));
        let probs = softmax(self.model.classify(pooled)?, 1);
        Some(
            probs
                .into_data()
                .try_into_vec::<f32>()
                .expect("the network returns f32"),
        )
    }
}
