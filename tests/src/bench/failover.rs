//! Failover (issue 4, item 4): client-observed longest gap over at least 5
//! hard node losses (bridge port down), for our agents with default
//! settings and for keepalived + HAProxy with default (advert_int 1, inter
//! 2s fall 3) and tuned (VRRPv3 advert_int 0.1, check inter 100ms)
//! settings.
//!
//! FAILOVER: PENDING ELECTION. The agents' VRRP election (issue 3) is being
//! wired; until it lands this hook measures nothing and the report says
//! so. Measuring keepalived alone first would give half a comparison run
//! on a different day, so it waits too. Fill in [`measure`] then: one lab
//! of 2 nodes + client, a client loop of short requests through the VIP
//! recording the longest gap, `ip link set p-n1 down` in the switch
//! namespace as the node loss.

/// What the failover part of the benchmark has to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverStatus {
    /// Not measured yet, and why.
    Pending(&'static str),
}

impl FailoverStatus {
    /// One paragraph for the terminal and the report.
    pub fn summary(&self) -> String {
        match self {
            FailoverStatus::Pending(why) => format!("Failover: pending election. {why}"),
        }
    }
}

/// The failover measurement hook. Returns [`FailoverStatus::Pending`]
/// until the election has landed.
pub fn measure(_quick: bool) -> FailoverStatus {
    FailoverStatus::Pending(
        "The agents' VRRP election (issue 3) is not wired yet. No numbers are reported until the agents' VRRP \
         election is; keepalived + HAProxy will be measured in the same run then.",
    )
}
