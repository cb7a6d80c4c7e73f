//! `dltool serve`: a head (with its network) or a network alone behind HTTP.
//!
//! Two kinds of threads, so that neither starves the other:
//! - a small tokio runtime does the HTTP I/O (axum on hyper): accepting, reading bodies,
//!   writing answers; it never decodes or runs a network;
//! - the batching loops, one per thread of rayon's pool on the CPU (see [`batcher`]), each
//!   gathering the images of concurrent requests into a batch, decoding and resizing them
//!   (the decode path of `featurize` and `predict`, from bytes instead of files) and running
//!   the network over them on its own thread, as `featurize`'s pipelines do; a batch that
//!   finds no other running takes the whole pool (a lone image every core, several images
//!   one group per thread).
//!
//! Admission is bounded: at most `queue` images are in the server at once (decoding, waiting
//! or in the network); beyond that a request gets 503 with `Retry-After` at once, so a
//! burst costs the clients a retry, not the server its memory.

pub mod batcher;
mod http;
pub mod log;
pub mod metrics;

use crate::backbone::{Backbone, BackboneOptions};
use crate::device::DeviceChoice;
use crate::head::Head;
use crate::image_io;
use crate::labels::Label;
use batcher::{Batching, Msg, Task};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

/// What the server runs.
pub enum Network {
    /// A head from `train-head`, on the network its provenance names.
    Head {
        path: PathBuf,
        head: Box<Head>,
        /// `--weights`: the backbone's weights, when not where featurize finds them.
        weights: Vec<PathBuf>,
        /// How large and slow an ONNX model the head names may be.
        onnx_limits: crate::onnx_net::Limits,
    },
    /// A network alone: features and, when the weights carry one, the ImageNet classifier.
    Backbone(BackboneOptions),
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub batching: Batching,
    /// Images admitted at most (decoding, waiting or in the network).
    pub queue: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Longest time a request may take, from its first byte to its answer.
    pub timeout: Duration,
    /// Decompression-bomb guard, as featurize's `--max-pixels`.
    pub max_pixels: u64,
    pub device: DeviceChoice,
    /// Class names of the pretrained classifier (`/v1/classify`) [default: next to the weights].
    pub labels: Option<PathBuf>,
    /// Threads of the HTTP runtime.
    pub http_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Load(String),
    #[error("the server stopped: {0}")]
    Serve(std::io::Error),
}

/// What is known once the network is loaded.
pub(crate) struct Loaded {
    pub head: Option<Arc<Head>>,
    /// The classifier's labels, or why `/v1/classify` cannot answer.
    pub labels: Result<Vec<Label>, String>,
    /// `GET /v1/model`.
    pub info: serde_json::Value,
}

/// Shared by every request.
pub(crate) struct State {
    pub config: Config,
    pub loaded: OnceLock<Arc<Loaded>>,
    pub admission: Arc<tokio::sync::Semaphore>,
    pub jobs: mpsc::Sender<Msg>,
    pub metrics: metrics::Metrics,
    /// Whether images have lately overlapped: the batching loops wait for more only then.
    pub company: batcher::Company,
    /// Set by SIGTERM/Ctrl-C: `/readyz` says 503 so a balancer stops sending.
    pub draining: AtomicBool,
    /// Why the network could not be loaded; the server then stops.
    pub load_error: Mutex<Option<String>>,
    pub load_failed: tokio::sync::Notify,
}

impl State {
    fn new(config: Config, jobs: mpsc::Sender<Msg>) -> Self {
        Self {
            admission: Arc::new(tokio::sync::Semaphore::new(config.queue)),
            config,
            loaded: OnceLock::new(),
            jobs,
            metrics: metrics::Metrics::default(),
            company: batcher::Company::default(),
            draining: AtomicBool::new(false),
            load_error: Mutex::new(None),
            load_failed: tokio::sync::Notify::new(),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.config.queue - self.admission.available_permits()
    }
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting, answers what is in flight and
/// returns. `on_listening` gets the bound address (the port the OS picked for `:0`) as soon
/// as connections are accepted; the network loads meanwhile and `/readyz` says when it is.
pub fn serve(
    config: Config,
    network: Network,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http_threads.max(1))
        .thread_name("dltool-http")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    // A panic is caught and answered 500 (see `http::observe`, `batcher::run`); its report goes
    // to the log as one JSON line like every other, not as the default hook's free text.
    std::panic::set_hook(Box::new(|info| {
        let message = batcher::panic_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        log::event(
            "error",
            "panic",
            json!({"message": message, "location": location}),
        );
    }));
    let (tx, rx) = mpsc::channel::<Msg>();
    let state = Arc::new(State::new(config.clone(), tx.clone()));

    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;

    let network_thread = {
        let state = state.clone();
        std::thread::Builder::new()
            .name("dltool-network".into())
            .spawn(move || network_loop(&state, network, rx))
            .map_err(ServeError::Runtime)?
    };

    log::event(
        "info",
        "listening",
        json!({"addr": addr.to_string(), "queue": config.queue,
               "max_batch": config.batching.max_batch,
               "max_wait_ms": config.batching.max_wait.as_secs_f64() * 1e3}),
    );
    on_listening(addr);

    let app = http::router(state.clone());
    let served = runtime.block_on(async {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal(state.clone()))
            .await
    });
    // Every connection is closed and every request answered: the network has nothing left.
    let _ = tx.send(Msg::Stop);
    let _ = network_thread.join();
    drop(runtime);
    served.map_err(ServeError::Serve)?;
    if let Some(reason) = state.load_error.lock().expect("lock").take() {
        return Err(ServeError::Load(reason));
    }
    log::event("info", "stopped", json!({}));
    Ok(())
}

/// Resolves on SIGTERM, Ctrl-C (SIGINT), or a network that failed to load.
async fn shutdown_signal(state: Arc<State>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let reason = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => "SIGTERM",
        _ = state.load_failed.notified() => "the network failed to load",
    };
    state.draining.store(true, Ordering::SeqCst);
    log::event(
        "info",
        "shutdown",
        json!({"reason": reason, "in_flight_images": state.queue_depth()}),
    );
}

/// The network thread: loads the network, says so, then runs batches until told to stop.
fn network_loop(state: &State, network: Network, rx: mpsc::Receiver<Msg>) {
    let started = std::time::Instant::now();
    let loaded = crate::device::open(state.config.device)
        .map_err(anyhow::Error::msg)
        .and_then(|(device, _)| load(&state.config, network, device));
    let (backbone, loaded) = match loaded {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("{e:#}");
            log::event("error", "load_failed", json!({"error": reason}));
            *state.load_error.lock().expect("lock") = Some(reason);
            // notify_one keeps the permit if the shutdown future is not polled yet.
            state.load_failed.notify_one();
            return;
        }
    };
    log::event(
        "info",
        "ready",
        json!({"network": loaded.info["network"]["backbone"],
               "load_seconds": started.elapsed().as_secs_f64()}),
    );
    let (pre, max_pixels) = (backbone.preprocess, state.config.max_pixels);
    let _ = state.loaded.set(Arc::new(loaded));
    // A GPU runs one batch at a time: one loop, which decodes on the whole pool.
    let loops = if backbone.is_cpu() {
        rayon::current_num_threads()
    } else {
        1
    };
    batcher::run(
        rx,
        state.config.batching,
        &state.company,
        &state.metrics,
        loops,
        |bytes| {
            image_io::decode_rgb8_bytes(bytes, max_pixels)
                .and_then(|img| image_io::preprocess_rgb8(&img, &pre))
                .map_err(|e| e.0)
        },
        |task, pixels, n| match task {
            Task::Features => Ok(backbone.features(pixels, n)),
            Task::Classify => backbone
                .classify(pixels, n)
                .ok_or_else(|| "the network has no classifier".to_string()),
        },
    );
}

fn load(
    config: &Config,
    network: Network,
    device: burn::prelude::Device,
) -> anyhow::Result<(Backbone, Loaded)> {
    let (backbone, head, head_path) = match network {
        Network::Head {
            path,
            head,
            weights,
            onnx_limits,
        } => {
            let mut set =
                crate::model::backbone_for_head(&head, &path, &weights, onnx_limits, device)?;
            if set.parts.len() != 1 {
                anyhow::bail!(
                    "{}: the head was trained on the features of {} networks ({}); serve runs                      heads of one network for now (`dltool predict` runs this one)",
                    path.display(),
                    set.parts.len(),
                    set.meta.backbone
                );
            }
            (set.parts.remove(0), Some(Arc::new(*head)), Some(path))
        }
        Network::Backbone(opts) => (Backbone::load(&opts, device)?, None, None),
    };
    let labels = classifier_labels(config, &backbone);
    let m = &backbone.meta;
    let info = json!({
        "head": head.as_ref().map(|h| json!({
            "path": head_path.as_ref().map(|p| p.display().to_string()),
            "model": h.model.kind(),
            "classes": h.classes,
            "feature_dim": h.feature_dim,
            "provenance": h.provenance,
            "dltool_version": h.dltool_version,
            "training": h.training,
        })),
        "network": {
            "backbone": m.backbone,
            "weights": backbone.weights_path.display().to_string(),
            "weights_sha256": m.weights_sha256,
            "layer": m.layer,
            "pool": m.pool,
            "tta": m.tta,
            "input": {"width": backbone.preprocess.width, "height": backbone.preprocess.height},
            "feature_dim": backbone.dim(),
            "classifier_classes": backbone.num_classes(),
        },
        "endpoints": {
            "predict": head.is_some(),
            "featurize": true,
            "classify": labels.is_ok(),
        },
        "limits": {
            "max_batch": config.batching.max_batch,
            "max_wait_ms": config.batching.max_wait.as_secs_f64() * 1e3,
            "queue": config.queue,
            "max_body_bytes": config.max_body,
            "timeout_ms": config.timeout.as_millis() as u64,
            "max_pixels": config.max_pixels,
        },
        "dltool_version": env!("CARGO_PKG_VERSION"),
    });
    let loaded = Loaded { head, labels, info };
    Ok((backbone, loaded))
}

/// The classifier's labels, or why there are none (no classifier, no labels file, a file of
/// another length): `/v1/classify` answers with that reason.
fn classifier_labels(config: &Config, backbone: &Backbone) -> Result<Vec<Label>, String> {
    let Some(classes) = backbone.num_classes() else {
        return Err(format!(
            "{}: these {} weights have no classifier (they end at the pooled features)",
            backbone.weights_path.display(),
            backbone.kind.name()
        ));
    };
    let path = crate::labels::resolve(config.labels.as_deref(), &backbone.weights_path)?;
    let labels = crate::labels::read(&path)?;
    if labels.len() != classes {
        return Err(format!(
            "{}: {} labels, but the classifier has {classes} outputs: start the server with \
             the --labels file made for these weights",
            path.display(),
            labels.len()
        ));
    }
    Ok(labels)
}

#[cfg(test)]
fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        batching: Batching {
            max_batch: 4,
            max_wait: Duration::from_millis(1),
        },
        queue: 8,
        max_body: 1 << 20,
        timeout: Duration::from_secs(5),
        max_pixels: crate::image_io::DEFAULT_MAX_PIXELS,
        device: DeviceChoice::Cpu,
        labels: None,
        http_threads: 1,
    }
}
