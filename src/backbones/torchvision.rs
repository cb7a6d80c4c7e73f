//! What torchvision's ImageNet classifiers (ResNet, VGG) share: their evaluation preprocessing
//! and the recognition of a state dict by the names of its layers.

use crate::image_io::{ChannelOrder, Preprocess, Resize};

/// torchvision's evaluation transform for its ImageNet weights: `Resize(256)` (shorter side,
/// aspect kept), `CenterCrop(224)`, `ToTensor()` (x / 255), `Normalize(mean, std)` with
/// ImageNet's statistics, RGB. [`Preprocess`] takes mean and std on the 0..255 scale.
pub fn preprocess() -> Preprocess {
    Preprocess {
        width: 224,
        height: 224,
        mean: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
        std: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
        // 224 / 0.875 = 256: the shorter side to 256, then the centre 224x224.
        resize: Resize::Crop,
        channels: ChannelOrder::Rgb,
    }
}

/// The provenance suffix of every torchvision network (`resnet50/torchvision`): their
/// preprocessing is one, and the weights' own hash is recorded beside it.
pub const PROVENANCE: &str = "torchvision";

/// `preprocess` for a [`crate::backbones::Spec`]: torchvision's, for the one suffix it writes.
pub fn preprocess_of(variant: &str) -> Option<Preprocess> {
    (variant == PROVENANCE).then(preprocess)
}
