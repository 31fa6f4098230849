//! haproxy.cfg: its sections and lines, and the TCP proxies in it as
//! [`ProxyService`]s (one per `bind`), with the health-check settings and
//! the idle timeout the agent has one of for all services.
//!
//! The syntax: a section starts with its keyword (`global`, `defaults`,
//! `frontend NAME`, `backend NAME`, `listen NAME`, ...) and runs to the next
//! one; each other line is a keyword and its words; `#` starts a comment;
//! `"..."`, `'...'` and `\` quote.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use super::{error_at, without_bom, ImportError, Input, Origin, Sourced, Warnings};
use crate::{config::Scheduler, health};

/// HAProxy's default `inter`, milliseconds.
const DEFAULT_INTER_MS: u64 = 2000;
/// HAProxy's default `rise`.
const DEFAULT_RISE: u32 = 2;
/// HAProxy's default `fall`.
const DEFAULT_FALL: u32 = 3;

const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "resolvers",
    "peers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "crt-store",
    "log-forward",
    "fcgi-app",
    "traces",
];

/// One line: its words, unquoted.
#[derive(Debug, Clone)]
struct Line {
    origin: Origin,
    words: Vec<String>,
}

impl Line {
    fn from(&self) -> String {
        format!("{} {}", self.origin, self.words.join(" "))
    }

    fn keyword(&self) -> &str {
        &self.words[0]
    }
}

#[derive(Debug)]
struct Section {
    header: Line,
    lines: Vec<Line>,
}

fn split_words(text: &str, origin: &Origin) -> Result<Vec<String>, ImportError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' => break,
            '\\' => {
                in_word = true;
                match chars.next() {
                    // `\r`, `\n`, `\t` are HAProxy's escapes in tcp-check strings.
                    Some('r') => word.push_str("\\r"),
                    Some('n') => word.push_str("\\n"),
                    Some('t') => word.push_str("\\t"),
                    Some(other) => word.push(other),
                    None => word.push('\\'),
                }
            }
            '"' | '\'' => {
                in_word = true;
                let quote = c;
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == quote {
                        closed = true;
                        break;
                    }
                    word.push(c);
                }
                if !closed {
                    return Err(error_at(
                        origin,
                        "a quoted string is not closed on its line",
                    ));
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn sections(input: Input<'_>) -> Result<Vec<Section>, ImportError> {
    let mut sections: Vec<Section> = Vec::new();
    for (index, text) in without_bom(input.text).lines().enumerate() {
        let origin = Origin {
            file: input.name.to_string(),
            line: index + 1,
        };
        let words = split_words(text, &origin)?;
        if words.is_empty() {
            continue;
        }
        let line = Line { origin, words };
        if SECTIONS.contains(&line.keyword()) {
            sections.push(Section {
                header: line,
                lines: Vec::new(),
            });
        } else {
            match sections.last_mut() {
                Some(section) => section.lines.push(line),
                None => {
                    return Err(error_at(
                        &line.origin,
                        format!(
                            "`{}` before any section (global, defaults, frontend, backend, listen)",
                            line.keyword()
                        ),
                    ))
                }
            }
        }
    }
    Ok(sections)
}

/// An HAProxy time (`2s`, `500ms`, `1m`; a bare number is milliseconds),
/// in milliseconds.
fn time_ms(text: &str, line: &Line) -> Result<u64, ImportError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| error_at(&line.origin, format!("{text:?} is not an HAProxy time")))?;
    let scale = match unit {
        "" | "ms" => 1,
        "us" => return Ok(n.div_ceil(1000)),
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(error_at(
                &line.origin,
                format!("{text:?} is not an HAProxy time (units: us, ms, s, m, h, d)"),
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| error_at(&line.origin, format!("{text:?} is too long")))
}

fn count(text: &str, line: &Line, what: &str) -> Result<u32, ImportError> {
    text.parse()
        .map_err(|_| error_at(&line.origin, format!("{what}: {text:?} is not a number")))
}

/// A value from a line, with the line's text for the comment.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    line: Line,
}

impl<T: Clone> At<T> {
    fn sourced(&self) -> Sourced<T> {
        Sourced::new(self.value.clone(), self.line.from())
    }
}

/// Health-check parameters of a `server` or `default-server` line.
#[derive(Debug, Clone, Default)]
struct CheckParams {
    check: Option<Line>,
    inter: Option<At<u64>>,
    rise: Option<At<u32>>,
    fall: Option<At<u32>>,
}

/// The settings a proxy takes from `defaults` or sets itself.
#[derive(Debug, Clone, Default)]
struct Settings {
    mode: Option<At<String>>,
    balance: Option<At<String>>,
    timeouts: HashMap<String, At<u64>>,
    /// `option redis-check`, or `tcp-check` lines sending PING.
    ping_check: Option<Line>,
    default_server: CheckParams,
}

#[derive(Debug)]
struct Server {
    line: Line,
    address: SocketAddrV4,
    /// No port: HAProxy uses the port the client connected to.
    port_given: bool,
    params: CheckParams,
}

#[derive(Debug)]
struct Bind {
    line: Line,
    address: Option<Ipv4Addr>,
    port: u16,
}

#[derive(Debug)]
struct Proxy {
    header: Line,
    binds: Vec<Bind>,
    default_backend: Option<Line>,
    servers: Vec<Server>,
    settings: Settings,
}

/// One `bind` of a frontend or listen section with the servers behind it.
#[derive(Debug, Clone)]
pub struct ProxyService {
    /// `None`: every address (`*`, `0.0.0.0`, `::`, empty).
    pub bind_address: Option<Ipv4Addr>,
    pub bind_origin: Origin,
    /// The port, from the bind line.
    pub bind: Sourced<u16>,
    pub backends: Vec<Sourced<SocketAddrV4>>,
    pub scheduler: Sourced<Scheduler>,
}

/// `[health]` as converted; `None` fields are left to the agent's defaults.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub interval_ms: Option<Sourced<u64>>,
    pub timeout_ms: Option<Sourced<u64>>,
    pub rise: Option<Sourced<u32>>,
    pub fall: Option<Sourced<u32>>,
}

/// What haproxy.cfg converts to.
#[derive(Debug, Clone)]
pub struct Proxies {
    pub services: Vec<ProxyService>,
    pub health: Health,
    pub idle_timeout_secs: Option<Sourced<u64>>,
}

/// Reads `input` and converts its TCP proxies.
pub fn parse(input: Input<'_>, warnings: &mut Warnings) -> Result<Proxies, ImportError> {
    let mut defaults = Settings::default();
    let mut frontends: Vec<Proxy> = Vec::new();
    let mut backends: HashMap<String, Proxy> = HashMap::new();
    let mut backend_used: HashMap<String, bool> = HashMap::new();
    for section in sections(input)? {
        let kind = section.header.keyword().to_string();
        match kind.as_str() {
            "defaults" => {
                let mut settings = Settings::default();
                for line in &section.lines {
                    if !read_setting(line, &mut settings, warnings)? {
                        warn_unconverted(line, warnings);
                    }
                }
                defaults = settings;
            }
            "frontend" | "backend" | "listen" => {
                let name = section.header.words.get(1).cloned().ok_or_else(|| {
                    error_at(&section.header.origin, format!("`{kind}` needs a name"))
                })?;
                let proxy = read_proxy(&section, &defaults, warnings)?;
                if kind == "backend" {
                    if !proxy.binds.is_empty() {
                        return Err(error_at(
                            &proxy.binds[0].line.origin,
                            "bind in a backend section",
                        ));
                    }
                    backend_used.insert(name.clone(), false);
                    backends.insert(name, proxy);
                } else {
                    if kind == "frontend" && !proxy.servers.is_empty() {
                        return Err(error_at(
                            &proxy.servers[0].line.origin,
                            "server in a frontend section",
                        ));
                    }
                    frontends.push(proxy);
                }
            }
            other => {
                let keywords: Vec<&str> = section.lines.iter().map(|l| l.keyword()).collect();
                warnings.warn(
                    &section.header.origin,
                    format!(
                        "{other} section{}: not converted (HAProxy's process settings, no equivalent in the agent)",
                        if keywords.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", keywords.join(", "))
                        }
                    ),
                );
            }
        }
    }

    let mut services = Vec::new();
    let mut checked: Vec<(&Server, &Settings)> = Vec::new();
    let mut unchecked: Vec<&Server> = Vec::new();
    let mut idle: Vec<(u64, String, Origin)> = Vec::new();
    for frontend in &frontends {
        let servers_of: &Proxy = if frontend.servers.is_empty() {
            match &frontend.default_backend {
                Some(line) => {
                    let name = &line.words[1];
                    match backends.get(name) {
                        Some(backend) => {
                            backend_used.insert(name.clone(), true);
                            backend
                        }
                        None => {
                            return Err(error_at(
                                &line.origin,
                                format!("default_backend {name}: no backend section {name}"),
                            ))
                        }
                    }
                }
                None => {
                    warnings.warn(
                        &frontend.header.origin,
                        format!(
                            "{}: no servers and no default_backend: not converted",
                            frontend.header.words.join(" ")
                        ),
                    );
                    continue;
                }
            }
        } else {
            frontend
        };
        if servers_of.servers.is_empty() {
            warnings.warn(
                &servers_of.header.origin,
                format!(
                    "{}: no servers: not converted",
                    servers_of.header.words.join(" ")
                ),
            );
            continue;
        }
        if frontend.binds.is_empty() {
            warnings.warn(
                &frontend.header.origin,
                format!(
                    "{}: no bind: not converted",
                    frontend.header.words.join(" ")
                ),
            );
            continue;
        }
        for proxy in [frontend, servers_of] {
            if let Some(mode) = &proxy.settings.mode {
                if mode.value != "tcp" {
                    warnings.warn(
                        &mode.line.origin,
                        format!(
                            "mode {}: converted as TCP; the agent balances connections and does nothing of HTTP mode",
                            mode.value
                        ),
                    );
                }
            }
        }
        idle.push(idle_timeout(frontend, servers_of, warnings));
        let scheduler = scheduler(servers_of, warnings);
        for bind in &frontend.binds {
            let mut list = Vec::new();
            for server in &servers_of.servers {
                let address = if server.port_given {
                    server.address
                } else {
                    warnings.warn(
                        &server.line.origin,
                        format!(
                            "server {} has no port: HAProxy uses the port the client connected to, converted to {}",
                            server.line.words[1], bind.port
                        ),
                    );
                    SocketAddrV4::new(*server.address.ip(), bind.port)
                };
                list.push(Sourced::new(address, server.line.from()));
            }
            services.push(ProxyService {
                bind_address: bind.address,
                bind_origin: bind.line.origin.clone(),
                bind: Sourced::new(bind.port, bind.line.from()),
                backends: list,
                scheduler: scheduler.clone(),
            });
        }
        for server in &servers_of.servers {
            if server.params.check.is_some() {
                checked.push((server, &servers_of.settings));
            } else {
                unchecked.push(server);
            }
        }
    }
    let mut names: Vec<&String> = backend_used.keys().collect();
    names.sort();
    for name in names {
        if !backend_used[name] {
            let backend = &backends[name];
            warnings.warn(
                &backend.header.origin,
                format!("backend {name}: no frontend uses it: not converted"),
            );
        }
    }

    let health = health(&checked, &unchecked, warnings);
    let longest = idle.iter().map(|(secs, _, _)| *secs).max();
    for (secs, _, origin) in &idle {
        if Some(*secs) != longest {
            warnings.warn(
                origin,
                format!(
                    "an idle timeout of {secs} s: the agent has one idle_timeout_secs for every service, the longest ({} s)",
                    longest.unwrap_or_default()
                ),
            );
        }
    }
    let idle_timeout_secs = idle
        .into_iter()
        .max_by_key(|(secs, _, _)| *secs)
        .map(|(secs, from, _)| Sourced::new(secs, from));
    Ok(Proxies {
        services,
        health,
        idle_timeout_secs,
    })
}

fn warn_unconverted(line: &Line, warnings: &mut Warnings) {
    let message = match line.keyword() {
        "log" | "option"
            if line.keyword() == "log"
                || matches!(
                    line.words.get(1).map(String::as_str),
                    Some("tcplog" | "httplog" | "dontlognull" | "log-health-checks")
                ) =>
        {
            format!("{}: not converted (the agent logs to stderr / the journal)", line.words.join(" "))
        }
        "stats" => format!(
            "{}: not converted; `balancer status` and /metrics show the agent's state",
            line.words.join(" ")
        ),
        "maxconn" | "fullconn" => format!(
            "{}: not converted; the agent has no connection limit (conntrack_flows bounds the NATed flows)",
            line.words.join(" ")
        ),
        _ => format!("{}: not converted (no equivalent in the agent)", line.words.join(" ")),
    };
    warnings.warn(&line.origin, message);
}

/// A line that `defaults` and proxies share. Returns whether it was one.
fn read_setting(
    line: &Line,
    settings: &mut Settings,
    warnings: &mut Warnings,
) -> Result<bool, ImportError> {
    let words = &line.words;
    match line.keyword() {
        "mode" => {
            let mode = words.get(1).ok_or_else(|| error_at(&line.origin, "mode needs tcp or http"))?;
            settings.mode = Some(At {
                value: mode.clone(),
                line: line.clone(),
            });
        }
        "balance" => {
            let algorithm = words
                .get(1)
                .ok_or_else(|| error_at(&line.origin, "balance needs an algorithm"))?;
            settings.balance = Some(At {
                value: algorithm.clone(),
                line: line.clone(),
            });
        }
        "timeout" => {
            let (Some(which), Some(value)) = (words.get(1), words.get(2)) else {
                return Err(error_at(&line.origin, "timeout needs a name and a time"));
            };
            let ms = time_ms(value, line)?;
            match which.as_str() {
                "client" | "server" | "tunnel" | "check" => {}
                "connect" => warnings.warn(
                    &line.origin,
                    format!(
                        "{}: not converted; clients connect to the backend through the data plane, so their own connect timeout applies",
                        words.join(" ")
                    ),
                ),
                _ => warnings.warn(
                    &line.origin,
                    format!("{}: not converted (no equivalent in the agent)", words.join(" ")),
                ),
            }
            settings.timeouts.insert(
                which.clone(),
                At {
                    value: ms,
                    line: line.clone(),
                },
            );
        }
        "option" => match words.get(1).map(String::as_str) {
            Some("redis-check") => settings.ping_check = Some(line.clone()),
            Some("tcp-check") => {}
            Some("redispatch") => warnings.warn(
                &line.origin,
                "option redispatch: approximated; the agent sends new connections only to READY backends and resets \
                 the flows of a backend that goes down, so clients reconnect to another one, but a connection that \
                 fails before the health check notices is not retried elsewhere",
            ),
            _ => warn_unconverted(line, warnings),
        },
        "tcp-check" => read_tcp_check(line, settings, warnings),
        "retries" => warnings.warn(
            &line.origin,
            format!("{}: not converted; a failed connection is not retried by the agent, the client retries", words.join(" ")),
        ),
        "default-server" => {
            settings.default_server = read_server_params(line, 1, &settings.default_server, warnings)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn read_tcp_check(line: &Line, settings: &mut Settings, warnings: &mut Warnings) {
    let rest = line.words[1..].join(" ");
    let upper = rest.to_ascii_uppercase();
    match line.words.get(1).map(String::as_str) {
        Some("connect") => {}
        Some("send" | "send-lf") if upper.contains("PING") => settings.ping_check = Some(line.clone()),
        Some("send" | "send-lf") if upper.contains("AUTH") => warnings.warn(
            &line.origin,
            "tcp-check send AUTH: not converted; put the password in a file and set [health] password_file",
        ),
        Some("send" | "send-lf") if upper.contains("QUIT") => {}
        Some("send" | "send-lf") if upper.contains("INFO") && upper.contains("REPLICATION") => {}
        Some("expect") if upper.contains("PONG") || upper.contains("+OK") => {}
        Some("expect") if upper.contains("ROLE:MASTER") => warnings.warn(
            &line.origin,
            format!(
                "{}: not converted; HAProxy sent clients only to the master, the agent sends them to every READY \
                 KeyDB (masters, and replicas or active replicas whose replication link is up): with read-only \
                 replicas list only the master as a backend or use scheduler = \"first\"",
                line.words.join(" ")
            ),
        ),
        _ => warnings.warn(
            &line.origin,
            format!("{}: not converted; the agent's check is its own (PING, INFO)", line.words.join(" ")),
        ),
    }
}

/// Server options that take a value; the rest are flags.
const SERVER_OPTIONS_WITH_VALUE: &[&str] = &[
    "inter",
    "fastinter",
    "downinter",
    "rise",
    "fall",
    "weight",
    "port",
    "addr",
    "maxconn",
    "maxqueue",
    "minconn",
    "slowstart",
    "on-error",
    "on-marked-down",
    "on-marked-up",
    "init-addr",
    "resolvers",
    "resolve-prefer",
    "id",
    "cookie",
    "observe",
    "error-limit",
    "source",
    "agent-port",
    "agent-inter",
    "agent-addr",
    "agent-send",
    "check-sni",
    "sni",
    "ca-file",
    "crt",
    "alpn",
    "proto",
    "pool-max-conn",
    "pool-purge-delay",
    "max-reuse",
    "redir",
    "track",
    "namespace",
    "tcp-ut",
    "usesrc",
    "log-proto",
    "health-check-port",
];

fn read_server_params(
    line: &Line,
    first: usize,
    inherited: &CheckParams,
    warnings: &mut Warnings,
) -> Result<CheckParams, ImportError> {
    let mut params = inherited.clone();
    let mut i = first;
    let words = &line.words;
    while i < words.len() {
        let option = words[i].as_str();
        let value = if SERVER_OPTIONS_WITH_VALUE.contains(&option) {
            i += 1;
            Some(
                words
                    .get(i)
                    .ok_or_else(|| error_at(&line.origin, format!("{option} needs a value")))?,
            )
        } else {
            None
        };
        i += 1;
        match (option, value) {
            ("check", _) => params.check = Some(line.clone()),
            ("no-check", _) => params.check = None,
            ("inter", Some(v)) => params.inter = Some(At { value: time_ms(v, line)?, line: line.clone() }),
            ("rise", Some(v)) => params.rise = Some(At { value: count(v, line, "rise")?, line: line.clone() }),
            ("fall", Some(v)) => params.fall = Some(At { value: count(v, line, "fall")?, line: line.clone() }),
            ("weight", Some(v)) if v == "1" || v == "100" => {}
            ("weight", Some(v)) => warnings.warn(
                &line.origin,
                format!("weight {v}: not converted; the agent gives every backend the same share"),
            ),
            ("backup", _) => warnings.warn(
                &line.origin,
                format!(
                    "{} backup: converted as an ordinary backend that takes connections; the agent has no backup servers \
                     (scheduler = \"first\" with it last in backends keeps it standing by)",
                    words.get(1).map(String::as_str).unwrap_or("server")
                ),
            ),
            ("disabled", _) => {
                return Err(error_at(
                    &line.origin,
                    "disabled server: remove the line or the keyword; the agent has no disabled backends",
                ))
            }
            (other, Some(v)) => warnings.warn(&line.origin, format!("{other} {v}: not converted")),
            (other, None) => warnings.warn(&line.origin, format!("{other}: not converted")),
        }
    }
    Ok(params)
}

fn read_server(
    line: &Line,
    settings: &Settings,
    warnings: &mut Warnings,
) -> Result<Server, ImportError> {
    let (Some(name), Some(address)) = (line.words.get(1), line.words.get(2)) else {
        return Err(error_at(&line.origin, "server needs a name and an address"));
    };
    let address = address.strip_prefix("ipv4@").unwrap_or(address);
    let (ip, port) = match address.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') => (ip, Some(port)),
        _ => (address, None),
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| {
        error_at(
            &line.origin,
            format!("server {name} {address}: not an IPv4 address (names are not resolved; the agent is IPv4 only)"),
        )
    })?;
    let port_value = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(error_at(
                    &line.origin,
                    format!("server {name} {address}: {p:?} is not a port (offsets and ranges are not supported)"),
                ))
            }
        },
        None => 0,
    };
    let params = read_server_params(line, 3, &settings.default_server, warnings)?;
    Ok(Server {
        line: line.clone(),
        address: SocketAddrV4::new(ip, port_value),
        port_given: port.is_some(),
        params,
    })
}

fn read_bind_address(
    text: &str,
    line: &Line,
) -> Result<Option<(Option<Ipv4Addr>, u16)>, ImportError> {
    let text = text.strip_prefix("ipv4@").unwrap_or(text);
    if text.starts_with('/')
        || text.starts_with("unix@")
        || text.starts_with("abns@")
        || text.starts_with("fd@")
    {
        return Ok(None);
    }
    let text = text.strip_prefix("ipv6@").unwrap_or(text);
    let Some((address, port)) = text.rsplit_once(':') else {
        return Err(error_at(&line.origin, format!("bind {text:?}: no port")));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(error_at(
                &line.origin,
                format!("bind {text:?}: {port:?} is not a port (ranges are not supported)"),
            ))
        }
    };
    let address = match address {
        "" | "*" | "0.0.0.0" | "::" | "[::]" | ":" => None,
        // An IPv6 address: the agent is IPv4 only.
        a if a.contains(':') => return Ok(None),
        a => Some(a.parse::<Ipv4Addr>().map_err(|_| {
            error_at(
                &line.origin,
                format!("bind {text:?}: {a:?} is not an IPv4 address"),
            )
        })?),
    };
    Ok(Some((address, port)))
}

fn read_binds(
    line: &Line,
    into: &mut Vec<Bind>,
    warnings: &mut Warnings,
    list: &str,
) -> Result<(), ImportError> {
    for text in list.split(',').filter(|t| !t.is_empty()) {
        match read_bind_address(text, line)? {
            Some((address, port)) => into.push(Bind {
                line: line.clone(),
                address,
                port,
            }),
            None => warnings.warn(
                &line.origin,
                format!("bind {text}: not an IPv4 address, not converted (the agent is IPv4 only)"),
            ),
        }
    }
    Ok(())
}

fn read_proxy(
    section: &Section,
    defaults: &Settings,
    warnings: &mut Warnings,
) -> Result<Proxy, ImportError> {
    let mut proxy = Proxy {
        header: section.header.clone(),
        binds: Vec::new(),
        default_backend: None,
        servers: Vec::new(),
        settings: defaults.clone(),
    };
    // The old form `listen NAME ADDRESS:PORT`.
    if section.header.keyword() == "listen" {
        if let Some(list) = section.header.words.get(2) {
            read_binds(&section.header, &mut proxy.binds, warnings, list)?;
        }
    }
    for line in &section.lines {
        match line.keyword() {
            "bind" => {
                let list = line
                    .words
                    .get(1)
                    .ok_or_else(|| error_at(&line.origin, "bind needs an address:port"))?;
                read_binds(line, &mut proxy.binds, warnings, list)?;
                if line.words.len() > 2 {
                    warnings.warn(
                        &line.origin,
                        format!("bind options {}: not converted", line.words[2..].join(" ")),
                    );
                }
            }
            "server" => {
                let server = read_server(line, &proxy.settings, warnings)?;
                proxy.servers.push(server);
            }
            "default_backend" => {
                if line.words.len() != 2 {
                    return Err(error_at(&line.origin, "default_backend takes one name"));
                }
                proxy.default_backend = Some(line.clone());
            }
            "use_backend" => warnings.warn(
                &line.origin,
                format!(
                    "{}: not converted; each service has one backend list (the default_backend's)",
                    line.words.join(" ")
                ),
            ),
            _ => {
                if !read_setting(line, &mut proxy.settings, warnings)? {
                    warn_unconverted(line, warnings);
                }
            }
        }
    }
    Ok(proxy)
}

fn scheduler(backend: &Proxy, warnings: &mut Warnings) -> Sourced<Scheduler> {
    let Some(balance) = &backend.settings.balance else {
        return Sourced::new(
            Scheduler::RoundRobin,
            format!(
                "HAProxy's default balance roundrobin ({} sets no balance)",
                backend.header.from()
            ),
        );
    };
    match balance.value.as_str() {
        "roundrobin" => balance_as(balance, Scheduler::RoundRobin),
        "first" => {
            if backend
                .servers
                .iter()
                .any(|s| s.line.words.iter().any(|w| w == "maxconn"))
            {
                warnings.warn(
                    &balance.line.origin,
                    "balance first with server maxconn: approximated; the agent sends every new connection to the \
                     first READY backend, with no per-server limit",
                );
            }
            balance_as(balance, Scheduler::First)
        }
        "static-rr" => {
            warnings.warn(
                &balance.line.origin,
                "balance static-rr: converted to round_robin (the agent gives every backend the same share)",
            );
            balance_as(balance, Scheduler::RoundRobin)
        }
        other => {
            warnings.warn(
                &balance.line.origin,
                format!("balance {other}: approximated by round_robin; the agent has round_robin and first only"),
            );
            balance_as(balance, Scheduler::RoundRobin)
        }
    }
}

fn balance_as(balance: &At<String>, scheduler: Scheduler) -> Sourced<Scheduler> {
    Sourced::new(scheduler, balance.line.from())
}

/// The flow idle timeout a proxy implies: `timeout tunnel`, else the larger
/// of `timeout client` and `timeout server`.
fn idle_timeout(
    frontend: &Proxy,
    backend: &Proxy,
    warnings: &mut Warnings,
) -> (u64, String, Origin) {
    let tunnel = backend.settings.timeouts.get("tunnel");
    let client = frontend.settings.timeouts.get("client");
    let server = backend.settings.timeouts.get("server");
    let chosen = match (tunnel, client, server) {
        (Some(t), _, _) => Some(t),
        (None, Some(c), Some(s)) => Some(if c.value >= s.value { c } else { s }),
        _ => None,
    };
    match chosen {
        Some(at) => {
            let secs = at
                .value
                .div_ceil(1000)
                .clamp(1, crate::config::MAX_TIMEOUT_SECS);
            warnings.warn(
                &at.line.origin,
                format!(
                    "{}: approximated by idle_timeout_secs = {secs}: HAProxy closed idle connections, the agent \
                     forgets an idle flow to a remote backend (its next packet is not delivered) and leaves \
                     connections to this node's KeyDB alone",
                    at.line.words.join(" ")
                ),
            );
            for other in [tunnel, client, server].into_iter().flatten() {
                if other.line.origin != at.line.origin {
                    warnings.warn(
                        &other.line.origin,
                        format!(
                            "{}: not converted; the agent has one idle timeout, taken from {} ({})",
                            other.line.words.join(" "),
                            at.line.origin,
                            at.line.words.join(" ")
                        ),
                    );
                }
            }
            (secs, at.line.from(), at.line.origin.clone())
        }
        None => {
            let secs = crate::config::MAX_TIMEOUT_SECS;
            warnings.warn(
                &frontend.header.origin,
                format!(
                    "{}: no timeout client and server (or tunnel): HAProxy keeps idle connections for ever; \
                     converted to the agent's longest idle_timeout_secs, {secs}",
                    frontend.header.words.join(" ")
                ),
            );
            (
                secs,
                format!(
                    "the agent's longest idle timeout ({} sets no timeout client/server)",
                    frontend.header.from()
                ),
                frontend.header.origin.clone(),
            )
        }
    }
}

fn health(
    checked: &[(&Server, &Settings)],
    unchecked: &[&Server],
    warnings: &mut Warnings,
) -> Health {
    for server in unchecked {
        warnings.warn(
            &server.line.origin,
            format!(
                "server {} has no `check`: HAProxy never took it out; the agent health-checks every backend",
                server.line.words[1]
            ),
        );
    }
    let Some((first, settings)) = checked.first() else {
        return Health::default();
    };
    let params = &first.params;
    let check_line = params.check.as_ref().expect("checked servers have `check`");
    let interval = params.inter.as_ref().map(At::sourced).unwrap_or_else(|| {
        Sourced::new(
            DEFAULT_INTER_MS,
            format!(
                "HAProxy's default inter 2s ({} sets no inter)",
                check_line.from()
            ),
        )
    });
    let rise = params.rise.as_ref().map(At::sourced).unwrap_or_else(|| {
        Sourced::new(
            DEFAULT_RISE,
            format!(
                "HAProxy's default rise 2 ({} sets no rise)",
                check_line.from()
            ),
        )
    });
    let fall = params.fall.as_ref().map(At::sourced).unwrap_or_else(|| {
        Sourced::new(
            DEFAULT_FALL,
            format!(
                "HAProxy's default fall 3 ({} sets no fall)",
                check_line.from()
            ),
        )
    });
    for (other, _) in &checked[1..] {
        let p = &other.params;
        let differs = p.inter.as_ref().map_or(DEFAULT_INTER_MS, |a| a.value) != interval.value
            || p.rise.as_ref().map_or(DEFAULT_RISE, |a| a.value) != rise.value
            || p.fall.as_ref().map_or(DEFAULT_FALL, |a| a.value) != fall.value;
        if differs {
            warnings.warn(
                &other.line.origin,
                format!(
                    "server {}: its inter/rise/fall differ from the first checked server's; the agent has one [health] \
                     for every backend, taken from {}",
                    other.line.words[1], first.line.origin
                ),
            );
        }
    }
    let mut interval = interval;
    let range = health::MIN_INTERVAL_MS..=health::MAX_INTERVAL_MS;
    if !range.contains(&interval.value) {
        let clamped = interval.value.clamp(*range.start(), *range.end());
        warnings.warn(
            &first.line.origin,
            format!(
                "inter {} ms is outside the agent's {range:?} ms: converted to {clamped}",
                interval.value
            ),
        );
        interval.value = clamped;
    }
    let bounded = |mut v: Sourced<u32>, what: &str, warnings: &mut Warnings| {
        if !(1..=100).contains(&v.value) {
            let clamped = v.value.clamp(1, 100);
            warnings.warn(
                &first.line.origin,
                format!(
                    "{what} {} is outside 1..=100: converted to {clamped}",
                    v.value
                ),
            );
            v.value = clamped;
        }
        v
    };
    let rise = bounded(rise, "rise", warnings);
    let fall = bounded(fall, "fall", warnings);
    let timeout = match settings.timeouts.get("check") {
        Some(at) => {
            warnings.warn(
                &at.line.origin,
                format!(
                    "{}: approximated; HAProxy allowed the connect (up to the smaller of timeout connect and inter) \
                     plus this for the reply, the agent allows this for the whole check",
                    at.line.words.join(" ")
                ),
            );
            let mut t = at.sourced();
            if t.value > interval.value || t.value == 0 {
                let clamped = t.value.clamp(1, interval.value);
                warnings.warn(
                    &at.line.origin,
                    format!(
                        "timeout check {} ms: the agent's timeout_ms must be from 1 to interval_ms ({}): converted to {clamped}",
                        t.value, interval.value
                    ),
                );
                t.value = clamped;
            }
            t
        }
        None => Sourced::new(
            interval.value,
            "HAProxy's check timeout without `timeout check`: inter".to_string(),
        ),
    };
    let kind = match &settings.ping_check {
        Some(line) => format!(
            "HAProxy's check sent PING ({}); the agent's also reads INFO persistence and replication",
            line.origin
        ),
        None => "HAProxy's check only opened a TCP connection; the agent's also sends PING and reads INFO".to_string(),
    };
    warnings.warn(
        &check_line.origin,
        format!(
            "check: approximated; {kind}, so a KeyDB that is loading or whose replication link is down is not READY \
             where HAProxy counted it up"
        ),
    );
    Health {
        interval_ms: Some(interval),
        timeout_ms: Some(timeout),
        rise: Some(rise),
        fall: Some(fall),
    }
}
