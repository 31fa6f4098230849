//! A fake KeyDB that is still loading its dataset, for the lab: on
//! 0.0.0.0:6380 inside a node's namespace it answers `+PONG` to PING and
//! `-LOADING` to INFO and every other command, as KeyDB does while it
//! loads. Health checks must never find it READY, so no client connection
//! through the VIP may ever reach it.
//!
//! It records who connected (peer addresses) and what it was asked, so a
//! test can tell the health checker's connections from clients routed to
//! it by the data plane, and prove that the checker did talk to it.
//!
//! Plain threads and std sockets (the tests crate has no async runtime).

use std::{
    io::{BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{spawn_in_netns, KEYDB_PORT};
use crate::{
    netns::Netns,
    resp::{read_value, Value},
};

/// The error KeyDB answers while loading its dataset.
pub const LOADING_REPLY: &[u8] = b"-LOADING KeyDB is loading the dataset in memory\r\n";

#[derive(Debug, Default)]
struct Seen {
    peers: Mutex<Vec<SocketAddr>>,
    pings: AtomicUsize,
    loading_replies: AtomicUsize,
    checks: AtomicUsize,
    /// Clones of the accepted streams, shut down on stop so their threads
    /// end.
    streams: Mutex<Vec<TcpStream>>,
}

/// A running loading fake; stopped on drop.
#[derive(Debug)]
pub struct LoadingKeydb {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    accept: Option<JoinHandle<Result<Result<()>>>>,
}

impl LoadingKeydb {
    /// Listens on 0.0.0.0:6380 inside `ns` (the port must be free there).
    pub fn start(ns: &Netns) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let accept = {
            let stop = stop.clone();
            let seen = seen.clone();
            spawn_in_netns(ns, "loading-fake", move || -> Result<()> {
                let bound = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, KEYDB_PORT))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                let listener = match bound {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Err(e.into());
                    }
                };
                let mut workers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            seen.peers
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(peer);
                            let _ = stream.set_nonblocking(false);
                            if let Ok(clone) = stream.try_clone() {
                                seen.streams
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(clone);
                            }
                            let seen = seen.clone();
                            workers.push(std::thread::spawn(move || serve(stream, &seen)));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(e).context("accept"),
                    }
                }
                for s in seen
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                for w in workers {
                    let _ = w.join();
                }
                Ok(())
            })?
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                anyhow::bail!("the loading fake could not listen on port {KEYDB_PORT}: {e}")
            }
            Err(_) => anyhow::bail!("the loading fake did not start"),
        }
        Ok(LoadingKeydb {
            stop,
            seen,
            accept: Some(accept),
        })
    }

    /// The peer address of every connection accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.seen
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// PINGs answered with `+PONG`.
    pub fn pings(&self) -> usize {
        self.seen.pings.load(Ordering::SeqCst)
    }

    /// Commands answered with `-LOADING` (INFO and everything else).
    pub fn loading_replies(&self) -> usize {
        self.seen.loading_replies.load(Ordering::SeqCst)
    }

    /// Connections that sent PING and then another command (answered
    /// `-LOADING`): what a KeyDB-aware health check does, and what a
    /// client asking only `INFO` does not.
    pub fn health_checks(&self) -> usize {
        self.seen.checks.load(Ordering::SeqCst)
    }
}

impl Drop for LoadingKeydb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Answers one connection until the peer leaves or the stream is shut down.
fn serve(stream: TcpStream, seen: &Seen) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let (mut pinged, mut counted) = (false, false);
    while let Ok(command) = read_value(&mut reader) {
        let name = match &command {
            Value::Array(Some(items)) => items.first().and_then(Value::as_text),
            _ => None,
        };
        let reply: &[u8] = if name.is_some_and(|n| n.eq_ignore_ascii_case("PING")) {
            seen.pings.fetch_add(1, Ordering::SeqCst);
            pinged = true;
            b"+PONG\r\n"
        } else {
            seen.loading_replies.fetch_add(1, Ordering::SeqCst);
            if pinged && !counted {
                counted = true;
                seen.checks.fetch_add(1, Ordering::SeqCst);
            }
            LOADING_REPLY
        };
        if writer.write_all(reply).is_err() {
            return;
        }
    }
}
