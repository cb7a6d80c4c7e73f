//! The CPU engine: NHWC convolution, pooling and Winograd kernels that know no network, and
//! the one place that decides which vector unit they (and the logistic kernels) use.
//!
//! Networks build their graphs from these kernels in `crate::backbones`; nothing here names a
//! layer or a weight file.

pub mod batch_split;
pub mod conv_grad;
pub mod cpu;
pub mod cpu_conv;
pub mod cpu_ops;
pub mod depthwise;
pub mod depthwise_grad;
pub mod direct_conv;
pub mod inverted_residual;
pub mod packed_gemm;
pub mod winograd;
