//! Counters and histograms for `GET /metrics`, in Prometheus' text exposition format.
//!
//! A handful of mutexes around small maps: each request touches them a few times, which costs
//! nothing next to decoding an image.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Request latency buckets, seconds.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Network batch sizes.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything `/metrics` reports but the queue depth, which the admission semaphore knows.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    batches: Mutex<Histogram>,
    network: Mutex<Histogram>,
    images: Mutex<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            errors: Mutex::default(),
            latency: Mutex::default(),
            batches: Mutex::new(Histogram::new(BATCH_BOUNDS)),
            network: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            images: Mutex::new(0),
        }
    }
}

/// A poisoned lock only means another request panicked mid-update of a counter: the counts
/// are still worth reporting.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// One answered request: `endpoint` is a route name (bounded, not the raw path).
    pub fn request(&self, endpoint: &'static str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((endpoint, status)).or_default() += 1;
        lock(&self.latency)
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(seconds);
    }

    pub fn error(&self, kind: &'static str) {
        *lock(&self.errors).entry(kind).or_default() += 1;
    }

    /// One network batch of `size` images that took `seconds`.
    pub fn batch(&self, size: usize, seconds: f64) {
        lock(&self.batches).observe(size as f64);
        lock(&self.network).observe(seconds);
        *lock(&self.images) += size as u64;
    }

    /// The text exposition format, with the queue gauges given by the caller.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize, ready: bool) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP dltool_requests_total HTTP requests answered, by endpoint and status code.\n",
        );
        out.push_str("# TYPE dltool_requests_total counter\n");
        for ((endpoint, code), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "dltool_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}"
            );
        }
        out.push_str("# HELP dltool_errors_total Errors answered, by kind (an image that failed inside a multipart request counts too).\n");
        out.push_str("# TYPE dltool_errors_total counter\n");
        for (kind, n) in lock(&self.errors).iter() {
            let _ = writeln!(out, "dltool_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP dltool_request_duration_seconds Time from request to response, by endpoint.\n",
        );
        out.push_str("# TYPE dltool_request_duration_seconds histogram\n");
        for (endpoint, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "dltool_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        out.push_str("# HELP dltool_batch_size Images per network batch.\n");
        out.push_str("# TYPE dltool_batch_size histogram\n");
        lock(&self.batches).render(&mut out, "dltool_batch_size", "");
        out.push_str("# HELP dltool_network_duration_seconds Time of one network batch.\n");
        out.push_str("# TYPE dltool_network_duration_seconds histogram\n");
        lock(&self.network).render(&mut out, "dltool_network_duration_seconds", "");
        out.push_str("# HELP dltool_images_total Images through the network.\n");
        out.push_str("# TYPE dltool_images_total counter\n");
        let _ = writeln!(out, "dltool_images_total {}", *lock(&self.images));
        out.push_str("# HELP dltool_queue_depth Images admitted and not yet answered (decoding, waiting for a batch, or in the network).\n");
        out.push_str("# TYPE dltool_queue_depth gauge\n");
        let _ = writeln!(out, "dltool_queue_depth {queue_depth}");
        out.push_str("# HELP dltool_queue_capacity Images admitted at most (--queue); beyond it requests get 503.\n");
        out.push_str("# TYPE dltool_queue_capacity gauge\n");
        let _ = writeln!(out, "dltool_queue_capacity {queue_capacity}");
        out.push_str("# HELP dltool_ready 1 once the network is loaded.\n");
        out.push_str("# TYPE dltool_ready gauge\n");
        let _ = writeln!(out, "dltool_ready {}", u8::from(ready));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inf() {
        let mut h = Histogram::new(&[1.0, 4.0]);
        for v in [1.0, 2.0, 3.0, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(
            out.contains("x_sum 15\n") && out.contains("x_count 4\n"),
            "{out}"
        );
    }

    #[test]
    fn render_reports_requests_errors_batches_and_queue() {
        let m = Metrics::default();
        m.request("/v1/predict", 200, 0.02);
        m.request("/v1/predict", 422, 0.001);
        m.error("bad_image");
        m.batch(3, 0.05);
        let text = m.render(2, 64, true);
        for line in [
            "dltool_requests_total{endpoint=\"/v1/predict\",code=\"200\"} 1",
            "dltool_requests_total{endpoint=\"/v1/predict\",code=\"422\"} 1",
            "dltool_errors_total{kind=\"bad_image\"} 1",
            "dltool_request_duration_seconds_count{endpoint=\"/v1/predict\"} 2",
            "dltool_batch_size_bucket{le=\"4\"} 1",
            "dltool_batch_size_bucket{le=\"2\"} 0",
            "dltool_images_total 3",
            "dltool_queue_depth 2",
            "dltool_queue_capacity 64",
            "dltool_ready 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}
