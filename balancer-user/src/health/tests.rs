//! The checker against the fake KeyDB: one test per backend state, and the
//! whole chain (check, damping, policy) over a few rounds.

use std::{net::SocketAddr, time::Duration};

use super::{
    fake::{self, Answer, Behaviour, FakeKeydb},
    *,
};

/// Generous: these tests do not measure speed, except the timeout ones.
const TIMEOUT: Duration = Duration::from_secs(2);

async fn check(behaviour: Behaviour) -> Probe {
    let server = FakeKeydb::start(behaviour).await.unwrap();
    Checker::new(TIMEOUT, None).check(server.addr()).await
}

fn not_ready(probe: &Probe) -> &NotReady {
    probe
        .reason()
        .unwrap_or_else(|| panic!("expected NOT READY, got {probe:?}"))
}

/// An address on which nothing listens (a port just released).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn master_is_ready() {
    let probe = check(Behaviour::master()).await;
    assert!(probe.is_ready(), "{probe:?}");
    assert_eq!(probe.role, Some(Role::Master));
    assert_eq!(probe.badness(), Badness::Ready);
    assert!(probe.elapsed < TIMEOUT);
}

#[tokio::test]
async fn replicas_in_sync_are_ready() {
    for role in [Role::Replica, Role::ActiveReplica] {
        let probe = check(Behaviour::replica(role, LinkState::InSync)).await;
        assert!(probe.is_ready(), "{role}: {probe:?}");
        assert_eq!(probe.role, Some(role));
    }
}

/// The acceptance case: +PONG to PING, -LOADING to INFO and everything
/// else. Never READY, whatever the damping's initial state, and never
/// served.
#[tokio::test]
async fn loading_server_is_never_ready() {
    let server = FakeKeydb::start(Behaviour::loading()).await.unwrap();
    let checker = Checker::new(TIMEOUT, None);
    for initial in [InitialHealth::FirstCheck, InitialHealth::Down] {
        let mut health = BackendHealth::new(1, 1, initial);
        for _ in 0..5 {
            let probe = checker.check(server.addr()).await;
            // PING passed: the stage that failed is the INFO after it.
            assert_eq!(
                not_ready(&probe),
                &NotReady::Loading {
                    stage: Stage::InfoPersistence
                }
            );
            assert!(not_ready(&probe).is_loading());
            health.observe(probe.badness());
            assert_eq!(health.badness(), Badness::Loading);
            // Never added to a set it is not in.
            let alone = [Candidate {
                badness: health.badness(),
                serving: false,
            }];
            assert!(select_serving(&alone).is_empty());
        }
    }
    // A damped-up backend that starts loading is no longer READY after
    // `fall` checks (it stays only as the last one serving).
    let mut health = BackendHealth::new(2, 3, InitialHealth::Up);
    let mut badness = Vec::new();
    for _ in 0..3 {
        health.observe(checker.check(server.addr()).await.badness());
        badness.push(health.badness());
    }
    assert_eq!(badness, [Badness::Ready, Badness::Ready, Badness::Loading]);
    assert_eq!(server.connections(), 13);
}

#[tokio::test]
async fn loading_behind_a_password_is_not_ready() {
    let server = FakeKeydb::start(Behaviour::loading().with_password(b"pw"))
        .await
        .unwrap();
    let probe = Checker::new(TIMEOUT, Some(Password::new("pw")))
        .check(server.addr())
        .await;
    assert!(not_ready(&probe).is_loading(), "{probe:?}");
}

#[tokio::test]
async fn loading_flag_is_not_ready() {
    let probe = check(Behaviour::loading_flag()).await;
    assert_eq!(not_ready(&probe), &NotReady::LoadingFlag);
    assert_eq!(probe.badness(), Badness::Loading);
}

#[tokio::test]
async fn active_replica_with_link_down() {
    let probe = check(Behaviour::replica(Role::ActiveReplica, LinkState::Down)).await;
    assert_eq!(
        not_ready(&probe),
        &NotReady::ReplicaLinkDown {
            role: Role::ActiveReplica
        }
    );
    assert_eq!(probe.role, Some(Role::ActiveReplica));
    assert_eq!(probe.badness(), Badness::ReplicaLinkDown);
}

#[tokio::test]
async fn replica_mid_sync() {
    for role in [Role::Replica, Role::ActiveReplica] {
        let probe = check(Behaviour::replica(role, LinkState::Syncing)).await;
        assert_eq!(not_ready(&probe), &NotReady::ReplicaSyncing { role });
        assert_eq!(probe.badness(), Badness::ReplicaSyncing);
    }
}

#[tokio::test]
async fn garbled_and_wrong_replies() {
    type Expect = fn(&NotReady) -> bool;
    let master = Behaviour::master;
    let cases: Vec<(&str, Behaviour, Expect)> = vec![
        (
            "PANG",
            Behaviour {
                ping: Answer::simple("PANG"),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::Ping,
                        ..
                    }
                )
            },
        ),
        (
            "no type byte",
            Behaviour {
                ping: Answer::Raw(b"hello world\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::Ping,
                        ..
                    }
                )
            },
        ),
        (
            "integer to PING",
            Behaviour {
                ping: Answer::Raw(b":1\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::Ping,
                        ..
                    }
                )
            },
        ),
        (
            "array to PING",
            Behaviour {
                ping: Answer::Raw(b"*1\r\n$4\r\nPONG\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::Ping,
                        ..
                    }
                )
            },
        ),
        (
            "binary junk",
            Behaviour {
                ping: Answer::Raw(vec![0xff, 0x00, 0x13, 0x37, b'\r', b'\n']),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::Ping,
                        ..
                    }
                )
            },
        ),
        (
            "busy script",
            Behaviour {
                ping: Answer::error("BUSY Redis is busy running a script."),
                ..master()
            },
            |r| {
                matches!(r, NotReady::ErrorReply { stage: Stage::Ping, message }
                    if message.starts_with("BUSY"))
            },
        ),
        (
            "INFO renamed away",
            Behaviour {
                info_persistence: Answer::error("ERR unknown command 'INFO'"),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::ErrorReply {
                        stage: Stage::InfoPersistence,
                        ..
                    }
                )
            },
        ),
        (
            "oversized bulk",
            Behaviour {
                info_persistence: Answer::Raw(b"$99999999999\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(r, NotReady::BadReply { stage: Stage::InfoPersistence, detail }
                    if detail.contains("limit"))
            },
        ),
        (
            "bulk cut short",
            Behaviour {
                info_persistence: Answer::Partial(b"$100\r\nloading:0\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::Closed {
                        stage: Stage::InfoPersistence
                    }
                )
            },
        ),
        (
            "nil INFO",
            Behaviour {
                info_persistence: Answer::Raw(b"$-1\r\n".to_vec()),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::InfoPersistence,
                        ..
                    }
                )
            },
        ),
        (
            "INFO as a simple string",
            Behaviour {
                info_persistence: Answer::simple("loading:0"),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::InfoPersistence,
                        ..
                    }
                )
            },
        ),
        (
            "no loading field",
            Behaviour {
                info_persistence: Answer::bulk("# Persistence\r\naof_enabled:0\r\n"),
                ..master()
            },
            |r| {
                matches!(r, NotReady::BadReply { stage: Stage::InfoPersistence, detail }
                    if detail.contains("loading"))
            },
        ),
        (
            "odd loading value",
            Behaviour {
                info_persistence: Answer::bulk("loading:maybe\r\n"),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::InfoPersistence,
                        ..
                    }
                )
            },
        ),
        (
            "unknown role",
            Behaviour {
                info_replication: Answer::bulk("# Replication\r\nrole:sentinel\r\n"),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::InfoReplication,
                        ..
                    }
                )
            },
        ),
        (
            "replica without link status",
            Behaviour {
                info_replication: Answer::bulk("role:slave\r\nmaster_host:x\r\n"),
                ..master()
            },
            |r| {
                matches!(r, NotReady::BadReply { stage: Stage::InfoReplication, detail }
                    if detail.contains("master_link_status"))
            },
        ),
        (
            "endless line",
            Behaviour {
                info_replication: Answer::Raw(vec![b'+'; 100_000]),
                ..master()
            },
            |r| {
                matches!(
                    r,
                    NotReady::BadReply {
                        stage: Stage::InfoReplication,
                        ..
                    }
                )
            },
        ),
        (
            "closed at PING",
            Behaviour {
                ping: Answer::Close,
                ..master()
            },
            |r| matches!(r, NotReady::Closed { stage: Stage::Ping }),
        ),
        (
            "PONG cut short",
            Behaviour {
                ping: Answer::Partial(b"+PO".to_vec()),
                ..master()
            },
            |r| matches!(r, NotReady::Closed { stage: Stage::Ping }),
        ),
    ];
    for (name, behaviour, expected) in cases {
        let probe = check(behaviour).await;
        let reason = not_ready(&probe);
        assert!(expected(reason), "{name}: {reason:?}");
        assert_eq!(probe.badness(), Badness::Unavailable, "{name}");
        assert!(probe.elapsed < TIMEOUT, "{name}: took {:?}", probe.elapsed);
        // Whatever came from the backend is printable in the message.
        assert!(!reason.to_string().chars().any(char::is_control), "{name}");
    }
}

#[tokio::test]
async fn silent_server_times_out_within_the_timeout() {
    let timeout = Duration::from_millis(150);
    let server = FakeKeydb::start(Behaviour::silent()).await.unwrap();
    let probe = Checker::new(timeout, None).check(server.addr()).await;
    assert_eq!(
        not_ready(&probe),
        &NotReady::Timeout {
            stage: Stage::Ping,
            timeout
        }
    );
    assert!(probe.elapsed >= timeout, "{:?}", probe.elapsed);
    assert!(
        probe.elapsed < timeout + Duration::from_secs(1),
        "{:?}",
        probe.elapsed
    );
}

/// The timeout bounds the whole check, not each step: a server that
/// answers PING and stalls on the last INFO still fails in time, and the
/// probe says where it stalled.
#[tokio::test]
async fn stall_after_ping_times_out_at_that_step() {
    let timeout = Duration::from_millis(150);
    let server = FakeKeydb::start(Behaviour {
        info_replication: Answer::Stall,
        ..Behaviour::master()
    })
    .await
    .unwrap();
    let probe = Checker::new(timeout, None).check(server.addr()).await;
    assert_eq!(
        not_ready(&probe),
        &NotReady::Timeout {
            stage: Stage::InfoReplication,
            timeout
        }
    );
    assert!(probe.elapsed < timeout + Duration::from_secs(1));

    // AUTH answered, PING not.
    let server = FakeKeydb::start(Behaviour::silent().with_password(b"pw"))
        .await
        .unwrap();
    let probe = Checker::new(timeout, Some(Password::new("pw")))
        .check(server.addr())
        .await;
    assert_eq!(
        not_ready(&probe),
        &NotReady::Timeout {
            stage: Stage::Ping,
            timeout
        }
    );
}

#[tokio::test]
async fn refused_connection() {
    let probe = Checker::new(TIMEOUT, None).check(closed_port()).await;
    assert_eq!(not_ready(&probe), &NotReady::Refused);
    assert_eq!(probe.role, None);
}

#[tokio::test]
async fn auth() {
    let secret = b"correct horse";
    let server = FakeKeydb::start(Behaviour::master().with_password(secret))
        .await
        .unwrap();

    let right = Checker::new(TIMEOUT, Some(Password::new(secret.to_vec())));
    assert!(right.check(server.addr()).await.is_ready());

    let wrong = Checker::new(TIMEOUT, Some(Password::new("battery staple")));
    let probe = wrong.check(server.addr()).await;
    assert!(
        matches!(not_ready(&probe), NotReady::AuthFailed { message } if message.starts_with("WRONGPASS")),
        "{probe:?}"
    );
    assert!(!format!("{probe:?} {probe:?}").contains("battery"));

    let none = Checker::new(TIMEOUT, None);
    assert_eq!(
        not_ready(&none.check(server.addr()).await),
        &NotReady::AuthRequired
    );

    // A password configured for a server without one is a configuration
    // error worth reporting, not something to work around.
    let open = FakeKeydb::start(Behaviour::master()).await.unwrap();
    let probe = right.check(open.addr()).await;
    assert!(
        matches!(not_ready(&probe), NotReady::AuthFailed { .. }),
        "{probe:?}"
    );
}

/// A backend restarting: refused, loading, syncing, in sync. With rise 2
/// it serves from the second good check on, and the fake's behaviour
/// change is seen by the next check.
#[tokio::test]
async fn rejoining_backend_through_every_state() {
    let addr = closed_port();
    let checker = Checker::new(TIMEOUT, None);
    let mut health = BackendHealth::new(2, 3, InitialHealth::FirstCheck);
    let mut seen = Vec::new();
    let mut observe = |probe: Probe, seen: &mut Vec<Badness>| {
        health.observe(probe.badness());
        seen.push(health.badness());
    };

    observe(checker.check(addr).await, &mut seen);
    let server = FakeKeydb::start_on(addr, Behaviour::loading())
        .await
        .unwrap();
    observe(checker.check(addr).await, &mut seen);
    server.set_behaviour(Behaviour::replica(Role::ActiveReplica, LinkState::Syncing));
    observe(checker.check(addr).await, &mut seen);
    observe(checker.check(addr).await, &mut seen);
    server.set_behaviour(Behaviour::replica(Role::ActiveReplica, LinkState::InSync));
    observe(checker.check(addr).await, &mut seen);
    observe(checker.check(addr).await, &mut seen);

    use Badness::*;
    // A loading server answers, so it counts towards `rise` for "can
    // answer": the second check that answers (syncing) makes it usable.
    assert_eq!(
        seen,
        [
            Unavailable,
            Unavailable,
            ReplicaSyncing,
            ReplicaSyncing,
            ReplicaSyncing,
            Ready
        ]
    );
}

/// One check of every backend through the [`HealthCheck`] trait, damped,
/// then the serving set.
async fn round(
    checker: &impl HealthCheck,
    backends: &[SocketAddr],
    health: &mut [BackendHealth],
    serving: &mut Vec<usize>,
) {
    for (addr, h) in backends.iter().zip(health.iter_mut()) {
        h.observe(checker.check(*addr).await.badness());
    }
    let candidates: Vec<Candidate> = health
        .iter()
        .enumerate()
        .map(|(i, h)| Candidate {
            badness: h.badness(),
            serving: serving.contains(&i),
        })
        .collect();
    *serving = select_serving(&candidates);
}

/// Two active replicas of each other. One dies; the survivor's link to it
/// goes down, which alone would make it NOT READY: it keeps serving.
#[tokio::test]
async fn survivor_keeps_serving_when_its_peer_dies() {
    let a = FakeKeydb::start(Behaviour::replica(Role::ActiveReplica, LinkState::InSync))
        .await
        .unwrap();
    let b = FakeKeydb::start(Behaviour::replica(Role::ActiveReplica, LinkState::InSync))
        .await
        .unwrap();
    let backends = [a.addr(), b.addr()];
    let checker = Checker::new(TIMEOUT, None);
    let mut health = vec![BackendHealth::new(2, 3, InitialHealth::FirstCheck); 2];
    let mut serving = Vec::new();

    round(&checker, &backends, &mut health, &mut serving).await;
    assert_eq!(serving, [0, 1]);

    a.stop().await;
    b.set_behaviour(Behaviour::replica(Role::ActiveReplica, LinkState::Down));
    let mut history = Vec::new();
    for _ in 0..4 {
        round(&checker, &backends, &mut health, &mut serving).await;
        history.push(serving.clone());
    }
    // Both stay during `fall - 1` rounds, then b alone, never nobody.
    assert_eq!(history, [vec![0, 1], vec![0, 1], vec![1], vec![1]]);
    assert_eq!(health[1].badness(), Badness::ReplicaLinkDown);

    // The peer comes back loading: still only b.
    let a = FakeKeydb::start_on(backends[0], Behaviour::loading())
        .await
        .unwrap();
    round(&checker, &backends, &mut health, &mut serving).await;
    assert_eq!(serving, [1]);
    // Both in sync again: both serve after `rise` rounds.
    a.set_behaviour(Behaviour::replica(Role::ActiveReplica, LinkState::InSync));
    b.set_behaviour(Behaviour::replica(Role::ActiveReplica, LinkState::InSync));
    round(&checker, &backends, &mut health, &mut serving).await;
    assert_eq!(serving, [1]);
    round(&checker, &backends, &mut health, &mut serving).await;
    assert_eq!(serving, [0, 1]);
}

#[test]
fn fake_info_texts_parse_as_intended() {
    for role in [Role::Replica, Role::ActiveReplica] {
        for link in [LinkState::InSync, LinkState::Down, LinkState::Syncing] {
            let text = fake::replication_text(role, link);
            let parsed = super::info::parse_replication(text.as_bytes()).unwrap();
            assert_eq!((parsed.role, parsed.link_state()), (role, link));
        }
    }
    for loading in [false, true] {
        let text = fake::persistence_text(loading);
        assert_eq!(
            super::info::parse_persistence(text.as_bytes())
                .unwrap()
                .loading,
            loading
        );
    }
}
