//! The Prometheus endpoint: `GET /metrics` on `[admin] metrics_listen`
//! answers with the Prometheus text format (version 0.0.4), rendered from
//! the same [`Status`] document `balancer status` shows ([`render`]).
//!
//! Every metric is named `balancer_*`; services are labelled `vip`,
//! `port`, backends also `backend` (`address:port`). Counters are the
//! agent's and the data plane's own running totals (they restart at 0 with
//! the agent).
//!
//! The same listener serves the status page on `GET /` ([`super::page`]).
//!
//! The HTTP side is hyper's HTTP/1 server and nothing more ([`serve`]):
//! one request per connection (no keep-alive), the request head within
//! [`HEADER_READ_TIMEOUT`], the whole exchange within
//! [`CONNECTION_TIMEOUT`], at most [`MAX_CONNECTIONS`] at a time (more are
//! closed at once). Other paths get 404, other methods 405.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{status::Status, StatusProvider};

/// The Prometheus exposition.
pub const METRICS_PATH: &str = "/metrics";
/// The status page.
pub const PAGE_PATH: &str = "/";
/// Scrapes served at the same time; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The request head must arrive within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head read.
const MAX_HEAD_LEN: usize = 16 * 1024;
/// Pause after a failed accept, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The VRRP states, plus "static" for a node without `[vrrp]`: one
/// `balancer_vrrp_state` series each.
pub const STATES: [&str; 5] = ["initialize", "backup", "master", "fault", "static"];

type Labels = Vec<(&'static str, String)>;

/// Collects metric families into a registry, each filled from values
/// already known (a fresh registry per scrape).
struct Exposition {
    registry: Registry,
}

impl Exposition {
    fn new() -> Exposition {
        Exposition {
            registry: Registry::with_prefix("balancer"),
        }
    }

    fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    fn gauge_f64(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let family = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    /// `name` without `_total`: the encoder adds it.
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Labels, Counter>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    fn text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

fn none() -> Labels {
    Vec::new()
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// The Prometheus text for `status`.
pub fn render(status: &Status) -> String {
    let mut m = Exposition::new();
    let e = &status.election;

    m.gauge(
        "agent_info",
        "The running agent: version, node, interface and XDP attach mode (always 1).",
        [(
            vec![
                ("version", status.agent.version.clone()),
                ("node", status.node.name.clone()),
                ("address", status.node.address.to_string()),
                ("interface", status.node.interface.clone()),
                ("xdp_mode", status.node.xdp_mode.clone()),
            ],
            1,
        )],
    );
    m.gauge_f64(
        "agent_start_time_seconds",
        "When the agent started, Unix seconds.",
        [(none(), status.agent.started_at)],
    );

    m.gauge(
        "vrrp_state",
        "VRRP state of this node: 1 for the current state (\"static\" without [vrrp]), 0 for the others.",
        STATES
            .iter()
            .map(|s| (vec![("state", s.to_string())], flag(e.state == *s))),
    );
    if let Some(since) = e.state_since {
        m.gauge_f64(
            "vrrp_state_change_timestamp_seconds",
            "When the current VRRP state was entered, Unix seconds.",
            [(none(), since)],
        );
    }
    if let (Some(configured), Some(effective)) = (e.configured_priority, e.effective_priority) {
        m.gauge(
            "vrrp_configured_priority",
            "VRRP priority from the configuration.",
            [(none(), i64::from(configured))],
        );
        m.gauge(
            "vrrp_effective_priority",
            "VRRP priority in the adverts: the configured one, lowered by no_ready_backend_weight while the node is not ready.",
            [(none(), i64::from(effective))],
        );
    }
    m.gauge(
        "node_ready",
        "1 when every service has a READY backend (this node's own where it has one); the VRRP priority is lowered while 0.",
        [(none(), flag(e.node_ready))],
    );
    m.gauge(
        "vip_held",
        "1 while the virtual address is on this node's interface.",
        e.vips
            .iter()
            .map(|v| (vec![("vip", v.address.to_string())], flag(v.held))),
    );
    if let Some(a) = &e.adverts {
        m.counter(
            "vrrp_adverts_sent",
            "VRRP adverts sent (one per destination).",
            [(none(), a.sent)],
        );
        m.counter(
            "vrrp_adverts_received",
            "VRRP adverts received that passed every check.",
            [(none(), a.received)],
        );
        m.counter(
            "vrrp_adverts_own",
            "This node's own VRRP adverts seen again, ignored.",
            [(none(), a.own)],
        );
        m.counter(
            "vrrp_adverts_dropped",
            "VRRP adverts dropped, by the check they failed.",
            a.dropped
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.clone())], *n)),
        );
        m.counter(
            "vrrp_send_errors",
            "VRRP adverts that could not be sent.",
            [(none(), a.send_errors)],
        );
        m.counter(
            "vrrp_receive_errors",
            "Errors reading the VRRP socket.",
            [(none(), a.receive_errors)],
        );
        m.gauge(
            "vrrp_peer_priority",
            "Priority in the last accepted advert of each other router.",
            a.peers
                .iter()
                .map(|p| (vec![("peer", p.address.to_string())], i64::from(p.priority))),
        );
        m.gauge_f64(
            "vrrp_peer_last_advert_timestamp_seconds",
            "When the last advert of each other router was accepted (Unix seconds).",
            a.peers
                .iter()
                .map(|p| (vec![("peer", p.address.to_string())], p.last_advert)),
        );
    }

    let service_labels = |vip: &std::net::SocketAddrV4| -> Labels {
        vec![
            ("vip", vip.ip().to_string()),
            ("port", vip.port().to_string()),
        ]
    };
    let backend_labels = |vip: &std::net::SocketAddrV4, backend: &std::net::SocketAddrV4| {
        let mut l = service_labels(vip);
        l.push(("backend", backend.to_string()));
        l
    };
    m.gauge(
        "service_active",
        "1 while the data plane serves the service on this node (the node holds its VIP).",
        status
            .services
            .iter()
            .map(|s| (service_labels(&s.vip), flag(s.active))),
    );
    m.gauge(
        "service_ready_backends",
        "Backends in the service's READY set in the data plane.",
        status
            .services
            .iter()
            .map(|s| (service_labels(&s.vip), s.ready_set.len() as i64)),
    );
    m.counter(
        "service_connections",
        "New connections to the service the data plane balanced on this node.",
        status
            .services
            .iter()
            .map(|s| (service_labels(&s.vip), s.traffic.connections)),
    );
    m.counter(
        "service_packets",
        "Packets of the service the data plane handled on this node.",
        status
            .services
            .iter()
            .map(|s| (service_labels(&s.vip), s.traffic.packets)),
    );
    m.counter(
        "service_bytes",
        "Bytes of the service the data plane handled on this node.",
        status
            .services
            .iter()
            .map(|s| (service_labels(&s.vip), s.traffic.bytes)),
    );

    let backends = || {
        status
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
    };
    m.gauge(
        "backend_ready",
        "1 while the backend passes its health checks (damped: READY after rise good checks, not after fall bad ones).",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), flag(b.ready))),
    );
    m.gauge(
        "backend_in_ready_set",
        "1 while the backend is in the service's READY set in the data plane (gets new connections).",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), flag(b.in_ready_set))),
    );
    m.gauge(
        "backend_drained",
        "1 while the operator has drained the backend (balancer drain): no new connections.",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), flag(b.drained))),
    );
    m.gauge(
        "backend_behind_bytes",
        "Bytes of a peer's replication stream the backend has still to apply, while it is catching up (absent otherwise).",
        backends().filter_map(|(s, b)| {
            b.behind_bytes
                .map(|n| (backend_labels(&s.vip, &b.address), i64::try_from(n).unwrap_or(i64::MAX)))
        }),
    );
    m.gauge(
        "backend_local",
        "1 when the backend is on this node.",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), flag(b.local))),
    );
    m.counter(
        "backend_connections",
        "New connections the data plane sent to the backend.",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), b.traffic.connections)),
    );
    m.counter(
        "backend_packets",
        "Packets of the backend's connections the data plane handled.",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), b.traffic.packets)),
    );
    m.counter(
        "backend_bytes",
        "Bytes of the backend's connections the data plane handled.",
        backends().map(|(s, b)| (backend_labels(&s.vip, &b.address), b.traffic.bytes)),
    );
    m.counter(
        "backend_replies",
        "Packets from a remote backend the data plane reverse-NATed to clients.",
        backends()
            .filter(|(_, b)| !b.local)
            .map(|(s, b)| (backend_labels(&s.vip, &b.address), b.traffic.replies)),
    );
    m.gauge(
        "backend_path_failing",
        "1 while connections forwarded to this remote backend through the data plane get no reply (frames dropped on the way out).",
        backends().filter_map(|(s, b)| {
            b.path
                .map(|p| (backend_labels(&s.vip, &b.address), flag(p.is_failing())))
        }),
    );

    // Health checks run once per distinct backend address.
    let mut checked: Vec<&super::status::BackendInfo> = Vec::new();
    for (_, b) in backends() {
        if !checked.iter().any(|c| c.address == b.address) {
            checked.push(b);
        }
    }
    m.counter(
        "health_checks",
        "Health checks run against the backend.",
        checked
            .iter()
            .map(|b| (vec![("backend", b.address.to_string())], b.checks)),
    );
    m.counter(
        "health_check_failures",
        "Health checks that did not find the backend READY, by reason.",
        checked.iter().flat_map(|b| {
            crate::health::NotReady::KINDS.iter().map(|kind| {
                (
                    vec![
                        ("backend", b.address.to_string()),
                        ("reason", kind.to_string()),
                    ],
                    b.failures.get(*kind).copied().unwrap_or(0),
                )
            })
        }),
    );

    m.counter(
        "xdp_events",
        "Data-plane counters by event: pass_* (XDP_PASS, by reason), drop_* (XDP_DROP, by reason), forwarded and reversed (NAT), flows_*.",
        status
            .dataplane
            .counters
            .iter()
            .map(|(event, n)| (vec![("event", event.clone())], *n)),
    );
    m.gauge(
        "conntrack_entries",
        "Entries in the conntrack table (two per NATed flow), as of the last sweep.",
        [(none(), status.dataplane.conntrack_entries as i64)],
    );
    let snat = &status.dataplane.snat;
    m.gauge(
        "snat_ports_in_use",
        "SNAT ports held towards the backend (live flows and ports resting after a close), as of the last sweep; drops for want of one are xdp_events{event=\"drop_snat_exhausted\"}.",
        snat.backends
            .iter()
            .map(|b| (vec![("backend", b.backend.clone())], i64::from(b.in_use))),
    );
    m.gauge(
        "snat_ports_free",
        "SNAT ports free towards the backend, as of the last sweep.",
        snat.backends
            .iter()
            .map(|b| (vec![("backend", b.backend.clone())], i64::from(b.free))),
    );
    m.text()
}

/// Serves `GET /metrics` until the task is aborted (which also ends every
/// connection it serves).
pub async fn serve<P: StatusProvider>(listener: TcpListener, provider: Arc<P>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut warned = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                        debug!(%peer, limit = MAX_CONNECTIONS, "metrics endpoint busy; closed a connection");
                        continue;
                    };
                    let provider = Arc::clone(&provider);
                    connections.spawn(async move {
                        if let Err(error) = connection(stream, provider).await {
                            debug!(%peer, %error, "metrics connection ended with an error");
                        }
                        drop(permit);
                    });
                }
                Err(error) => {
                    if !warned {
                        warned = true;
                        warn!(%error, "cannot accept on the metrics endpoint (further errors at debug)");
                    } else {
                        debug!(%error, "cannot accept on the metrics endpoint");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined {
                    if error.is_panic() {
                        warn!(%error, "a metrics connection panicked");
                    }
                }
            }
        }
    }
}

/// Serves one HTTP/1 connection: one request, bounded in time.
async fn connection<I, P>(io: I, provider: Arc<P>) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: StatusProvider,
{
    let service = service_fn(move |request| {
        let provider = Arc::clone(&provider);
        async move { Ok::<_, Infallible>(answer(&request, &*provider).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_LEN)
        .serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("not done within {CONNECTION_TIMEOUT:?}")),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The response to one request.
async fn answer<B, P: StatusProvider>(request: &Request<B>, provider: &P) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != METRICS_PATH && path != PAGE_PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics, the status page at /",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let status = match tokio::time::timeout(CONNECTION_TIMEOUT / 3, provider.status()).await {
        Ok(Ok(status)) => status,
        Ok(Err(error)) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot collect the metrics: {}", crate::error_chain(&error)),
            )
        }
        Err(_) => {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the metrics were not ready in time",
            )
        }
    };
    let (body, content_type) = if path == PAGE_PATH {
        let now = super::status::unix_seconds(std::time::SystemTime::now());
        (
            super::page::render(&status, now),
            "text/html; charset=utf-8",
        )
    } else {
        (render(&status), prometheus_text::CONTENT_TYPE)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{status::tests::master_with_a_failed_backend, StatusError};

    struct Fixed;

    impl StatusProvider for Fixed {
        async fn status(&self) -> Result<Status, StatusError> {
            Ok(master_with_a_failed_backend())
        }
    }

    /// The sample line of `name` whose labels contain every `labels` pair.
    fn sample<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> Option<&'a str> {
        text.lines().find(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let line =
            sample(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_exposition_agrees_with_the_status() {
        let status = master_with_a_failed_backend();
        let text = render(&status);
        for family in [
            "balancer_vrrp_state gauge",
            "balancer_vip_held gauge",
            "balancer_backend_ready gauge",
            "balancer_vrrp_adverts_sent_total counter",
            "balancer_vrrp_peer_priority gauge",
            "balancer_health_check_failures_total counter",
            "balancer_xdp_events_total counter",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family} in\n{text}"
            );
        }
        assert!(
            text.contains("# HELP balancer_vrrp_state VRRP state"),
            "{text}"
        );
        assert_eq!(
            value(&text, "balancer_vrrp_state", &[("state", "master")]),
            1.0
        );
        for other in ["initialize", "backup", "fault", "static"] {
            assert_eq!(
                value(&text, "balancer_vrrp_state", &[("state", other)]),
                0.0
            );
        }
        assert_eq!(value(&text, "balancer_vrrp_effective_priority", &[]), 150.0);
        assert_eq!(
            value(&text, "balancer_vrrp_configured_priority", &[]),
            150.0
        );
        assert_eq!(
            value(&text, "balancer_vip_held", &[("vip", "198.18.0.100")]),
            1.0
        );
        assert_eq!(value(&text, "balancer_node_ready", &[]), 1.0);
        assert_eq!(value(&text, "balancer_vrrp_adverts_sent_total", &[]), 600.0);
        assert_eq!(
            value(
                &text,
                "balancer_vrrp_peer_priority",
                &[("peer", "198.18.0.2")]
            ),
            100.0
        );
        assert_eq!(
            value(
                &text,
                "balancer_vrrp_adverts_dropped_total",
                &[("reason", "vrid")]
            ),
            2.0
        );
        let n1 = [
            ("vip", "198.18.0.100"),
            ("port", "6380"),
            ("backend", "198.18.0.1:6380"),
        ];
        let n2 = [
            ("vip", "198.18.0.100"),
            ("port", "6380"),
            ("backend", "198.18.0.2:6380"),
        ];
        assert_eq!(value(&text, "balancer_backend_ready", &n1), 1.0);
        assert_eq!(value(&text, "balancer_backend_ready", &n2), 0.0);
        assert_eq!(value(&text, "balancer_backend_in_ready_set", &n2), 0.0);
        assert_eq!(value(&text, "balancer_backend_local", &n1), 1.0);
        assert_eq!(value(&text, "balancer_backend_connections_total", &n1), 2.0);
        assert_eq!(value(&text, "balancer_backend_bytes_total", &n2), 2000.0);
        assert_eq!(value(&text, "balancer_backend_path_failing", &n2), 1.0);
        assert_eq!(
            value(
                &text,
                "balancer_service_ready_backends",
                &[("vip", "198.18.0.100")]
            ),
            1.0
        );
        assert_eq!(
            value(&text, "balancer_service_packets_total", &[("port", "6380")]),
            30.0
        );
        assert_eq!(
            value(
                &text,
                "balancer_health_checks_total",
                &[("backend", "198.18.0.2:6380")]
            ),
            4.0
        );
        assert_eq!(
            value(
                &text,
                "balancer_health_check_failures_total",
                &[("backend", "198.18.0.2:6380"), ("reason", "refused")]
            ),
            3.0
        );
        assert_eq!(
            value(
                &text,
                "balancer_health_check_failures_total",
                &[("backend", "198.18.0.2:6380"), ("reason", "loading")]
            ),
            0.0,
            "every reason is exported, zeros included"
        );
        assert_eq!(
            value(
                &text,
                "balancer_xdp_events_total",
                &[("event", "forwarded")]
            ),
            7.0
        );
        assert_eq!(value(&text, "balancer_conntrack_entries", &[]), 2.0);
        let n2 = [("backend", "198.18.0.2:6380")];
        assert_eq!(value(&text, "balancer_snat_ports_in_use", &n2), 12.0);
        assert_eq!(value(&text, "balancer_snat_ports_free", &n2), 31732.0);
        let n3 = [("backend", "198.18.0.3:6380")];
        assert_eq!(value(&text, "balancer_snat_ports_free", &n3), 31744.0);
        assert!(sample(
            &text,
            "balancer_agent_info",
            &[("version", "0.1.0"), ("xdp_mode", "native")]
        )
        .is_some());
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
        // Label values are escaped.
        assert!(
            !text.contains("balancer_backend_behind_bytes{"),
            "no sample while no backend is catching up"
        );
        let mut behind = status.clone();
        behind.services[0].backends[1].behind_bytes = Some(1_234_567);
        assert_eq!(
            value(&render(&behind), "balancer_backend_behind_bytes", &n2),
            1_234_567.0
        );
        let mut odd = status.clone();
        odd.node.name = "a\"b\\c\nd".into();
        assert!(render(&odd).contains(r#"node="a\"b\\c\nd""#));
    }

    #[test]
    fn a_static_node_exports_no_vrrp_counters() {
        let mut status = master_with_a_failed_backend();
        status.election.mode = "static".into();
        status.election.state = "static".into();
        status.election.adverts = None;
        status.election.configured_priority = None;
        status.election.effective_priority = None;
        status.election.state_since = None;
        let text = render(&status);
        assert_eq!(
            value(&text, "balancer_vrrp_state", &[("state", "static")]),
            1.0
        );
        assert!(!text.contains("balancer_vrrp_adverts_sent"), "{text}");
        assert!(!text.contains("balancer_vrrp_effective_priority"), "{text}");
    }

    /// One HTTP exchange with a raw request over an in-memory pipe; the
    /// status code and the body.
    async fn exchange(raw: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(connection(server, Arc::new(Fixed)));
        client.write_all(raw.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut reply))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let _ = served.await;
        let reply = String::from_utf8(reply).unwrap();
        let code = reply
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    #[tokio::test]
    async fn serves_metrics_the_page_and_nothing_else() {
        let (code, body) = exchange("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("balancer_vrrp_state{state=\"master\"} 1"),
            "{body}"
        );
        let (code, body) = exchange("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!((code, body.as_str()), (200, ""));
        let (code, body) = exchange("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(code, 200);
        assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
        let (code, _) = exchange("GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(code, 404);
        let (code, _) = exchange("GET /metrics/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(code, 404);
        let (code, _) =
            exchange("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(code, 405);
        let (code, _) = exchange("NONSENSE\r\n\r\n").await;
        assert_eq!(code, 400);
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let (code, _) = exchange(&huge).await;
        assert_eq!(code, 431, "an oversized head is refused");
    }
}
