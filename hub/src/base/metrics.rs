//! The hub's own figures for `GET /metrics` (OpenMetrics text, which Prometheus reads):
//! what it serves, what it holds, what its outside systems cost. Label values come from
//! small fixed sets (route templates, never paths; store and provider operation names), so
//! no client can grow the series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// An HTTP request as counted: the route's template, the method, the status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    pub route: String,
    pub method: String,
    pub status: u16,
}

/// An HTTP route as timed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
    pub method: String,
}

/// A call to an outside system (the store, the provider): its operation and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// Something counted by kind (streams, housekeeping actions, enrollments).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

type Timings<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 100 µs to about 26 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// The figures the connected agents report about themselves, added up at a scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentTotals {
    pub reporting: u64,
    pub rss_bytes: u64,
    pub rss_bytes_max: u64,
    pub cpu_ms: u64,
    pub sessions: u64,
}

/// A stream relayed to an agent: in `streams_open` while it lives, with the counter its
/// bytes (both ways) go to.
#[derive(Debug)]
pub struct Relayed {
    open: Gauge,
    pub bytes: Counter,
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Every figure the hub keeps, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<Request, Counter>,
    pub http_seconds: Timings<Route>,
    pub agents_connected: Gauge,
    pub agent_connects: Counter,
    pub enrollments: Family<Kind, Counter>,
    pub streams_open: Family<Kind, Gauge>,
    pub streams: Family<Kind, Counter>,
    pub relayed_bytes: Family<Kind, Counter>,
    pub store_calls: Family<Call, Counter>,
    pub store_seconds: Timings<Call>,
    pub provider_calls: Family<Call, Counter>,
    pub provider_seconds: Timings<Call>,
    pub housekeeping: Family<Kind, Counter>,
    pub sse_feeds: Gauge,
    pub agent_totals: Family<Kind, Gauge>,
    pub agent_updates: Family<Kind, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        fn timings<L: Clone + std::hash::Hash + Eq>() -> Timings<L> {
            Timings::new_with_constructor(seconds as fn() -> Histogram)
        }
        let mut m = Metrics {
            registry: Registry::with_prefix("wsh_hub"),
            http_requests: Family::default(),
            http_seconds: timings(),
            agents_connected: Gauge::default(),
            agent_connects: Counter::default(),
            enrollments: Family::default(),
            streams_open: Family::default(),
            streams: Family::default(),
            relayed_bytes: Family::default(),
            store_calls: Family::default(),
            store_seconds: timings(),
            provider_calls: Family::default(),
            provider_seconds: timings(),
            housekeeping: Family::default(),
            sse_feeds: Gauge::default(),
            agent_totals: Family::default(),
            agent_updates: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_seconds",
            "Time to the response head, by route template and method",
            m.http_seconds.clone(),
        );
        r.register(
            "agent_updates",
            "Agent updates: offers made, binaries sent, and what agents answered (declined, \
             waiting, refused, failed, restarting)",
            m.agent_updates.clone(),
        );
        r.register(
            "agents_connected",
            "Agents connected to this replica",
            m.agents_connected.clone(),
        );
        r.register(
            "agent_connections",
            "Agent connections accepted (first connections and reconnects)",
            m.agent_connects.clone(),
        );
        r.register(
            "enrollments",
            "Agent enrollments, by outcome",
            m.enrollments.clone(),
        );
        r.register(
            "streams_open",
            "Streams relayed to agents now, by kind",
            m.streams_open.clone(),
        );
        r.register(
            "streams",
            "Streams relayed to agents, by kind",
            m.streams.clone(),
        );
        r.register(
            "relayed_bytes",
            "Bytes relayed between clients and agents, by kind",
            m.relayed_bytes.clone(),
        );
        r.register(
            "store_calls",
            "Store calls, by operation and outcome",
            m.store_calls.clone(),
        );
        r.register(
            "store_call_seconds",
            "Store call latency, by operation and outcome",
            m.store_seconds.clone(),
        );
        r.register(
            "provider_calls",
            "Provider calls, by operation and outcome",
            m.provider_calls.clone(),
        );
        r.register(
            "provider_call_seconds",
            "Provider call latency, by operation and outcome",
            m.provider_seconds.clone(),
        );
        r.register(
            "housekeeping_actions",
            "What the reconciler and the idle clean-up did, by action",
            m.housekeeping.clone(),
        );
        r.register(
            "sse_feeds",
            "Workspaces and owners somebody follows as server-sent events",
            m.sse_feeds.clone(),
        );
        r.register(
            "agents",
            "What the connected agents report about themselves, added up: `reporting` \
             agents, `rss_bytes` (and `rss_bytes_max`), `cpu_ms` since each started, \
             terminal `sessions`",
            m.agent_totals.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts a call to an outside system and its latency.
    pub fn call(
        calls: &Family<Call, Counter>,
        timings: &Timings<Call>,
        op: &'static str,
        ok: bool,
        took: Duration,
    ) {
        let call = Call {
            op,
            outcome: if ok { "ok" } else { "error" },
        };
        calls.get_or_create(&call).inc();
        timings.get_or_create(&call).observe(took.as_secs_f64());
    }

    /// A stream relayed to an agent, of `kind`: counted now, open until the answer drops.
    pub fn relayed(&self, kind: &'static str) -> Relayed {
        let kind = Kind { kind };
        self.streams.get_or_create(&kind).inc();
        let open = self.streams_open.get_or_create_owned(&kind);
        open.inc();
        Relayed {
            open,
            bytes: self.relayed_bytes.get_or_create_owned(&kind),
        }
    }

    /// Sets the agents' figures from a scrape's totals.
    pub fn set_agent_totals(&self, t: AgentTotals) {
        for (kind, v) in [
            ("reporting", t.reporting),
            ("rss_bytes", t.rss_bytes),
            ("rss_bytes_max", t.rss_bytes_max),
            ("cpu_ms", t.cpu_ms),
            ("sessions", t.sessions),
        ] {
            self.agent_totals
                .get_or_create(&Kind { kind })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// The figures as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_with_their_labels() {
        let m = Metrics::default();
        m.http_requests
            .get_or_create(&Request {
                route: "/workspaces".into(),
                method: "GET".into(),
                status: 200,
            })
            .inc();
        Metrics::call(
            &m.store_calls,
            &m.store_seconds,
            "get_workspace",
            true,
            Duration::from_millis(2),
        );
        m.agents_connected.set(3);
        let text = m.render();
        assert!(
            text.contains(
                r#"wsh_hub_http_requests_total{route="/workspaces",method="GET",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"wsh_hub_store_calls_total{op="get_workspace",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains("wsh_hub_agents_connected 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
