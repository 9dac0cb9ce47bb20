//! Losing the link and getting it back: hub restarts, network cuts, a hub that was down
//! when the agent booted, and an agent that goes silent.

use harness::{InProcessAgent, TestHub};
use rustix::process::{Pid, Signal};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// The agent is connected again, and the hub shows it.
async fn connected_again(agent: &mut InProcessAgent, hub: &TestHub, id: &str) {
    agent
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
    hub.wait_for(id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
}

#[tokio::test]
async fn agent_reconnects_after_the_hub_is_killed_and_restarted_without_enrolling_again() {
    let mut hub = TestHub::start().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let before = hub
        .wait_for(&id, WAIT, |w| {
            w["status"] == "READY" && !w["agent"].is_null()
        })
        .await
        .unwrap();
    let cert = std::fs::read(hub.workspace_dir(&id).join("agent/agent.crt.der")).unwrap();

    hub.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.start_again().await.unwrap();
    let after = hub
        .wait_for(&id, WAIT, |w| {
            !w["agent"].is_null()
                && w["agent"]["connected_since"] != before["agent"]["connected_since"]
        })
        .await
        .unwrap();
    assert_eq!(after["status"], "READY");
    assert_eq!(after["id"], before["id"]);
    assert_eq!(
        std::fs::read(hub.workspace_dir(&id).join("agent/agent.crt.der")).unwrap(),
        cert,
        "same certificate"
    );
    assert_eq!(
        hub.log().matches("agent enrolled").count(),
        1,
        "{}",
        hub.log()
    );
    assert_eq!(
        hub.agent_log(&id)
            .matches("enrolled: certificate stored")
            .count(),
        1
    );
    // The hub registers the agent before the agent has logged the welcome: wait for it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.agent_log(&id).matches("connected to hub").count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            hub.agent_log(&id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The restarted hub recognised the old connection and reset it (no timeout wait).
    assert!(
        hub.agent_log(&id).contains("reset by peer"),
        "{}",
        hub.agent_log(&id)
    );
}

/// An idle agent sends its hub a packet at least every `link::AGENT_KEEP_ALIVE`, whatever
/// the heartbeat: a hub (or a replica) that died between two heartbeats is found out by the
/// next keep-alive, which the restarted hub (or another replica) answers with a reset.
#[tokio::test]
async fn an_idle_agent_finds_a_restarted_hub_long_before_its_next_heartbeat() {
    let heartbeat = Duration::from_secs(60);
    let mut hub = TestHub::start_with(harness::HubOptions {
        provider: "manual".into(),
        heartbeat_interval: heartbeat,
        heartbeat_timeout: heartbeat * 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    // Nothing else to say: no port watching (the hub's own ports closing would be news), no
    // sessions; its next statistics are 10 s after the connect, its heartbeat 60 s.
    let (mut config, dir) = harness::agent_config(&ws).unwrap();
    config.ports = protocol::bootstrap::PortScope::Off;
    let mut agent = InProcessAgent::start_with(config, dir);
    agent
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
    // Let its first reports be sent and acknowledged: from here on it is idle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    hub.kill();
    hub.start_again().await.unwrap();
    let restarted = std::time::Instant::now();
    match agent
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, agent::AgentEvent::Disconnected(_))
        })
        .await
        .expect("the agent noticed the restart by its keep-alive")
    {
        agent::AgentEvent::Disconnected(reason) => {
            assert!(reason.contains("reset by peer"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let noticed = restarted.elapsed();
    connected_again(&mut agent, &hub, id).await;
    eprintln!("noticed {noticed:?} after the restart");
}

#[tokio::test]
async fn an_agent_that_boots_before_its_hub_joins_when_the_hub_comes_up() {
    let mut hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    hub.kill();
    let mut agent = InProcessAgent::start(&ws).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(agent.events.try_recv().is_err());
    hub.start_again().await.unwrap();
    agent
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Enrolled)
        .await
        .unwrap();
    agent
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
    let id = ws["id"].as_str().unwrap();
    hub.wait_for(id, WAIT, |w| w["status"] == "READY")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_network_cut_is_noticed_on_both_sides_and_healed() {
    let hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    let mut agent = InProcessAgent::start(&ws).unwrap();
    agent
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();

    // A frozen hub answers nothing, as if the network between them were cut.
    hub.freeze(true).unwrap();
    let lost = agent
        .wait_event(WAIT, |e| matches!(e, agent::AgentEvent::Disconnected(_)))
        .await;
    hub.freeze(false).unwrap();
    match lost.unwrap() {
        agent::AgentEvent::Disconnected(reason) => {
            assert!(reason.contains("heartbeat"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    connected_again(&mut agent, &hub, id).await;
}

#[tokio::test]
async fn the_hub_knows_within_seconds_that_an_agent_is_gone() {
    let hub = TestHub::start_with(harness::HubOptions {
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_millis(1500),
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    hub.wait_for(&id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();

    let pid: i32 = std::fs::read_to_string(hub.workspace_dir(&id).join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = Pid::from_raw(pid).unwrap();
    rustix::process::kill_process_group(pid, Signal::STOP).unwrap();
    // A heartbeat timeout of 1.5 s: noticed within seconds, even on busy cores.
    let gone = hub
        .wait_for(&id, Duration::from_secs(10), |w| w["agent"].is_null())
        .await;
    rustix::process::kill_process_group(pid, Signal::CONT).unwrap();
    let gone = gone.unwrap();
    assert_eq!(
        gone["status"], "READY",
        "a silent agent does not change the workspace status"
    );
    assert!(
        hub.log().contains("agent heartbeat timed out") || hub.log().contains("agent disconnected")
    );
    hub.wait_for(&id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
}
