//! burn backend extensions that run the engine's training kernels on burn-flex (the CPU), each
//! with its own backward pass recorded by autodiff; other backends (wgpu) keep burn's own
//! operation, so every function here takes the same arguments as the burn one it replaces.

pub mod conv;
pub mod depthwise;

use burn::backend::DispatchDevice;
use burn::prelude::Device;

/// Whether `device` runs these extensions (burn-flex on the CPU).
pub fn supported(device: &Device) -> bool {
    let device = device.clone().without_autodiff();
    matches!(device.as_dispatch(), DispatchDevice::Flex(_))
}
