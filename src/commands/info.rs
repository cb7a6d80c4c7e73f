//! `dltool info`: this build and this machine, as the engine sees them.

use super::Status;
use std::io::Write;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    let info = crate::info::gather();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
        return Ok(Status::Ok);
    }
    let features = if info.features.is_empty() {
        "none (CPU only)".to_string()
    } else {
        info.features.join(", ")
    };
    writeln!(out, "dltool {}", info.version)?;
    writeln!(out, "build features: {features}")?;
    let detected: Vec<String> = info
        .cpu
        .detected
        .iter()
        .map(|(name, on)| format!("{name} {}", if *on { "yes" } else { "no" }))
        .collect();
    writeln!(out, "cpu: {} ({})", info.cpu.arch, detected.join(", "))?;
    for k in &info.cpu.kernels {
        writeln!(out, "  {}: {}", k.name, k.path)?;
    }
    writeln!(
        out,
        "threads: {} in the pool, {} available",
        info.threads.pool, info.threads.available
    )?;
    if info.gpu.adapters.is_empty() {
        let why = info.gpu.note.as_deref().unwrap_or("none found");
        writeln!(out, "gpu: {why}")?;
    } else {
        writeln!(out, "gpu adapters:")?;
        for a in &info.gpu.adapters {
            writeln!(out, "  {} ({}, {})", a.name, a.backend, a.device_type)?;
        }
    }
    let w = &info.weights;
    match &w.cache {
        Some(dir) => writeln!(out, "weights cache: {}", dir.display())?,
        None => writeln!(out, "weights cache: none (set DLTOOL_HOME)")?,
    }
    if w.offline {
        writeln!(out, "  downloads off (--offline or DLTOOL_OFFLINE)")?;
    }
    if let Some(m) = &w.mirror {
        writeln!(out, "  mirror: {m}")?;
    }
    for e in &w.entries {
        let state = match e.bytes {
            Some(n) => format!("cached, {}", crate::registry::human_bytes(n)),
            None => "not cached".to_string(),
        };
        let hashed = if e.hashed { ", hashed" } else { "" };
        writeln!(
            out,
            "  {:<26} {:<20} {state}{hashed} (known hash: {})",
            e.name, e.backbone, e.checks
        )?;
    }
    for name in &w.other {
        writeln!(out, "  {name} (not a registry entry)")?;
    }
    out.flush()?;
    Ok(Status::Ok)
}
