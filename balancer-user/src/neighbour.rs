//! Keeps the neighbour (ARP) entries of remote backends resolved.
//!
//! The XDP program takes next-hop MACs from `bpf_fib_lookup` and drops (and
//! counts) a new connection whose next hop has no resolved neighbour: it
//! never hands a half-rewritten packet to the stack. So before attaching,
//! the agent resolves them by talking to each remote backend (a TCP
//! connect, closed at once; a refused connection counts too: the answer came
//! back, so the neighbour is resolved). From then on the health checks,
//! which connect to every backend each interval, keep them resolved.

use std::{
    io,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::netlink::Netlink;

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long startup waits for every remote backend's neighbour.
pub const STARTUP_WAIT: Duration = Duration::from_secs(3);

/// Outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The backend answered (accepted or refused): its next hop is known.
    Answered,
    /// No answer in time, or the host is unreachable.
    Silent,
}

/// Connects to `backend` and closes the connection at once.
pub async fn probe(backend: SocketAddrV4, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, TcpStream::connect(backend)).await {
        Ok(Ok(stream)) => {
            drop(stream);
            Probe::Answered
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Probe::Answered,
        Ok(Err(error)) => {
            debug!(%backend, %error, "backend probe failed");
            Probe::Silent
        }
        Err(_) => Probe::Silent,
    }
}

/// Waits up to `wait` until each of `backends` answered a probe or has a
/// usable neighbour entry. Returns those that did not; never fails.
pub async fn wait_resolved(
    netlink: &Netlink,
    backends: &[SocketAddrV4],
    wait: Duration,
) -> Vec<SocketAddrV4> {
    let deadline = Instant::now() + wait;
    let mut pending: Vec<SocketAddrV4> = backends.to_vec();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = left.min(PROBE_TIMEOUT);
        let probes =
            futures_util::future::join_all(pending.iter().map(|b| probe(*b, timeout))).await;
        let mut still = Vec::new();
        for (backend, outcome) in pending.into_iter().zip(probes) {
            let resolved = outcome == Probe::Answered
                || netlink
                    .neighbour_resolved(*backend.ip())
                    .await
                    .unwrap_or(false);
            if resolved {
                debug!(%backend, "backend neighbour resolved");
            } else {
                still.push(backend);
            }
        }
        pending = still;
        if !pending.is_empty() {
            // Poll again shortly, without overshooting the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(200))).await;
        }
    }
    for backend in &pending {
        warn!(
            %backend,
            "backend neighbour not resolved: new connections to it are dropped until it answers"
        );
    }
    pending
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listening_and_refusing_ports_both_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        assert_eq!(probe(open, PROBE_TIMEOUT).await, Probe::Answered);

        // A port nobody listens on: bind, note the port, close.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            match l.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                other => panic!("{other}"),
            }
        };
        assert_eq!(probe(closed, PROBE_TIMEOUT).await, Probe::Answered);
    }
}
