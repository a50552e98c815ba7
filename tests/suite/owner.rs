//! Single writer, with real daemons: two daemons (each with its own state dir, socket
//! and workspace) for the same conversation on the same remote, a `dir` remote or the
//! embedded S3 server, with a 2 s lease. The second waits without writing while the
//! first owns the conversation, and takes over after a clean stop (at once, released),
//! after a SIGKILL (after the lease), or after the first was frozen past its lease;
//! the first then stops writing for good and says `lost`.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use sandkeep::remote::{self, Remote};
use serde_json::{Value, json};

use crate::s3_server::S3Server;
use crate::util::{Daemon, OTHER_KV_KEY, ok, poll_until};

const CONV: &str = "conversations/u1/c1/";
const OWNER: &str = "conversations/u1/c1/.sandkeep/owner.json";
const LEASE: Duration = Duration::from_secs(2);
/// Every daemon here: a short final-sync deadline (a fenced daemon cannot finish it).
const EXTRA: &str = "[shutdown]\ndeadline = \"5s\"\n";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Dir,
    S3,
}

/// Two prepared daemons on one remote and conversation, neither started.
struct Pair {
    a: Daemon,
    b: Daemon,
    remote: Arc<dyn Remote>,
    _server: Option<S3Server>,
}

impl Pair {
    async fn new(backend: Backend) -> Self {
        let mut a = Daemon::prepare(EXTRA);
        let mut b = Daemon::prepare(EXTRA);
        for d in [&mut a, &mut b] {
            d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
            // One conversation, one KV key: B reads A's exports.
            d.set_env("SANDKEEP_KV_KEY", OTHER_KV_KEY);
        }
        let (remote, server): (Arc<dyn Remote>, _) = match backend {
            Backend::Dir => {
                // B's `[remote] path` becomes A's remote directory.
                let text = std::fs::read_to_string(&b.config_path).unwrap();
                let quoted = |d: &Daemon| format!("{:?}", d.remote.display().to_string());
                std::fs::write(&b.config_path, text.replace(&quoted(&b), &quoted(&a))).unwrap();
                let remote = remote::dir::DirRemote::new(&a.remote).unwrap();
                (Arc::new(remote), None)
            }
            Backend::S3 => {
                let server = S3Server::start().await;
                server.configure(&a);
                server.configure(&b);
                (Arc::new(server.client().await), Some(server))
            }
        };
        Self {
            a,
            b,
            remote,
            _server: server,
        }
    }

    /// `owner.json` as JSON.
    async fn owner(&self) -> Value {
        let bytes = self
            .remote
            .get_bytes(OWNER)
            .await
            .unwrap()
            .expect("owner.json");
        serde_json::from_slice(&bytes).unwrap()
    }

    async fn object(&self, rel: &str) -> Option<Vec<u8>> {
        let got = self
            .remote
            .get_bytes(&format!("{CONV}{rel}"))
            .await
            .unwrap();
        got.map(|b| b.to_vec())
    }

    /// Every object of the conversation but the owner object, with its content.
    async fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for o in remote::list_all(self.remote.as_ref(), CONV).await.unwrap() {
            if o.key != OWNER {
                let data = self.remote.get_bytes(&o.key).await.unwrap();
                out.insert(o.key, data.map(|b| b.to_vec()).unwrap_or_default());
            }
        }
        out
    }
}

async fn owner_status(d: &Daemon) -> Value {
    ok(&d.api().get("/v1/status").await, 200)["owner"].clone()
}

fn signal(d: &Daemon, name: &str) {
    let st = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(d.pid().to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{name} failed");
}

/// A owns the conversation and put a KV key, a file store file and a workspace file
/// in the remote.
async fn start_first(p: &mut Pair) {
    std::fs::write(p.a.workspace.join("from-a.txt"), b"a").unwrap();
    p.a.spawn_and_wait().await;
    let api = p.a.api();
    ok(&api.put("/v1/kv/k", &json!("from a")).await, 201);
    ok(
        &api.raw(Method::PUT, "/v1/files/notes/a.txt", b"a").await,
        201,
    );
    ok(&api.post_empty("/v1/sync").await, 200);
    let s = owner_status(&p.a).await;
    assert_eq!(s["state"], "claimed", "{s}");
    assert_eq!(s["epoch"], 1, "{s}");
    assert_eq!(s["writes_allowed"], true, "{s}");
    let o = p.owner().await;
    assert_eq!(o["instance"], s["instance"], "{o}");
    assert_eq!(o["lease_ms"], s["lease_ms"], "{o}");
    assert!(p.object("kv/default.kv").await.is_some());
    assert_eq!(p.object("notes/a.txt").await.as_deref(), Some(&b"a"[..]));
}

/// B runs and waits: not ready, nothing written, its log names A.
async fn assert_waiting(p: &mut Pair, before: &BTreeMap<String, Vec<u8>>, a_instance: &str) {
    assert!(p.b.is_running(), "B exited; log:\n{}", p.b.log());
    // B answers, but is not ready and says why.
    assert_eq!(p.b.api().get("/readyz").await.status, 503);
    let s = owner_status(&p.b).await;
    assert_eq!(s["state"], "waiting", "{s}");
    assert_eq!(p.b.api().get("/v1/kv/k").await.status, 503);
    // Metrics answer while it starts: that is when an operator looks at them.
    let m = p.b.api().get("/metrics").await;
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.body));
    assert_eq!(&p.objects().await, before, "B (or A) wrote to the remote");
    assert_eq!(p.owner().await["instance"], a_instance);
    let log = p.b.log();
    assert!(
        log.contains("another daemon owns this conversation") && log.contains(a_instance),
        "{log}"
    );
}

/// B owns the conversation now (epoch 2), restored A's KV and file store, and writes.
async fn assert_b_took_over(p: &Pair) {
    let s = owner_status(&p.b).await;
    assert_eq!(s["state"], "claimed", "{s}");
    assert_eq!(s["epoch"], 2, "{s}");
    let o = p.owner().await;
    assert_eq!((&o["instance"], &o["epoch"]), (&s["instance"], &json!(2)));
    let api = p.b.api();
    assert_eq!(api.value("k").await, Some(json!("from a")));
    let f = api.get("/v1/files/notes/a.txt").await;
    assert_eq!((f.status, f.body.as_ref()), (200, &b"a"[..]));
    ok(&api.post_empty("/v1/sync").await, 200);
    assert_eq!(
        p.object("workspace/files/from-b.txt").await.as_deref(),
        Some(&b"b"[..])
    );
}

/// B says why it took over, owns and writes ([`assert_b_took_over`]), and stops cleanly.
async fn b_took_over_and_stops(p: &mut Pair, reason: &str) {
    assert!(p.b.log().contains(reason), "{}", p.b.log());
    assert_b_took_over(p).await;
    assert_eq!(p.b.terminate().code(), Some(0), "{}", p.b.log());
}

async fn waits_then_takes_over_after_a_clean_stop(backend: Backend) {
    let mut p = Pair::new(backend).await;
    start_first(&mut p).await;
    let a_instance = owner_status(&p.a).await["instance"]
        .as_str()
        .unwrap()
        .to_string();
    let before = p.objects().await;

    std::fs::write(p.b.workspace.join("from-b.txt"), b"b").unwrap();
    p.b.spawn();
    tokio::time::sleep(LEASE * 5 / 2).await;
    assert_waiting(&mut p, &before, &a_instance).await;

    // A stops cleanly and releases: B takes over without waiting for the lease.
    let status = p.a.terminate();
    assert_eq!(status.code(), Some(0), "{}", p.a.log());
    assert!(
        p.a.log().contains("released the conversation"),
        "{}",
        p.a.log()
    );
    p.b.wait_ready().await;
    b_took_over_and_stops(&mut p, "the previous owner released it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_then_takes_over_after_a_clean_stop_dir() {
    waits_then_takes_over_after_a_clean_stop(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_then_takes_over_after_a_clean_stop_s3() {
    waits_then_takes_over_after_a_clean_stop(Backend::S3).await;
}

async fn takes_over_after_a_killed_owners_lease(backend: Backend) {
    let mut p = Pair::new(backend).await;
    start_first(&mut p).await;
    p.a.kill9();
    let killed = Instant::now();
    std::fs::write(p.b.workspace.join("from-b.txt"), b"b").unwrap();
    p.b.spawn_and_wait().await;
    // B saw A's last renewal only after the kill, and waited a whole lease from then.
    assert!(killed.elapsed() >= LEASE, "{:?}", killed.elapsed());
    b_took_over_and_stops(&mut p, "the previous owner's lease expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_after_a_killed_owners_lease_dir() {
    takes_over_after_a_killed_owners_lease(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_after_a_killed_owners_lease_s3() {
    takes_over_after_a_killed_owners_lease(Backend::S3).await;
}

async fn a_stolen_lease_stops_the_first_daemons_writes(backend: Backend) {
    let mut p = Pair::new(backend).await;
    start_first(&mut p).await;
    std::fs::write(p.b.workspace.join("from-b.txt"), b"b").unwrap();
    p.b.spawn();
    tokio::time::sleep(LEASE / 2).await;

    // A freezes (a long pause, a partition) past its lease: B takes over.
    signal(&p.a, "STOP");
    p.b.wait_ready().await;
    assert!(p.b.log().contains("lease expired"), "{}", p.b.log());
    signal(&p.a, "CONT");

    // A's next renewal finds B: it reports `lost` and writes nothing any more.
    let lost = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let s = owner_status(&p.a).await;
            (s["state"] == "lost").then_some(s)
        },
    )
    .await
    .unwrap_or_else(|| panic!("A never reported lost; log:\n{}", p.a.log()));
    let b_instance = owner_status(&p.b).await["instance"].clone();
    assert_eq!(lost["holder"]["instance"], b_instance, "{lost}");
    assert_eq!(lost["writes_allowed"], false, "{lost}");
    assert!(
        p.a.log()
            .contains("ANOTHER DAEMON TOOK OVER THIS CONVERSATION"),
        "{}",
        p.a.log()
    );

    // Its sync cannot succeed, and says so at once, even with nothing pending.
    let api = p.a.api();
    let asked = Instant::now();
    let r = api.post("/v1/sync", &json!({"timeout_s": 30})).await;
    crate::util::assert_error(&r, 409, "conversation_lost");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    // So does a file store write's `sync=true` (the file is kept locally).
    let asked = Instant::now();
    let r = api
        .raw(Method::PUT, "/v1/files/notes/synced.txt?sync=true", b"s")
        .await;
    crate::util::assert_error(&r, 409, "conversation_lost");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    let f = api.get("/v1/files/notes/synced.txt").await;
    assert_eq!((f.status, f.body.as_ref()), (200, &b"s"[..]));
    // No lost compare-and-set (4) for the CLI: an error.
    let out = p.a.cli().run(&["sync", "--timeout", "30"]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("conversation_lost"), "{}", out.stderr);

    // A still serves its local KV and file store; nothing of it reaches the remote.
    assert_eq!(api.value("k").await, Some(json!("from a")));
    ok(&api.put("/v1/kv/late?ns=late", &json!(1)).await, 201);
    ok(
        &api.raw(Method::PUT, "/v1/files/events/late.json", b"{}")
            .await,
        201,
    );
    std::fs::write(p.a.workspace.join("late.txt"), b"late").unwrap();
    let r = api.post("/v1/sync", &json!({"timeout_s": 30})).await;
    crate::util::assert_error(&r, 409, "conversation_lost");
    assert_eq!(p.object("kv/late.kv").await, None);
    assert_eq!(p.object("events/late.json").await, None);
    assert_eq!(p.object("workspace/files/late.txt").await, None);
    assert_eq!(p.owner().await["instance"], b_instance);

    // B owns and writes.
    assert_b_took_over(&p).await;
    // A cannot finish a final sync: 75, without trying (not waiting out its deadline).
    assert_eq!(p.a.terminate().code(), Some(75), "{}", p.a.log());
    assert!(p.a.log().contains("final sync skipped"), "{}", p.a.log());
    assert_eq!(p.object("kv/late.kv").await, None);
    assert_eq!(p.owner().await["instance"], b_instance);
    assert_eq!(p.b.terminate().code(), Some(0), "{}", p.b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_lease_stops_the_first_daemons_writes_dir() {
    a_stolen_lease_stops_the_first_daemons_writes(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_lease_stops_the_first_daemons_writes_s3() {
    a_stolen_lease_stops_the_first_daemons_writes(Backend::S3).await;
}

/// `sandkeep restore` (an init container) waits while another daemon owns the
/// conversation (the sandbox being replaced, not stopped yet), so that it restores what
/// that daemon wrote until its final sync; `--no-wait` reads what is there at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_restore_waits_for_the_owners_final_sync() {
    let mut p = Pair::new(Backend::Dir).await;
    start_first(&mut p).await;
    let at_once = p.b.root().join("at-once");
    let out =
        p.b.restore_cli(&["--to", at_once.to_str().unwrap(), "--no-wait"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(at_once.join("from-a.txt").exists());

    let waited = p.b.root().join("waited");
    let mut cmd = crate::util::sandkeep_command();
    cmd.arg("restore")
        .arg("--config")
        .arg(&p.b.config_path)
        .arg("--to")
        .arg(&waited);
    let restore = tokio::task::spawn_blocking(move || {
        crate::util::run_bounded(cmd, None, Duration::from_secs(60))
    });
    tokio::time::sleep(LEASE).await;
    assert!(!restore.is_finished(), "the restore did not wait");
    // A's last work, carried by its final sync.
    std::fs::write(p.a.workspace.join("from-a.txt"), b"a, last").unwrap();
    std::fs::write(p.a.workspace.join("late.txt"), b"late").unwrap();
    assert_eq!(p.a.terminate().code(), Some(0), "{}", p.a.log());
    let out = tokio::time::timeout(Duration::from_secs(30), restore)
        .await
        .expect("the restore goes on once the owner released the conversation")
        .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("owns this conversation"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(waited.join("from-a.txt")).unwrap(),
        b"a, last"
    );
    assert_eq!(std::fs::read(waited.join("late.txt")).unwrap(), b"late");
    assert!(!at_once.join("late.txt").exists());
}

/// After a killed owner, an init container's restore waits out its lease once and marks
/// its object released: the sidecar that starts next takes over at once, instead of
/// waiting a second lease from when it first reads the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_killed_owner_only_the_restore_waits_for_the_lease() {
    let mut p = Pair::new(Backend::Dir).await;
    start_first(&mut p).await;
    p.a.kill9();
    let killed = Instant::now();
    let to = p.b.workspace.to_str().unwrap().to_string();
    let out = p.b.restore_cli(&["--to", &to], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(killed.elapsed() >= LEASE, "{:?}", killed.elapsed());
    assert!(
        out.stderr.contains("owns this conversation"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("marked released"), "{}", out.stderr);
    assert_eq!(
        std::fs::read(p.b.workspace.join("from-a.txt")).unwrap(),
        b"a"
    );
    let o = p.owner().await;
    assert_eq!((&o["lease_ms"], &o["epoch"]), (&json!(0), &json!(1)), "{o}");

    std::fs::write(p.b.workspace.join("from-b.txt"), b"b").unwrap();
    p.b.spawn_and_wait().await;
    b_took_over_and_stops(&mut p, "the previous owner released it").await;
}

async fn a_restart_on_the_same_state_dir_takes_over_at_once(backend: Backend) {
    let mut p = Pair::new(backend).await;
    // A lease far longer than the test: only the instance id lets the restart in.
    p.a.set_env("SANDKEEP_REMOTE_LEASE", "5m");
    start_first(&mut p).await;
    let first = owner_status(&p.a).await;
    p.a.kill9();
    let killed = Instant::now();
    p.a.spawn_and_wait().await;
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        p.a.log().contains("restarted on the same state directory"),
        "{}",
        p.a.log()
    );
    let s = owner_status(&p.a).await;
    assert_eq!(
        (&s["instance"], &s["epoch"]),
        (&first["instance"], &json!(2))
    );
    assert_eq!(p.owner().await["epoch"], 2);
    assert_eq!(p.a.terminate().code(), Some(0), "{}", p.a.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_state_dir_takes_over_at_once_dir() {
    a_restart_on_the_same_state_dir_takes_over_at_once(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_state_dir_takes_over_at_once_s3() {
    a_restart_on_the_same_state_dir_takes_over_at_once(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_exits_75_without_writing() {
    stop_while_waiting(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_over_the_api_while_waiting_exits_75_without_writing() {
    stop_while_waiting(true).await;
}

/// B waits for A's claim and is stopped: with SIGTERM, or with `POST /v1/shutdown`.
async fn stop_while_waiting(over_the_api: bool) {
    let mut p = Pair::new(Backend::Dir).await;
    start_first(&mut p).await;
    let a_instance = owner_status(&p.a).await["instance"]
        .as_str()
        .unwrap()
        .to_string();
    let before = p.objects().await;
    std::fs::write(p.b.workspace.join("from-b.txt"), b"b").unwrap();
    p.b.spawn();
    tokio::time::sleep(LEASE).await;
    assert_waiting(&mut p, &before, &a_instance).await;
    let started = Instant::now();
    let status = if over_the_api {
        assert_eq!(p.b.api().post_empty("/v1/shutdown").await.status, 202);
        p.b.wait_exit(crate::util::EXIT_TIMEOUT)
    } else {
        p.b.terminate()
    };
    assert_eq!(status.code(), Some(75), "{}", p.b.log());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        p.b.log()
            .contains("stopped during start-up (before owning the conversation"),
        "{}",
        p.b.log()
    );
    assert_eq!(p.objects().await, before);
    assert_eq!(owner_status(&p.a).await["state"], "claimed");
    assert_eq!(p.a.terminate().code(), Some(0), "{}", p.a.log());
}

/// A daemon that loses the conversation during its final sync stops then (exit 75),
/// not at the shutdown deadline: its writes are refused for good from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_conversation_during_the_final_sync_stops_it_then() {
    let mut d = Daemon::prepare("[shutdown]\ndeadline = \"60s\"\n");
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    // A repository whose bundle cannot be stored (a file where its directory goes):
    // the final sync retries it until its deadline.
    crate::util::fs::git(&d.workspace, &["init", "-q"]);
    let in_the_way = d.remote.join(CONV).join("workspace/git");
    std::fs::create_dir_all(in_the_way.parent().unwrap()).unwrap();
    std::fs::write(&in_the_way, "in the way").unwrap();
    signal(&d, "TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(d.is_running(), "log:\n{}", d.log());
    // Another daemon takes the conversation over.
    let path = d.remote.join(OWNER);
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["instance"] = json!("another-instance");
    record["epoch"] = json!(record["epoch"].as_u64().unwrap() + 1);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    let taken = Instant::now();
    let status = d.wait_exit(Duration::from_secs(50));
    assert_eq!(status.code(), Some(75), "log:\n{}", d.log());
    assert!(
        taken.elapsed() < LEASE * 4,
        "stopped {:?} after losing the conversation; log:\n{}",
        taken.elapsed(),
        d.log()
    );
    assert!(
        d.log().contains("took the conversation over"),
        "log:\n{}",
        d.log()
    );
}
