//! Image file → network input: decode (format sniffed from content), apply EXIF orientation,
//! convert to 8-bit RGB, resize like Pillow's `Image.resize(size, BILINEAR)` and normalise into
//! CHW `f32` planes.
//!
//! Called from rayon workers, one image per call. A bad file must cost only that file, so every
//! failure on bad input is an [`ImageError`] holding a short lowercase reason without the path
//! (the caller prints `skipped PATH: REASON`); decoder panics are caught as a last resort.

use std::any::Any;
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Cursor, Read};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use fast_image_resize as fr;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// How an image becomes the network input: brought to `width`×`height` by `resize`, its
/// channels put in `channels` order, then `(x - mean[c]) / std[c]` with x in 0..=255 and `c`
/// counted in that order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: Resize,
    pub channels: ChannelOrder,
}

impl Preprocess {
    /// Number of `f32`s of one preprocessed image (3 × height × width).
    pub fn tensor_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// All of it in one token without slashes, for provenance strings
    /// (`224x224_crop_RGB_mean123.675,116.28,103.53_std58.395,57.12,57.375`); read back by
    /// [`Preprocess::from_spec`], exactly (floats print as their shortest round-trip form).
    pub fn spec(&self) -> String {
        let triple = |v: [f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
        format!(
            "{}x{}_{}_{}_mean{}_std{}",
            self.width,
            self.height,
            self.resize.name(),
            self.channels.name(),
            triple(self.mean),
            triple(self.std)
        )
    }

    pub fn from_spec(s: &str) -> Option<Preprocess> {
        let mut parts = s.split('_');
        let (w, h) = parts.next()?.split_once('x')?;
        let resize = parts.next()?.parse().ok()?;
        let channels = match parts.next()? {
            "RGB" => ChannelOrder::Rgb,
            "BGR" => ChannelOrder::Bgr,
            _ => return None,
        };
        let triple = |t: &str| -> Option<[f32; 3]> {
            let v: Vec<f32> = t
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?;
            v.try_into().ok()
        };
        let mean = triple(parts.next()?.strip_prefix("mean")?)?;
        let std = triple(parts.next()?.strip_prefix("std")?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(Preprocess {
            width: w.parse().ok()?,
            height: h.parse().ok()?,
            mean,
            std,
            resize,
            channels,
        })
    }
}

/// How an image of any shape is brought to the network's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resize {
    /// Straight to width×height, aspect not kept (Keras' and TF-slim's evaluation).
    #[default]
    Stretch,
    /// torchvision's evaluation transform, `Resize(int(size / 0.875))` then
    /// `CenterCrop(size)`: the image is scaled (aspect kept) until it covers
    /// (width / 0.875)×(height / 0.875), then the centre width×height is cut out.
    Crop,
}

impl Resize {
    pub fn name(self) -> &'static str {
        match self {
            Resize::Stretch => "stretch",
            Resize::Crop => "crop",
        }
    }
}

impl std::str::FromStr for Resize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stretch" => Ok(Resize::Stretch),
            "crop" => Ok(Resize::Crop),
            other => Err(format!(
                "unknown resize '{other}' (expected stretch or crop)"
            )),
        }
    }
}

/// Order of the three colour planes the network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelOrder {
    #[default]
    Rgb,
    /// Caffe's (and OpenCV's) order.
    Bgr,
}

impl ChannelOrder {
    pub fn name(self) -> &'static str {
        match self {
            ChannelOrder::Rgb => "RGB",
            ChannelOrder::Bgr => "BGR",
        }
    }
}

/// The share of the resized image [`Resize::Crop`] keeps (torchvision's and timm's 0.875).
pub const CROP_FRACTION: f64 = 0.875;

/// Size an image of `src` pixels is resized to before [`Resize::Crop`] cuts `dst` out of its
/// centre: the side that binds is scaled to `dst / 0.875` (floored) and the other in proportion
/// (floored, as torchvision's `int(size * long / short)`).
pub fn crop_resize_size(src: (u32, u32), dst: (u32, u32)) -> (u32, u32) {
    let (sw, sh) = (u64::from(src.0.max(1)), u64::from(src.1.max(1)));
    let rw = (f64::from(dst.0) / CROP_FRACTION).floor() as u64;
    let rh = (f64::from(dst.1) / CROP_FRACTION).floor() as u64;
    // Width binds when rw / sw >= rh / sh; integer products keep it exact.
    let (w, h) = if rw * sh >= rh * sw {
        (rw, (sh * rw / sw).max(rh))
    } else {
        ((sw * rh / sh).max(rw), rh)
    };
    let clamp = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
    (clamp(w), clamp(h))
}

/// Offset of a centred crop of `inner` out of `outer`, rounded as torchvision's
/// `int(round((outer - inner) / 2))`: Python rounds halves to even.
fn centre_offset(outer: u32, inner: u32) -> u32 {
    let diff = outer.saturating_sub(inner);
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Why an image was skipped: one short lowercase line, without the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

impl ImageError {
    fn new(reason: impl Into<String>) -> Self {
        ImageError(reason.into())
    }
}

/// Largest pixel count accepted (decompression-bomb guard), the same default as PIL's
/// `Image.MAX_IMAGE_PIXELS`.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Formats compiled into the `image` dependency; `image::guess_format` also recognises others.
const SUPPORTED: [ImageFormat; 6] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::WebP,
    ImageFormat::Tiff,
];

/// Bytes needed to sniff the format; `image::guess_format` looks at no more than this.
const SNIFF_LEN: usize = 32;

/// Decoder memory allowance per accepted pixel: enough for 16-bit RGBA, the widest layout a
/// legitimate photo decodes to; only float TIFFs near the pixel limit need more.
const ALLOC_BYTES_PER_PIXEL: u64 = 8;

/// Allowance floor, so that a small `max_pixels` does not starve decoder scratch buffers.
const MIN_ALLOC: u64 = 512 << 20;

/// Decode a file: JPEG, PNG, GIF (first frame), BMP, WebP, TIFF, detected from content (not
/// extension). Applies EXIF orientation. Grey, grey+alpha, RGBA (alpha dropped, not composited,
/// like PIL's `convert("RGB")`), CMYK JPEG, 16-bit and float images become 8-bit RGB.
pub fn decode_rgb8(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageError> {
    let bytes = read_image_file(path, max_pixels)?;
    decode_rgb8_bytes(&bytes, max_pixels)
}

/// Same as [`decode_rgb8`], from bytes already in memory.
pub fn decode_rgb8_bytes(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let format = sniff_format(bytes)?;
    // Decoders are third-party code fed untrusted bytes; a panic there must not take down the
    // rayon pool and the whole run.
    panic::catch_unwind(AssertUnwindSafe(|| decode_known(bytes, format, max_pixels)))
        .unwrap_or_else(|payload| {
            Err(ImageError(format!(
                "decoder crashed: {}",
                one_line(&panic_message(payload.as_ref()))
            )))
        })
}

/// Resize straight to `width`×`height` (no crop, aspect not kept) with Pillow's antialiased
/// bilinear (triangle) convolution, whose support widens with the downscale factor.
pub fn resize_rgb8(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let mut out = vec![0u8; 3 * width as usize * height as usize];
    resize_rgb8_into(img, width, height, &mut out)?;
    RgbImage::from_raw(width, height, out)
        .ok_or_else(|| ImageError::new("resize produced a buffer of the wrong size"))
}

/// Write the normalised CHW planes into `out`: plane c holds `(x - mean[c]) / std[c]` for
/// every pixel in row-major order.
///
/// # Panics
/// If `out.len() != 3 * img.width() * img.height()` (a caller bug, not bad input).
pub fn to_chw(img: &RgbImage, pre: &Preprocess, out: &mut [f32]) {
    let n = img.width() as usize * img.height() as usize;
    assert_eq!(
        out.len(),
        3 * n,
        "to_chw: output holds {} floats, a {}x{} image needs {}",
        out.len(),
        img.width(),
        img.height(),
        3 * n
    );
    // A 256-entry table per channel computes exactly (x - mean) / std, the reference formula,
    // and costs 768 divisions instead of one per sample.
    let lut: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|x| (x as f32 - pre.mean[c]) / pre.std[c]));
    let (r_plane, rest) = out.split_at_mut(n);
    let (g_plane, b_plane) = rest.split_at_mut(n);
    // Plane c reads source channel src[c]: BGR is RGB with the first and last swapped.
    let src = match pre.channels {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let pixels = img.as_raw().chunks_exact(3);
    for (px, ((r, g), b)) in pixels.zip(
        r_plane
            .iter_mut()
            .zip(g_plane.iter_mut())
            .zip(b_plane.iter_mut()),
    ) {
        *r = lut[0][px[src[0]] as usize];
        *g = lut[1][px[src[1]] as usize];
        *b = lut[2][px[src[2]] as usize];
    }
}

/// Resize (skipped when the size already matches) and normalise a decoded image, returning the
/// CHW vector of [`Preprocess::tensor_len`] floats.
pub fn preprocess_rgb8(img: &RgbImage, pre: &Preprocess) -> Result<Vec<f32>, ImageError> {
    let mut out = vec![0f32; pre.tensor_len()];
    preprocess_rgb8_into(img, pre, &mut out)?;
    Ok(out)
}

/// [`preprocess_rgb8`] writing into a slice of a batch tensor, saving a copy per image.
///
/// # Panics
/// If `out.len() != pre.tensor_len()`.
pub fn preprocess_rgb8_into(
    img: &RgbImage,
    pre: &Preprocess,
    out: &mut [f32],
) -> Result<(), ImageError> {
    if pre.resize == Resize::Crop {
        let (w, h) = crop_resize_size(img.dimensions(), (pre.width, pre.height));
        let resized;
        let scaled = if img.dimensions() == (w, h) {
            img
        } else {
            resized = resize_rgb8(img, w, h)?;
            &resized
        };
        let (x, y) = (centre_offset(w, pre.width), centre_offset(h, pre.height));
        let cropped = image::imageops::crop_imm(scaled, x, y, pre.width, pre.height).to_image();
        to_chw(&cropped, pre, out);
    } else if img.dimensions() == (pre.width, pre.height) {
        to_chw(img, pre, out);
    } else {
        let resized = resize_rgb8(img, pre.width, pre.height)?;
        to_chw(&resized, pre, out);
    }
    Ok(())
}

/// All of it: decode + resize + [`to_chw`], returning the CHW vec.
pub fn load_for_network(
    path: &Path,
    pre: &Preprocess,
    max_pixels: u64,
) -> Result<Vec<f32>, ImageError> {
    preprocess_rgb8(&decode_rgb8(path, max_pixels)?, pre)
}

/// [`load_for_network`] writing into a slice of a batch tensor.
///
/// # Panics
/// If `out.len() != pre.tensor_len()`.
pub fn load_for_network_into(
    path: &Path,
    pre: &Preprocess,
    max_pixels: u64,
    out: &mut [f32],
) -> Result<(), ImageError> {
    preprocess_rgb8_into(&decode_rgb8(path, max_pixels)?, pre, out)
}

// ---------------------------------------------------------------------------------------------
// Files

/// Read a whole image file, checking what can be known before reading it all.
fn read_image_file(path: &Path, max_pixels: u64) -> Result<Vec<u8>, ImageError> {
    let meta = fs::metadata(path).map_err(|e| file_error(path, &e))?;
    if meta.is_dir() {
        return Err(ImageError::new("is a directory"));
    }
    // Opening a FIFO or a device would block or read forever.
    if !meta.is_file() {
        return Err(ImageError::new("not a regular file"));
    }
    if meta.len() == 0 {
        return Err(ImageError::new("empty file"));
    }
    // No legitimate image within the pixel budget is larger than an uncompressed one at
    // 16 bytes per pixel; a bigger file would only be read to be refused.
    let max_file = max_pixels.saturating_mul(16).saturating_add(1 << 20);
    if meta.len() > max_file {
        return Err(ImageError(format!(
            "file is {} bytes, too large for the {max_pixels}-pixel limit",
            meta.len()
        )));
    }
    let mut file = File::open(path).map_err(|e| file_error(path, &e))?;

    // Sniff first: a video or archive dropped in an image folder is refused without being
    // read whole.
    let mut bytes = vec![0u8; SNIFF_LEN];
    let mut filled = 0;
    while filled < SNIFF_LEN {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(file_error(path, &e)),
        }
    }
    bytes.truncate(filled);
    sniff_format(&bytes)?;

    let expected = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    bytes.reserve(expected.saturating_sub(filled));
    // `take` bounds the read even if the file grows while being read.
    file.take(max_file.saturating_sub(filled as u64))
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(path, &e))?;
    Ok(bytes)
}

/// Reason for a failed stat/open/read of `path`.
fn file_error(path: &Path, e: &io::Error) -> ImageError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => {
            // `metadata` follows symlinks; only `symlink_metadata` tells a dangling link from
            // a missing file.
            let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if is_link {
                "broken symlink".to_owned()
            } else {
                "no such file".to_owned()
            }
        }
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        io::ErrorKind::IsADirectory => "is a directory".to_owned(),
        io::ErrorKind::NotADirectory => "no such file (a parent is not a directory)".to_owned(),
        _ if is_symlink_loop(e) => "symlink loop".to_owned(),
        _ => format!("cannot read file: {}", one_line(&e.to_string())),
    };
    ImageError(reason)
}

/// `io::ErrorKind::FilesystemLoop` is unstable, so ELOOP is recognised by its errno.
fn is_symlink_loop(e: &io::Error) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const ELOOP: i32 = 40;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const ELOOP: i32 = 62; // macOS and the BSDs
    e.raw_os_error() == Some(ELOOP)
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::new("empty file"));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| ImageError::new("not an image (unrecognised format)"))?;
    if !SUPPORTED.contains(&format) {
        let name = format
            .extensions_str()
            .first()
            .copied()
            .unwrap_or("unknown");
        return Err(ImageError(format!("unsupported image format ({name})")));
    }
    Ok(format)
}

fn decode_known(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<RgbImage, ImageError> {
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // zune-jpeg, in the lenient mode the image crate uses, pads missing scan data with grey
        // instead of failing; PIL refuses such files ("image file is truncated").
        return Err(ImageError::new(
            "truncated or corrupt JPEG: no end-of-image marker (file cut short)",
        ));
    }
    let fail = |e| decode_error(format, e);

    let budget = max_pixels
        .saturating_mul(ALLOC_BYTES_PER_PIXEL)
        .max(MIN_ALLOC);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits(max_pixels, budget));
    let mut decoder = reader.into_decoder().map_err(fail)?;

    // The header has been parsed but no pixel buffer allocated yet: refuse bombs here.
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError(format!(
            "image is {width}x{height}, over the {max_pixels}-pixel limit"
        )));
    }
    if pixels == 0 {
        return Err(ImageError(format!("image is {width}x{height}, no pixels")));
    }
    // `DynamicImage::from_decoder` allocates `total_bytes` without consulting the limits.
    let needed = decoder.total_bytes();
    if needed > budget {
        return Err(ImageError(format!(
            "image is {width}x{height} and needs {} MiB to decode, over the {} MiB limit",
            needed >> 20,
            budget >> 20
        )));
    }
    // Unreadable EXIF must not cost the image: PIL ignores orientation entirely.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // The decoded buffer and its 8-bit RGB copy are alive together. The budget is shared by
    // every decoding thread: a 13000x13000 16-bit PNG under the pixel limit takes ~1.5 GB,
    // and four threads must not take four times that.
    let _held = DECODE_MEMORY.acquire(needed.saturating_add(pixels.saturating_mul(3)), budget);
    let decoded = DynamicImage::from_decoder(decoder).map_err(fail)?;

    // Convert before reorienting: rotating 3 bytes per pixel is cheaper than 8 or 16.
    let rgb = decoded.into_rgb8();
    if orientation == Orientation::NoTransforms {
        return Ok(rgb);
    }
    let mut oriented = DynamicImage::ImageRgb8(rgb);
    oriented.apply_orientation(orientation);
    Ok(oriented.into_rgb8())
}

/// Bytes of decoder memory in use across threads; a decode waits until its bytes fit under
/// its budget (the per-image allowance), or until it is the only one (an image within the
/// limits always decodes, one at a time at worst).
pub struct MemoryBudget {
    in_use: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

static DECODE_MEMORY: MemoryBudget = MemoryBudget::new();

/// Bytes reserved from a [`MemoryBudget`], given back when dropped (also on a decoder panic).
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl MemoryBudget {
    pub const fn new() -> MemoryBudget {
        MemoryBudget {
            in_use: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits until `bytes` fit under `limit` with what others hold (or nothing is held).
    pub fn acquire(&self, bytes: u64, limit: u64) -> Reservation<'_> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        while *in_use > 0 && in_use.saturating_add(bytes) > limit {
            in_use = self.freed.wait(in_use).unwrap_or_else(|e| e.into_inner());
        }
        *in_use += bytes;
        Reservation {
            budget: self,
            bytes,
        }
    }

    /// [`Self::acquire`] without waiting: `None` when it would wait.
    pub fn try_acquire(&self, bytes: u64, limit: u64) -> Option<Reservation<'_>> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if *in_use > 0 && in_use.saturating_add(bytes) > limit {
            return None;
        }
        *in_use += bytes;
        Some(Reservation {
            budget: self,
            bytes,
        })
    }

    pub fn in_use(&self) -> u64 {
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock().unwrap_or_else(|e| e.into_inner());
        *in_use -= self.bytes;
        self.budget.freed.notify_all();
    }
}

fn decoder_limits(max_pixels: u64, budget: u64) -> Limits {
    let mut limits = Limits::default();
    // Only a side longer than the whole pixel budget is refused at this level: smaller ones must
    // reach the pixel-count check, whose message says what the image is.
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(budget);
    limits
}

/// Whether a JPEG reaches its end-of-image marker. Embedded thumbnails carry their own EOI inside
/// APPn segments, so the marker is looked for only from the first start-of-scan on; inside
/// entropy-coded data 0xFF is always stuffed, so a bare FF D9 there is the real end.
fn jpeg_is_complete(data: &[u8]) -> bool {
    let Some(scan) = jpeg_first_scan(data) else {
        // Headers that cannot be walked are the decoder's to judge, with a better message.
        return true;
    };
    // Nearly every file ends with the marker; only the rest need the scan.
    data.ends_with(&[0xFF, 0xD9]) || data[scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Offset of the first SOS marker, found by walking the length-prefixed header segments.
fn jpeg_first_scan(data: &[u8]) -> Option<usize> {
    let mut i = 2; // past SOI
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while *data.get(i)? == 0xFF && *data.get(i + 1)? == 0xFF {
            i += 1;
        }
        if *data.get(i)? != 0xFF {
            return None;
        }
        let marker = *data.get(i + 1)?;
        match marker {
            0xDA => return Some(i),
            0xD9 => return None,
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                let len = u16::from_be_bytes([*data.get(i + 2)?, *data.get(i + 3)?]);
                i += 2 + usize::from(len);
            }
        }
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::WebP => "WebP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

fn decode_error(format: ImageFormat, e: image::ImageError) -> ImageError {
    use image::ImageError as E;
    use std::error::Error as _;
    let name = format_name(format);
    let reason = match e {
        // The image crate's own Display repeats the format ("Format error decoding Png: ...");
        // the underlying decoder's message is the useful part.
        E::Decoding(d) => {
            let detail = d.source().map_or_else(|| d.to_string(), |s| s.to_string());
            format!("truncated or corrupt {name}: {}", one_line(&detail))
        }
        E::IoError(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            format!("truncated {name} file")
        }
        // Reading from memory cannot fail, so an I/O error is the decoder rejecting the data.
        E::IoError(io) => format!("truncated or corrupt {name}: {}", one_line(&io.to_string())),
        E::Limits(l) => format!("image too large: {}", one_line(&l.to_string())),
        E::Unsupported(u) => format!("unsupported {name} variant: {}", one_line(&u.to_string())),
        E::Parameter(p) => format!("invalid {name}: {}", one_line(&p.to_string())),
        E::Encoding(x) => format!("{name} error: {}", one_line(&x.to_string())),
    };
    ImageError(reason)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Squash a library message into the reason style: one line, no surrounding quotes (some
/// decoders print their message with `{:?}`), no trailing period, and a lowercase first word
/// unless it is an acronym ("PNG", "I/O").
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let unquoted = joined
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(&joined);
    let trimmed = unquoted.trim_end_matches('.');
    let first_word = trimmed.split(' ').next().unwrap_or("");
    let capitalised = first_word.starts_with(char::is_uppercase)
        && first_word
            .chars()
            .skip(1)
            .filter(|c| c.is_alphabetic())
            .all(char::is_lowercase);
    if capitalised {
        let mut chars = trimmed.chars();
        chars
            .next()
            .into_iter()
            .flat_map(char::to_lowercase)
            .chain(chars)
            .collect()
    } else {
        trimmed.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Resizing

thread_local! {
    // A Resizer keeps its scratch buffers between calls; one per rayon worker saves
    // reallocating them for every image.
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

fn resize_rgb8_into(
    img: &RgbImage,
    width: u32,
    height: u32,
    out: &mut [u8],
) -> Result<(), ImageError> {
    let (src_w, src_h) = img.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError(format!("cannot resize to {width}x{height}")));
    }
    if src_w == 0 || src_h == 0 {
        return Err(ImageError(format!("image is {src_w}x{src_h}, no pixels")));
    }
    let src_len = 3 * src_w as usize * src_h as usize;
    let src_buf = img
        .as_raw()
        .get(..src_len)
        .ok_or_else(|| ImageError::new("image buffer shorter than its dimensions"))?;
    if (src_w, src_h) == (width, height) {
        out.copy_from_slice(src_buf);
        return Ok(());
    }
    // The typed images and `resize_typed`: `Resizer::resize` dispatches on the pixel type at
    // run time and so instantiated the resampling code of all 13 pixel types here, a quarter of
    // this crate's LLVM IR (cargo llvm-lines) and of its build time, for the one type we use.
    let src = fr::images::TypedImageRef::<fr::pixels::U8x3>::from_buffer(src_w, src_h, src_buf)
        .map_err(|e| ImageError(format!("resize failed: {e}")))?;
    let mut dst = fr::images::TypedImage::<fr::pixels::U8x3>::from_buffer(width, height, out)
        .map_err(|e| ImageError(format!("resize failed: {e}")))?;
    let options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    RESIZER
        .with_borrow_mut(|resizer| resizer.resize_typed(&src, &mut dst, &options))
        .map_err(|e| ImageError(format!("resize failed: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn decode_memory_is_one_budget_across_threads() {
        let budget = super::MemoryBudget::new();
        let gb = 1u64 << 30;
        let first = budget.acquire(gb, 2 * gb);
        // A second large decode would pass its own per-image limit but not the shared one.
        assert!(budget.try_acquire(gb + 1, 2 * gb).is_none());
        let small = budget
            .try_acquire(gb / 2, 2 * gb)
            .expect("fits beside the first");
        assert_eq!(budget.in_use(), gb + gb / 2);
        // One waiting thread goes on as soon as the others give their bytes back.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let r = budget.acquire(gb + 1, 2 * gb);
                budget.in_use() > gb && r.bytes == gb + 1
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "did not wait for the budget");
            drop(first);
            drop(small);
            assert!(waiter.join().unwrap());
        });
        assert_eq!(budget.in_use(), 0);
        // An image larger than the budget still decodes when it is alone.
        drop(budget.try_acquire(3 * gb, 2 * gb).expect("alone, it goes"));
    }

    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{GrayAlphaImage, GrayImage, ImageBuffer, Rgb, RgbaImage};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .encode_image(img)
            .unwrap();
        out
    }

    /// 3x2, six distinct colours, so a transposed or channel-swapped decode shows.
    fn sample_rgb() -> RgbImage {
        let px = [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 255],
            [0, 0, 0],
            [200, 100, 50],
        ];
        RgbImage::from_raw(3, 2, px.concat()).unwrap()
    }

    fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
        decode_rgb8_bytes(bytes, DEFAULT_MAX_PIXELS)
    }

    fn assert_close(img: &RgbImage, x: u32, y: u32, want: [u8; 3], tol: u8) {
        let got = img.get_pixel(x, y).0;
        let ok = got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= tol);
        assert!(ok, "pixel ({x},{y}) is {got:?}, want {want:?} ±{tol}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// A well-formed PNG whose header claims `width`x`height` but whose data is tiny.
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
        png_chunk(&mut png, b"IHDR", &ihdr);
        // zlib stream holding one empty stored block
        png_chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0, 0, 0, 1],
        );
        png_chunk(&mut png, b"IEND", &[]);
        png
    }

    /// APP1 segment with an Exif block holding only the Orientation tag.
    fn exif_app1(orientation: u16) -> Vec<u8> {
        let mut payload = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
        payload.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
        payload.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        payload.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        payload.extend_from_slice(&1u32.to_be_bytes()); // count
        payload.extend_from_slice(&orientation.to_be_bytes());
        payload.extend_from_slice(&[0, 0]);
        payload.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
        seg.extend_from_slice(&payload);
        seg
    }

    /// 16x8: left half red, right half blue (8x8 blocks survive JPEG).
    fn red_blue() -> RgbImage {
        RgbImage::from_fn(16, 8, |x, _| {
            if x < 8 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn lossless_formats_decode_exactly() {
        let img = sample_rgb();
        for format in [
            ImageFormat::Png,
            ImageFormat::Bmp,
            ImageFormat::WebP,
            ImageFormat::Tiff,
            ImageFormat::Gif,
        ] {
            let bytes = encode(&DynamicImage::ImageRgb8(img.clone()), format);
            assert_eq!(image::guess_format(&bytes).unwrap(), format);
            let got = decode(&bytes).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(got, img, "{format:?}");
        }
    }

    #[test]
    fn sixteen_bit_png_scales_to_eight_bit() {
        let img = ImageBuffer::<Rgb<u16>, _>::from_raw(
            2,
            1,
            vec![0, 65535, 257 * 100, 257 * 128, 257, 65535 - 257],
        )
        .unwrap();
        let bytes = encode(&DynamicImage::ImageRgb16(img), ImageFormat::Png);
        let got = decode(&bytes).unwrap();
        assert_eq!(got.as_raw(), &[0, 255, 100, 128, 1, 254]);
    }

    #[test]
    fn float_tiff_scales_to_eight_bit() {
        let img = ImageBuffer::<Rgb<f32>, _>::from_raw(2, 1, vec![0.0, 1.0, 0.5, 2.0, -1.0, 0.25])
            .unwrap();
        let bytes = encode(&DynamicImage::ImageRgb32F(img), ImageFormat::Tiff);
        let got = decode(&bytes).unwrap();
        assert_eq!(got.as_raw(), &[0, 255, 128, 255, 0, 64]);
    }

    #[test]
    fn grey_and_grey_alpha_replicate_to_rgb() {
        let grey = GrayImage::from_raw(2, 1, vec![7, 250]).unwrap();
        let got = decode(&encode(&DynamicImage::ImageLuma8(grey), ImageFormat::Png)).unwrap();
        assert_eq!(got.as_raw(), &[7, 7, 7, 250, 250, 250]);

        let grey_alpha = GrayAlphaImage::from_raw(2, 1, vec![7, 0, 250, 128]).unwrap();
        let bytes = encode(&DynamicImage::ImageLumaA8(grey_alpha), ImageFormat::Png);
        assert_eq!(decode(&bytes).unwrap().as_raw(), &[7, 7, 7, 250, 250, 250]);
    }

    #[test]
    fn rgba_drops_alpha_without_compositing() {
        // A fully transparent pixel keeps its colour, as with PIL's convert("RGB").
        let rgba = RgbaImage::from_raw(2, 1, vec![200, 10, 20, 0, 1, 2, 3, 128]).unwrap();
        let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        assert_eq!(decode(&bytes).unwrap().as_raw(), &[200, 10, 20, 1, 2, 3]);
    }

    #[test]
    fn jpeg_decodes_close_to_source() {
        let got = decode(&jpeg(&red_blue())).unwrap();
        assert_eq!(got.dimensions(), (16, 8));
        assert_close(&got, 2, 4, [255, 0, 0], 8);
        assert_close(&got, 13, 4, [0, 0, 255], 8);
    }

    #[test]
    fn exif_orientation_is_applied() {
        let plain = jpeg(&red_blue());
        for (orientation, dims, top, bottom) in [
            // 6: rotate 90° clockwise, so the left (red) half ends on top.
            (6u16, (8, 16), [255, 0, 0], [0, 0, 255]),
            // 8: rotate 90° counter-clockwise, so the right (blue) half ends on top.
            (8, (8, 16), [0, 0, 255], [255, 0, 0]),
            (1, (16, 8), [255, 0, 0], [255, 0, 0]),
        ] {
            let mut bytes = plain[..2].to_vec();
            bytes.extend(exif_app1(orientation));
            bytes.extend_from_slice(&plain[2..]);
            let got = decode(&bytes).unwrap();
            assert_eq!(got.dimensions(), dims, "orientation {orientation}");
            assert_close(&got, 1, 1, top, 8);
            assert_close(&got, 1, dims.1 - 2, bottom, 8);
        }
    }

    #[test]
    fn cmyk_jpeg_becomes_rgb() {
        // 16x8 Adobe CMYK JPEG written by Pillow 13: left half C+M (blue), right half M+Y (red);
        // PIL's convert("RGB") gives (0,0,255) and (255,0,0).
        const CMYK_JPEG: &[u8] = &[
            0xff, 0xd8, 0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00, 0x64, 0x00,
            0x00, 0x00, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x02, 0x01, 0x01, 0x01, 0x01,
            0x01, 0x02, 0x01, 0x01, 0x01, 0x02, 0x02, 0x02, 0x02, 0x02, 0x04, 0x03, 0x02, 0x02,
            0x02, 0x02, 0x05, 0x04, 0x04, 0x03, 0x04, 0x06, 0x05, 0x06, 0x06, 0x06, 0x05, 0x06,
            0x06, 0x06, 0x07, 0x09, 0x08, 0x06, 0x07, 0x09, 0x07, 0x06, 0x06, 0x08, 0x0b, 0x08,
            0x09, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x06, 0x08, 0x0b, 0x0c, 0x0b, 0x0a, 0x0c, 0x09,
            0x0a, 0x0a, 0x0a, 0xff, 0xc0, 0x00, 0x14, 0x08, 0x00, 0x08, 0x00, 0x10, 0x04, 0x43,
            0x11, 0x00, 0x4d, 0x11, 0x00, 0x59, 0x11, 0x00, 0x4b, 0x11, 0x00, 0xff, 0xc4, 0x00,
            0x16, 0x00, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x09, 0xff, 0xc4, 0x00, 0x14, 0x10, 0x01, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0xff, 0xda, 0x00, 0x0e, 0x04, 0x43, 0x00, 0x4d, 0x00, 0x59, 0x00, 0x4b, 0x00,
            0x00, 0x3f, 0x00, 0x3f, 0xe3, 0xfe, 0xdf, 0xc6, 0xfe, 0x1f, 0xe2, 0x00, 0x34, 0xff,
            0xd9,
        ];
        let got = decode(CMYK_JPEG).unwrap();
        assert_eq!(got.dimensions(), (16, 8));
        assert_close(&got, 2, 2, [0, 0, 255], 8);
        assert_close(&got, 12, 2, [255, 0, 0], 8);
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        let full = jpeg(&RgbImage::from_fn(64, 64, |x, y| {
            Rgb([x as u8 * 4, y as u8 * 4, 99])
        }));
        assert!(decode(&full).is_ok());
        for cut in [full.len() / 3, full.len() / 2, full.len() - 2] {
            let err = decode(&full[..cut]).unwrap_err().0;
            assert!(
                err.starts_with("truncated or corrupt JPEG"),
                "cut {cut}: {err}"
            );
        }
        // Trailing bytes after the end marker (some cameras append data) are fine.
        let mut padded = full.clone();
        padded.extend_from_slice(b"trailing junk");
        assert!(decode(&padded).is_ok());
    }

    #[test]
    fn bad_bytes_are_refused_with_reasons() {
        assert_eq!(decode(b"").unwrap_err().0, "empty file");
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(
            decode(&noise).unwrap_err().0,
            "not an image (unrecognised format)"
        );
        assert_eq!(
            decode(b"hello, world\n").unwrap_err().0,
            "not an image (unrecognised format)"
        );

        let mut fake_jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
        fake_jpeg.extend_from_slice(&noise);
        assert!(decode(&fake_jpeg).unwrap_err().0.contains("JPEG"));

        let mut fake_png = b"\x89PNG\r\n\x1a\n".to_vec();
        fake_png.extend_from_slice(&noise);
        assert!(decode(&fake_png).unwrap_err().0.contains("PNG"));

        let err = decode(b"\0\0\x01\0\x01\0\x10\x10\0\0\x01\0\x20\0")
            .unwrap_err()
            .0;
        assert_eq!(err, "unsupported image format (ico)");
    }

    #[test]
    fn truncated_png_is_refused() {
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([x as u8, y as u8, (x * y) as u8]));
        let bytes = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let err = decode(&bytes[..bytes.len() / 2]).unwrap_err().0;
        assert!(err.contains("PNG"), "{err}");
    }

    #[test]
    fn decompression_bomb_is_refused_from_the_header() {
        let start = std::time::Instant::now();
        let err = decode(&png_claiming(100_000, 100_000)).unwrap_err().0;
        assert_eq!(
            err,
            "image is 100000x100000, over the 178956970-pixel limit"
        );
        // Allocating the 30 GB the header asks for would take far longer than this (or abort).
        assert!(start.elapsed().as_secs() < 2);

        let err = decode(&png_claiming(u32::MAX >> 1, 1)).unwrap_err().0;
        assert!(err.starts_with("image too large"), "{err}");

        let small = encode(&DynamicImage::ImageRgb8(sample_rgb()), ImageFormat::Png);
        let err = decode_rgb8_bytes(&small, 5).unwrap_err().0;
        assert_eq!(err, "image is 3x2, over the 5-pixel limit");
        assert!(decode_rgb8_bytes(&small, 6).is_ok());
    }

    #[test]
    fn mangled_files_never_panic() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| {
            Rgb([x as u8 * 10, y as u8 * 15, (x + y) as u8])
        }));
        let mut encodings = vec![jpeg(&img.to_rgb8())];
        for format in [
            ImageFormat::Png,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::WebP,
            ImageFormat::Tiff,
        ] {
            encodings.push(encode(&img, format));
        }
        let mut crashes = Vec::new();
        for bytes in &encodings {
            for cut in (1..bytes.len()).step_by(7) {
                if let Err(e) = decode(&bytes[..cut]) {
                    assert!(!e.0.is_empty() && !e.0.contains('\n'));
                    if e.0.starts_with("decoder crashed") {
                        crashes.push(e.0);
                    }
                }
            }
            for pos in (8..bytes.len()).step_by(5) {
                let mut flipped = bytes.clone();
                flipped[pos] ^= 0x5A;
                if let Err(e) = decode(&flipped)
                    && e.0.starts_with("decoder crashed")
                {
                    crashes.push(e.0);
                }
            }
        }
        // A crash is caught, but the normal path for bad data should be an error.
        assert!(crashes.is_empty(), "{crashes:?}");
    }

    #[test]
    fn file_errors_have_reasons() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let reason = |path: &Path| decode_rgb8(path, DEFAULT_MAX_PIXELS).unwrap_err().0;

        fs::write(p("empty.jpg"), b"").unwrap();
        assert_eq!(reason(&p("empty.jpg")), "empty file");
        assert_eq!(reason(&p("missing.jpg")), "no such file");
        assert_eq!(reason(dir.path()), "is a directory");
        symlink(p("missing.jpg"), p("dangling.jpg")).unwrap();
        assert_eq!(reason(&p("dangling.jpg")), "broken symlink");
        symlink(p("loop_b"), p("loop_a")).unwrap();
        symlink(p("loop_a"), p("loop_b")).unwrap();
        assert_eq!(reason(&p("loop_a")), "symlink loop");
        // A socket stands in for FIFOs and devices, which would block or never end.
        let _socket = std::os::unix::net::UnixListener::bind(p("socket.jpg")).unwrap();
        assert_eq!(reason(&p("socket.jpg")), "not a regular file");
        fs::write(p("notes.jpg"), b"not a picture at all").unwrap();
        assert_eq!(
            reason(&p("notes.jpg")),
            "not an image (unrecognised format)"
        );

        // Root reads anything, so this check only means something for other users.
        let png = encode(&DynamicImage::ImageRgb8(sample_rgb()), ImageFormat::Png);
        fs::write(p("locked.png"), &png).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p("locked.png"), fs::Permissions::from_mode(0o000)).unwrap();
        if File::open(p("locked.png")).is_err() {
            assert_eq!(reason(&p("locked.png")), "permission denied");
        }
    }

    #[test]
    fn decodes_by_content_not_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("really_a_png.jpg");
        fs::write(
            &path,
            encode(&DynamicImage::ImageRgb8(sample_rgb()), ImageFormat::Png),
        )
        .unwrap();
        assert_eq!(
            decode_rgb8(&path, DEFAULT_MAX_PIXELS).unwrap(),
            sample_rgb()
        );
    }

    /// 7x5 gradient shared with the Pillow reference values below.
    fn gradient() -> RgbImage {
        RgbImage::from_fn(7, 5, |x, y| {
            Rgb([
                ((x * 37 + y * 91) % 256) as u8,
                ((x * x * 13 + y * 5) % 256) as u8,
                ((255 - x * 29 + y * y * 7) % 256) as u8,
            ])
        })
    }

    #[test]
    fn resize_matches_pillow_bilinear() {
        // numpy.asarray(Image.fromarray(gradient).resize(size, Image.BILINEAR)), Pillow 13.0.
        let cases: [((u32, u32), &[u8]); 3] = [
            (
                (3, 2),
                &[
                    99, 22, 173, 129, 119, 177, 129, 155, 118, 106, 32, 87, 118, 129, 148, 128,
                    165, 174,
                ],
            ),
            (
                (4, 3),
                &[
                    58, 10, 186, 116, 64, 198, 162, 157, 144, 137, 153, 99, 137, 18, 110, 88, 72,
                    185, 117, 165, 172, 132, 161, 127, 88, 26, 75, 146, 80, 60, 109, 173, 191, 126,
                    169, 187,
                ],
            ),
            (
                (2, 2),
                &[110, 56, 178, 131, 146, 138, 111, 66, 107, 123, 156, 169],
            ),
        ];
        for ((w, h), want) in cases {
            let got = resize_rgb8(&gradient(), w, h).unwrap();
            assert_eq!(got.dimensions(), (w, h));
            // fast_image_resize keeps 16-bit coefficients where Pillow keeps 22 bits, so an
            // occasional sample is one level off.
            let max = got
                .as_raw()
                .iter()
                .zip(want)
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(max <= Some(1), "{w}x{h}: {:?} vs {want:?}", got.as_raw());
        }
    }

    #[test]
    fn resize_edge_cases() {
        let img = gradient();
        assert_eq!(resize_rgb8(&img, 7, 5).unwrap(), img);
        let flat = RgbImage::from_pixel(40, 30, Rgb([9, 99, 199]));
        let small = resize_rgb8(&flat, 3, 11).unwrap();
        assert!(small.pixels().all(|p| p.0 == [9, 99, 199]));
        assert!(resize_rgb8(&img, 0, 10).is_err());
        assert!(resize_rgb8(&RgbImage::new(0, 0), 10, 10).is_err());
    }

    #[test]
    fn bgr_swaps_the_first_and_last_planes() {
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let pre = Preprocess {
            width: 2,
            height: 1,
            mean: [1.0, 2.0, 3.0],
            std: [2.0, 4.0, 8.0],
            resize: Resize::Stretch,
            channels: ChannelOrder::Bgr,
        };
        let mut out = vec![f32::NAN; pre.tensor_len()];
        to_chw(&img, &pre, &mut out);
        // Plane 0 is blue with mean[0]/std[0], plane 2 red with mean[2]/std[2].
        assert_eq!(out, [127.0, 14.5, 31.5, 4.5, -0.375, 0.875]);
    }

    #[test]
    fn spec_round_trips() {
        let pre = Preprocess {
            width: 224,
            height: 192,
            mean: [123.675, 116.28, 103.53],
            std: [58.395, 57.12, 57.375],
            resize: Resize::Crop,
            channels: ChannelOrder::Bgr,
        };
        let spec = pre.spec();
        assert_eq!(
            spec,
            "224x192_crop_BGR_mean123.675,116.28,103.53_std58.395,57.12,57.375"
        );
        assert_eq!(Preprocess::from_spec(&spec), Some(pre));
        assert_eq!(
            Preprocess::from_spec("224x224_crop_RGB_mean1,2_std1,2,3"),
            None
        );
    }

    #[test]
    fn crop_size_follows_torchvision() {
        // Resize(256) of a 500x375 landscape: the short side to 256, the long one int(256*500/375).
        assert_eq!(crop_resize_size((500, 375), (224, 224)), (341, 256));
        assert_eq!(crop_resize_size((375, 500), (224, 224)), (256, 341));
        assert_eq!(crop_resize_size((300, 300), (224, 224)), (256, 256));
        // Python's round(58.5) is 58 and round(17.5) is 18.
        assert_eq!(centre_offset(341, 224), 58);
        assert_eq!(centre_offset(259, 224), 18);
        assert_eq!(centre_offset(256, 224), 16);
    }

    #[test]
    fn crop_cuts_the_border_that_stretch_keeps() {
        // A 200x100 image, blue but for a red band on the left fifth: the crop's 18/36 of
        // the width starting at 10/36 never reaches it; the stretch does.
        let img = RgbImage::from_fn(200, 100, |x, _| {
            if x < 40 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let mut pre = Preprocess {
            width: 16,
            height: 16,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: Resize::Crop,
            channels: ChannelOrder::Rgb,
        };
        let cropped = preprocess_rgb8(&img, &pre).unwrap();
        assert!(
            cropped[..256].iter().all(|&r| r == 0.0),
            "red left in the crop"
        );
        assert!(cropped[512..].iter().all(|&b| b == 255.0));
        pre.resize = Resize::Stretch;
        let stretched = preprocess_rgb8(&img, &pre).unwrap();
        assert_eq!(stretched[0], 255.0);
    }

    #[test]
    fn to_chw_normalises_into_planes() {
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let pre = Preprocess {
            width: 2,
            height: 1,
            mean: [1.0, 2.0, 3.0],
            std: [2.0, 4.0, 8.0],
            resize: Resize::Stretch,
            channels: ChannelOrder::Rgb,
        };
        let mut out = vec![f32::NAN; pre.tensor_len()];
        to_chw(&img, &pre, &mut out);
        assert_eq!(out, [-0.5, 4.5, 31.5, 4.5, 31.5, 3.375]);
    }

    #[test]
    fn load_for_network_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flat.png");
        let flat = RgbImage::from_pixel(50, 20, Rgb([255, 0, 127]));
        fs::write(
            &path,
            encode(&DynamicImage::ImageRgb8(flat), ImageFormat::Png),
        )
        .unwrap();
        let pre = Preprocess {
            width: 6,
            height: 4,
            mean: [127.5; 3],
            std: [127.5; 3],
            resize: Resize::Stretch,
            channels: ChannelOrder::Rgb,
        };

        let v = load_for_network(&path, &pre, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(v.len(), 3 * 6 * 4);
        assert!(v[..24].iter().all(|&x| x == 1.0));
        assert!(v[24..48].iter().all(|&x| x == -1.0));
        assert!(v[48..].iter().all(|&x| (x + 0.5 / 127.5).abs() < 1e-6));

        let mut batch = vec![0f32; 2 * pre.tensor_len()];
        let (first, second) = batch.split_at_mut(pre.tensor_len());
        load_for_network_into(&path, &pre, DEFAULT_MAX_PIXELS, second).unwrap();
        assert_eq!(second, &v[..]);
        assert!(first.iter().all(|&x| x == 0.0));

        let err = load_for_network(&dir.path().join("nope.png"), &pre, DEFAULT_MAX_PIXELS);
        assert_eq!(err.unwrap_err().0, "no such file");
    }

    #[test]
    fn reasons_are_single_lowercase_lines() {
        assert_eq!(
            one_line("Invalid PNG signature.\n  more"),
            "invalid PNG signature. more"
        );
        assert_eq!(one_line("JPEG error."), "JPEG error");
        assert_eq!(one_line("  "), "");
        assert_eq!(one_line("\"Bogus Huffman table\""), "bogus Huffman table");
        assert_eq!(
            one_line("I/O errors Not enough bytes"),
            "I/O errors Not enough bytes"
        );
        assert_eq!(one_line("A"), "a");
    }
}
