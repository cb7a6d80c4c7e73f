//! Routes, request bodies, JSON answers and errors.

use super::batcher::{Failure, Job, Msg, Reply, Task};
use super::{State, log};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::oneshot;

pub(crate) fn router(state: Arc<State>) -> Router {
    let routes = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/featurize", post(featurize))
        .route("/v1/classify", post(classify))
        .route("/v1/model", get(model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found);
    guarded(routes, state)
}

/// `routes` with the body limit and [`observe`] around every request.
fn guarded(routes: Router<Arc<State>>, state: Arc<State>) -> Router {
    routes
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

type AppState = axum::extract::State<Arc<State>>;

/// A JSON answer (axum's own needs serde_json's `raw_value`, which would rebuild every crate
/// that uses serde_json).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// An answer that is not a success: `{"error": {"kind", "message"}}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

/// The error kind of a response, for the metrics and the log.
#[derive(Debug, Clone, Copy)]
struct ErrorKind(&'static str);

/// Images a request carried, for the log.
#[derive(Debug, Clone, Copy)]
struct Images(usize);

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the network is still loading; GET /readyz says when it is ready",
        )
    }

    /// A body rejection of axum (too large, unreadable) in our JSON.
    fn from_rejection(status: StatusCode, text: String, max_body: usize) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                status,
                "too_large",
                format!("the body is larger than the server's --max-body ({max_body} bytes)"),
            )
        } else {
            Self::new(status, "bad_request", text)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"kind": self.kind, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Queue full, still loading, shutting down: all pass in about a second.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp.extensions_mut().insert(ErrorKind(self.kind));
        resp
    }
}

/// Route names for the metrics: a fixed set, whatever paths clients try.
fn endpoint(path: &str) -> &'static str {
    match path {
        "/v1/predict" => "/v1/predict",
        "/v1/featurize" => "/v1/featurize",
        "/v1/classify" => "/v1/classify",
        "/v1/model" => "/v1/model",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// Around every request: runs it as a task of its own so that a panic costs only that request
/// (answered 500), bounds its time, counts it and logs it in one line.
async fn observe(state: AppState, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let timeout = state.config.timeout;
    let task = tokio::spawn(tokio::time::timeout(timeout, next.run(req)));
    let resp = match task.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(_elapsed)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than the server's --timeout-ms ({} ms)",
                timeout.as_millis()
            ),
        )
        .into_response(),
        Err(join) => {
            let message = if join.is_panic() {
                super::batcher::panic_text(join.into_panic().as_ref())
            } else {
                "the request was cancelled".to_string()
            };
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("internal error: {message}"),
            )
            .into_response()
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let status = resp.status();
    let kind = resp.extensions().get::<ErrorKind>().map(|k| k.0);
    let images = resp.extensions().get::<Images>().map(|i| i.0);
    state
        .metrics
        .request(endpoint(&path), status.as_u16(), seconds);
    if let Some(kind) = kind {
        state.metrics.error(kind);
    }
    let level = if status.is_server_error() {
        "error"
    } else if status.is_client_error() {
        "warn"
    } else {
        "info"
    };
    log::event(
        level,
        "request",
        json!({"method": method.as_str(), "path": path, "status": status.as_u16(),
               "ms": (seconds * 1e4).round() / 10.0, "images": images, "error": kind}),
    );
    resp
}

async fn not_found(state: AppState, req: Request) -> ApiError {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // Read (and drop) what the client sends, so that it gets this answer; see `predict`.
    let _ = axum::body::to_bytes(req.into_body(), state.config.max_body).await;
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route {} {}: POST /v1/predict, /v1/featurize, /v1/classify; GET /v1/model, \
             /healthz, /readyz, /metrics",
            method, path
        ),
    )
}

async fn healthz() -> Json {
    Json(json!({"status": "ok"}))
}

async fn readyz(state: AppState) -> Result<Json, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    state.loaded.get().ok_or_else(ApiError::not_ready)?;
    Ok(Json(json!({"status": "ready"})))
}

async fn metrics(state: AppState) -> Response {
    let text = state.metrics.render(
        state.queue_depth(),
        state.config.queue,
        state.loaded.get().is_some(),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn model(state: AppState) -> Result<Json, ApiError> {
    let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?;
    Ok(Json(loaded.info.clone()))
}

/// `?top_k=K`, the only query parameter.
fn parse_top_k(query: Option<&str>) -> Result<Option<usize>, ApiError> {
    let mut top_k = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "top_k" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter '{key}' (the only one is top_k)"
            )));
        }
        match value.parse::<usize>() {
            Ok(k) if k >= 1 => top_k = Some(k),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "top_k must be a whole number of at least 1, not '{value}'"
                )));
            }
        }
    }
    Ok(top_k)
}

/// One image of a request: the multipart file name (or field name), and its bytes.
struct Upload {
    name: Option<String>,
    bytes: Bytes,
}

/// The images of a request: its whole body, or each part of a `multipart/form-data` body.
/// Returns them with whether the body was multipart (which shapes the answer).
async fn read_images(state: &Arc<State>, req: Request) -> Result<(Vec<Upload>, bool), ApiError> {
    let limit = state.config.max_body;
    // Refused from the headers: a huge upload is not read only to be dropped.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::from_rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            String::new(),
            limit,
        ));
    }
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if !multipart {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rej| ApiError::from_rejection(rej.status(), rej.body_text(), limit))?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "empty body: send the image file as the body, or several as multipart/form-data",
            ));
        }
        return Ok((vec![Upload { name: None, bytes }], false));
    }
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|rej| ApiError::from_rejection(rej.status(), rej.body_text(), limit))?;
    let mut uploads = Vec::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(ApiError::from_rejection(e.status(), e.body_text(), limit)),
        };
        let name = field
            .file_name()
            .or_else(|| field.name())
            .map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::from_rejection(e.status(), e.body_text(), limit))?;
        uploads.push(Upload { name, bytes });
    }
    if uploads.is_empty() {
        return Err(ApiError::bad_request(
            "the multipart body holds no file: send each image as a part",
        ));
    }
    Ok((uploads, true))
}

/// Admits the images of a request and hands them to the batching loops, which decode and run
/// them; one result per image, in order.
async fn run_images(
    state: &Arc<State>,
    uploads: &[Upload],
    task: Task,
) -> Result<Vec<Reply>, ApiError> {
    let n = uploads.len();
    if n > state.config.queue {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_images",
            format!(
                "{n} images in one request, but the server admits {} at a time (--queue)",
                state.config.queue
            ),
        ));
    }
    // Held until every image of the request is answered: the queue depth counts it.
    let _permit = state
        .admission
        .clone()
        .try_acquire_many_owned(n as u32)
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!(
                    "the server is busy ({} images queued, --queue {}): retry later",
                    state.queue_depth(),
                    state.config.queue
                ),
            )
        })?;
    // Whether the batching loops should wait for more images (see `batcher::Company`): told
    // as the request comes and as it goes, with however many images are in the server then.
    state.company.saw(state.queue_depth());
    let mut pending = Vec::with_capacity(n);
    for upload in uploads {
        let (tx, rx) = oneshot::channel::<Reply>();
        // If the batching loops are gone (shutting down), the job is dropped with `tx`, and
        // the request sees that.
        let _ = state.jobs.send(Msg::Job(Job {
            bytes: upload.bytes.clone(),
            task,
            reply: tx,
        }));
        pending.push(rx);
    }
    let mut replies = Vec::with_capacity(n);
    for rx in pending {
        replies.push(rx.await.unwrap_or_else(|_| {
            Err(Failure::Internal(
                "the network stopped before answering (the server is shutting down)".into(),
            ))
        }));
    }
    state.company.saw(state.queue_depth());
    Ok(replies)
}

/// How to turn one image's network output into its JSON object.
type Render<'a> = dyn Fn(&[f32]) -> serde_json::Map<String, Value> + Send + Sync + 'a;

/// The status, kind and reason of an image that got no result.
fn failure(f: &Failure) -> (StatusCode, &'static str, &str) {
    match f {
        Failure::BadImage(reason) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_image", reason),
        Failure::Internal(reason) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", reason),
    }
}

/// The common path of the image endpoints: read, admit, run, answer.
async fn answer(
    state: &Arc<State>,
    (uploads, multipart): (Vec<Upload>, bool),
    task: Task,
    render: &Render<'_>,
) -> Result<Response, ApiError> {
    let replies = run_images(state, &uploads, task).await?;
    let n = uploads.len();
    if !multipart {
        let mut resp = match &replies[0] {
            Ok(out) => Json(Value::Object(render(out))).into_response(),
            Err(f) => {
                let (status, kind, reason) = failure(f);
                let what = if kind == "bad_image" {
                    "the body is not a usable image"
                } else {
                    "internal error"
                };
                ApiError::new(status, kind, format!("{what}: {reason}")).into_response()
            }
        };
        resp.extensions_mut().insert(Images(1));
        return Ok(resp);
    }
    // Multipart: one entry per part, in order; a bad image fails its entry only. The status
    // is 200 when at least one image went through, else the first failure's.
    let mut results = Vec::with_capacity(n);
    let mut first_failure = None;
    let mut ok = 0;
    for (upload, reply) in uploads.iter().zip(&replies) {
        let mut entry = serde_json::Map::new();
        entry.insert("file".into(), json!(upload.name));
        match reply {
            Ok(out) => {
                entry.extend(render(out));
                ok += 1;
            }
            Err(f) => {
                let (status, kind, reason) = failure(f);
                state.metrics.error(kind);
                let name = upload.name.as_deref().unwrap_or("(unnamed part)");
                let message = format!("{name}: {reason}");
                entry.insert("error".into(), json!({"kind": kind, "message": message}));
                first_failure.get_or_insert((status, kind, message));
            }
        }
        results.push(Value::Object(entry));
    }
    let body = Json(json!({"results": results}));
    let mut resp = match first_failure {
        Some((status, kind, _)) if ok == 0 => {
            let mut r = (status, body).into_response();
            r.extensions_mut().insert(ErrorKind(kind));
            r
        }
        _ => body.into_response(),
    };
    resp.extensions_mut().insert(Images(n));
    Ok(resp)
}

// Each image endpoint reads the body before anything can refuse the request: a client that
// writes its whole body before reading (most do) must get the answer, not a reset connection.

async fn predict(state: AppState, req: Request) -> Result<Response, ApiError> {
    let query = req.uri().query().map(str::to_string);
    let images = read_images(&state, req).await?;
    let top_k = parse_top_k(query.as_deref())?;
    let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?.clone();
    let Some(head) = loaded.head.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_head",
            "this server runs a network without a head: start it with a HEAD file for \
             /v1/predict, or use /v1/featurize and /v1/classify",
        ));
    };
    // The head applied to one feature row at a time, as `dltool predict` does.
    let render = move |features: &[f32]| {
        let probs = head.predict_proba(features, 1);
        crate::model::prediction_json(&head.classes, &probs, top_k)
    };
    answer(&state, images, Task::Features, &render).await
}

async fn featurize(state: AppState, req: Request) -> Result<Response, ApiError> {
    let query = req.uri().query().map(str::to_string);
    let images = read_images(&state, req).await?;
    if parse_top_k(query.as_deref())?.is_some() {
        return Err(ApiError::bad_request(
            "top_k is for /v1/predict and /v1/classify",
        ));
    }
    state.loaded.get().ok_or_else(ApiError::not_ready)?;
    let render = |features: &[f32]| {
        let mut v = serde_json::Map::new();
        v.insert("features".into(), json!(features));
        v.insert("dim".into(), json!(features.len()));
        v
    };
    answer(&state, images, Task::Features, &render).await
}

async fn classify(state: AppState, req: Request) -> Result<Response, ApiError> {
    let query = req.uri().query().map(str::to_string);
    let images = read_images(&state, req).await?;
    let k = parse_top_k(query.as_deref())?.unwrap_or(5);
    let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?.clone();
    let labels = match &loaded.labels {
        Ok(labels) => labels.clone(),
        Err(reason) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_classifier",
                format!("/v1/classify is not available: {reason}"),
            ));
        }
    };
    // What `dltool classify --format jsonl` writes per image, without the path.
    let render = move |probs: &[f32]| {
        let top: Vec<Value> = crate::model::ranked(probs)
            .into_iter()
            .take(k)
            .map(|c| {
                json!({"synset": labels[c].synset, "name": labels[c].name,
                       "probability": probs[c]})
            })
            .collect();
        let mut v = serde_json::Map::new();
        v.insert("top".into(), Value::Array(top));
        v
    };
    answer(&state, images, Task::Classify, &render).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_the_only_query_parameter() {
        assert_eq!(parse_top_k(None).unwrap(), None);
        assert_eq!(parse_top_k(Some("top_k=3")).unwrap(), Some(3));
        for bad in ["top_k=0", "top_k=x", "top_k", "k=3", "top_k=-1"] {
            let e = parse_top_k(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    fn state() -> Arc<State> {
        let (tx, _rx) = std::sync::mpsc::channel();
        Arc::new(State::new(super::super::test_config(), tx))
    }

    async fn boom() -> &'static str {
        panic!("handler bug")
    }

    /// Over a real socket with a real client: the panic of one handler costs that request a
    /// 500 (JSON naming the panic), the connection's server task survives, and the next
    /// requests are served.
    #[test]
    fn a_panicking_request_is_answered_500_and_the_server_goes_on() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = state();
        let routes = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }));
        let app = guarded(routes, state.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(30))
            .build();
        let get = |path: &str| match agent.get(&format!("http://{addr}{path}")).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        };
        for _ in 0..2 {
            let (status, body) = get("/boom");
            assert_eq!(status, 500, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["kind"], "internal");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("handler bug"), "{v}");
            assert_eq!(get("/fine"), (200, "fine".to_string()));
        }
        let text = state.metrics.render(0, 1, false);
        assert!(
            text.contains("dltool_errors_total{kind=\"internal\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("dltool_requests_total{endpoint=\"other\",code=\"200\"} 2"),
            "{text}"
        );
        let _ = stop_tx.send(());
        rt.block_on(server).unwrap().unwrap();
    }
}
