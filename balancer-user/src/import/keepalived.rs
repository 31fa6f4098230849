//! keepalived.conf: its brace syntax read into [`Statement`]s, and the one
//! `vrrp_instance` the agent can run taken from them as an [`Instance`].
//!
//! The syntax: one statement per line, words separated by blanks, `#` or
//! `!` starting a comment, `"..."` quoting a word with blanks, and a
//! statement followed by `{` opening a block of statements closed by `}`.

use std::{collections::HashMap, net::Ipv4Addr};

use super::{error_at, without_bom, ImportError, Input, Origin, Sourced, Warnings};

/// keepalived's default `advert_int`, seconds.
const DEFAULT_ADVERT_INT_S: f64 = 1.0;
/// keepalived's default `priority`.
const DEFAULT_PRIORITY: u8 = 100;
/// keepalived's default `vrrp_version`.
const DEFAULT_VERSION: u8 = 2;
/// `auth_pass` is cut to this many bytes on the wire.
const AUTH_PASS_LEN: usize = 8;

/// One line of the file (its words) and the block that follows it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub origin: Origin,
    pub words: Vec<String>,
    pub block: Option<Vec<Statement>>,
}

impl Statement {
    fn keyword(&self) -> &str {
        &self.words[0]
    }

    fn args(&self) -> &[String] {
        &self.words[1..]
    }

    /// `file:line words...`, for the comment above a converted value.
    fn from(&self) -> String {
        format!("{} {}", self.origin, self.words.join(" "))
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    EndOfLine,
}

fn tokenize(input: Input<'_>) -> Result<Vec<(Token, usize)>, ImportError> {
    let mut tokens = Vec::new();
    for (index, line) in without_bom(input.text).lines().enumerate() {
        let number = index + 1;
        let mut chars = line.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                c if c.is_whitespace() => {
                    chars.next();
                }
                '#' | '!' => break,
                '{' => {
                    chars.next();
                    tokens.push((Token::Open, number));
                }
                '}' => {
                    chars.next();
                    tokens.push((Token::Close, number));
                }
                '"' => {
                    chars.next();
                    let mut word = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '"' {
                            closed = true;
                            break;
                        }
                        word.push(c);
                    }
                    if !closed {
                        return Err(error_at(
                            &Origin {
                                file: input.name.to_string(),
                                line: number,
                            },
                            "a quoted string is not closed on its line",
                        ));
                    }
                    tokens.push((Token::Word(word), number));
                }
                _ => {
                    let mut word = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || c == '{' || c == '}' || c == '"' {
                            break;
                        }
                        word.push(c);
                        chars.next();
                    }
                    tokens.push((Token::Word(word), number));
                }
            }
        }
        tokens.push((Token::EndOfLine, number));
    }
    Ok(tokens)
}

/// Reads the file into its statements. Unbalanced braces and a `{` with no
/// statement before it are errors naming the line.
pub fn statements(input: Input<'_>) -> Result<Vec<Statement>, ImportError> {
    let at = |line: usize| Origin {
        file: input.name.to_string(),
        line,
    };
    let tokens = tokenize(input)?;
    // Blocks being read: the statements so far, and the statement that
    // opened the block with it (none for the file itself).
    let mut stack: Vec<(Vec<Statement>, Option<Statement>)> = vec![(Vec::new(), None)];
    let mut words: Vec<String> = Vec::new();
    let mut words_line = 0;
    let flush = |words: &mut Vec<String>, line: usize, into: &mut Vec<Statement>| {
        if !words.is_empty() {
            into.push(Statement {
                origin: at(line),
                words: std::mem::take(words),
                block: None,
            });
        }
    };
    for (token, line) in tokens {
        let current = &mut stack.last_mut().expect("the file's level stays").0;
        match token {
            Token::Word(word) => {
                if words.is_empty() {
                    words_line = line;
                }
                words.push(word);
            }
            Token::EndOfLine => flush(&mut words, words_line, current),
            Token::Open => {
                flush(&mut words, words_line, current);
                // `{` opens the block of the statement before it, on this
                // line or the one above.
                let opener = match current.pop() {
                    Some(s) if s.block.is_none() => s,
                    _ => return Err(error_at(&at(line), "`{` with no keyword before it")),
                };
                stack.push((Vec::new(), Some(opener)));
            }
            Token::Close => {
                flush(&mut words, words_line, current);
                if stack.len() == 1 {
                    return Err(error_at(&at(line), "`}` closes no block"));
                }
                let (body, opener) = stack.pop().expect("more than one level");
                let mut opener = opener.expect("inner levels have an opener");
                opener.block = Some(body);
                stack.last_mut().expect("outer level").0.push(opener);
            }
        }
    }
    if stack.len() > 1 {
        let (_, opener) = stack.pop().expect("more than one level");
        let opener = opener.expect("inner levels have an opener");
        return Err(error_at(
            &opener.origin,
            format!(
                "the block of `{}` is never closed (a `}}` is missing)",
                opener.words.join(" ")
            ),
        ));
    }
    Ok(stack.pop().expect("the file's level").0)
}

/// A `virtual_ipaddress` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub value: Ipv4Addr,
    pub from: String,
    pub origin: Origin,
}

/// The converted `vrrp_instance`.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub instance_origin: Origin,
    pub interface: Sourced<String>,
    pub vrid: Sourced<u8>,
    pub priority: Sourced<u8>,
    pub version: Sourced<u8>,
    pub advert_interval_ms: Sourced<u64>,
    pub preempt: Sourced<bool>,
    pub preempt_delay_ms: Option<Sourced<u64>>,
    pub auth_pass: Option<Sourced<String>>,
    /// `unicast_src_ip` or `mcast_src_ip`: this node's address.
    pub source_address: Option<Sourced<Ipv4Addr>>,
    pub unicast_peers: Vec<Sourced<Ipv4Addr>>,
    pub vips: Vec<Vip>,
    pub notify: Option<Sourced<String>>,
    pub no_ready_backend_weight: Sourced<u8>,
    pub garp_count: Option<Sourced<u32>>,
    pub garp_repeat_delay_ms: Option<Sourced<u64>>,
    /// The `vrrp_script` names its `track_script` lists.
    pub tracked_scripts: Vec<String>,
}

/// What `global_defs` sets that the instance uses.
#[derive(Debug, Default)]
struct Globals {
    strict: Option<Origin>,
    version: Option<(u8, String)>,
    garp_repeat: Option<(u32, String)>,
    garp_delay_ms: Option<(u64, String)>,
}

/// A `vrrp_script` block.
#[derive(Debug)]
struct Script {
    origin: Origin,
    weight: i32,
}

/// Reads `input` and converts its `vrrp_instance` (the one named
/// `instance` if the file has several).
pub fn parse(
    input: Input<'_>,
    instance: Option<&str>,
    warnings: &mut Warnings,
) -> Result<Instance, ImportError> {
    let statements = statements(input)?;
    let mut globals = Globals::default();
    let mut scripts: HashMap<String, Script> = HashMap::new();
    let mut instances: Vec<&Statement> = Vec::new();
    for s in &statements {
        match s.keyword() {
            "global_defs" => read_globals(block_of(s)?, &mut globals, warnings)?,
            "vrrp_script" => {
                let name = one_arg(s)?;
                let script = read_script(s, block_of(s)?, warnings)?;
                scripts.insert(name.to_string(), script);
            }
            "vrrp_instance" => {
                one_arg(s)?;
                block_of(s)?;
                instances.push(s);
            }
            "include" => warnings.warn(
                &s.origin,
                format!(
                    "include {} is not followed: convert that file's content by putting it in this file",
                    s.args().join(" ")
                ),
            ),
            "vrrp_sync_group" => warnings.warn(
                &s.origin,
                "vrrp_sync_group: not converted (the agent runs one VRRP instance)",
            ),
            "virtual_server" | "virtual_server_group" => warnings.warn(
                &s.origin,
                format!(
                    "{}: keepalived's IPVS balancing is not converted; the services come from haproxy.cfg",
                    s.words.join(" ")
                ),
            ),
            "static_ipaddress" | "static_routes" | "static_rules" | "vrrp_track_file"
            | "track_file" | "vrrp_track_process" | "track_process" | "track_bfd"
            | "garp_group" | "linkbeat_interfaces" | "bfd_instance" => warnings.warn(
                &s.origin,
                format!("{}: not converted (no equivalent in the agent)", s.keyword()),
            ),
            other => {
                return Err(error_at(
                    &s.origin,
                    format!("unknown keyword `{other}` at the top level of keepalived.conf"),
                ))
            }
        }
    }
    let chosen = match (instances.as_slice(), instance) {
        ([], _) => {
            return Err(ImportError::Whole(format!(
                "{}: no vrrp_instance: nothing to convert",
                input.name
            )))
        }
        ([only], None) => *only,
        (many, None) => {
            let names: Vec<String> = many
                .iter()
                .map(|s| format!("{} ({})", s.args()[0], s.origin))
                .collect();
            return Err(ImportError::Whole(format!(
                "{}: {} vrrp_instance blocks ({}); the agent runs one VRRP instance per node: \
                 choose one with --instance NAME",
                input.name,
                many.len(),
                names.join(", ")
            )));
        }
        (all, Some(name)) => match all.iter().find(|s| s.args()[0] == name) {
            Some(s) => {
                for other in all.iter().filter(|s| s.args()[0] != name) {
                    warnings.warn(
                        &other.origin,
                        format!(
                            "vrrp_instance {}: not converted (--instance {name})",
                            other.args()[0]
                        ),
                    );
                }
                *s
            }
            None => {
                return Err(ImportError::Whole(format!(
                    "{}: no vrrp_instance named {name:?}",
                    input.name
                )))
            }
        },
    };
    let converted = read_instance(chosen, &globals, &scripts, warnings)?;
    let mut names: Vec<&String> = scripts.keys().collect();
    names.sort();
    for name in names {
        if !converted.tracked_scripts.contains(name) {
            warnings.warn(
                &scripts[name].origin,
                format!("vrrp_script {name}: tracked by no converted instance: not converted"),
            );
        }
    }
    Ok(converted)
}

fn block_of(s: &Statement) -> Result<&[Statement], ImportError> {
    s.block.as_deref().ok_or_else(|| {
        error_at(
            &s.origin,
            format!(
                "`{}` needs a block: `{} {{ ... }}`",
                s.keyword(),
                s.keyword()
            ),
        )
    })
}

fn no_block(s: &Statement) -> Result<(), ImportError> {
    if s.block.is_some() {
        return Err(error_at(
            &s.origin,
            format!("`{}` takes no block", s.keyword()),
        ));
    }
    Ok(())
}

fn one_arg(s: &Statement) -> Result<&str, ImportError> {
    match s.args() {
        [arg] => Ok(arg),
        _ => Err(error_at(
            &s.origin,
            format!("`{}` takes one value", s.keyword()),
        )),
    }
}

fn number<T: std::str::FromStr>(s: &Statement, what: &str) -> Result<T, ImportError> {
    let arg = one_arg(s)?;
    arg.parse()
        .map_err(|_| error_at(&s.origin, format!("{}: {arg:?} is not {what}", s.keyword())))
}

fn seconds(s: &Statement) -> Result<f64, ImportError> {
    let value: f64 = number(s, "a number of seconds")?;
    if !value.is_finite() || value < 0.0 {
        return Err(error_at(
            &s.origin,
            format!("{}: {value} is not a number of seconds", s.keyword()),
        ));
    }
    Ok(value)
}

fn ipv4(text: &str, s: &Statement) -> Result<Ipv4Addr, ImportError> {
    text.parse().map_err(|_| {
        error_at(
            &s.origin,
            format!(
                "{}: {text:?} is not an IPv4 address (the agent is IPv4 only)",
                s.keyword()
            ),
        )
    })
}

fn read_globals(
    block: &[Statement],
    globals: &mut Globals,
    warnings: &mut Warnings,
) -> Result<(), ImportError> {
    for s in block {
        match s.keyword() {
            "vrrp_strict" => globals.strict = Some(s.origin.clone()),
            "vrrp_version" => {
                let v: u8 = number(s, "2 or 3")?;
                if v != 2 && v != 3 {
                    return Err(error_at(&s.origin, format!("vrrp_version {v}: 2 or 3")));
                }
                globals.version = Some((v, s.from()));
            }
            "vrrp_garp_master_repeat" => {
                globals.garp_repeat = Some((number(s, "a count")?, s.from()));
            }
            "vrrp_garp_master_delay" => {
                let ms = (seconds(s)? * 1000.0).round() as u64;
                globals.garp_delay_ms = Some((ms, s.from()));
            }
            "vrrp_skip_check_adv_addr" => warnings.warn(
                &s.origin,
                "vrrp_skip_check_adv_addr: not converted; the agent checks the address list of every advert \
                 (an advert listing other VIPs is dropped and counted)",
            ),
            "router_id" => warnings.warn(
                &s.origin,
                format!("router_id {}: not converted (keepalived's name for the node in its logs and mails)", s.args().join(" ")),
            ),
            "notification_email" | "notification_email_from" | "smtp_server"
            | "smtp_connect_timeout" | "smtp_alert" | "smtp_alert_vrrp" => warnings.warn(
                &s.origin,
                format!(
                    "{}: mail alerts are not converted; use [vrrp] notify or alert on /metrics",
                    s.keyword()
                ),
            ),
            "vrrp_garp_interval" | "vrrp_gna_interval" => {
                if one_arg(s)?.parse::<f64>().ok() != Some(0.0) {
                    warnings.warn(
                        &s.origin,
                        format!(
                            "{}: not converted; the agent sends each burst's gratuitous ARPs without a delay between them",
                            s.words.join(" ")
                        ),
                    );
                }
                // 0, keepalived's default, is what the agent does: no delay.
            }
            "script_user" | "enable_script_security" => warnings.warn(
                &s.origin,
                format!("{}: not converted (the agent runs [vrrp] notify as root)", s.keyword()),
            ),
            _ => unconverted(s, "global_defs", &[], warnings)?,
        }
    }
    Ok(())
}

/// keepalived's `vrrp_instance` blocks the agent has no equivalent of.
const INSTANCE_BLOCKS: &[&str] = &[
    "virtual_routes",
    "virtual_rules",
    "track_file",
    "track_process",
    "track_bfd",
    "track_src_ip",
];

/// A statement that is not converted: a warning, or an error for a block
/// keepalived does not have (a typo such as `virtual_ipadress { ... }`
/// would otherwise lose everything in it).
fn unconverted(
    s: &Statement,
    within: &str,
    known_blocks: &[&str],
    warnings: &mut Warnings,
) -> Result<(), ImportError> {
    if s.block.is_some() && !known_blocks.contains(&s.keyword()) {
        return Err(error_at(
            &s.origin,
            format!("unknown block `{} {{` in {within}", s.keyword()),
        ));
    }
    warnings.warn(
        &s.origin,
        format!(
            "{within} {}: not converted (the agent has no equivalent, or it is not a keepalived keyword)",
            s.words.join(" ")
        ),
    );
    Ok(())
}

fn read_script(
    s: &Statement,
    block: &[Statement],
    warnings: &mut Warnings,
) -> Result<Script, ImportError> {
    let mut weight = 0;
    for line in block {
        match line.keyword() {
            "weight" => {
                weight = match line.args() {
                    [w] | [w, _] => w.parse().map_err(|_| {
                        error_at(&line.origin, format!("weight: {w:?} is not a number"))
                    })?,
                    _ => return Err(error_at(&line.origin, "weight takes a number")),
                };
                if line.args().get(1).map(String::as_str) == Some("reverse") {
                    return Err(error_at(
                        &line.origin,
                        "weight ... reverse: no equivalent (the agent lowers its priority only while this node is \
                         not ready); remove `reverse` or the script's track_script and convert again",
                    ));
                }
                if !(-253..=253).contains(&weight) {
                    return Err(error_at(
                        &line.origin,
                        format!("weight {weight} is outside -253..=253"),
                    ));
                }
            }
            "script" | "interval" | "timeout" | "fall" | "rise" | "user" | "init_fail" => {}
            other => warnings.warn(
                &line.origin,
                format!("vrrp_script {other}: unknown keyword, not converted"),
            ),
        }
    }
    Ok(Script {
        origin: s.origin.clone(),
        weight,
    })
}

fn read_instance(
    s: &Statement,
    globals: &Globals,
    scripts: &HashMap<String, Script>,
    warnings: &mut Warnings,
) -> Result<Instance, ImportError> {
    let name = s.args()[0].clone();
    let block = block_of(s)?;
    let here = s.origin.clone();
    let unset = |what: &str| format!("{here} vrrp_instance {name} sets no {what}");

    let mut interface = None;
    let mut vrid = None;
    let mut priority = None;
    let mut version = globals.version.clone();
    let mut advert_int: Option<(f64, String, Origin)> = None;
    let mut nopreempt: Option<Statement> = None;
    let mut preempt_delay: Option<(f64, Statement)> = None;
    let mut auth: Option<&Statement> = None;
    let mut source_address = None;
    let mut unicast_peers = Vec::new();
    let mut vips = Vec::new();
    let mut notify = None;
    let mut weight_from_scripts: Option<(i32, String)> = None;
    let mut tracked_scripts = Vec::new();
    let mut garp_count = globals
        .garp_repeat
        .clone()
        .map(|(v, from)| Sourced::new(v, from));
    let mut garp_delay = globals
        .garp_delay_ms
        .clone()
        .map(|(v, from)| Sourced::new(v, from));
    let mut strict = globals.strict.clone();
    let mut accept = false;

    for line in block {
        match line.keyword() {
            "state" => {
                no_block(line)?;
                match one_arg(line)? {
                    "MASTER" | "BACKUP" => warnings.warn(
                        &line.origin,
                        format!(
                            "{}: not converted; every agent starts as backup and the priorities decide \
                             (keepalived's MASTER only skips the first wait)",
                            line.words.join(" ")
                        ),
                    ),
                    other => {
                        return Err(error_at(
                            &line.origin,
                            format!("state {other}: MASTER or BACKUP"),
                        ))
                    }
                }
            }
            "interface" => {
                no_block(line)?;
                interface = Some(Sourced::new(one_arg(line)?.to_string(), line.from()));
            }
            "virtual_router_id" => {
                let v: u8 = number(line, "a VRID from 1 to 255")?;
                if v == 0 {
                    return Err(error_at(&line.origin, "virtual_router_id 0: 1 to 255"));
                }
                vrid = Some(Sourced::new(v, line.from()));
            }
            "priority" => {
                let v: u8 = number(line, "a priority from 1 to 255")?;
                if v == 0 {
                    return Err(error_at(&line.origin, "priority 0: 1 to 255"));
                }
                priority = Some(Sourced::new(v, line.from()));
            }
            "version" => {
                let v: u8 = number(line, "2 or 3")?;
                if v != 2 && v != 3 {
                    return Err(error_at(&line.origin, format!("version {v}: 2 or 3")));
                }
                version = Some((v, line.from()));
            }
            "advert_int" => {
                advert_int = Some((seconds(line)?, line.from(), line.origin.clone()));
            }
            "nopreempt" => nopreempt = Some(line.clone()),
            "preempt" => nopreempt = None,
            "preempt_delay" => preempt_delay = Some((seconds(line)?, line.clone())),
            "strict_mode" => {
                let on = match line.args() {
                    [] => true,
                    [v] => matches!(v.as_str(), "on" | "true" | "yes"),
                    _ => return Err(error_at(&line.origin, "strict_mode takes on or off")),
                };
                strict = on.then(|| line.origin.clone());
            }
            "authentication" => auth = Some(line),
            // The agent's VIPs always accept traffic.
            "accept" => accept = true,
            "unicast_src_ip" | "mcast_src_ip" => {
                let address = ipv4(one_arg(line)?, line)?;
                source_address = Some(Sourced::new(address, line.from()));
            }
            "unicast_peer" => {
                for peer in block_of(line)? {
                    let address = ipv4(&peer.words[0], peer)?;
                    if peer.words.len() > 1 {
                        warnings.warn(
                            &peer.origin,
                            format!(
                                "unicast_peer options {}: not converted",
                                peer.args().join(" ")
                            ),
                        );
                    }
                    unicast_peers.push(Sourced::new(address, peer.from()));
                }
            }
            "virtual_ipaddress" => {
                let own = interface.as_ref().map(|i: &Sourced<String>| i.value.clone());
                for entry in block_of(line)? {
                    if let Some(vip) = read_vip(entry, &block_interface(block, own.as_deref()), warnings)? {
                        vips.push(vip);
                    }
                }
            }
            "virtual_ipaddress_excluded" => warnings.warn(
                &line.origin,
                "virtual_ipaddress_excluded: not converted (addresses outside the adverts; the agent holds only its services' VIPs)",
            ),
            "track_script" => {
                for entry in block_of(line)? {
                    let (sum, from) = weight_from_scripts.get_or_insert((0, String::new()));
                    let weight = track_script_weight(entry, scripts, warnings)?;
                    *sum += weight;
                    if !from.is_empty() {
                        from.push_str(", ");
                    }
                    from.push_str(&format!(
                        "{} track_script {} (weight {weight})",
                        entry.origin,
                        entry.words.join(" ")
                    ));
                    tracked_scripts.push(entry.words[0].clone());
                }
            }
            "track_interface" => {
                let own = block_interface(block, None);
                for entry in block_of(line)? {
                    if Some(entry.words[0].as_str()) == Some(own.as_str()) && entry.words.len() == 1 {
                        // The agent goes to FAULT when its own link is down,
                        // as keepalived does for its interface.
                        continue;
                    }
                    warnings.warn(
                        &entry.origin,
                        format!(
                            "track_interface {}: not converted; the agent tracks only its own interface's link",
                            entry.words.join(" ")
                        ),
                    );
                }
            }
            "notify" => {
                // keepalived takes the rest of the line as the command.
                let command = line.args().join(" ");
                if command.is_empty() {
                    return Err(error_at(&line.origin, "notify needs a command"));
                }
                if command.starts_with('/') && !command.contains(char::is_whitespace) {
                    warnings.warn(
                        &line.origin,
                        "notify: converted, but the agent runs it as `notify <master|backup|fault|stopped> <vrid>`, \
                         not with keepalived's arguments (GROUP|INSTANCE name state priority)",
                    );
                    notify = Some(Sourced::new(command, line.from()));
                } else {
                    warnings.warn(
                        &line.origin,
                        format!(
                            "notify {command:?}: not converted; [vrrp] notify must be an absolute path without arguments"
                        ),
                    );
                }
            }
            "notify_master" | "notify_backup" | "notify_fault" | "notify_stop"
            | "notify_deleted" | "notify_master_rx_lower_pri" => warnings.warn(
                &line.origin,
                format!(
                    "{}: not converted; the agent runs one command, [vrrp] notify, as `notify <master|backup|fault|stopped> <vrid>`: \
                     a wrapper that dispatches on its first argument replaces the per-state scripts",
                    line.words.join(" ")
                ),
            ),
            "garp_master_repeat" => garp_count = Some(Sourced::new(number(line, "a count")?, line.from())),
            "garp_master_delay" => {
                garp_delay = Some(Sourced::new((seconds(line)? * 1000.0).round() as u64, line.from()))
            }
            _ => unconverted(line, "vrrp_instance", INSTANCE_BLOCKS, warnings)?,
        }
    }

    let interface = interface
        .ok_or_else(|| error_at(&here, format!("vrrp_instance {name} has no interface")))?;
    let vrid = vrid.ok_or_else(|| {
        error_at(
            &here,
            format!("vrrp_instance {name} has no virtual_router_id"),
        )
    })?;
    let mut priority = priority.unwrap_or_else(|| {
        Sourced::new(
            DEFAULT_PRIORITY,
            format!("keepalived's default ({})", unset("priority")),
        )
    });
    let (version_number, version_from) = version.unwrap_or_else(|| {
        (
            DEFAULT_VERSION,
            format!(
                "keepalived's default ({})",
                unset("version or vrrp_version")
            ),
        )
    });
    let version = Sourced::new(version_number, version_from);

    let (advert_s, advert_from, advert_origin) = advert_int.unwrap_or_else(|| {
        (
            DEFAULT_ADVERT_INT_S,
            format!("keepalived's default 1 s ({})", unset("advert_int")),
            here.clone(),
        )
    });
    let advert_interval_ms = if version_number == 2 {
        let whole = advert_s.round().max(1.0);
        if whole != advert_s {
            warnings.warn(
                &advert_origin,
                format!(
                    "advert_int {advert_s}: VRRPv2 counts whole seconds; converted to {whole} s"
                ),
            );
        }
        if whole > 255.0 {
            return Err(error_at(
                &advert_origin,
                format!("advert_int {advert_s}: VRRPv2 allows at most 255 s"),
            ));
        }
        Sourced::new(whole as u64 * 1000, advert_from)
    } else {
        let cs = (advert_s * 100.0).round().clamp(1.0, 4095.0);
        if cs / 100.0 != advert_s {
            warnings.warn(
                &advert_origin,
                format!("advert_int {advert_s}: VRRPv3 counts centiseconds from 0.01 to 40.95 s; converted to {} s", cs / 100.0),
            );
        }
        Sourced::new(cs as u64 * 10, advert_from)
    };

    let mut preempt = Sourced::new(
        true,
        format!("keepalived's default ({})", unset("nopreempt")),
    );
    let mut preempt_delay_ms = None;
    // keepalived 2.2.7 keeps nopreempt in strict mode (it resets only
    // preempt_delay there).
    if let Some(line) = &nopreempt {
        preempt = Sourced::new(false, line.from());
    }
    if let Some((delay_s, line)) = &preempt_delay {
        if let Some(origin) = &strict {
            warnings.warn(
                &line.origin,
                format!(
                    "preempt_delay: not converted; keepalived ignores it in strict mode (vrrp_strict at {origin}: \
                     \"preempt_delay is incompatible with strict mode - resetting\")"
                ),
            );
        } else if !preempt.value {
            warnings.warn(
                &line.origin,
                "preempt_delay: not converted; keepalived ignores it with nopreempt \
                 (\"preempt_delay is incompatible with nopreempt mode - resetting\")",
            );
        } else {
            let ms = (delay_s * 1000.0).round() as u64;
            if ms > crate::config::MAX_VRRP_DELAY_MS {
                return Err(error_at(
                    &line.origin,
                    format!("preempt_delay {delay_s}: at most 3600 s"),
                ));
            }
            preempt_delay_ms = Some(Sourced::new(ms, line.from()));
        }
    }

    let auth_pass = match auth {
        None => None,
        Some(line) => read_auth(line, version_number, strict.as_ref(), warnings)?,
    };
    if let (Some(origin), false) = (&strict, accept) {
        warnings.warn(
            origin,
            "vrrp_strict: the agent applies none of strict mode's firewall rules: its VIPs accept traffic \
             (strict keepalived drops traffic to the VIP unless `accept` is set)",
        );
    }
    let no_ready_backend_weight = match weight_from_scripts {
        None => {
            warnings.warn(
                &here,
                format!(
                    "no track_script: the agent still lowers its priority by {} while no backend of this node is READY \
                     (set no_ready_backend_weight = 0 for keepalived's behaviour)",
                    crate::config::DEFAULT_NO_READY_BACKEND_WEIGHT
                ),
            );
            Sourced::new(
                crate::config::DEFAULT_NO_READY_BACKEND_WEIGHT as u8,
                format!("the agent's default ({})", unset("track_script")),
            )
        }
        Some((sum, from)) => {
            let weight = if sum < 0 {
                sum.unsigned_abs()
            } else if sum > 0 {
                // A script that raises the priority by W while it succeeds:
                // the same as a priority W higher that drops by W while it
                // fails.
                let raised = (u32::from(priority.value) + sum.unsigned_abs()).min(254);
                if raised < u32::from(priority.value) + sum.unsigned_abs() {
                    warnings.warn(
                        &here,
                        format!(
                            "priority {} + track_script weight {sum} is above 254: capped",
                            priority.value
                        ),
                    );
                }
                priority = Sourced::new(
                    raised as u8,
                    format!(
                        "{} plus the positive track_script weight ({from})",
                        priority.from
                    ),
                );
                sum.unsigned_abs()
            } else {
                crate::config::DEFAULT_NO_READY_BACKEND_WEIGHT
            };
            let weight = weight.min(254) as u8;
            Sourced::new(weight, from)
        }
    };

    Ok(Instance {
        name,
        instance_origin: here,
        interface,
        vrid,
        priority,
        version,
        advert_interval_ms,
        preempt,
        preempt_delay_ms,
        auth_pass,
        source_address,
        unicast_peers,
        vips,
        notify,
        no_ready_backend_weight,
        garp_count,
        garp_repeat_delay_ms: garp_delay,
        tracked_scripts,
    })
}

/// The instance's `interface` wherever it is in the block (a
/// `virtual_ipaddress` may come before it).
fn block_interface(block: &[Statement], known: Option<&str>) -> String {
    if let Some(known) = known {
        return known.to_string();
    }
    block
        .iter()
        .find(|s| s.keyword() == "interface" && s.words.len() == 2)
        .map(|s| s.words[1].clone())
        .unwrap_or_default()
}

fn read_vip(
    entry: &Statement,
    interface: &str,
    warnings: &mut Warnings,
) -> Result<Option<Vip>, ImportError> {
    let (address, prefix) = match entry.words[0].split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (entry.words[0].as_str(), None),
    };
    if address.contains(':') {
        warnings.warn(
            &entry.origin,
            format!(
                "virtual_ipaddress {}: IPv6, not converted (the agent is IPv4 only)",
                entry.words.join(" ")
            ),
        );
        return Ok(None);
    }
    let value: Ipv4Addr = address.parse().map_err(|_| {
        error_at(
            &entry.origin,
            format!("virtual_ipaddress: {address:?} is not an IPv4 address"),
        )
    })?;
    if let Some(prefix) = prefix {
        match prefix.parse::<u8>() {
            Ok(32) => {}
            Ok(p) if p < 32 => warnings.warn(
                &entry.origin,
                format!("virtual_ipaddress {value}/{p}: the agent adds VIPs as /32, no prefix route for /{p}"),
            ),
            _ => {
                return Err(error_at(
                    &entry.origin,
                    format!("virtual_ipaddress: {prefix:?} is not a prefix length"),
                ))
            }
        }
    }
    let mut options = entry.args().iter();
    while let Some(option) = options.next() {
        let value_of = options.next();
        match (option.as_str(), value_of) {
            ("dev", Some(dev)) if dev == interface => {}
            ("dev", Some(dev)) => warnings.warn(
                &entry.origin,
                format!("virtual_ipaddress {value} dev {dev}: the agent adds VIPs on its interface {interface}, not {dev}"),
            ),
            ("label", Some(label)) => warnings.warn(
                &entry.origin,
                format!("virtual_ipaddress {value} label {label}: not converted (the agent adds VIPs without a label)"),
            ),
            (other, Some(v)) => warnings.warn(
                &entry.origin,
                format!("virtual_ipaddress {value} {other} {v}: not converted"),
            ),
            (other, None) => warnings.warn(
                &entry.origin,
                format!("virtual_ipaddress {value} {other}: not converted"),
            ),
        }
    }
    Ok(Some(Vip {
        value,
        from: entry.from(),
        origin: entry.origin.clone(),
    }))
}

fn track_script_weight(
    entry: &Statement,
    scripts: &HashMap<String, Script>,
    warnings: &mut Warnings,
) -> Result<i32, ImportError> {
    let name = &entry.words[0];
    let script = scripts.get(name).ok_or_else(|| {
        error_at(
            &entry.origin,
            format!("track_script {name}: no vrrp_script {name} in the file"),
        )
    })?;
    let weight = match entry.args() {
        [] => script.weight,
        [kw, w] if kw == "weight" => w.parse().map_err(|_| {
            error_at(
                &entry.origin,
                format!("track_script {name} weight: {w:?} is not a number"),
            )
        })?,
        _ => {
            return Err(error_at(
                &entry.origin,
                format!("track_script {name}: expected `{name} [weight N]`"),
            ))
        }
    };
    let effect = if weight == 0 {
        format!(
            "weight 0 (FAULT while it fails) is approximated by no_ready_backend_weight {}",
            crate::config::DEFAULT_NO_READY_BACKEND_WEIGHT
        )
    } else {
        format!("its weight {weight} is applied while this node has no READY backend")
    };
    warnings.warn(
        &entry.origin,
        format!(
            "track_script {name} (vrrp_script at {}): the script is not run; the agent's own KeyDB-aware readiness \
             replaces it, and {effect}",
            script.origin
        ),
    );
    Ok(weight)
}

fn read_auth(
    line: &Statement,
    version: u8,
    strict: Option<&Origin>,
    warnings: &mut Warnings,
) -> Result<Option<Sourced<String>>, ImportError> {
    let mut auth_type = None;
    let mut pass = None;
    for entry in block_of(line)? {
        match entry.keyword() {
            "auth_type" => auth_type = Some((one_arg(entry)?.to_string(), entry)),
            "auth_pass" => pass = Some((one_arg(entry)?.to_string(), entry)),
            other => warnings.warn(
                &entry.origin,
                format!("authentication {other}: unknown keyword, not converted"),
            ),
        }
    }
    if let Some(origin) = strict {
        warnings.warn(
            &line.origin,
            format!(
                "authentication: not converted, as strict keepalived does (vrrp_strict at {origin}: it logs \
                 \"Strict mode does not support authentication. Ignoring.\" and sends adverts without one); \
                 copying auth_pass would split the group"
            ),
        );
        return Ok(None);
    }
    if version == 3 {
        warnings.warn(
            &line.origin,
            "authentication: not converted; VRRPv3 has no authentication and keepalived ignores it there too",
        );
        return Ok(None);
    }
    match auth_type {
        Some((t, _)) if t == "PASS" => {}
        Some((t, entry)) => {
            return Err(error_at(
                &entry.origin,
                format!("auth_type {t}: the agent supports PASS only (keepalived: PASS or AH); use PASS, or no authentication block, on every node"),
            ))
        }
        None => return Err(error_at(&line.origin, "authentication without auth_type")),
    }
    let Some((mut pass, entry)) = pass else {
        return Err(error_at(
            &line.origin,
            "authentication with auth_type PASS but no auth_pass",
        ));
    };
    if pass.len() > AUTH_PASS_LEN {
        // keepalived sends the first 8 bytes; the agent must send the same.
        let mut cut = AUTH_PASS_LEN;
        while !pass.is_char_boundary(cut) {
            cut -= 1;
        }
        pass.truncate(cut);
        warnings.warn(
            &entry.origin,
            "auth_pass is longer than 8 bytes: keepalived sends its first 8, so the converted auth_pass is those",
        );
    }
    // The password stays out of the comment.
    Ok(Some(Sourced::new(
        pass,
        format!("{} auth_pass (auth_type PASS)", entry.origin),
    )))
}
