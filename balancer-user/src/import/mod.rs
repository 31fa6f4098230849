//! `balancer import`: a keepalived.conf (and the haproxy.cfg next to it)
//! converted into this agent's `balancer.toml`.
//!
//! Pure: text in, configuration text and warnings out. [`keepalived`]
//! reads the VRRP instance, [`haproxy`] the proxies; [`convert`] joins them
//! (HAProxy's binds on the keepalived VIPs become the services) and writes
//! the TOML. Every emitted value is preceded by a comment naming the line it
//! comes from; every value that is dropped or only approximated is a
//! [`Warning`] with its file and line, listed again at the top of the
//! output. The text is checked with [`crate::config::parse`], the loader
//! `balancer check` and `balancer run` use, before it is returned.

pub mod haproxy;
pub mod keepalived;
mod toml_out;

use std::{collections::HashSet, fmt, net::Ipv4Addr};

use crate::config::Scheduler;

/// One input file: the name used in comments and messages, and its text.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// A line of an input file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: String,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A value dropped or approximated in the conversion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Warning {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Why nothing was converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// A problem at a line of an input file.
    #[error("{origin}: {message}")]
    At { origin: Origin, message: String },
    /// A problem of the files as a whole.
    #[error("{0}")]
    Whole(String),
}

/// `text` without the byte-order mark an editor may have put first.
pub(crate) fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

pub(crate) fn error_at(origin: &Origin, message: impl Into<String>) -> ImportError {
    ImportError::At {
        origin: origin.clone(),
        message: message.into(),
    }
}

/// A converted value and where it comes from, for the comment above it:
/// `keepalived.conf:12 priority 100`, or why a default was written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub from: String,
}

impl<T> Sourced<T> {
    pub fn new(value: T, from: impl Into<String>) -> Self {
        Sourced {
            value,
            from: from.into(),
        }
    }
}

/// Collects warnings; the same warning (a `defaults` line applied to two
/// proxies) is kept once.
#[derive(Debug, Default)]
pub struct Warnings {
    list: Vec<Warning>,
    seen: HashSet<Warning>,
}

impl Warnings {
    pub fn warn(&mut self, origin: &Origin, message: impl Into<String>) {
        let warning = Warning {
            origin: origin.clone(),
            message: message.into().replace('\n', " "),
        };
        if self.seen.insert(warning.clone()) {
            self.list.push(warning);
        }
    }

    pub fn into_vec(self) -> Vec<Warning> {
        self.list
    }
}

/// What the command line adds to the files.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// This node's address (`[node] address`). keepalived takes it from the
    /// interface unless `unicast_src_ip` / `mcast_src_ip` says it.
    pub address: Option<Ipv4Addr>,
    /// The `vrrp_instance` to convert when the file has several.
    pub instance: Option<String>,
}

/// The result: the configuration's text (warnings included as comments)
/// and the warnings, for stderr.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: String,
    pub warnings: Vec<Warning>,
}

/// One `[[service]]` as it will be written.
#[derive(Debug, Clone)]
pub struct Service {
    pub vip: Sourced<Ipv4Addr>,
    pub port: Sourced<u16>,
    pub backends: Vec<Sourced<std::net::SocketAddrV4>>,
    pub scheduler: Sourced<Scheduler>,
}

/// Converts `keepalived` (and `haproxy`, which gives the services) into
/// the text of a valid `balancer.toml`.
pub fn convert(
    keepalived: Input<'_>,
    haproxy: Option<Input<'_>>,
    options: &Options,
) -> Result<Imported, ImportError> {
    let mut warnings = Warnings::default();
    let vrrp = keepalived::parse(keepalived, options.instance.as_deref(), &mut warnings)?;
    let Some(haproxy) = haproxy else {
        return Err(ImportError::Whole(format!(
            "{}: keepalived.conf gives the virtual addresses but not the KeyDB servers behind them: \
             pass the haproxy.cfg that balances them with --haproxy FILE",
            keepalived.name
        )));
    };
    let proxies = haproxy::parse(haproxy, &mut warnings)?;

    let node_address = node_address(&vrrp, &proxies, options, keepalived.name)?;
    let services = services(&vrrp, &proxies, &mut warnings, haproxy.name)?;

    let mut vrrp = vrrp;
    vrrp.unicast_peers.retain(|peer| {
        if peer.value == node_address.value {
            warnings.warn(
                &vrrp.instance_origin,
                format!(
                    "unicast_peer {} is this node's own address: left out of unicast_peers",
                    peer.value
                ),
            );
            false
        } else {
            true
        }
    });
    if !services
        .iter()
        .flat_map(|s| &s.backends)
        .any(|b| *b.value.ip() == node_address.value)
    {
        warnings.warn(
            &vrrp.instance_origin,
            format!(
                "this node's address {} is none of the HAProxy servers: every backend is remote (NATed); \
                 a KeyDB on this node is served without NAT only when a server has this node's address",
                node_address.value
            ),
        );
    }

    let mut warnings = warnings.into_vec();
    // In reading order: keepalived.conf's first, each file's by line.
    warnings.sort_by_key(|w| (w.origin.file != keepalived.name, w.origin.line));
    let config = toml_out::render(
        &toml_out::Document {
            sources: vec![keepalived.name, haproxy.name],
            interface: &vrrp.interface,
            address: &node_address,
            vrrp: &vrrp,
            health: &proxies.health,
            idle_timeout_secs: proxies.idle_timeout_secs.as_ref(),
            services: &services,
        },
        &warnings,
    );
    if let Err(error) = crate::config::parse(&config, "the converted configuration") {
        return Err(ImportError::Whole(format!(
            "{}; nothing was written",
            crate::error_chain(&error)
        )));
    }
    Ok(Imported { config, warnings })
}

fn node_address(
    vrrp: &keepalived::Instance,
    proxies: &haproxy::Proxies,
    options: &Options,
    keepalived_name: &str,
) -> Result<Sourced<Ipv4Addr>, ImportError> {
    match (options.address, &vrrp.source_address) {
        (Some(given), Some(from_file)) if given != from_file.value => Err(ImportError::Whole(
            format!(
                "--address {given} differs from {} ({}): the adverts' source is this node's address",
                from_file.value, from_file.from
            ),
        )),
        (Some(given), _) => Ok(Sourced::new(given, "the --address option")),
        (None, Some(from_file)) => Ok(from_file.clone()),
        (None, None) => {
            let mut servers: Vec<String> = Vec::new();
            for s in &proxies.services {
                for b in &s.backends {
                    let ip = b.value.ip().to_string();
                    if !servers.contains(&ip) {
                        servers.push(ip);
                    }
                }
            }
            Err(ImportError::Whole(format!(
                "{keepalived_name}: this node's address is not in the file (keepalived takes {}'s \
                 primary address; no unicast_src_ip): pass --address IPV4{}",
                vrrp.interface.value,
                if servers.is_empty() {
                    String::new()
                } else {
                    format!(", e.g. one of the HAProxy servers {}", servers.join(", "))
                }
            )))
        }
    }
}

/// HAProxy's binds matched with the keepalived VIPs.
fn services(
    vrrp: &keepalived::Instance,
    proxies: &haproxy::Proxies,
    warnings: &mut Warnings,
    haproxy_name: &str,
) -> Result<Vec<Service>, ImportError> {
    let vips: Vec<Ipv4Addr> = vrrp.vips.iter().map(|v| v.value).collect();
    let mut used: HashSet<Ipv4Addr> = HashSet::new();
    let mut services = Vec::new();
    for proxy in &proxies.services {
        let targets: Vec<Sourced<Ipv4Addr>> = match proxy.bind_address {
            Some(address) if vips.contains(&address) => {
                vec![Sourced::new(address, proxy.bind.from.clone())]
            }
            Some(address) => {
                warnings.warn(
                    &proxy.bind_origin,
                    format!(
                        "bind {address}:{} is not a keepalived virtual_ipaddress: not converted \
                         (the agent serves only the VIPs it holds)",
                        proxy.bind.value
                    ),
                );
                continue;
            }
            None => {
                warnings.warn(
                    &proxy.bind_origin,
                    format!(
                        "bind on every address: converted to the keepalived VIP{} {} only",
                        if vips.len() == 1 { "" } else { "s" },
                        vips.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                vrrp.vips
                    .iter()
                    .map(|v| Sourced::new(v.value, format!("{} and {}", proxy.bind.from, v.from)))
                    .collect()
            }
        };
        for vip in targets {
            used.insert(vip.value);
            services.push(Service {
                vip,
                port: proxy.bind.clone(),
                backends: proxy.backends.clone(),
                scheduler: proxy.scheduler.clone(),
            });
        }
    }
    for vip in &vrrp.vips {
        if !used.contains(&vip.value) {
            warnings.warn(
                &vip.origin,
                format!(
                    "virtual_ipaddress {} has no HAProxy frontend: the agent holds only the VIPs of its services, so it is not \
                     converted; the adverts list one VIP fewer, which a keepalived peer still listing it drops",
                    vip.value
                ),
            );
        }
    }
    if services.is_empty() {
        return Err(ImportError::Whole(format!(
            "{haproxy_name}: no frontend or listen section binds a keepalived virtual_ipaddress ({}) with servers: nothing to balance",
            vips.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(services)
}

#[cfg(test)]
mod tests;
