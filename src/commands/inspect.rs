//! `dltool inspect`: what a network offers to read features from, with shapes: an ONNX file's
//! input, outputs and nodes, or a built-in network's layers.

use super::Status;
use crate::onnx_net::{self, OnnxModel};
use anyhow::bail;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
For an ONNX file: the input (name, layout, height x width), the graph outputs, then every node \
whose output is a float tensor, as `node  op  tensor  shape`; --layer takes the node name or \
the tensor name. Shapes are per image (the batch axis left out); a `?` shape is one shape \
inference could not find for this input size. Shape plumbing (int64 Shape/Gather chains) and \
Constant nodes are left out.

For a built-in network (inception_v3, mobilenet_v1): its layers and their shapes.")]
pub struct Args {
    /// An ONNX model file, or a built-in network name.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// Input height and width, for a model whose input size is symbolic.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub size: Option<u32>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub limits: super::OnnxLimitArgs,
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    let path = PathBuf::from(&args.model);
    if !path.exists() {
        return builtin(&args);
    }
    let model = OnnxModel::open(&path, &args.limits.limits())?;
    let nodes = model.nodes(args.size)?;
    let (h, w) = model.resolve_size(args.size)?;
    let input = &model.input;
    if args.json {
        let json = serde_json::json!({
            "model": path,
            "input": {
                "name": input.name,
                "layout": input.layout.name(),
                "batch": input.batch.to_string(),
                "height": h,
                "width": w,
            },
            "outputs": model.outputs,
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(Status::Ok);
    }
    println!("model: {}", path.display());
    let shape = match input.layout {
        onnx_net::Layout::Nchw => format!("[{},3,{h},{w}]", input.batch),
        onnx_net::Layout::Nhwc => format!("[{},{h},{w},3]", input.batch),
    };
    println!("input: {} {shape} ({})", input.name, input.layout.name());
    println!("outputs: {}", model.outputs.join(", "));
    println!("nodes ({}):", nodes.len());
    for n in &nodes {
        let shape = n.shape.as_ref().map_or_else(
            || "?".to_string(),
            |s| {
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            },
        );
        if n.node == n.tensor {
            println!("  {}  {}  {shape}", n.node, n.op);
        } else {
            println!("  {}  {}  {}  {shape}", n.node, n.op, n.tensor);
        }
    }
    Ok(Status::Ok)
}

/// Layers of the networks dltool ships, from the network table.
fn builtin(args: &Args) -> anyhow::Result<Status> {
    let builtins: Vec<&str> = crate::backbones::NETWORKS
        .iter()
        .filter(|s| !s.layers.is_empty())
        .map(|s| s.name)
        .collect();
    let Some(spec) = crate::backbones::find(&args.model).filter(|s| !s.layers.is_empty()) else {
        bail!(
            "{}: no such file, and not a built-in network ({})",
            args.model,
            builtins.join(", ")
        );
    };
    let layers: Vec<(String, String)> = spec
        .layers
        .iter()
        .map(|l| {
            let shape = l.shape.map_or_else(
                || "depends on the weight file".to_string(),
                |[c, h, w]| format!("{c}x{h}x{w}"),
            );
            (l.name.to_string(), shape)
        })
        .collect();
    let [h, w] = spec.input;
    if args.json {
        let json = serde_json::json!({
            "network": spec.name,
            "input": {"height": h, "width": w},
            "default_layer": spec.default_layer,
            "layers": layers
                .iter()
                .map(|(n, s)| serde_json::json!({"layer": n, "shape": s}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("network: {} ({})", spec.name, spec.title);
        println!("input: {h}x{w} (default weights)");
        println!("layers ({}, default {}):", layers.len(), spec.default_layer);
        for (name, shape) in &layers {
            println!("  {name}  {shape}");
        }
    }
    Ok(Status::Ok)
}
