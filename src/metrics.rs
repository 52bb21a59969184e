//! Service metrics in the Prometheus / OpenMetrics text format (`GET /metrics`, docs/http.md).
//!
//! Counters and histograms are recorded where things happen (the service core for requests and
//! routing, the engine for customizations); gauges that describe a state (queue, memory, breaker,
//! cached blends) are read when scraped, so a scrape never waits for the engine. Built on the
//! Prometheus project's own Rust client (`prometheus-client`): the exposition format is its job.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorKind;
use crate::router::{AnsweredBy, Route};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The interface a request came through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users write them
pub enum Interface {
    http,
    socket,
    dbus,
}

/// What a request asked for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    generate,
    customize,
    remove,
}

/// How a request ended: `ok`, or its error's kind (`crate::error::ErrorKind`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    invalid,
    not_found,
    busy,
    forbidden,
    cancelled,
    unavailable,
    internal,
}

impl From<ErrorKind> for Outcome {
    fn from(k: ErrorKind) -> Outcome {
        match k {
            ErrorKind::Invalid => Outcome::invalid,
            ErrorKind::NotFound => Outcome::not_found,
            ErrorKind::Busy => Outcome::busy,
            ErrorKind::Forbidden => Outcome::forbidden,
            ErrorKind::Cancelled => Outcome::cancelled,
            ErrorKind::Unavailable => Outcome::unavailable,
            ErrorKind::Internal => Outcome::internal,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    interface: Interface,
    operation: Operation,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: Interface,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    answered_by: String,
    reason: String,
    /// "true" when the server failed and the device answered instead.
    fallback: String,
}

/// Every metric the service exports, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refused: Family<InterfaceLabels, Counter>,
    prompt_tokens: Family<InterfaceLabels, Counter>,
    completion_tokens: Family<InterfaceLabels, Counter>,
    queue_wait: Histogram,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    routes: Family<RouteLabels, Counter>,
    remote_errors: Counter,
    customizations_built: Counter,
    customizations_evicted: Counter,
    customization_build: Histogram,
    // Read at scrape time.
    queue_waiting: Gauge,
    in_flight: Gauge,
    customizations_cached: Gauge,
    adapters_saved: Gauge,
    breaker_open: Gauge,
    resident_memory: Gauge,
    up_seconds: Gauge<f64, AtomicU64>,
}

/// A state gauge's values, gathered by the service for one scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct State {
    pub queue_waiting: usize,
    pub in_flight: usize,
    pub adapters_saved: usize,
    pub breaker_open: bool,
    pub uptime_s: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("crayon");
        let m = Metrics {
            requests: Family::default(),
            refused: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            // 1 ms .. ~33 s
            queue_wait: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 5 ms .. ~82 s
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 1 ms .. ~1 s
            time_per_output_token: Histogram::new(exponential_buckets(0.001, 2.0, 11)),
            routes: Family::default(),
            remote_errors: Counter::default(),
            customizations_built: Counter::default(),
            customizations_evicted: Counter::default(),
            // 1 ms .. ~33 s: unmerged blends take milliseconds, merged float32 ones about a second
            customization_build: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_waiting: Gauge::default(),
            in_flight: Gauge::default(),
            customizations_cached: Gauge::default(),
            adapters_saved: Gauge::default(),
            breaker_open: Gauge::default(),
            resident_memory: Gauge::default(),
            up_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by interface, operation and outcome", m.requests.clone());
        registry.register(
            "admission_refused",
            "Requests refused at admission (server.max_concurrent or max_concurrent_per_client)",
            m.refused.clone(),
        );
        registry.register("prompt_tokens", "Prompt tokens of answered requests", m.prompt_tokens.clone());
        registry.register("completion_tokens", "Generated tokens of answered requests", m.completion_tokens.clone());
        registry.register("queue_wait_seconds", "Time a request waited for the engine", m.queue_wait.clone());
        registry.register(
            "time_to_first_token_seconds",
            "From a request's start to its first text",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Mean time between generated tokens, per request with two or more",
            m.time_per_output_token.clone(),
        );
        registry.register("routing_decisions", "Who answered and why", m.routes.clone());
        registry.register(
            "remote_errors",
            "Server requests that failed (the device answered instead)",
            m.remote_errors.clone(),
        );
        registry.register("customizations_built", "Customized models made ready", m.customizations_built.clone());
        registry.register(
            "customizations_evicted",
            "Customized models dropped from memory beyond adapters.cache_mb",
            m.customizations_evicted.clone(),
        );
        registry.register(
            "customization_build_seconds",
            "Time to make one customized model ready",
            m.customization_build.clone(),
        );
        registry.register("queue_waiting", "Requests waiting for the engine", m.queue_waiting.clone());
        registry.register("in_flight", "Requests admitted and not finished", m.in_flight.clone());
        registry.register(
            "customizations_cached",
            "Customized models ready in memory",
            m.customizations_cached.clone(),
        );
        registry.register("adapters_saved", "Saved customizations", m.adapters_saved.clone());
        registry.register("breaker_open", "1 while the server circuit breaker is open", m.breaker_open.clone());
        registry.register("resident_memory_bytes", "Resident set size of the process", m.resident_memory.clone());
        registry.register("uptime_seconds", "Seconds since the service started", m.up_seconds.clone());
        Metrics { registry, ..m }
    }

    /// One request that ended with `outcome`.
    pub fn request(&self, interface: Interface, operation: Operation, outcome: Outcome) {
        self.requests.get_or_create(&RequestLabels { interface, operation, outcome }).inc();
    }

    /// One answered request: its tokens, waits and route.
    pub fn answered(&self, interface: Interface, answer: &AnswerTiming, route: &Route) {
        let labels = InterfaceLabels { interface };
        self.prompt_tokens.get_or_create(&labels).inc_by(answer.prompt_tokens as u64);
        self.completion_tokens.get_or_create(&labels).inc_by(answer.completion_tokens as u64);
        self.queue_wait.observe(route.latency.queue_ms / 1e3);
        if let Some(first) = answer.first_text_s {
            self.time_to_first_token.observe(first);
            if answer.completion_tokens > 1 {
                let rest = (answer.total_s - first).max(0.0);
                self.time_per_output_token.observe(rest / (answer.completion_tokens - 1) as f64);
            }
        }
        let answered_by = match route.answered_by {
            AnsweredBy::Device => "device",
            AnsweredBy::Server => "server",
        };
        let reason = serde_json::to_value(route.reason).ok().and_then(|v| v.as_str().map(str::to_string));
        self.routes
            .get_or_create(&RouteLabels {
                answered_by: answered_by.into(),
                reason: reason.unwrap_or_else(|| format!("{:?}", route.reason)),
                fallback: route.fallback.is_some().to_string(),
            })
            .inc();
        if route.fallback.is_some() {
            self.remote_errors.inc();
        }
    }

    /// A customized model was made ready in `seconds`.
    pub fn customization_built(&self, seconds: f64) {
        self.customizations_built.inc();
        self.customization_build.observe(seconds);
    }

    /// A request refused at admission (no place left for it or its client).
    pub fn refused(&self, interface: Interface) {
        self.refused.get_or_create(&InterfaceLabels { interface }).inc();
    }

    /// Customized models ready in memory now (the engine reports it when its cache changes).
    pub fn set_cached(&self, n: usize) {
        self.customizations_cached.set(clamp_i64(n));
    }

    /// A customized model was dropped from memory for the cache budget.
    pub fn customization_evicted(&self) {
        self.customizations_evicted.inc();
    }

    /// The exposition text, with the state gauges set from `state` and the process's memory.
    pub fn encode(&self, state: State) -> String {
        self.queue_waiting.set(clamp_i64(state.queue_waiting));
        self.in_flight.set(clamp_i64(state.in_flight));
        self.adapters_saved.set(clamp_i64(state.adapters_saved));
        self.breaker_open.set(i64::from(state.breaker_open));
        self.resident_memory.set(resident_bytes().map_or(0, clamp_i64));
        self.up_seconds.set(state.uptime_s);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the metrics need of one answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerTiming {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds from the request's start to its first text (None when it produced none).
    pub first_text_s: Option<f64>,
    pub total_s: f64,
}

fn clamp_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Resident set size from /proc/self/statm (Linux); None elsewhere.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * usize::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_and_ends_with_eof() {
        let m = Metrics::new();
        m.request(Interface::socket, Operation::generate, Outcome::ok);
        m.request(Interface::http, Operation::generate, ErrorKind::Busy.into());
        m.customization_built(0.004);
        m.set_cached(1);
        m.refused(Interface::dbus);
        let text = m.encode(State { queue_waiting: 2, in_flight: 3, breaker_open: true, ..State::default() });
        for needle in [
            "crayon_requests_total{interface=\"socket\",operation=\"generate\",outcome=\"ok\"} 1",
            "crayon_requests_total{interface=\"http\",operation=\"generate\",outcome=\"busy\"} 1",
            "crayon_customizations_built_total 1",
            "crayon_customization_build_seconds_count 1",
            "crayon_queue_waiting 2",
            "crayon_in_flight 3",
            "crayon_breaker_open 1",
            "crayon_customizations_cached 1",
            "crayon_admission_refused_total{interface=\"dbus\"} 1",
            "# TYPE crayon_time_to_first_token_seconds histogram",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("crayon_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(rss > 1e6, "resident memory is read from /proc: {rss}");
    }
}
