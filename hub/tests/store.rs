//! One conformance suite for every `Store` implementation. SQLite runs it here; the
//! Firestore store joins with one more `#[tokio::test]` that calls [`conformance`].

use hub::base::workspace::{IdlePolicy, Metadata, Status, Workspace};
use hub::store::firestore::{FirestoreConfig, FirestoreStore};
use hub::store::sqlite::SqliteStore;
use hub::store::{
    AgentRoute, ApiToken, AuditEntry, AuditOutcome, AuditQuery, DotfilesSetting, Limits, Profile,
    ReplicaRecord, SshKey, Store, StoreError, TokenRejection,
};
use std::sync::Arc;
use uuid::Uuid;

fn workspace(owner: &str, created_at: i64) -> Workspace {
    let id = Uuid::new_v4();
    Workspace {
        id,
        name: String::new(),
        owner_id: owner.into(),
        instance_name: format!("ws-{}", &id.simple().to_string()[..20]),
        zone: "local".into(),
        image_tag: "default".into(),
        machine_type: "local".into(),
        status: Status::Provisioning,
        status_reason: None,
        created_at,
        updated_at: created_at,
        last_connected_at: None,
        last_active_at: None,
        keep_awake_until: None,
        idle: IdlePolicy::default(),
        metadata: Metadata {
            repo: Some("https://example.com/r.git".into()),
            branch: Some("main".into()),
            device_id: None,
        },
        sharing: Default::default(),
    }
}

async fn conformance(store: Arc<dyn Store>) {
    // Workspaces: insert, get, list by owner (newest first), duplicates, missing.
    let a1 = workspace("alice", 1_000);
    let a2 = workspace("alice", 2_000);
    let b1 = workspace("bob", 1_500);
    for ws in [&a1, &a2, &b1] {
        store.insert_workspace(ws, Limits::NONE).await.unwrap();
    }
    assert!(matches!(
        store.insert_workspace(&a1, Limits::NONE).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_workspace(a1.id).await.unwrap(), a1);
    assert!(matches!(
        store.get_workspace(Uuid::new_v4()).await,
        Err(StoreError::NotFound)
    ));
    let alice: Vec<Uuid> = store
        .list_workspaces(Some("alice"))
        .await
        .unwrap()
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(alice, vec![a2.id, a1.id]);
    assert_eq!(store.list_workspaces(None).await.unwrap().len(), 3);
    assert_eq!(store.count_workspaces("alice").await.unwrap(), (2, 2));
    assert_eq!(store.count_workspaces("nobody").await.unwrap(), (0, 0));
    // Names: unique per owner (another owner may reuse one), found by owner and name.
    let mut named = workspace("alice", 3_000);
    named.name = "api".into();
    store.insert_workspace(&named, Limits::NONE).await.unwrap();
    let mut again = workspace("alice", 3_100);
    again.name = "api".into();
    assert!(matches!(
        store.insert_workspace(&again, Limits::NONE).await,
        Err(StoreError::NameTaken(n)) if n == "api"
    ));
    let mut bobs = workspace("bob", 3_200);
    bobs.name = "api".into();
    store.insert_workspace(&bobs, Limits::NONE).await.unwrap();
    assert_eq!(
        store.find_workspace_by_name("alice", "api").await.unwrap(),
        named
    );
    assert_eq!(
        store.find_workspace_by_name("bob", "api").await.unwrap(),
        bobs
    );
    assert!(matches!(
        store.find_workspace_by_name("carol", "api").await,
        Err(StoreError::NotFound)
    ));
    // A deleted workspace's name is free again.
    let gone = |id| {
        let store = store.clone();
        async move {
            store
                .transition(id, &[Status::Provisioning], Status::Deleting, None)
                .await
                .unwrap();
            store.delete_workspace(id).await.unwrap();
        }
    };
    gone(named.id).await;
    gone(bobs.id).await;
    store.insert_workspace(&again, Limits::NONE).await.unwrap();
    gone(again.id).await;
    assert!(
        store
            .list_workspaces(Some("nobody"))
            .await
            .unwrap()
            .is_empty()
    );

    // Conditional transitions.
    let ready = store
        .transition(a1.id, &[Status::Provisioning], Status::Ready, None)
        .await
        .unwrap();
    assert_eq!(ready.status, Status::Ready);
    match store
        .transition(a1.id, &[Status::Provisioning], Status::Error, Some("x"))
        .await
    {
        Err(StoreError::Conflict { current }) => assert_eq!(current, Status::Ready),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let failed = store
        .transition(a1.id, &[Status::Ready], Status::Error, Some("disk full"))
        .await
        .unwrap();
    assert_eq!(failed.status_reason.as_deref(), Some("disk full"));
    assert!(matches!(
        store
            .transition(Uuid::new_v4(), &[Status::Ready], Status::Error, None)
            .await,
        Err(StoreError::NotFound)
    ));

    // Racing writers: exactly one of many concurrent transitions wins.
    let race = workspace("carol", 3_000);
    store.insert_workspace(&race, Limits::NONE).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let to = if i % 2 == 0 {
            Status::Ready
        } else {
            Status::Error
        };
        tasks.push(tokio::spawn(async move {
            store
                .transition(race.id, &[Status::Provisioning], to, None)
                .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(wins, 1);

    // Touches only move times forward, and each field alone.
    store.touch(a2.id, Some(42_000), None).await.unwrap();
    store
        .touch(a2.id, Some(41_000), Some(40_000))
        .await
        .unwrap();
    let touched = store.get_workspace(a2.id).await.unwrap();
    assert_eq!(touched.last_connected_at, Some(42_000));
    assert_eq!(touched.last_active_at, Some(40_000));
    store.touch(a2.id, None, Some(43_000)).await.unwrap();
    let touched = store.get_workspace(a2.id).await.unwrap();
    assert_eq!(
        (touched.last_connected_at, touched.last_active_at),
        (Some(42_000), Some(43_000))
    );
    assert!(matches!(
        store.touch(Uuid::new_v4(), Some(1), None).await,
        Err(StoreError::NotFound)
    ));

    // Keep-awake leases.
    assert_eq!(
        store
            .set_keep_awake(a2.id, Some(9_000))
            .await
            .unwrap()
            .keep_awake_until,
        Some(9_000)
    );
    assert_eq!(
        store
            .set_keep_awake(a2.id, None)
            .await
            .unwrap()
            .keep_awake_until,
        None
    );
    assert!(matches!(
        store.set_keep_awake(Uuid::new_v4(), Some(1)).await,
        Err(StoreError::NotFound)
    ));

    // Preview sharing: visibility per port, links that expire and can be revoked.
    use hub::base::workspace::{ShareLink, SharingChange, Visibility};
    let link = |id: &str, expires_at| ShareLink {
        id: id.into(),
        port: 3000,
        secret_hash: format!("hash-{id}"),
        expires_at,
    };
    store
        .update_sharing(
            a2.id,
            SharingChange::Visibility(3000, Visibility::Public),
            0,
        )
        .await
        .unwrap();
    store
        .update_sharing(a2.id, SharingChange::AddLink(link("l1", 5_000)), 0)
        .await
        .unwrap();
    let ws = store
        .update_sharing(a2.id, SharingChange::AddLink(link("l2", 9_000)), 0)
        .await
        .unwrap();
    assert_eq!(ws.sharing.visibility(3000), Visibility::Public);
    assert_eq!(ws.sharing.visibility(3001), Visibility::Private);
    assert_eq!(ws.sharing.links.len(), 2);
    // Reads see it; an expired link is dropped by the next change.
    let read = store.get_workspace(a2.id).await.unwrap();
    assert_eq!(read.sharing, ws.sharing);
    let ws = store
        .update_sharing(
            a2.id,
            SharingChange::Visibility(3000, Visibility::Private),
            6_000,
        )
        .await
        .unwrap();
    assert!(ws.sharing.ports.is_empty());
    assert_eq!(ws.sharing.links, vec![link("l2", 9_000)]);
    assert!(matches!(
        store
            .update_sharing(a2.id, SharingChange::RemoveLink("l1".into()), 6_000)
            .await,
        Err(StoreError::NotFound)
    ));
    let ws = store
        .update_sharing(a2.id, SharingChange::RemoveLink("l2".into()), 6_000)
        .await
        .unwrap();
    assert!(ws.sharing.links.is_empty());

    // Deleting: only from DELETING, and the record is gone afterwards.
    let doomed = workspace("erin", 4_000);
    store.insert_workspace(&doomed, Limits::NONE).await.unwrap();
    assert!(matches!(
        store.delete_workspace(doomed.id).await,
        Err(StoreError::Conflict {
            current: Status::Provisioning
        })
    ));
    store
        .transition(doomed.id, &[Status::Provisioning], Status::Deleting, None)
        .await
        .unwrap();
    store.delete_workspace(doomed.id).await.unwrap();
    assert!(matches!(
        store.get_workspace(doomed.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_workspace(doomed.id).await,
        Err(StoreError::NotFound)
    ));

    // 50 concurrent start, stop and delete requests on one workspace, each a conditional
    // write the way the lifecycle makes them: the history they leave is a legal one, and
    // the final state is the one the last winner wrote (no lost update).
    let busy = workspace("frank", 5_000);
    store.insert_workspace(&busy, Limits::NONE).await.unwrap();
    store
        .transition(busy.id, &[Status::Provisioning], Status::Ready, None)
        .await
        .unwrap();
    const DELETE_FROM: [Status; 4] = [
        Status::Ready,
        Status::Stopping,
        Status::Suspended,
        Status::Starting,
    ];
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (from, to): (&[Status], Status) = match i % 5 {
                _ if i == 45 => (&DELETE_FROM, Status::Deleting),
                0 | 4 => (&[Status::Ready], Status::Stopping),
                1 => (&[Status::Stopping], Status::Suspended),
                2 => (&[Status::Suspended], Status::Starting),
                _ => (&[Status::Starting], Status::Ready),
            };
            match store.transition(busy.id, from, to, None).await {
                Ok(_) => Some((from[0], to)),
                Err(StoreError::Conflict { current }) => {
                    assert!(
                        !from.contains(&current),
                        "a conflict names a state outside `from`"
                    );
                    None
                }
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        wins.extend(t.await.unwrap());
    }
    // No lost update: the winning edges must form one path from READY through the state
    // machine. For every state, (edges out) - (edges in) is +1 at the start, -1 at the end
    // and 0 elsewhere; two writers that both "won" from the same state would break it.
    let last = store.get_workspace(busy.id).await.unwrap();
    let deleted = wins.iter().any(|(_, to)| *to == Status::Deleting);
    assert_eq!(deleted, last.status == Status::Deleting);
    let mut net = std::collections::HashMap::<Status, i32>::new();
    for (from, to) in wins.iter().filter(|(_, to)| *to != Status::Deleting) {
        *net.entry(*from).or_default() += 1;
        *net.entry(*to).or_default() -= 1;
    }
    *net.entry(Status::Ready).or_default() -= 1;
    let ends: Vec<Status> = net
        .iter()
        .filter(|(_, n)| **n != 0)
        .map(|(s, _)| *s)
        .collect();
    let end = match ends.as_slice() {
        [] => Status::Ready,
        [end] if net[end] == -1 => *end,
        other => panic!("winning transitions do not form one path: {other:?} {net:?}"),
    };
    if deleted {
        assert!(DELETE_FROM.contains(&end), "deleted from {end:?}");
    } else {
        assert_eq!(end, last.status);
    }

    // Enrollment tokens: unknown, bound to the first key, expired; exactly one racer wins.
    store
        .insert_enrollment_token("h1", a2.id, 10_000)
        .await
        .unwrap();
    assert_eq!(
        store.redeem_enrollment_token("nope", "k", 0).await.unwrap(),
        Err(TokenRejection::Unknown)
    );
    assert_eq!(
        store
            .redeem_enrollment_token("h1", "keyA", 5_000)
            .await
            .unwrap(),
        Ok(a2.id)
    );
    assert_eq!(
        store
            .redeem_enrollment_token("h1", "keyA", 6_000)
            .await
            .unwrap(),
        Ok(a2.id)
    );
    assert_eq!(
        store
            .redeem_enrollment_token("h1", "keyB", 6_000)
            .await
            .unwrap(),
        Err(TokenRejection::Used)
    );
    assert_eq!(
        store
            .redeem_enrollment_token("h1", "keyA", 10_000)
            .await
            .unwrap(),
        Err(TokenRejection::Expired(a2.id))
    );
    store
        .insert_enrollment_token("h2", b1.id, 10_000)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .redeem_enrollment_token("h2", &format!("key{i}"), 1)
                .await
                .unwrap()
        }));
    }
    let mut redeemed = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            redeemed += 1;
        }
    }
    assert_eq!(redeemed, 1);

    // Agent certificates: one per workspace, replaced on re-issue.
    assert_eq!(store.agent_cert(a2.id).await.unwrap(), None);
    store.put_agent_cert(a2.id, "fp1").await.unwrap();
    store.put_agent_cert(a2.id, "fp2").await.unwrap();
    assert_eq!(
        store.agent_cert(a2.id).await.unwrap().as_deref(),
        Some("fp2")
    );

    // API tokens.
    let token = ApiToken {
        owner_id: "alice".into(),
        name: "laptop".into(),
        expires_at: Some(99),
        email: Some("alice@example.com".into()),
        service: None,
    };
    store.insert_api_token("th", &token).await.unwrap();
    assert_eq!(
        store.find_api_token("th").await.unwrap(),
        Some(token.clone())
    );
    assert_eq!(store.find_api_token("other").await.unwrap(), None);
    // A service token's grant round-trips.
    let ci = ApiToken {
        name: "ci".into(),
        service: Some(hub::store::ServiceGrant {
            owner_prefix: "user-".into(),
            scopes: vec![hub::store::Scope::Workspaces, hub::store::Scope::Exec],
        }),
        ..token.clone()
    };
    store.insert_api_token("th2", &ci).await.unwrap();
    assert_eq!(store.find_api_token("th2").await.unwrap(), Some(ci.clone()));
    assert_eq!(
        store.list_api_tokens("alice").await.unwrap(),
        vec![("th2".to_owned(), ci), ("th".to_owned(), token)]
    );
    assert!(store.list_api_tokens("bob").await.unwrap().is_empty());
    store.delete_api_token("th2").await.unwrap();
    assert!(matches!(
        store.delete_api_token("th2").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.find_api_token("th2").await.unwrap(), None);
    assert_eq!(store.list_api_tokens("alice").await.unwrap().len(), 1);

    // Grants: one taker, compare and swap, expiry, purge.
    store
        .put_grant("link", "h1", "alice", 1_000, 2_000)
        .await
        .unwrap();
    assert!(matches!(
        store.put_grant("link", "h1", "bob", 1_000, 2_000).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(
        store
            .get_grant("link", "h1", 1_000)
            .await
            .unwrap()
            .as_deref(),
        Some("alice")
    );
    assert_eq!(
        store.get_grant("device", "h1", 1_000).await.unwrap(),
        None,
        "kinds apart"
    );
    assert!(
        !store
            .swap_grant("link", "h1", "bob", "carol", 1_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .swap_grant("link", "h1", "alice", "dave", 1_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .take_grant("link", "h1", Some("alice"), 1_000)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .take_grant("link", "h1", None, 1_000)
            .await
            .unwrap()
            .as_deref(),
        Some("dave")
    );
    assert_eq!(
        store.take_grant("link", "h1", None, 1_000).await.unwrap(),
        None,
        "once"
    );
    store
        .put_grant("link", "h2", "erin", 1_000, 2_000)
        .await
        .unwrap();
    assert_eq!(
        store.take_grant("link", "h2", None, 2_000).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.get_grant("link", "h2", 2_000).await.unwrap(), None);
    store
        .put_grant("link", "h3", "frank", 1_000, 9_000)
        .await
        .unwrap();
    assert!(store.purge_grants(2_000).await.unwrap() >= 1);
    assert_eq!(
        store
            .get_grant("link", "h3", 2_000)
            .await
            .unwrap()
            .as_deref(),
        Some("frank")
    );
    // Concurrent takers: one gets it.
    store
        .put_grant("device", "race", "x", 1_000, 9_000)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .take_grant("device", "race", None, 1_000)
                .await
                .unwrap()
        });
    }
    let mut takers = 0;
    while let Some(taken) = tasks.join_next().await {
        takers += usize::from(taken.unwrap().is_some());
    }
    assert_eq!(takers, 1);

    // Replicas: registered, renewed, expired, removed.
    let r1 = ReplicaRecord {
        id: "hub-a".into(),
        peer_addr: "10.0.0.1:7443".into(),
        expires_at: 5_000,
    };
    store.put_replica(&r1).await.unwrap();
    assert_eq!(
        store.get_replica("hub-a", 4_000).await.unwrap(),
        Some(r1.clone())
    );
    assert_eq!(
        store.get_replica("hub-a", 5_000).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.get_replica("hub-b", 0).await.unwrap(), None);
    assert_eq!(store.list_replicas(4_000).await.unwrap(), vec![r1.clone()]);
    assert!(store.list_replicas(5_000).await.unwrap().is_empty());
    let renewed = ReplicaRecord {
        expires_at: 9_000,
        ..r1.clone()
    };
    store.put_replica(&renewed).await.unwrap();
    assert_eq!(
        store.get_replica("hub-a", 5_000).await.unwrap(),
        Some(renewed)
    );
    store.delete_replica("hub-a").await.unwrap();
    assert_eq!(store.get_replica("hub-a", 0).await.unwrap(), None);

    // Agent routes: a later epoch wins whatever the order; clearing a stale one is a no-op.
    let ws = Uuid::new_v4();
    let old = AgentRoute {
        replica_id: "hub-a".into(),
        epoch: 100,
    };
    let new = AgentRoute {
        replica_id: "hub-b".into(),
        epoch: 200,
    };
    assert_eq!(store.agent_route(ws).await.unwrap(), None);
    assert!(store.put_agent_route(ws, &new).await.unwrap());
    assert!(
        !store.put_agent_route(ws, &old).await.unwrap(),
        "a stale route lost"
    );
    assert_eq!(store.agent_route(ws).await.unwrap(), Some(new.clone()));
    store.clear_agent_route(ws, &old).await.unwrap();
    assert_eq!(store.agent_route(ws).await.unwrap(), Some(new.clone()));
    store.clear_agent_route(ws, &new).await.unwrap();
    assert_eq!(store.agent_route(ws).await.unwrap(), None);
    assert!(store.put_agent_route(ws, &old).await.unwrap());

    // Leases: one holder at a time; renewals; expiry; release by the holder only.
    assert!(
        store
            .acquire_lease("housekeeping", "r1", 1_000, 2_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease("housekeeping", "r2", 1_500, 2_500)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("housekeeping", "r1", 1_900, 2_900)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease("housekeeping", "r2", 2_800, 3_800)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("other-lease", "r2", 2_800, 3_800)
            .await
            .unwrap()
    );
    store.release_lease("housekeeping", "r2").await.unwrap();
    assert!(
        !store
            .acquire_lease("housekeeping", "r2", 2_850, 3_850)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("housekeeping", "r2", 2_900, 3_900)
            .await
            .unwrap(),
        "expired"
    );
    store.release_lease("housekeeping", "r2").await.unwrap();
    assert!(
        store
            .acquire_lease("housekeeping", "r3", 2_950, 3_950)
            .await
            .unwrap(),
        "released"
    );
    // Many replicas at once: exactly one wins.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .acquire_lease("contended", &format!("r{i}"), 5_000, 6_000)
                .await
                .unwrap()
        });
    }
    let mut winners = 0;
    while let Some(won) = tasks.join_next().await {
        winners += usize::from(won.unwrap());
    }
    assert_eq!(winners, 1);

    // Profiles: empty until saved, then compare and set on the version.
    let owner = format!("profile-owner/{}", Uuid::new_v4());
    assert_eq!(store.get_profile(&owner).await.unwrap(), Profile::default());
    let mut profile = Profile {
        ssh_keys: vec![SshKey {
            id: "SHA256:abc/+x".into(),
            key: "ssh-ed25519 AAAA me".into(),
            added_at: 1,
        }],
        dotfiles: Some(DotfilesSetting {
            repo: "https://example.com/dotfiles.git".into(),
            install_command: None,
        }),
        version: 1,
    };
    assert!(store.put_profile(&owner, &profile).await.unwrap());
    // The same version again lost its race.
    assert!(!store.put_profile(&owner, &profile).await.unwrap());
    assert_eq!(store.get_profile(&owner).await.unwrap(), profile);
    profile.ssh_keys.clear();
    profile.dotfiles = None;
    profile.version = 2;
    assert!(store.put_profile(&owner, &profile).await.unwrap());
    profile.version = 5;
    assert!(!store.put_profile(&owner, &profile).await.unwrap());
    let saved = store.get_profile(&owner).await.unwrap();
    assert_eq!((saved.version, saved.ssh_keys.len()), (2, 0));
    // Of concurrent writers of one version, one wins.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let (store, owner) = (store.clone(), owner.clone());
        tasks.spawn(async move {
            let p = Profile {
                ssh_keys: vec![SshKey {
                    id: format!("k{i}"),
                    key: "ssh-ed25519 AAAA".into(),
                    added_at: i,
                }],
                dotfiles: None,
                version: 3,
            };
            store.put_profile(&owner, &p).await.unwrap()
        });
    }
    let mut winners = 0;
    while let Some(won) = tasks.join_next().await {
        winners += usize::from(won.unwrap());
    }
    assert_eq!(winners, 1);
    assert_eq!(
        store.get_profile("nobody").await.unwrap(),
        Profile::default()
    );

    audit_log(store.as_ref()).await;
}

/// The audit log: appended entries come back newest first, filtered by workspace, actor and
/// time, a page at a time; a taken id is refused; retention deletes the old ones only.
async fn audit_log(store: &dyn Store) {
    let (w1, w2) = (Uuid::new_v4(), Uuid::new_v4());
    let base = 1_700_000_000_000_i64;
    let mut all = Vec::new();
    for i in 0..30_i64 {
        let refused = i % 4 == 0;
        let entry = AuditEntry {
            id: AuditEntry::new_id((base + i * 1000) * 1000 + i),
            at: base + i * 1000,
            actor: if i % 3 == 0 { "system" } else { "alice" }.into(),
            via: "user".into(),
            action: "workspace.stop".into(),
            workspace_id: Some(if i % 2 == 0 { w1 } else { w2 }),
            target: (i % 5 == 0).then(|| format!("id=demo port={i}")),
            outcome: if refused {
                AuditOutcome::Refused
            } else {
                AuditOutcome::Ok
            },
            status: Some(if refused { 409 } else { 202 }),
            code: refused.then(|| "conflict".into()),
            request_id: Some(format!("req{i}")),
            ip: Some("127.0.0.1".into()),
        };
        store.append_audit(&entry).await.unwrap();
        all.push(entry);
    }
    // An entry without a workspace (a sign-in).
    let sign_in = AuditEntry {
        id: AuditEntry::new_id((base + 40_000) * 1000),
        at: base + 40_000,
        actor: "bob".into(),
        via: "link".into(),
        action: "sign_in".into(),
        workspace_id: None,
        target: None,
        outcome: AuditOutcome::Ok,
        status: Some(303),
        code: None,
        request_id: None,
        ip: None,
    };
    store.append_audit(&sign_in).await.unwrap();
    assert!(matches!(
        store.append_audit(&sign_in).await,
        Err(StoreError::AlreadyExists)
    ));
    all.push(sign_in.clone());
    all.reverse();
    let query = |limit| AuditQuery {
        workspace_id: None,
        actor: None,
        since: None,
        until: None,
        before: None,
        limit,
    };
    let times = |entries: &[AuditEntry]| entries.iter().map(|e| e.at).collect::<Vec<_>>();
    // Everything, newest first, entries exactly as appended.
    assert_eq!(store.list_audit(&query(100)).await.unwrap(), all);
    // Pages: each starts below the previous page's last id, and together they are all.
    let mut paged = Vec::new();
    let mut q = query(7);
    loop {
        let page = store.list_audit(&q).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        q.before = Some(last.id.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // By workspace, by actor, by both, by time.
    let by_w1 = store
        .list_audit(&AuditQuery {
            workspace_id: Some(w1),
            ..query(100)
        })
        .await
        .unwrap();
    assert_eq!(by_w1.len(), 15);
    assert!(by_w1.iter().all(|e| e.workspace_id == Some(w1)));
    let by_actor = store
        .list_audit(&AuditQuery {
            actor: Some("system".into()),
            ..query(100)
        })
        .await
        .unwrap();
    assert_eq!(by_actor.len(), 10);
    let both = store
        .list_audit(&AuditQuery {
            workspace_id: Some(w1),
            actor: Some("system".into()),
            ..query(100)
        })
        .await
        .unwrap();
    // Even and divisible by three.
    assert_eq!(times(&both), [24, 18, 12, 6, 0].map(|i| base + i * 1000));
    let window = store
        .list_audit(&AuditQuery {
            since: Some(base + 10_000),
            until: Some(base + 20_000),
            ..query(100)
        })
        .await
        .unwrap();
    assert_eq!(
        times(&window),
        (10..20).rev().map(|i| base + i * 1000).collect::<Vec<_>>()
    );
    let window_page = store
        .list_audit(&AuditQuery {
            since: Some(base + 10_000),
            until: Some(base + 20_000),
            workspace_id: Some(w2),
            ..query(2)
        })
        .await
        .unwrap();
    assert_eq!(times(&window_page), [19, 17].map(|i| base + i * 1000));
    // Retention: a bounded batch at a time, the oldest first, nothing newer.
    assert_eq!(store.purge_audit(base + 10_000, 4).await.unwrap(), 4);
    assert_eq!(store.purge_audit(base + 10_000, 100).await.unwrap(), 6);
    assert_eq!(store.purge_audit(base + 10_000, 100).await.unwrap(), 0);
    let kept = store.list_audit(&query(100)).await.unwrap();
    assert_eq!(kept.len(), 21);
    assert!(kept.iter().all(|e| e.at >= base + 10_000));
}

/// 50 creates of one owner at once, spread over `stores` (replicas sharing one database),
/// against a limit of 10 workspaces: exactly 10 pass, the rest are refused with the count.
async fn concurrent_creates_respect_the_quota(stores: Vec<Arc<dyn Store>>) {
    let owner = format!("quota-{}", Uuid::new_v4().simple());
    let limits = Limits {
        workspaces: 10,
        running: 50,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = stores[i % stores.len()].clone();
        let ws = workspace(&owner, 10_000 + i as i64);
        tasks.spawn(async move { store.insert_workspace(&ws, limits).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(()) => created += 1,
            Err(StoreError::OverQuota {
                what: "workspaces",
                count: 10,
                limit: 10,
            }) => refused += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!((created, refused), (10, 40));
    assert_eq!(stores[0].count_workspaces(&owner).await.unwrap(), (10, 10));

    // The running limit counts running workspaces only; the id check comes first.
    let limits = Limits {
        workspaces: 100,
        running: 10,
    };
    let extra = workspace(&owner, 20_000);
    assert!(matches!(
        stores[0].insert_workspace(&extra, limits).await,
        Err(StoreError::OverQuota {
            what: "running workspaces",
            ..
        })
    ));
    let first = stores[0].list_workspaces(Some(&owner)).await.unwrap()[0].clone();
    assert!(matches!(
        stores[0].insert_workspace(&first, limits).await,
        Err(StoreError::AlreadyExists)
    ));
    stores[0]
        .transition(first.id, &[Status::Provisioning], Status::Suspended, None)
        .await
        .unwrap();
    stores[0].insert_workspace(&extra, limits).await.unwrap();
}

#[tokio::test]
async fn sqlite_creates_respect_the_quota_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sqlite3");
    // Two connections to one file behave as two hub processes do.
    concurrent_creates_respect_the_quota(vec![
        Arc::new(SqliteStore::open(&path).unwrap()),
        Arc::new(SqliteStore::open(&path).unwrap()),
    ])
    .await;
}

#[tokio::test]
async fn firestore_creates_respect_the_quota_across_replicas() {
    let emulator = harness::firestore::FirestoreEmulator::start().expect("Firestore emulator");
    let config = FirestoreConfig {
        project: format!("quota-{}", Uuid::new_v4().simple()),
        emulator_host: Some(emulator.host.clone()),
    };
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(FirestoreStore::connect(&config).await.unwrap()));
    }
    concurrent_creates_respect_the_quota(stores).await;
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Arc::new(
        SqliteStore::open(&dir.path().join("hub.sqlite3")).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn firestore_store_conforms() {
    let emulator = harness::firestore::FirestoreEmulator::start().expect("Firestore emulator");
    let store = FirestoreStore::connect(&FirestoreConfig {
        project: format!("conformance-{}", Uuid::new_v4().simple()),
        emulator_host: Some(emulator.host.clone()),
    })
    .await
    .unwrap();
    conformance(Arc::new(store)).await;
}

#[tokio::test]
async fn sqlite_store_keeps_state_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sqlite3");
    let ws = workspace("dana", 7);
    {
        let store = SqliteStore::open(&path).unwrap();
        store.insert_workspace(&ws, Limits::NONE).await.unwrap();
        store
            .transition(ws.id, &[Status::Provisioning], Status::Ready, None)
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.get_workspace(ws.id).await.unwrap().status,
        Status::Ready
    );
}
