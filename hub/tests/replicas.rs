//! Several hub processes sharing one store (the Firestore emulator) and one identity: what
//! must happen once happens on one replica at a time.

use harness::{HubOptions, TestHub};
use std::time::Duration;

/// Config lines for a replica: the shared store and identity, a short leader lease and a
/// fast reconciler.
fn replica_config(emulator: &str, project: &str, identity: &std::path::Path, id: &str) -> String {
    format!(
        "replica_id = \"{id}\"\nleader_lease = \"2s\"\nreconcile_interval = \"200ms\"\n\
         [store]\nkind = \"firestore\"\nproject = \"{project}\"\nemulator_host = \"{emulator}\"\n\
         [identity]\nca_cert = \"file:{d}/ca.pem\"\nca_key = \"file:{d}/ca.key\"\n\
         ticket_key = \"file:{d}/ticket.key\"\nreset_key = \"file:{d}/reset.key\"\n",
        d = identity.display()
    )
}

/// Whether the last leadership line of `hub`'s log (from byte `from`: a restarted hub
/// appends to the same log) says it holds the lease now.
fn leads_since(hub: &TestHub, from: usize) -> bool {
    hub.log()[from..]
        .lines()
        .rfind(|l| l.contains("housekeeping leader changed"))
        .is_some_and(|l| l.contains("leader=true"))
}

fn leads(hub: &TestHub) -> bool {
    leads_since(hub, 0)
}

#[tokio::test]
async fn one_replica_runs_housekeeping_and_another_takes_over_when_it_dies() {
    let emulator = harness::firestore::FirestoreEmulator::start().expect("Firestore emulator");
    let project = format!("replicas-{}", uuid::Uuid::new_v4().simple());
    let identity = tempfile::tempdir().unwrap();
    hub::identity::Identity::generate_files(identity.path()).unwrap();
    let start = |id: &'static str| {
        TestHub::start_with(HubOptions {
            provider: "manual".into(),
            config: replica_config(&emulator.host, &project, identity.path(), id),
            ..Default::default()
        })
    };
    let mut a = start("replica-a").await.unwrap();
    let mut b = start("replica-b").await.unwrap();

    // Exactly one leads, and keeps leading while it lives (renewals hold the lease).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(leads(&a) || leads(&b)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..30 {
        assert!(
            leads(&a) != leads(&b),
            "two leaders or none:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, follower) = if leads(&a) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let follower_changes = follower
        .log()
        .matches("housekeeping leader changed")
        .count();

    // SIGKILL: no release. The follower takes over once the lease runs out (2 s).
    leader.kill();
    let killed = tokio::time::Instant::now();
    while !leads(follower) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no takeover:\n{}",
            follower.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(
        follower
            .log()
            .matches("housekeeping leader changed")
            .count()
            > follower_changes
    );

    // The old leader comes back as a follower.
    let restarted = leader.log().len();
    leader.start_again().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        leads(follower) && !leads_since(leader, restarted),
        "{}\n{}",
        leader.log(),
        follower.log()
    );

    // SIGTERM: the leader gives the lease back as it exits, and the other takes it.
    let pid = rustix::process::Pid::from_raw(follower.listening.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let termed = tokio::time::Instant::now();
    while !leads_since(leader, restarted) {
        assert!(
            termed.elapsed() < Duration::from_secs(10),
            "{}",
            leader.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        follower.log().contains("housekeeping lease released"),
        "{}",
        follower.log()
    );
    eprintln!(
        "takeover after SIGKILL: {took:?}, after SIGTERM: {:?}",
        termed.elapsed()
    );
}
