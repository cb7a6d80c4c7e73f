//! dltool: transfer learning on images from the command line.

pub mod inception_v3;
