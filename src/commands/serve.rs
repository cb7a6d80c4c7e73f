//! `dltool serve`: a head (or a network alone) behind HTTP, with dynamic batching.

use super::Status;
use crate::head::Head;
use crate::serve::{Config, Network, batcher::Batching};
use anyhow::bail;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
#[command(
    mut_arg("batch_size", |a| a
        .long("max-batch")
        .value_name("N")
        .default_value("16")
        .help("Most images in the network at once: images of concurrent requests are run \
               together up to this many, shared out among the threads (each thread decodes and \
               runs its own batch)")),
    after_help = "\
Endpoints (JSON answers; errors are {\"error\": {\"kind\", \"message\"}}):
  POST /v1/predict[?top_k=K]  the image as the body (any format featurize reads), or several as \
multipart/form-data: {\"prediction\", \"probability\", \"probabilities\": {class: p}} (with top_k: \
\"top\": [{\"class\", \"probability\"}]); multipart gives {\"results\": [{\"file\", ...}]}
  POST /v1/featurize          {\"features\": [...], \"dim\"}
  POST /v1/classify[?top_k=K] the pretrained classifier: {\"top\": [{\"synset\", \"name\", \"probability\"}]}
  GET  /v1/model              the head's classes and provenance, the network, the limits
  GET  /healthz, /readyz      alive; ready once the network is loaded (503 before and while stopping)
  GET  /metrics               Prometheus text: requests, errors by kind, batch sizes, latencies, queue depth

Limits: a body over --max-body is answered 413; more than --queue images in the server at once, \
503 with Retry-After; a request over --timeout-ms, 503; an image that does not decode, 422 naming \
the problem. SIGTERM or Ctrl-C stops accepting, answers what is in flight and exits 0. Logs: one \
JSON object per line on stderr. The bound address is printed on stdout (`listening on \
http://ADDR`), so `--listen 127.0.0.1:0` lets the OS pick a port.

With a HEAD, images go through the head's own network (as `dltool predict HEAD` does, with the \
same numbers); weights whose SHA-256 differs from the head's are refused.")]
pub struct Args {
    /// Head file written by train-head [default: no head: features and ImageNet classes only].
    #[arg(value_name = "HEAD")]
    pub head: Option<PathBuf>,

    /// Address to listen on; anything but loopback exposes the model to the network.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// The network (without a HEAD), or the HEAD's weights when they are not where featurize
    /// finds them (they must be the head's).
    #[command(flatten)]
    pub net: super::NetworkChoice,

    /// Class names of the pretrained classifier, for /v1/classify [default: next to the weights].
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,

    /// Longest wait for more images once one is ready, before its batch runs anyway; only
    /// while requests have overlapped within the last second (a lone client never waits).
    #[arg(long, default_value_t = 2, value_name = "MS")]
    pub max_wait_ms: u64,

    /// Images admitted at most (decoding, waiting or in the network); beyond, 503.
    #[arg(long, default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue: u32,

    /// Largest request body in bytes; beyond, 413.
    #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
    pub max_body: usize,

    /// Longest time one request may take, in milliseconds; beyond, 503.
    #[arg(long, default_value_t = 30_000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// Threads for the HTTP connections (decoding and the network have their own).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub http_threads: u32,

    #[command(flatten)]
    pub run: super::NetworkArgs,
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    let network = match &args.head {
        Some(path) => {
            if !args.net.backbone.is_empty() || args.net.variant.is_some() {
                bail!(
                    "--backbone and --variant are for a server without a HEAD: a head runs on \
                     the network it was trained on"
                );
            }
            // Read before listening: a wrong path is a usage error, not a server that never
            // gets ready.
            let head = Head::load(path).map_err(anyhow::Error::msg)?;
            Network::Head {
                path: path.clone(),
                head: Box::new(head),
                weights: args.net.weights.clone().map(|w| w.0).unwrap_or_default(),
                onnx_limits: args.net.onnx.limits.limits(),
            }
        }
        None => Network::Backbone(args.net.options()?),
    };
    if args.max_body == 0 {
        bail!("--max-body must be at least 1 byte");
    }
    let config = Config {
        listen: args.listen,
        batching: Batching {
            max_batch: args.run.batch_size as usize,
            max_wait: Duration::from_millis(args.max_wait_ms),
        },
        queue: args.queue as usize,
        max_body: args.max_body,
        timeout: Duration::from_millis(args.timeout_ms),
        max_pixels: args.run.max_pixels,
        device: args.run.device,
        labels: args.labels.clone(),
        http_threads: args.http_threads as usize,
    };
    crate::serve::serve(config, network, |addr| {
        // A script (or a test) that asked for port 0 reads the port here.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })?;
    Ok(Status::Ok)
}
