//! Known pretrained weights and a downloader for them (`dltool weights ...`), like Keras' or
//! timm's: every file comes from its real home over HTTPS, is checked against its size and
//! SHA-256 (full, or the 8-hex-digit prefix that torchvision-style file names carry), and is
//! installed atomically, once, into `<cache>/weights/<entry name>/<file name>`.
//!
//! The cache root is `$DLTOOL_HOME`, else `dirs::cache_dir()/dltool`. `$DLTOOL_WEIGHTS_MIRROR`
//! replaces every URL's directory with `$DLTOOL_WEIGHTS_MIRROR/<entry name>/` (mirrors, tests).
//! Plain `http://` is allowed only for loopback hosts. An interrupted download is kept as
//! `<file>.part` and resumed with a `Range` request by the next fetch.
//!
//! Every error is a single line of text; nothing here panics on bad input.

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
}

impl Backbone {
    pub fn as_str(self) -> &'static str {
        match self {
            Backbone::InceptionV3 => "inception_v3",
            Backbone::MobileNetV1 => "mobilenet_v1",
            Backbone::ResNet50 => "resnet50",
            Backbone::Vgg16 => "vgg16",
            Backbone::Vgg19 => "vgg19",
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

/// One file of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    pub url: &'static str,
    pub name: &'static str,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// Lowercase hex SHA-256: all 64 digits, or a prefix of it (torchvision's file names carry
    /// the first 8), or `None` when unknown.
    pub sha256: Option<&'static str>,
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

    /// True when every file of the entry has a known hash (for a TF.js model: its shards are
    /// in the table too).
    pub fn hashes_known(&self) -> bool {
        self.files.iter().all(|f| f.sha256.is_some())
            && (self.format != Format::TfjsLayers || self.files.len() > 1)
    }

    /// The sum of the file sizes when all of them are known.
    pub fn known_size(&self) -> Option<u64> {
        if self.format == Format::TfjsLayers && self.files.len() == 1 {
            return None;
        }
        self.files.iter().map(|f| f.size).sum()
    }

    fn spec(&self, file_name: &str) -> Option<&'static FileSpec> {
        self.files.iter().find(|f| f.name == file_name)
    }
}

const fn url_only(url: &'static str, name: &'static str, sha256: Option<&'static str>) -> FileSpec {
    FileSpec {
        url,
        name,
        size: None,
        sha256,
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
    let mut by_file = ENTRIES.iter().filter(|e| e.main_file().name == name);
    match (by_file.next(), by_file.next()) {
        (Some(e), None) => Some(e),
        (Some(_), Some(_)) => parent.and_then(|p| {
            ENTRIES
                .iter()
                .find(|e| e.name == p && e.main_file().name == name)
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

/// The installed main file of `entry` (the `.pth`, or `model.json` when all of its shards are
/// there too), or `None` when it has not been fetched (or the cache root is unknown).
pub fn cached_path(entry: &Entry) -> Option<PathBuf> {
    cache_from_env().ok()?.cached_path(entry)
}

/// Downloads `entry` into the cache (resuming, verifying) and returns its main file. Files
/// already installed and intact are not downloaded again. `progress`: a bar on stderr when it
/// is a terminal.
pub fn fetch(entry: &Entry, progress: bool) -> Result<PathBuf, String> {
    cache_from_env()?.fetch(entry, progress)
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
    /// Present, but the registry knows no hash for it.
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

/// A cache root and an optional mirror: everything the operations need besides the network,
/// so they can be pointed anywhere (tests) without touching the process environment.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
    pub mirror: Option<String>,
}

impl Cache {
    /// `<root>/weights/<entry name>`.
    pub fn entry_dir(&self, entry: &Entry) -> PathBuf {
        self.root.join("weights").join(entry.name)
    }

    pub fn cached_path(&self, entry: &Entry) -> Option<PathBuf> {
        let main = self.entry_dir(entry).join(entry.main_file().name);
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
        let mut names = vec![entry.main_file().name.to_string()];
        if entry.format == Format::TfjsLayers {
            names.extend(manifest_paths(&main).ok()?);
        }
        let dir = main.parent()?;
        names
            .iter()
            .map(|n| fs::metadata(dir.join(n)).ok().map(|m| m.len()))
            .sum()
    }

    /// The URL a file is really downloaded from: `url`, or the mirror's equivalent.
    pub fn source_url(&self, entry: &Entry, file_name: &str, url: &str) -> String {
        match &self.mirror {
            Some(m) => format!("{}/{}/{}", m.trim_end_matches('/'), entry.name, file_name),
            None => url.to_string(),
        }
    }

    pub fn fetch(&self, entry: &Entry, progress: bool) -> Result<PathBuf, String> {
        let dir = self.entry_dir(entry);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {}", dir.display(), one_line(&e)))?;
        let agent = ureq::AgentBuilder::new()
            .redirects(0) // followed by hand, so every hop passes `check_url`
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("dltool/", env!("CARGO_PKG_VERSION")))
            .build();
        let main = entry.main_file();
        let main_path = self.fetch_file(&agent, entry, main, main.url, &dir, progress)?;
        if entry.format == Format::TfjsLayers {
            let base = &main.url[..main.url.rfind('/').map_or(0, |i| i + 1)];
            for shard in manifest_paths(&main_path)? {
                let spec = match entry.spec(&shard) {
                    Some(s) => Some(s),
                    None if entry.hashes_known() => {
                        return Err(format!(
                            "{} lists a shard {shard} that the registry does not know for {}",
                            main_path.display(),
                            entry.name
                        ));
                    }
                    None => None,
                };
                let url = format!("{base}{shard}");
                let owned = OwnedSpec {
                    name: shard.clone(),
                    size: spec.and_then(|s| s.size),
                    sha256: spec.and_then(|s| s.sha256),
                };
                self.fetch_owned(&agent, entry, &owned, &url, &dir, progress)?;
            }
        }
        Ok(main_path)
    }

    fn fetch_file(
        &self,
        agent: &ureq::Agent,
        entry: &Entry,
        spec: &FileSpec,
        url: &str,
        dir: &Path,
        progress: bool,
    ) -> Result<PathBuf, String> {
        let owned = OwnedSpec {
            name: spec.name.to_string(),
            size: spec.size,
            sha256: spec.sha256,
        };
        self.fetch_owned(agent, entry, &owned, url, dir, progress)
    }

    fn fetch_owned(
        &self,
        agent: &ureq::Agent,
        entry: &Entry,
        spec: &OwnedSpec,
        url: &str,
        dir: &Path,
        progress: bool,
    ) -> Result<PathBuf, String> {
        let dest = dir.join(&spec.name);
        if dest.is_file() {
            // Installed files passed their checks; re-check those we can.
            match spec.sha256 {
                None => return Ok(dest),
                Some(_) => {
                    if check_file(&dest, spec.size, spec.sha256)? == Check::Ok {
                        return Ok(dest);
                    }
                    fs::remove_file(&dest).map_err(|e| {
                        format!("cannot remove damaged {}: {}", dest.display(), one_line(&e))
                    })?;
                }
            }
        }
        let url = self.source_url(entry, &spec.name, url);
        let part = dir.join(format!("{}.part", spec.name));
        download(agent, &url, &part, spec.size, progress)?;

        let discard = |why: String| -> String {
            let _ = fs::remove_file(&part);
            format!("{why}; the download was discarded")
        };
        let len = fs::metadata(&part)
            .map_err(|e| format!("cannot read {}: {}", part.display(), one_line(&e)))?
            .len();
        if let Some(size) = spec.size
            && len != size
        {
            return Err(discard(format!(
                "size mismatch for {url}: expected {size} bytes, got {len}"
            )));
        }
        if let Some(expected) = spec.sha256 {
            let actual = sha256_file(&part)?;
            if !hash_matches(expected, &actual) {
                return Err(discard(format!(
                    "sha256 mismatch for {url}: expected {}, got {actual}",
                    describe_hash(expected)
                )));
            }
        }
        fs::rename(&part, &dest).map_err(|e| {
            format!(
                "cannot install {} as {}: {}",
                part.display(),
                dest.display(),
                one_line(&e)
            )
        })?;
        Ok(dest)
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
        // (source, installed name), main file last so a half-done import is not "cached".
        let mut plan: Vec<(PathBuf, String)> = Vec::new();
        if entry.format == Format::TfjsLayers {
            let src_dir = file.parent().unwrap_or(Path::new("."));
            for shard in manifest_paths(file)? {
                plan.push((src_dir.join(&shard), shard));
            }
        }
        plan.push((file.to_path_buf(), entry.main_file().name.to_string()));

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
                && let Check::Bad(why) = check_file(src, spec.size, spec.sha256)?
            {
                return Err(format!(
                    "{} is not {}'s {}: {why}",
                    src.display(),
                    entry.name,
                    spec.name
                ));
            }
        }
        let dir = self.entry_dir(entry);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {}", dir.display(), one_line(&e)))?;
        let mut main = dir.clone();
        for (src, name) in &plan {
            let dest = dir.join(name);
            let tmp = dir.join(format!("{name}.import"));
            fs::copy(src, &tmp).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                format!(
                    "cannot copy {} to {}: {}",
                    src.display(),
                    tmp.display(),
                    one_line(&e)
                )
            })?;
            fs::rename(&tmp, &dest)
                .map_err(|e| format!("cannot install {}: {}", dest.display(), one_line(&e)))?;
            main = dest;
        }
        Ok(main)
    }

    pub fn verify(&self, entry: &Entry) -> Result<Vec<FileCheck>, String> {
        let dir = self.entry_dir(entry);
        let main = dir.join(entry.main_file().name);
        let mut names = vec![entry.main_file().name.to_string()];
        if entry.format == Format::TfjsLayers {
            if main.is_file() {
                names.extend(manifest_paths(&main)?);
            } else {
                names.extend(entry.files[1..].iter().map(|f| f.name.to_string()));
            }
        }
        let mut out = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let check = match entry.spec(&name) {
                Some(spec) => check_file(&path, spec.size, spec.sha256)?,
                None if entry.hashes_known() => Check::Bad(format!(
                    "not a file of {} (the registry knows its files)",
                    entry.name
                )),
                None => check_file(&path, None, None)?,
            };
            out.push(FileCheck { path, check });
        }
        Ok(out)
    }
}

/// A file to download whose name may come from a manifest.
struct OwnedSpec {
    name: String,
    size: Option<u64>,
    sha256: Option<&'static str>,
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

/// GET `url` (from byte `offset` when > 0), following up to 8 redirects, each checked.
fn get(agent: &ureq::Agent, url: &str, offset: u64) -> Result<ureq::Response, GetError> {
    let mut url = url.to_string();
    for _ in 0..8 {
        check_url(&url).map_err(GetError::Other)?;
        let mut req = agent.get(&url);
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
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

/// Downloads `url` into `part`, resuming from its current length. On a failure after bytes
/// arrived, `part` keeps them for the next attempt.
fn download(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    expected_size: Option<u64>,
    progress: bool,
) -> Result<(), String> {
    let mut offset = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if expected_size.is_some_and(|s| offset > s) {
        offset = 0; // longer than the file can be: start over
    }
    let resp = match get(agent, url, offset) {
        Ok(r) => r,
        Err(GetError::RangeNotSatisfiable) if offset > 0 && Some(offset) == expected_size => {
            return Ok(()); // already complete; the caller verifies it
        }
        Err(GetError::RangeNotSatisfiable) if offset > 0 => {
            offset = 0;
            get(agent, url, 0).map_err(|e| match e {
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
    let start = if resumed { offset } else { 0 };
    let content_length = resp
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let total = content_length.map(|n| n + start).or(expected_size);

    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| format!("cannot write {}: {}", part.display(), one_line(&e)))?;

    let bar = if progress && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(
            part.file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".part").to_string())
                .unwrap_or_default(),
        );
        bar.set_position(start);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let kept = |got: u64| {
        format!(
            "{} bytes kept in {}; run the fetch again to resume",
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
                bar.abandon();
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
        bar.inc(n as u64);
    }
    out.flush()
        .and_then(|_| out.sync_all())
        .map_err(|e| format!("cannot write {}: {}", part.display(), one_line(&e)))?;
    if let Some(len) = content_length
        && got < len
    {
        bar.abandon();
        return Err(format!(
            "download of {url} closed early: got {got} of {len} bytes; {}",
            kept(got)
        ));
    }
    bar.finish_and_clear();
    Ok(())
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
        assert_eq!(entries().len(), 6);
    }

    #[test]
    fn good_fetch_installs_and_verifies() {
        let (base, log) = serve(mobilenet_routes(&[]), 200);
        let (_tmp, cache) = cache(&base);
        let entry = find(MN).unwrap();
        assert_eq!(cache.cached_path(entry), None);
        let main = cache.fetch(entry, false).unwrap();
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
        cache.fetch(entry, false).unwrap();
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
        let err = cache.fetch(entry, false).unwrap_err();
        assert!(!err.contains('\n'));
        assert!(err.contains(shard) && err.contains("resume"), "{err}");
        let part = cache.entry_dir(entry).join(format!("{shard}.part"));
        assert_eq!(fs::metadata(&part).unwrap().len(), 300_000);
        assert_eq!(cache.cached_path(entry), None);

        cache.fetch(entry, false).unwrap();
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
        let err = cache.fetch(entry, false).unwrap_err();
        let expected = entry.spec(shard).unwrap().sha256.unwrap();
        assert!(!err.contains('\n'));
        assert!(
            err.contains("sha256 mismatch") && err.contains(expected),
            "{err}"
        );
        assert!(err.contains(&format!("{base}/{MN}/{shard}")), "{err}");
        let dir = cache.entry_dir(entry);
        assert!(!dir.join(shard).exists());
        assert!(!dir.join(format!("{shard}.part")).exists());
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
        let err = cache.fetch(entry, false).unwrap_err();
        assert!(
            err.contains("HTTP 500") && err.contains("model.json"),
            "{err}"
        );
        assert!(!err.contains('\n'));

        let other = find("inception_v3_tf2015").unwrap();
        let err = cache.fetch(other, false).unwrap_err();
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
        let err = cache.fetch(find(MN).unwrap(), false).unwrap_err();
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
