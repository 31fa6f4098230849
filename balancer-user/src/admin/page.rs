//! The status page: `GET /` on the metrics listener, HTML rendered from the
//! same [`Status`] document as `balancer status` and `/metrics`, so the
//! three always agree. Like HAProxy's stats page it needs no script: it
//! reloads itself every [`REFRESH_SECONDS`].
//!
//! "Recent changes" are read off the document (when the election state,
//! each backend's health and each backend's last failed check changed),
//! newest first: the agent keeps no separate event log.

use std::fmt::Write as _;

use super::status::{ago, duration, health_label, utc, Status};

/// The page reloads itself this often.
pub const REFRESH_SECONDS: u32 = 2;

/// Text made safe inside HTML elements and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}\
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{background:#d9f2d9}.bad{background:#f8d4d4}.warn{background:#fbeec8}\
.state{font-weight:bold;padding:.1em .5em;border-radius:.3em}.muted{color:#777}";

/// The whole page for `status`, as of `now` (Unix seconds).
pub fn render(status: &Status, now: f64) -> String {
    let mut out = String::new();
    let agent = &status.agent;
    let node = &status.node;
    let e = &status.election;
    let state_class = match e.state.as_str() {
        "master" => "ok",
        "backup" | "static" => "warn",
        _ => "bad",
    };
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>balancer on {name}: {state}</title><style>{STYLE}</style></head><body>",
        name = esc(&node.name),
        state = esc(&e.state.to_uppercase()),
    );
    let _ = write!(
        out,
        "<h1>balancer on {} <span class=\"state {state_class}\" id=\"state\">{}</span></h1>\
         <p>node {} on {} (ifindex {}), XDP {}; agent {} pid {}, up {}; \
         as of {} (refreshes every {REFRESH_SECONDS} s)</p>",
        esc(&node.name),
        esc(&e.state.to_uppercase()),
        node.address,
        esc(&node.interface),
        node.ifindex,
        esc(&node.xdp_mode),
        esc(&agent.version),
        agent.pid,
        duration(agent.uptime_seconds),
        utc(now),
    );
    for warning in &status.warnings {
        let _ = write!(out, "<p class=\"bad\">WARNING: {}</p>", esc(warning));
    }

    out.push_str("<h2>Election</h2><table>");
    if e.mode == "static" {
        row(&mut out, "mode", "static (no [vrrp])");
    } else {
        row(
            &mut out,
            "VRRP",
            &format!(
                "v{} vrid {}",
                e.vrrp_version.unwrap_or(0),
                e.vrid.unwrap_or(0)
            ),
        );
        let since = e
            .state_since
            .map(|at| format!(" for {} (since {})", ago(now, at), utc(at)))
            .unwrap_or_default();
        row(
            &mut out,
            "state",
            &format!("{}{since}", e.state.to_uppercase()),
        );
        row(
            &mut out,
            "priority",
            &format!(
                "{} (configured {}, no_ready_backend_weight {})",
                e.effective_priority.unwrap_or(0),
                e.configured_priority.unwrap_or(0),
                e.no_ready_backend_weight.unwrap_or(0)
            ),
        );
    }
    row(
        &mut out,
        "node ready",
        if e.node_ready {
            "yes"
        } else {
            "NO: a service has no READY backend, or this node's own backend is not READY"
        },
    );
    for vip in &e.vips {
        row(
            &mut out,
            &format!("VIP {}", vip.address),
            if vip.held { "held" } else { "not held" },
        );
    }
    if let Some(a) = &e.adverts {
        row(&mut out, "adverts", &a.summary());
        for p in &a.peers {
            row(&mut out, &format!("peer {}", p.address), &p.summary(now));
        }
    }
    out.push_str("</table>");

    for s in &status.services {
        let set: Vec<String> = s.ready_set.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "<h2>Service {} ({}, scheduler {})</h2><p>READY set: {}</p>\
             <table><tr><th>backend</th><th>where</th><th>health</th><th>in set</th>\
             <th>checks</th><th>failed</th><th>connections</th><th>packets</th>\
             <th>bytes</th><th>notes</th></tr>",
            s.vip,
            if s.active { "active" } else { "inactive" },
            esc(&s.scheduler),
            if set.is_empty() {
                "(empty)".to_string()
            } else {
                esc(&set.join(", "))
            }
        );
        for b in &s.backends {
            let class = if b.ready { "ok" } else { "bad" };
            let mut notes = Vec::new();
            if b.drained {
                notes.push("DRAINED: no new connections".to_string());
            }
            if let Some(path) = b.path.filter(|p| p.is_failing()) {
                notes.push(format!("data path: {path}"));
            }
            if !b.ready || b.last_check_failed {
                if let Some(f) = &b.last_failure {
                    notes.push(format!(
                        "last failed check {} ago: {}",
                        ago(now, f.at),
                        f.reason
                    ));
                }
            }
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                b.address,
                if b.local { "local" } else { "remote" },
                esc(&health_label(&b.health)),
                if b.in_ready_set { "yes" } else { "no" },
                b.checks,
                b.failed_checks,
                b.traffic.connections,
                b.traffic.packets,
                b.traffic.bytes,
                esc(&notes.join("; ")),
            );
        }
        let _ = write!(
            out,
            "<tr><th colspan=\"6\">service total</th><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td></td></tr></table>",
            s.traffic.connections, s.traffic.packets, s.traffic.bytes
        );
    }

    let snat = &status.dataplane.snat;
    let _ = write!(
        out,
        "<h2>Data plane</h2><p>conntrack entries: {} (two per forwarded flow, at the last sweep)</p>\
         <p>SNAT ports {}-{} on {} address(es), {} per remote backend</p>",
        status.dataplane.conntrack_entries,
        snat.port_min,
        snat.port_max,
        snat.addresses,
        snat.ports
    );
    if !snat.backends.is_empty() {
        out.push_str(
            "<table><tr><th>remote backend</th><th>SNAT ports in use</th><th>free</th></tr>",
        );
        for b in &snat.backends {
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(&b.backend),
                b.in_use,
                b.free
            );
        }
        out.push_str("</table><p></p>");
    }
    out.push_str("<table><tr><th>counter</th><th>value</th></tr>");
    for (name, value) in &status.dataplane.counters {
        let class = if *value > 0 && name.starts_with("drop") {
            " class=\"warn\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr{class}><td>{}</td><td class=\"n\">{value}</td></tr>",
            esc(name)
        );
    }
    out.push_str("</table>");

    out.push_str("<h2>Recent changes</h2>");
    let changes = recent_changes(status);
    if changes.is_empty() {
        out.push_str("<p class=\"muted\">none recorded</p>");
    } else {
        out.push_str("<table><tr><th>when (UTC)</th><th>ago</th><th>what</th></tr>");
        for (at, what) in changes {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                utc(at),
                ago(now, at),
                esc(&what)
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</body></html>\n");
    out
}

fn row(out: &mut String, name: &str, value: &str) {
    let _ = write!(
        out,
        "<tr><th>{}</th><td>{}</td></tr>",
        esc(name),
        esc(value)
    );
}

/// At most this many changes are listed.
const MAX_CHANGES: usize = 20;

/// `(when, what)` for each change the document dates, newest first.
fn recent_changes(status: &Status) -> Vec<(f64, String)> {
    let mut changes = Vec::new();
    if let Some(at) = status.election.state_since {
        changes.push((
            at,
            format!("election: became {}", status.election.state.to_uppercase()),
        ));
    }
    for s in &status.services {
        for b in &s.backends {
            if let Some(at) = b.health_since {
                changes.push((
                    at,
                    format!(
                        "{} backend {}: health {}",
                        s.vip,
                        b.address,
                        health_label(&b.health)
                    ),
                ));
            }
            if let Some(f) = &b.last_failure {
                changes.push((
                    f.at,
                    format!(
                        "{} backend {}: check failed: {}",
                        s.vip, b.address, f.reason
                    ),
                ));
            }
        }
    }
    changes.sort_by(|a, b| b.0.total_cmp(&a.0));
    changes.truncate(MAX_CHANGES);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::tests::master_with_a_failed_backend;

    /// The visible text of `html`: tags dropped, entities left as they are.
    fn text(html: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    out.push(' ');
                }
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_page_shows_the_election_services_and_changes() {
        let mut status = master_with_a_failed_backend();
        let now = status.agent.started_at + 100.0;
        let page = render(&status, now);
        assert!(page.contains("http-equiv=\"refresh\""), "refreshes itself");
        let shown = text(&page);
        for want in [
            "state MASTER",
            "VIP 198.18.0.100 held",
            "peer 198.18.0.2 priority 100, interval 100 ms",
            "Service 198.18.0.100:6380 (active, scheduler round_robin)",
            "198.18.0.2:6380 remote DOWN no",
            "connection refused",
            "SNAT ports",
            "Recent changes",
        ] {
            assert!(shown.contains(want), "{want:?} not in {shown}");
        }
        // The newest change is listed first.
        let changes = recent_changes(&status);
        assert!(changes.windows(2).all(|w| w[0].0 >= w[1].0), "{changes:?}");

        // Whatever a backend's failure says is shown as text, not markup.
        status.services[0].backends[1]
            .last_failure
            .as_mut()
            .unwrap()
            .reason = "<script>alert(1)</script>".into();
        let page = render(&status, now);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }
}
