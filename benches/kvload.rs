//! `kvload`: a load generator for sandkeep's KV routes over the Unix socket, shaped like
//! `redis-benchmark` without pipelining: C keep-alive HTTP/1.1 connections, each running
//! its share of the N requests one after the other.
//!
//! ```text
//! cargo build --release --benches
//! target/release/deps/kvload-<hash> --socket /run/sandkeep/sandkeep.sock --op get
//! ```
//!
//! Operations:
//! - `get`: `GET /v1/kv/key:NNNNNN`, keys drawn uniformly from the key space, which is
//!   preloaded first with PUTs over a few concurrent connections;
//! - `set`: `PUT /v1/kv/key:NNNNNN` with a JSON string of `--value-size` bytes, keys drawn
//!   uniformly from the key space (durable: answered after the group commit);
//! - `incr`: `POST /v1/kv/counter/incr`, one key for every connection like
//!   `redis-benchmark -t incr` (with `--incr-spread`: `counter:NNNNNN` over the key space).
//!   The single counter is read before and after the run: its increase must equal the
//!   number of successful INCRs.
//!
//! Every response status is checked (GET 200, SET 200/201, INCR 200); anything else, and
//! any transport error, is counted and reported, and makes the exit status 1.
//!
//! The client speaks HTTP/1.1 itself on one thread (a request is written whole, the
//! answer read up to its `Content-Length` and parsed with `httparse`), the way
//! redis-benchmark is a single-threaded C client: on a 2-core machine the load
//! generator shares the CPU with the server, so the lighter it is, the more the figures
//! say about the server. (A hyper client on a multi-threaded runtime cost 13 µs of CPU
//! per request here; this one costs a few.)
//! `cargo bench` runs this binary without `--socket` (with `--bench`): it then prints the
//! usage and exits 0.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::fmt::Write as _;
use std::io::Write as _;

use clap::{CommandFactory, Parser, ValueEnum};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Barrier;

/// `println!` that ignores a closed stdout (e.g. `kvload ... | head -1`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OpKind {
    Get,
    Set,
    Incr,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Set => "set",
            OpKind::Incr => "incr",
        }
    }
}

/// Load generator for sandkeep's KV API (redis-benchmark style, no pipelining).
#[derive(Debug, Parser)]
#[command(name = "kvload")]
struct Args {
    /// The daemon's Unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Keep-alive connections, each running its share of the requests sequentially.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Total requests over all connections.
    #[arg(long, short = 'n', default_value_t = 100_000)]
    requests: u64,
    /// Operation to measure.
    #[arg(long, value_enum, default_value_t = OpKind::Get)]
    op: OpKind,
    /// Bytes of the string value written by `set` and the `get` preload (the body is
    /// this many characters in JSON quotes).
    #[arg(long, default_value_t = 3)]
    value_size: usize,
    /// Key space: keys `key:000000` .. `key:<K-1>`.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Namespace (`?ns=`); the daemon's default namespace when absent.
    #[arg(long)]
    ns: Option<String>,
    /// Bearer token, for a daemon with `auth.mode = "token"`.
    #[arg(long, env = "SANDKEEP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The key every `incr` request increments.
    #[arg(long, default_value = "counter")]
    incr_key: String,
    /// `incr` spreads over `counter:NNNNNN` in the key space instead of one key.
    #[arg(long)]
    incr_spread: bool,
    /// Skip the preload of the key space before `get`.
    #[arg(long)]
    no_preload: bool,
    /// Connections used by the preload.
    #[arg(long, default_value_t = 8)]
    preload_connections: usize,
    /// Threads of the client (1: a single-threaded runtime, like redis-benchmark).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON line of results instead of text.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Benchmark name filters passed by `cargo bench -- FILTER`; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

/// What one connection measured.
#[derive(Default)]
struct WorkerResult {
    /// Latency of every request that got an answer, in nanoseconds.
    latencies_ns: Vec<u64>,
    ok: u64,
    /// Unexpected statuses (status code → count); transport errors under 0.
    errors: BTreeMap<u16, u64>,
    /// First unexpected answer, for the report.
    first_error: Option<String>,
}

impl WorkerResult {
    fn error(&mut self, code: u16, msg: impl FnOnce() -> String) {
        *self.errors.entry(code).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }
}

/// Small fast PRNG (xorshift64*) so key choice costs nothing next to a request.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Everything a request needs that does not change during a run.
struct Target {
    socket: PathBuf,
    /// `?ns=...` or empty.
    query: String,
    token: Option<String>,
}

impl Target {
    async fn connect(&self) -> Result<Conn, String> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(512),
        })
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: UnixStream,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
    /// The request being sent (reused).
    req: Vec<u8>,
}

impl Conn {
    /// Sends one request and reads the whole answer: (status, body).
    async fn exchange(
        &mut self,
        target: &Target,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        // Writes into a Vec cannot fail.
        let req = &mut self.req;
        req.clear();
        let _ = write!(
            req,
            "{method} {path}{} HTTP/1.1\r\nhost: sandkeep\r\n",
            target.query
        );
        if !body.is_empty() {
            let _ = write!(
                req,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        if let Some(t) = &target.token {
            let _ = write!(req, "authorization: Bearer {t}\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        self.stream
            .write_all(&self.req)
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some((status, start, len)) = parse_response(&self.buf)?
                && self.buf.len() >= start + len
            {
                let body = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Ok((status, body));
            }
            self.buf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
        }
    }
}

/// A complete response head at the start of `buf`: (status, body start, body length);
/// `None` while the head is incomplete.
fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let start = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut len = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported by kvload".into());
        }
    }
    let len = len.ok_or("a response without content-length")?;
    Ok(Some((status, start, len)))
}

fn key_name(i: u64) -> String {
    format!("key:{i:06}")
}

/// A JSON string of `size` characters.
fn value_body(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 2);
    v.push(b'"');
    v.resize(size + 1, b'x');
    v.push(b'"');
    v
}

fn expected(op: OpKind, status: u16) -> bool {
    match op {
        OpKind::Get | OpKind::Incr => status == 200,
        OpKind::Set => status == 200 || status == 201,
    }
}

/// One connection running `count` requests sequentially.
async fn worker(
    target: Arc<Target>,
    args: Arc<Args>,
    id: u64,
    count: u64,
    start: Arc<Barrier>,
) -> WorkerResult {
    let mut res = WorkerResult {
        latencies_ns: Vec::with_capacity(count as usize),
        ..Default::default()
    };
    let mut conn = match target.connect().await {
        Ok(s) => Some(s),
        Err(e) => {
            res.error(0, || e);
            None
        }
    };
    start.wait().await;
    let mut rng = Rng::new(id + 1);
    let body = value_body(args.value_size);
    let incr_path = format!("/v1/kv/{}/incr", args.incr_key);
    let mut path = String::with_capacity(64);
    for done in 0..count {
        let Some(c) = conn.as_mut() else {
            // No connection and none could be made: the rest of the share fails.
            *res.errors.entry(0).or_default() += count - done;
            break;
        };
        path.clear();
        let (method, body): (&str, &[u8]) = match args.op {
            OpKind::Get => {
                let _ = write!(path, "/v1/kv/key:{:06}", rng.below(args.keys));
                ("GET", b"")
            }
            OpKind::Set => {
                let _ = write!(path, "/v1/kv/key:{:06}", rng.below(args.keys));
                ("PUT", &body)
            }
            OpKind::Incr if args.incr_spread => {
                let _ = write!(path, "/v1/kv/counter:{:06}/incr", rng.below(args.keys));
                ("POST", b"")
            }
            OpKind::Incr => {
                path.push_str(&incr_path);
                ("POST", b"")
            }
        };
        let t0 = Instant::now();
        match c.exchange(&target, method, &path, body).await {
            Ok((status, answer)) => {
                res.latencies_ns.push(t0.elapsed().as_nanos() as u64);
                if expected(args.op, status) {
                    res.ok += 1;
                } else {
                    res.error(status, || {
                        format!("{status}: {}", String::from_utf8_lossy(&answer))
                    });
                }
            }
            Err(e) => {
                res.error(0, || e);
                // The connection is unusable: open a new one (once per failure).
                conn = target.connect().await.ok();
            }
        }
    }
    res
}

/// Writes every key of the key space once, over a few connections.
async fn preload(target: &Arc<Target>, args: &Arc<Args>) -> Result<Duration, String> {
    let conns = args.preload_connections.max(1) as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let (target, args) = (target.clone(), args.clone());
        tasks.spawn(async move {
            let mut conn = target.connect().await?;
            let body = value_body(args.value_size);
            let mut i = c;
            while i < args.keys {
                let path = format!("/v1/kv/{}", key_name(i));
                let (status, answer) = conn.exchange(&target, "PUT", &path, &body).await?;
                if !expected(OpKind::Set, status) {
                    return Err(format!(
                        "preload PUT {}: {status}: {}",
                        key_name(i),
                        String::from_utf8_lossy(&answer)
                    ));
                }
                i += conns;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| format!("preload task: {e}"))??;
    }
    Ok(started.elapsed())
}

/// The current integer value of the single INCR key (0 when absent).
async fn read_counter(target: &Target, key: &str) -> Result<i64, String> {
    let mut conn = target.connect().await?;
    let path = format!("/v1/kv/{key}");
    let (status, body) = conn.exchange(target, "GET", &path, b"").await?;
    match status {
        404 => Ok(0),
        200 => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["value"].as_i64())
            .ok_or_else(|| {
                format!(
                    "`{key}` does not hold an integer: {}",
                    String::from_utf8_lossy(&body)
                )
            }),
        s => Err(format!(
            "GET {key}: {s}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// User + system CPU seconds this process used so far (Linux; None elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file (11 and 12 here), in clock ticks;
    // Linux reports them in USER_HZ, which is 100.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

async fn run(args: Args) -> Result<bool, String> {
    let socket = args.socket.clone().ok_or("--socket is required")?;
    if args.connections == 0 || args.requests == 0 || args.keys == 0 {
        return Err("--connections, --requests and --keys must be at least 1".into());
    }
    let query = match &args.ns {
        Some(ns) => format!("?ns={ns}"),
        None => String::new(),
    };
    let target = Arc::new(Target {
        socket,
        query,
        token: args.token.clone(),
    });
    let args = Arc::new(args);
    let single_counter = args.op == OpKind::Incr && !args.incr_spread;

    let mut preload_s = None;
    if args.op == OpKind::Get && !args.no_preload {
        let d = preload(&target, &args).await?;
        preload_s = Some(d.as_secs_f64());
        if !args.json {
            say!(
                "preloaded {} keys of {} bytes in {:.2} s ({} connections)",
                args.keys,
                args.value_size,
                d.as_secs_f64(),
                args.preload_connections
            );
        }
    }
    let counter_before = if single_counter {
        Some(read_counter(&target, &args.incr_key).await?)
    } else {
        None
    };

    let c = args.connections as u64;
    let start = Arc::new(Barrier::new(args.connections + 1));
    let mut tasks = Vec::with_capacity(args.connections);
    for id in 0..c {
        let share = args.requests / c + u64::from(id < args.requests % c);
        tasks.push(tokio::spawn(worker(
            target.clone(),
            args.clone(),
            id,
            share,
            start.clone(),
        )));
    }
    start.wait().await;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut total = WorkerResult::default();
    for t in tasks {
        let r = t.await.map_err(|e| format!("worker task: {e}"))?;
        total.latencies_ns.extend_from_slice(&r.latencies_ns);
        total.ok += r.ok;
        for (code, n) in r.errors {
            *total.errors.entry(code).or_default() += n;
        }
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu_s = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let mut counter_delta = None;
    if let Some(before) = counter_before {
        let after = read_counter(&target, &args.incr_key).await?;
        let delta = after - before;
        counter_delta = Some(delta);
        let ok = total.ok;
        if delta != ok as i64 {
            total.error(0, || {
                format!(
                    "`{}` rose by {delta} but {ok} INCRs succeeded",
                    args.incr_key
                )
            });
        }
    }

    let lat = &mut total.latencies_ns;
    lat.sort_unstable();
    let mean_us = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0
    };
    let (p50, p99, max) = (
        percentile(lat, 50.0),
        percentile(lat, 99.0),
        percentile(lat, 100.0),
    );
    let ops = total.ok as f64 / elapsed;
    let errors: u64 = total.errors.values().sum();
    let key_mode = match args.op {
        OpKind::Incr if args.incr_spread => {
            format!("spread over {} keys counter:NNNNNN", args.keys)
        }
        OpKind::Incr => format!("single key `{}`", args.incr_key),
        _ => format!("uniform over {} keys key:NNNNNN", args.keys),
    };
    if args.json {
        let errors_by_status: BTreeMap<String, u64> = total
            .errors
            .iter()
            .map(|(k, v)| {
                let name = if *k == 0 {
                    "transport".to_string()
                } else {
                    k.to_string()
                };
                (name, *v)
            })
            .collect();
        let line = json!({
            "op": args.op.name(),
            "connections": args.connections,
            "requests": args.requests,
            "ok": total.ok,
            "errors": errors,
            "errors_by_status": errors_by_status,
            "first_error": total.first_error,
            "status": if errors == 0 { "ok" } else { "errors" },
            "duration_s": elapsed,
            "ops_per_sec": ops,
            "mean_us": mean_us,
            "p50_us": p50,
            "p99_us": p99,
            "max_us": max,
            "client_cpu_s": client_cpu_s,
            "value_size": args.value_size,
            "keys": key_mode,
            "preload_s": preload_s,
            "counter_delta": counter_delta,
        });
        say!("{line}");
    } else {
        say!(
            "{}: {} requests, {} connections, keys {key_mode}, value {} bytes",
            args.op.name().to_uppercase(),
            args.requests,
            args.connections,
            args.value_size
        );
        say!(
            "  {ops:.0} ops/s in {elapsed:.2} s; latency mean {mean_us:.1} us, p50 {p50:.1} us, p99 {p99:.1} us, max {max:.1} us"
        );
        if let Some(cpu) = client_cpu_s {
            say!(
                "  client CPU {cpu:.2} s ({:.1} us/request)",
                cpu * 1e6 / args.requests as f64
            );
        }
        if let Some(d) = counter_delta {
            say!("  `{}` rose by {d}", args.incr_key);
        }
        if errors > 0 {
            say!(
                "  ERRORS: {errors} of {} requests failed {:?} (0 = transport); first: {}",
                args.requests,
                total.errors,
                total.first_error.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(errors == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.socket.is_none() {
        let _ = Args::command().print_help();
        say!();
        // `cargo bench` passes only --bench, `cargo test --benches` nothing: not a failure.
        let bare = args.bench || std::env::args().len() == 1;
        if !bare {
            eprintln!("kvload: --socket is required");
        }
        return if bare {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("cannot start the tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kvload: {e}");
            ExitCode::from(2)
        }
    }
}
