//! The networks dltool can run, behind one seam.
//!
//! Each network lives in its own module (its architecture, its weight-name mapping, its
//! loader) and has one row in [`NETWORKS`]: name, input, preprocessing, layers, how its weight
//! files are recognised, which files and registry entry are looked for, and the loader. The
//! rest of dltool sees a loaded network only as a [`Network`]; `crate::backbone` adds the
//! user's choices (layer, pooling, test-time augmentation) and the provenance.
//!
//! A network that runs only on the CPU engine (no burn model) sets `gpu: false`; asking for it
//! on a GPU is then one line of error instead of a silent fallback.

pub mod efficientnet_lite;
pub mod inception_v3;
pub mod mobilenet_v1;
pub mod onnx;
pub mod resnet;
pub mod state_dict;
pub mod torchvision;
pub mod vgg;
pub mod weight_file;
pub mod xception;

use crate::image_io::Preprocess;
use burn::prelude::Device;
use std::path::Path;

pub use weight_file::WeightIndex;

/// The output of a layer for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    /// A feature map `[C, H, W]`: pooled to C features, or C*H*W without pooling.
    Map([usize; 3]),
    /// A vector (a classifier's logits, an ONNX node that is not 4-D): pooling leaves it as is.
    Flat(usize),
}

impl LayerShape {
    /// Features per image with `pool`.
    pub fn dim(self, pool: Pool) -> usize {
        match (self, pool) {
            (LayerShape::Map([c, _, _]), Pool::Avg | Pool::Max) => c,
            (LayerShape::Map([c, h, w]), Pool::None) => c * h * w,
            (LayerShape::Flat(d), _) => d,
        }
    }

    /// Width of the map (for mirroring unpooled features back), 1 for a vector.
    pub fn width(self) -> usize {
        match self {
            LayerShape::Map([_, _, w]) => w,
            LayerShape::Flat(_) => 1,
        }
    }
}

pub use crate::backbone::Pool;

/// What a loader needs besides the file.
pub struct LoadOptions<'a> {
    pub device: &'a Device,
    /// `--variant`, for networks that have variants the file may not say (InceptionV3's block
    /// layout); a network without variants refuses one.
    pub variant: Option<&'a str>,
    /// `--layer`, for networks cut at the layer when loading (an ONNX graph); the others load
    /// whole and ignore it.
    pub layer: Option<&'a str>,
    /// How an ONNX model is fed and its limits; the built-in networks ignore it.
    pub onnx: Option<&'a crate::onnx_net::OnnxChoice>,
}

impl LoadOptions<'_> {
    /// The refusal every network without variants gives a `--variant` (one place, so the
    /// message stays the same for all of them).
    pub fn refuse_variant(
        &self,
        path: &std::path::Path,
        network: &'static str,
    ) -> Result<(), LoadError> {
        match self.variant {
            Some(_) => Err(LoadError::NoVariant {
                path: path.display().to_string(),
                network,
            }),
            None => Ok(()),
        }
    }
}

/// A loaded network, as the rest of dltool uses it. Pixels are preprocessed images laid back to
/// back, NCHW (`n * 3 * H * W` floats, H and W from [`Network::preprocess`]).
pub trait Network: Sync {
    /// The row of [`NETWORKS`] this network belongs to.
    fn spec(&self) -> &'static Spec;

    /// What features and heads record as their backbone (`inception_v3/tf2015`,
    /// `mobilenet_v1/0.25_224`): the spec's name, a slash, what tells this file's network from
    /// its siblings. [`Spec::preprocess`] must read it back.
    fn provenance(&self) -> String;

    fn preprocess(&self) -> Preprocess;

    /// The layers features can be read from, in network order.
    fn layers(&self) -> Vec<String>;

    /// The output of `layer` for one image; `None` when the network has no such layer.
    fn layer_shape(&self, layer: &str) -> Option<LayerShape>;

    /// The layer read when the user names none: the spec's, or what this file says (an ONNX
    /// model's first output).
    fn default_layer(&self) -> String {
        self.spec().default_layer.to_string()
    }

    /// Features of `n` images at `layer` (one [`Network::layers`] has), pooled: `n * dim`
    /// floats, row-major, unpooled maps channel-major (`c * H * W + h * W + w`).
    fn features(&self, pixels: &[f32], n: usize, layer: &str, pool: Pool) -> Vec<f32>;

    /// Outputs of the network's own classifier, `None` when the weights have none.
    fn num_classes(&self) -> Option<usize>;

    /// Class probabilities (softmax) of the classifier: `n * num_classes()` floats.
    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>>;
}

/// A layer a network always has.
#[derive(Debug, Clone, Copy)]
pub struct LayerSpec {
    pub name: &'static str,
    /// `[C, H, W]` at the default input size; `None` when it depends on the weight file
    /// (MobileNet's width multiplier and input size).
    pub shape: Option<[usize; 3]>,
}

/// Why a network could not be loaded. Each message is one line and names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    InceptionV3(#[from] inception_v3::LoadError),
    #[error(transparent)]
    MobileNetV1(#[from] mobilenet_v1::LoadError),
    #[error(transparent)]
    EfficientNetLite(#[from] efficientnet_lite::LoadError),
    /// ResNet, VGG: networks assembled straight from a state dict.
    #[error(transparent)]
    StateDict(#[from] state_dict::StateDictError),
    /// A network's own loader error, for networks added without a variant here.
    #[error("{0}")]
    Other(String),
    #[error("{path}: this file holds {holds} weights ({names}), not {expected}")]
    WrongNetwork {
        path: String,
        expected: &'static str,
        holds: String,
        names: String,
    },
    #[error("{path}: tensor {tensor} holds {what}: refusing weights that are not finite")]
    NotFinite {
        path: String,
        tensor: String,
        what: &'static str,
    },
    #[error("{path}: {network} takes no --variant")]
    NoVariant { path: String, network: &'static str },
}

/// One network dltool knows: everything the rest of the program asks about it before (and
/// for) loading it.
pub struct Spec {
    /// `--backbone` value and the family part of provenance strings: never renamed, old feature
    /// files and heads record it.
    pub name: &'static str,
    /// How messages name it (`InceptionV3`).
    pub title: &'static str,
    /// One line for `--backbone`'s help.
    pub help: &'static str,
    /// Input `[H, W]` of the default weights (the file may say otherwise, see `preprocess`).
    pub input: [usize; 2],
    /// The preprocessing of the network a provenance string's second part names
    /// (`tf2015`, `0.25_224`); `None` when it names none this network has.
    pub preprocess: fn(variant: &str) -> Option<Preprocess>,
    /// Layers features can be read from, in network order (a loaded network may list more:
    /// an ONNX graph's nodes).
    pub layers: &'static [LayerSpec],
    pub default_layer: &'static str,
    /// Accepted `--variant` values; empty when the network has none.
    pub variants: &'static [&'static str],
    /// True when the tensor names (and format) of a weight file are this network's.
    pub recognise: fn(&WeightIndex) -> bool,
    /// Weight files looked for, best first, when no `--weights` is given (relative to a
    /// weights folder: `model.json` files inside the registry's folder names).
    pub files: &'static [&'static str],
    /// The registry entry `dltool weights fetch` installs for it by default, named in the
    /// "no weights found" message.
    pub registry_entry: &'static str,
    /// Has a burn model (so runs on `--device wgpu` too); false: the CPU engine only.
    pub gpu: bool,
    pub load: Loader,
}

/// Reads a weight file into a ready network (BatchNorm folded, f32, finite).
pub type Loader = fn(&Path, &LoadOptions) -> Result<Box<dyn Network>, LoadError>;

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every network, the default first. Adding a network: its module, and a row here.
pub static NETWORKS: &[&Spec] = &[
    &inception_v3::SPEC,
    &mobilenet_v1::SPEC,
    &efficientnet_lite::LITE0_SPEC,
    &efficientnet_lite::LITE2_SPEC,
    &resnet::SPEC,
    &vgg::VGG16_SPEC,
    &vgg::VGG19_SPEC,
    &xception::SPEC,
    &onnx::SPEC,
];

/// The default network (InceptionV3).
pub fn default_spec() -> &'static Spec {
    NETWORKS[0]
}

/// The row named `name`.
pub fn find(name: &str) -> Option<&'static Spec> {
    NETWORKS.iter().copied().find(|s| s.name == name)
}

/// The network a registry entry holds weights for: the row whose name starts the entry's
/// (`inception_v3_tf2015` -> InceptionV3), the longest if several do.
pub fn of_registry_entry(entry: &str) -> Option<&'static Spec> {
    NETWORKS
        .iter()
        .copied()
        .filter(|s| entry.starts_with(s.name))
        .max_by_key(|s| s.name.len())
}

/// The row of a provenance string's family (`inception_v3/tf2015` -> InceptionV3).
pub fn of_provenance(backbone: &str) -> Option<&'static Spec> {
    find(backbone.split('/').next().unwrap_or(""))
}

/// The preprocessing of the network a provenance string names, for recording in heads.
pub fn preprocess_of(backbone: &str) -> Option<Preprocess> {
    let (family, rest) = backbone.split_once('/')?;
    (find(family)?.preprocess)(rest)
}

/// The network whose weights `index` holds, if any row recognises them.
pub fn recognise(index: &WeightIndex) -> Option<&'static Spec> {
    NETWORKS.iter().copied().find(|s| (s.recognise)(index))
}

/// The network of a weight path, from its contents (safetensors header, `.pth` index, TF.js
/// manifest); `None` when no network recognises it (the default's loader then says what is
/// wrong with it). A path that cannot be read gives `None` too: loading reports it.
pub fn of_weights(path: &Path) -> Option<&'static Spec> {
    if onnx::is_onnx_path(path) {
        return Some(&onnx::SPEC);
    }
    recognise(&WeightIndex::read(path).ok()?)
}

/// Refuses a weight file that some other network recognises as its own: one line naming what
/// the file holds and the network expected.
pub fn check_weights_for(spec: &'static Spec, path: &Path) -> Result<(), LoadError> {
    if onnx::is_onnx_path(path) != std::ptr::eq(spec, &onnx::SPEC) {
        return Err(LoadError::Other(if onnx::is_onnx_path(path) {
            format!(
                "{}: an ONNX model, not {} weights: leave --backbone out (or use --backbone onnx)",
                path.display(),
                spec.title
            )
        } else {
            format!(
                "{}: --backbone onnx takes an ONNX model file (MODEL.onnx)",
                path.display()
            )
        }));
    }
    let Ok(index) = WeightIndex::read(path) else {
        return Ok(());
    };
    if (spec.recognise)(&index) {
        return Ok(());
    }
    match recognise(&index) {
        Some(other) => Err(LoadError::WrongNetwork {
            path: path.display().to_string(),
            expected: spec.title,
            holds: other.title.to_string(),
            names: index.sample(3),
        }),
        None => Ok(()),
    }
}

/// Refuses NaN and infinite values, naming the first tensor that has one.
pub fn check_finite<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
) -> Result<(), LoadError> {
    for (name, values) in tensors {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(LoadError::NotFinite {
                path: path.display().to_string(),
                tensor: name.to_string(),
                what: if v.is_nan() { "NaN" } else { "an infinity" },
            });
        }
    }
    Ok(())
}

/// Pools a burn `[N, C, H, W]` activation into `n` feature rows (for networks that run on burn).
pub fn burn_pool(act: burn::prelude::Tensor<4>, pool: Pool, n: usize) -> Vec<f32> {
    let out = match pool {
        Pool::Avg => inception_v3::global_avg_pool(act),
        Pool::Max => inception_v3::global_max_pool(act),
        Pool::None => act.reshape([n as i32, -1]),
    };
    out.into_data()
        .try_into_vec::<f32>()
        .expect("the network returns f32")
}

/// Pools an engine (NHWC) activation into feature rows, or lays the whole map out
/// channel-major (for networks on the CPU engine).
pub fn engine_pool(act: &crate::engine::cpu_conv::Act, pool: Pool) -> Vec<f32> {
    match pool {
        Pool::Avg => act.global_avg(),
        Pool::Max => act.global_max(),
        Pool::None => act.to_nchw(),
    }
}

/// Lists names for a message: the first `shown`, then how many more (a state dict has
/// hundreds of tensors; one line must stay readable).
pub fn list_names(names: &[String], shown: usize) -> String {
    if names.len() <= shown {
        names.join(", ")
    } else {
        format!(
            "{}, ... ({} in all)",
            names[..shown].join(", "),
            names.len()
        )
    }
}

/// Which network: a row of [`NETWORKS`]. `--backbone` takes its names (a clap `ValueEnum`
/// built from the table).
#[derive(Clone, Copy)]
pub struct BackboneKind(pub &'static Spec);

impl BackboneKind {
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn spec(self) -> &'static Spec {
        self.0
    }

    /// The layer features are read from when the user names none.
    pub fn default_layer(self) -> &'static str {
        self.0.default_layer
    }

    /// The kind a weight path holds, from its tensor names; the default network when no row
    /// recognises it (its loader then says what is wrong).
    pub fn of_weights(path: &Path) -> BackboneKind {
        BackboneKind(of_weights(path).unwrap_or_else(default_spec))
    }

    /// The kind recorded in feature/head provenance (`inception_v3/tf2015`, ...).
    pub fn of_provenance(backbone: &str) -> Option<BackboneKind> {
        of_provenance(backbone).map(BackboneKind)
    }
}

impl PartialEq for BackboneKind {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}
impl Eq for BackboneKind {}

impl std::fmt::Debug for BackboneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

static KINDS: std::sync::LazyLock<Vec<BackboneKind>> =
    std::sync::LazyLock::new(|| NETWORKS.iter().map(|&s| BackboneKind(s)).collect());

impl clap::ValueEnum for BackboneKind {
    fn value_variants<'a>() -> &'a [Self] {
        KINDS.as_slice()
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.name).help(self.0.help))
    }
}

impl std::str::FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        find(s).map(BackboneKind).ok_or_else(|| {
            let names: Vec<&str> = NETWORKS.iter().map(|n| n.name).collect();
            format!("unknown backbone '{s}' (expected {})", names.join(" or "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_unique_and_default_layers_are_listed() {
        let mut names: Vec<&str> = NETWORKS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), NETWORKS.len());
        // The ONNX row takes its layers and its file from the user's model.
        for s in NETWORKS.iter().filter(|s| s.name != onnx::SPEC.name) {
            assert!(
                s.layers.iter().any(|l| l.name == s.default_layer),
                "{}: default layer {} not in its layer list",
                s.name,
                s.default_layer
            );
            assert!(
                !s.files.is_empty() && !s.registry_entry.is_empty(),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn provenance_strings_of_old_files_still_resolve() {
        let p = preprocess_of("inception_v3/tf2015").unwrap();
        assert_eq!((p.width, p.height), (299, 299));
        let p = preprocess_of("mobilenet_v1/0.25_128").unwrap();
        assert_eq!((p.width, p.height, p.mean), (128, 128, [127.5; 3]));
        assert!(preprocess_of("inception_v3/nonsense").is_none());
        assert!(preprocess_of("resnet9/x").is_none());
        assert_eq!(
            BackboneKind::of_provenance("mobilenet_v1/1.00_224").map(|k| k.name()),
            Some("mobilenet_v1")
        );
    }

    #[test]
    fn backbone_names_parse_and_unknown_lists_the_table() {
        for s in NETWORKS {
            assert_eq!(s.name.parse::<BackboneKind>().unwrap().name(), s.name);
        }
        let err = "resnet9".parse::<BackboneKind>().unwrap_err();
        assert!(
            err.contains("inception_v3") && err.contains("mobilenet_v1"),
            "{err}"
        );
    }

    #[test]
    fn registry_entries_name_their_network() {
        for entry in crate::registry::entries() {
            assert!(
                of_registry_entry(entry.name).is_some(),
                "registry entry {} belongs to no network",
                entry.name
            );
        }
        assert_eq!(
            of_registry_entry("mobilenet_v1_0.25_224").map(|s| s.name),
            Some("mobilenet_v1")
        );
    }

    #[test]
    fn long_name_lists_are_cut_with_a_count() {
        let names: Vec<String> = (0..470).map(|i| format!("t{i}")).collect();
        let line = list_names(&names, 5);
        assert_eq!(line, "t0, t1, t2, t3, t4, ... (470 in all)");
        assert_eq!(list_names(&names[..2], 5), "t0, t1");
    }
}
