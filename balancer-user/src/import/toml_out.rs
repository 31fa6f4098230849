//! The converted values written as `balancer.toml`, each under a comment
//! saying where it comes from, the warnings at the top.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::{haproxy::Health, keepalived::Instance, Service, Sourced, Warning};

pub(super) struct Document<'a> {
    pub sources: Vec<&'a str>,
    pub interface: &'a Sourced<String>,
    pub address: &'a Sourced<Ipv4Addr>,
    pub vrrp: &'a Instance,
    pub health: &'a Health,
    pub idle_timeout_secs: Option<&'a Sourced<u64>>,
    pub services: &'a [Service],
}

/// A TOML string literal.
fn string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// One line of comment text: no line breaks can end the comment early.
fn comment(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn entry(out: &mut String, key: &str, value: &str, from: &str) {
    let _ = writeln!(out, "# from {}", comment(from));
    let _ = writeln!(out, "{key} = {value}");
}

fn list<T>(out: &mut String, key: &str, items: &[Sourced<T>], show: impl Fn(&T) -> String) {
    let _ = writeln!(out, "{key} = [");
    for item in items {
        let _ = writeln!(out, "    # from {}", comment(&item.from));
        let _ = writeln!(out, "    {},", string(&show(&item.value)));
    }
    let _ = writeln!(out, "]");
}

pub(super) fn render(doc: &Document<'_>, warnings: &[Warning]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `balancer import` from {}.",
        comment(&doc.sources.join(" and "))
    );
    let _ = writeln!(
        out,
        "# Each value names the line it comes from; where the files set nothing, keepalived's or HAProxy's"
    );
    let _ = writeln!(
        out,
        "# default is written out. Check it with `balancer check --config FILE` on each node."
    );
    if warnings.is_empty() {
        let _ = writeln!(out, "#\n# Nothing was dropped or approximated.");
    } else {
        let _ = writeln!(
            out,
            "#\n# {} warning{}: what was dropped or approximated",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        );
        for w in warnings {
            let _ = writeln!(out, "# WARNING {}", comment(&w.to_string()));
        }
    }

    let _ = writeln!(out, "\n[node]");
    entry(
        &mut out,
        "interface",
        &string(&doc.interface.value),
        &doc.interface.from,
    );
    entry(
        &mut out,
        "address",
        &string(&doc.address.value.to_string()),
        &doc.address.from,
    );

    let v = doc.vrrp;
    let _ = writeln!(out, "\n[vrrp]");
    let _ = writeln!(
        out,
        "# vrrp_instance {} ({})",
        comment(&v.name),
        v.instance_origin
    );
    entry(&mut out, "vrid", &v.vrid.value.to_string(), &v.vrid.from);
    entry(
        &mut out,
        "priority",
        &v.priority.value.to_string(),
        &v.priority.from,
    );
    entry(
        &mut out,
        "version",
        &v.version.value.to_string(),
        &v.version.from,
    );
    entry(
        &mut out,
        "advert_interval_ms",
        &v.advert_interval_ms.value.to_string(),
        &v.advert_interval_ms.from,
    );
    entry(
        &mut out,
        "preempt",
        &v.preempt.value.to_string(),
        &v.preempt.from,
    );
    if let Some(d) = &v.preempt_delay_ms {
        entry(&mut out, "preempt_delay_ms", &d.value.to_string(), &d.from);
    }
    if let Some(pass) = &v.auth_pass {
        entry(&mut out, "auth_pass", &string(&pass.value), &pass.from);
    }
    if !v.unicast_peers.is_empty() {
        list(&mut out, "unicast_peers", &v.unicast_peers, |p| {
            p.to_string()
        });
    }
    if let Some(n) = &v.notify {
        entry(&mut out, "notify", &string(&n.value), &n.from);
    }
    if let Some(c) = &v.garp_count {
        entry(&mut out, "garp_count", &c.value.to_string(), &c.from);
    }
    if let Some(d) = &v.garp_repeat_delay_ms {
        entry(
            &mut out,
            "garp_repeat_delay_ms",
            &d.value.to_string(),
            &d.from,
        );
    }
    entry(
        &mut out,
        "no_ready_backend_weight",
        &v.no_ready_backend_weight.value.to_string(),
        &v.no_ready_backend_weight.from,
    );

    let h = doc.health;
    let _ = writeln!(out, "\n[health]");
    if h.interval_ms.is_none() {
        let _ = writeln!(out, "# no HAProxy server has `check`: the agent's defaults");
    }
    if let Some(x) = &h.interval_ms {
        entry(&mut out, "interval_ms", &x.value.to_string(), &x.from);
    }
    if let Some(x) = &h.timeout_ms {
        entry(&mut out, "timeout_ms", &x.value.to_string(), &x.from);
    }
    if let Some(x) = &h.rise {
        entry(&mut out, "rise", &x.value.to_string(), &x.from);
    }
    if let Some(x) = &h.fall {
        entry(&mut out, "fall", &x.value.to_string(), &x.from);
    }

    if let Some(idle) = doc.idle_timeout_secs {
        let _ = writeln!(out, "\n[dataplane]");
        entry(
            &mut out,
            "idle_timeout_secs",
            &idle.value.to_string(),
            &idle.from,
        );
    }

    for s in doc.services {
        let _ = writeln!(out, "\n[[service]]");
        entry(
            &mut out,
            "vip",
            &string(&s.vip.value.to_string()),
            &s.vip.from,
        );
        entry(&mut out, "port", &s.port.value.to_string(), &s.port.from);
        list(&mut out, "backends", &s.backends, |b| b.to_string());
        entry(
            &mut out,
            "scheduler",
            &string(&s.scheduler.value.to_string()),
            &s.scheduler.from,
        );
    }
    out
}
