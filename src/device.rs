//! Where the network runs: the CPU (burn-flex), or a GPU through burn's wgpu backend when dltool
//! is built with `--features wgpu`.
//!
//! A wgpu adapter of type `Cpu` (Mesa's llvmpipe, the only one on GPU-less Linux machines) is
//! refused: it is a software rasteriser, tens of times slower than burn-flex on the same cores.
//! `DLTOOL_WGPU_ALLOW_SOFTWARE=1` accepts it anyway, to test the wgpu path on such a machine.

use burn::tensor::Device;

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// burn-flex on the CPU.
    #[default]
    Cpu,
    /// A GPU through wgpu, or an error.
    Wgpu,
    /// A GPU through wgpu when there is one, else the CPU with a warning.
    Auto,
}

impl DeviceChoice {
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Wgpu => "wgpu",
            DeviceChoice::Auto => "auto",
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(format!(
                "unknown device '{other}' (expected cpu, wgpu or auto)"
            )),
        }
    }
}

/// Why a build without the `wgpu` feature cannot use a GPU.
pub const NO_GPU_SUPPORT: &str = "this dltool was built without GPU support: rebuild with \
                                  `cargo build --release --features wgpu`";

/// An opened device.
#[derive(Debug, Clone)]
pub struct Opened {
    pub device: Device,
    /// What it is, for the user: `cpu (burn-flex)`, `wgpu: NVIDIA H100 (Vulkan, DiscreteGpu)`.
    pub description: String,
    /// Set when `auto` fell back to the CPU: why, in one line.
    pub warning: Option<String>,
}

/// Opens what `choice` asks for without printing anything. `Err` is one line, for `wgpu` only:
/// `cpu` cannot fail and `auto` falls back.
pub fn select(choice: DeviceChoice) -> Result<Opened, String> {
    let cpu = |warning| Opened {
        device: Device::flex(),
        description: "cpu (burn-flex)".to_string(),
        warning,
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu(None)),
        DeviceChoice::Wgpu => {
            let (device, description) = gpu().map_err(|why| format!("--device wgpu: {why}"))?;
            Ok(Opened {
                device,
                description,
                warning: None,
            })
        }
        DeviceChoice::Auto => Ok(match gpu() {
            Ok((device, description)) => Opened {
                device,
                description,
                warning: None,
            },
            Err(why) => cpu(Some(format!("--device auto: {why}; running on the CPU"))),
        }),
    }
}

/// [`select`], with the fallback warning (if any) printed on stderr.
pub fn open(choice: DeviceChoice) -> Result<(Device, String), String> {
    let opened = select(choice)?;
    if let Some(warning) = &opened.warning {
        crate::note!("dltool: warning: {warning}");
    }
    Ok((opened.device, opened.description))
}

/// True for burn-flex, the device the in-tree CPU code paths are written for.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}

#[cfg(not(feature = "wgpu"))]
fn gpu() -> Result<(Device, String), String> {
    Err(NO_GPU_SUPPORT.to_string())
}

/// The wgpu device, opened once per process: the runtime refuses a second initialisation, and
/// `auto` in one command and `wgpu` in a test harness may both ask.
#[cfg(feature = "wgpu")]
fn gpu() -> Result<(Device, String), String> {
    static OPENED: std::sync::OnceLock<Result<(Device, String), String>> =
        std::sync::OnceLock::new();
    OPENED.get_or_init(open_wgpu).clone()
}

#[cfg(feature = "wgpu")]
fn open_wgpu() -> Result<(Device, String), String> {
    use burn::tensor::wgpu::wgpu::DeviceType;
    // The fallible initialiser reports a missing adapter as an error; the catch is only for a
    // driver or runtime bug that panics instead, so the user still gets one line.
    let (device, setup) = quiet_catch_unwind(|| Device::wgpu_options().init_with_setup())?
        .map_err(|e| format!("no usable GPU: {}", one_line(&e.to_string())))?;
    let info = setup.adapter.get_info();
    // The override exists to test the wgpu code path (kernels, numerics) on GPU-less machines.
    let allow_software = std::env::var_os("DLTOOL_WGPU_ALLOW_SOFTWARE").is_some_and(|v| v == "1");
    if info.device_type == DeviceType::Cpu && !allow_software {
        return Err(format!(
            "no GPU found: the only wgpu adapter is '{}', a software renderer running on the CPU \
             (slower than --device cpu)",
            info.name
        ));
    }
    Ok((
        device,
        format!(
            "wgpu: {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        ),
    ))
}

/// Runs `f`, turning a panic into `Err` with its message and without the default hook's
/// multi-line report.
#[cfg(feature = "wgpu")]
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".to_string());
        format!("the wgpu runtime failed to start: {}", one_line(&msg))
    })
}

#[cfg(feature = "wgpu")]
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_name_themselves() {
        for choice in [DeviceChoice::Cpu, DeviceChoice::Wgpu, DeviceChoice::Auto] {
            assert_eq!(choice.name().parse::<DeviceChoice>(), Ok(choice));
        }
        let err = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(
            err.contains("'gpu'") && err.contains("cpu, wgpu or auto"),
            "{err}"
        );
    }

    #[test]
    fn cpu_is_flex_without_warning() {
        let opened = select(DeviceChoice::Cpu).unwrap();
        assert!(is_cpu(&opened.device));
        assert!(opened.warning.is_none());
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn without_the_feature_wgpu_fails_and_auto_falls_back() {
        let err = select(DeviceChoice::Wgpu).unwrap_err();
        assert_eq!(err, format!("--device wgpu: {NO_GPU_SUPPORT}"));
        let auto = select(DeviceChoice::Auto).unwrap();
        assert!(is_cpu(&auto.device));
        let warning = auto.warning.expect("auto says why it fell back");
        assert!(warning.contains("without GPU support"), "{warning}");
        assert!(!warning.contains('\n'));
    }

    /// With the feature, `wgpu` and `auto` agree: both on the same GPU, or `wgpu` refused (one
    /// line) and `auto` on the CPU saying the same reason.
    #[cfg(feature = "wgpu")]
    #[test]
    fn with_the_feature_auto_follows_wgpu() {
        let auto = select(DeviceChoice::Auto).unwrap();
        match select(DeviceChoice::Wgpu) {
            Ok(gpu) => {
                assert!(!is_cpu(&gpu.device));
                assert_eq!(gpu.device, auto.device);
                assert!(auto.warning.is_none());
            }
            Err(err) => {
                assert!(!err.contains('\n'), "{err}");
                assert!(is_cpu(&auto.device));
                let warning = auto.warning.expect("auto says why it fell back");
                let why = err.strip_prefix("--device wgpu: ").unwrap();
                assert!(warning.contains(why), "{warning} / {err}");
            }
        }
    }
}
