//! REST benchmark: latency p50/p99 and throughput of list, get, create and stop under many
//! concurrent clients, on SQLite and on the Firestore emulator, against one real hub
//! process; and the time from `POST /workspaces` to `READY` with the process provider.
//!
//! `cargo bench -p workspace-hub --bench api -- [--clients 100] [--per-client 20] [--ready 20]`

use harness::firestore::FirestoreEmulator;
use harness::{HubOptions, TestHub};
use hub::base::workspace::Status;
use hub::store::Store;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

struct Args {
    clients: usize,
    per_client: usize,
    ready: usize,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&["--clients", "--per-client", "--ready"]);
    Args {
        clients: a.num("--clients", 100, 4),
        per_client: a.num("--per-client", 20, 3),
        ready: a.num("--ready", 20, 2),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Row {
    op: &'static str,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    errors: usize,
    first_error: Option<String>,
}

/// Runs `clients` tasks, each sending `per_client` requests made by `request(i)` in turn.
async fn load(
    hub: &TestHub,
    tokens: &[String],
    op: &'static str,
    clients: usize,
    per_client: usize,
    expect: u16,
    request: impl Fn(usize) -> (reqwest::Method, String, Option<Value>) + Send + Sync + 'static,
) -> Row {
    let request = Arc::new(request);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, token) in tokens.iter().enumerate().take(clients) {
        let http = hub.http.clone();
        let base = hub.url("");
        let token = token.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_client);
            let mut errors = 0;
            let mut first_error = None;
            for k in 0..per_client {
                let (method, path, body) = request(c * per_client + k);
                let mut req = http
                    .request(method, format!("{base}{path}"))
                    .bearer_auth(&token);
                if let Some(body) = body {
                    req = req.json(&body);
                }
                let t = Instant::now();
                let res = req.send().await;
                let status = res.as_ref().map(|r| r.status().as_u16()).ok();
                let text = match res {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                out.push(t.elapsed());
                if status != Some(expect) {
                    errors += 1;
                    first_error.get_or_insert(format!("{status:?} {text}"));
                }
            }
            (out, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, first) = t.await.unwrap();
        all.extend(lat);
        errors += e;
        first_error = first_error.or(first);
    }
    let wall = start.elapsed();
    all.sort();
    Row {
        op,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        per_sec: all.len() as f64 / wall.as_secs_f64(),
        errors,
        first_error,
    }
}

/// Where the hub keeps its state in one run.
enum Backend {
    Sqlite,
    Firestore { host: String, project: String },
}

impl Backend {
    fn toml(&self) -> String {
        match self {
            Backend::Sqlite => String::new(),
            Backend::Firestore { host, project } => format!(
                "[store]\nkind = \"firestore\"\nproject = \"{project}\"\nemulator_host = \"{host}\"\n"
            ),
        }
    }

    /// A second handle on the hub's store (SQLite in WAL mode takes a second connection).
    async fn open(&self, hub: &TestHub) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite => Arc::new(
                hub::store::sqlite::SqliteStore::open(&hub.state_dir.join("hub.sqlite3")).unwrap(),
            ),
            Backend::Firestore { host, project } => Arc::new(
                hub::store::firestore::FirestoreStore::connect(
                    &hub::store::firestore::FirestoreConfig {
                        project: project.clone(),
                        emulator_host: Some(host.clone()),
                    },
                )
                .await
                .unwrap(),
            ),
        }
    }
}

async fn bench_store(name: &str, backend: &Backend, args: &Args) -> Vec<Row> {
    let store_toml = backend.toml();
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        config: format!(
            "reconcile_interval = \"1h\"\n{store_toml}\n[quotas]\nmax_workspaces = 1000000\nmax_running = 1000000\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let total = args.clients * args.per_client;
    // One owner per client, as in real use: each lists and counts its own workspaces.
    let tokens: Vec<String> = (0..args.clients)
        .map(|c| hub.mint_token(&format!("user{c}")).unwrap())
        .collect();
    eprintln!("... {name}: create");
    let create = load(
        &hub,
        &tokens,
        "create",
        args.clients,
        args.per_client,
        201,
        |_| (reqwest::Method::POST, "/workspaces".into(), Some(json!({}))),
    )
    .await;
    // Workspaces for get and stop: made READY in the store (the manual provider starts no
    // agent), as if their agents had connected. Client c works on its own owner's ones.
    let store = backend.open(&hub).await;
    let mut ids = Vec::new();
    for c in 0..args.clients {
        let mut mine: Vec<String> = store
            .list_workspaces(Some(&format!("user{c}")))
            .await
            .unwrap()
            .iter()
            .map(|w| w.id.to_string())
            .collect();
        mine.sort();
        mine.resize(args.per_client, mine.first().cloned().unwrap_or_default());
        ids.extend(mine);
    }
    let ids = Arc::new(ids);
    if ids.len() < total {
        eprintln!(
            "{name}: only {} of {total} creates succeeded: {:?}",
            ids.len(),
            create.first_error
        );
    }
    for id in ids.iter() {
        let _ = store
            .transition(
                Uuid::parse_str(id).unwrap(),
                &[Status::Provisioning],
                Status::Ready,
                None,
            )
            .await;
    }
    eprintln!("... {name}: get");
    let get_ids = ids.clone();
    let get = load(
        &hub,
        &tokens,
        "get",
        args.clients,
        args.per_client,
        200,
        move |i| {
            (
                reqwest::Method::GET,
                format!("/workspaces/{}", get_ids[i % get_ids.len()]),
                None,
            )
        },
    )
    .await;
    eprintln!(
        "... {name}: list ({} workspaces per owner)",
        args.per_client
    );
    let list = load(
        &hub,
        &tokens,
        "list",
        args.clients,
        args.per_client,
        200,
        |_| (reqwest::Method::GET, "/workspaces".into(), None),
    )
    .await;
    eprintln!("... {name}: stop");
    let stop_ids = ids.clone();
    let stop = load(
        &hub,
        &tokens,
        "stop",
        args.clients,
        args.per_client,
        202,
        move |i| {
            (
                reqwest::Method::POST,
                format!("/workspaces/{}/stop", stop_ids[i % stop_ids.len()]),
                None,
            )
        },
    )
    .await;
    let errors: Vec<String> = hub
        .log()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .take(3)
        .map(str::to_owned)
        .collect();
    if !errors.is_empty() {
        eprintln!("{name}: hub errors: {errors:#?}");
    }
    vec![list, get, create, stop]
}

async fn time_to_ready(samples: usize) -> Vec<Duration> {
    let hub = TestHub::start_with(HubOptions {
        config: "[quotas]\nmax_workspaces = 1000\nmax_running = 1000\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut out = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let (code, ws) = hub
            .api("POST", "/workspaces", Some(json!({})))
            .await
            .unwrap();
        assert_eq!(code, 201, "{ws}");
        let id = ws["id"].as_str().unwrap().to_owned();
        loop {
            let (_, w) = hub
                .api("GET", &format!("/workspaces/{id}"), None)
                .await
                .unwrap();
            if w["status"] == "READY" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "not ready: {w}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(t.elapsed());
        hub.api("DELETE", &format!("/workspaces/{id}"), None)
            .await
            .unwrap();
    }
    out.sort();
    out
}

fn print_rows(name: &str, rows: &[Row], clients: usize) {
    println!("\n| {name}, {clients} concurrent clients | p50 | p99 | requests/s | errors |");
    println!("|---|---|---|---|---|");
    for r in rows {
        if let Some(e) = &r.first_error {
            eprintln!("{}: first error: {e}", r.op);
        }
        println!(
            "| {} | {} | {} | {:.0} | {} |",
            r.op,
            ms(r.p50),
            ms(r.p99),
            r.per_sec,
            r.errors
        );
    }
}

#[tokio::main]
async fn main() {
    link::install_crypto_provider();
    let args = parse_args();
    println!(
        "REST benchmark: {} clients x {} requests per operation",
        args.clients, args.per_client
    );

    let rows = bench_store("SQLite", &Backend::Sqlite, &args).await;
    print_rows("SQLite", &rows, args.clients);

    eprintln!("... starting the Firestore emulator");
    let emulator = FirestoreEmulator::start().expect("Firestore emulator");
    let firestore = Backend::Firestore {
        host: emulator.host.clone(),
        project: format!("bench-{}", Uuid::new_v4().simple()),
    };
    let rows = bench_store("Firestore emulator", &firestore, &args).await;
    print_rows("Firestore emulator", &rows, args.clients);

    eprintln!("... POST /workspaces to READY (process provider)");
    let ready = time_to_ready(args.ready).await;
    println!(
        "\n| POST /workspaces to READY, process provider ({} samples) | p50 {} | p99 {} | target <= 500 ms |",
        ready.len(),
        ms(percentile(&ready, 0.5)),
        ms(percentile(&ready, 0.99))
    );
}
