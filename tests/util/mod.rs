//! Shared fixtures for the integration tests: a [`Daemon`] that runs the real
//! `sandkeep serve` binary on its own temporary directories, a runner for the CLI, a
//! raw HTTP writer for requests the client cannot make (lying Content-Length, endless
//! chunked bodies), and assertion helpers for API.md's error shape.

#![allow(dead_code)]

pub mod fs;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use sandkeep::client::{Client, Reply};
use serde_json::Value;
use tempfile::TempDir;

pub use sandkeep::client::encode_segment as enc;

/// The `sandkeep` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sandkeep");
/// How long a daemon may take to answer `/readyz` with 200. Readiness waits for the
/// startup reconcile round (up to 30 s in the daemon), which on a loaded machine can take
/// a while for the larger workspaces of the sync tests.
pub const READY_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a daemon may take to exit after SIGTERM or `POST /v1/shutdown`.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The shared secret of the token-mode tests.
pub const SECRET: &str = "integration-test-secret-0123456789";
/// Another valid base64 KV key (32 bytes) for the wrong-key test.
pub const OTHER_KV_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// A daemon process on its own socket, state dir, workspace and remote directory.
pub struct Daemon {
    dir: TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub workspace: PathBuf,
    pub remote: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// The user the daemon runs as, when not the test's own (see `unprivileged`).
    uid: Option<u32>,
}

impl Daemon {
    /// A daemon with the base configuration, started and ready.
    pub async fn start() -> Daemon {
        Self::start_with("").await
    }

    /// A daemon whose configuration has `extra` TOML appended (sections only, such as
    /// `[kv]` or `[auth]`), started and ready.
    pub async fn start_with(extra: &str) -> Daemon {
        let mut d = Self::prepare(extra);
        d.spawn_and_wait().await;
        d
    }

    /// A daemon with `auth.mode = "token"`, [`SECRET`] and `max_ttl = "1h"`.
    pub async fn start_token() -> Daemon {
        Self::start_with(&format!(
            "[auth]\nmode = \"token\"\nsecret = \"{SECRET}\"\nmax_ttl = \"1h\"\n"
        ))
        .await
    }

    /// Creates the directories and writes the configuration; does not start anything.
    pub fn prepare(extra: &str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("sk")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let socket = root.join("sandkeep.sock");
        let state_dir = root.join("state");
        let workspace = root.join("workspace");
        let remote = root.join("remote");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&remote).unwrap();
        let config_path = root.join("sandkeep.toml");
        let text = format!(
            "socket = {socket:?}\nstate_dir = {state:?}\nworkspace = {ws:?}\nrestore = \"never\"\n\n\
             [identity]\nuser = \"u1\"\nconversation = \"c1\"\n\n\
             [remote]\nkind = \"dir\"\npath = {remote:?}\n\n{extra}\n",
            socket = socket.display().to_string(),
            state = state_dir.display().to_string(),
            ws = workspace.display().to_string(),
            remote = remote.display().to_string(),
        );
        std::fs::write(&config_path, text).unwrap();
        let log_path = root.join("daemon.log");
        Daemon {
            dir,
            socket,
            state_dir,
            workspace,
            remote,
            config_path,
            log_path,
            child: None,
            env: Vec::new(),
            uid: None,
        }
    }

    /// Makes the daemon run as `nobody` when the tests run as root (permission bits
    /// bind it then, as they bind the test otherwise): its directories become
    /// nobody's; files the test writes later stay readable to it (umask 022).
    pub fn unprivileged(&mut self) {
        const NOBODY: u32 = 65534;
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        fn chown_all(p: &Path) {
            std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
            if p.is_dir() && !p.is_symlink() {
                for e in std::fs::read_dir(p).unwrap() {
                    chown_all(&e.unwrap().path());
                }
            }
        }
        chown_all(self.dir.path());
        self.uid = Some(NOBODY);
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The KV key the daemon generated into its state directory.
    pub fn generated_key(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("kv.key"))
            .expect("generated kv key")
            .trim()
            .to_string()
    }

    /// Makes the (stopped) daemon's next start that of a new sandbox for the same
    /// conversation: an empty workspace, no state directory, the same remote and (through
    /// `SANDKEEP_KV_KEY`) the same key, `restore = auto`.
    pub fn become_new_sandbox(&mut self) {
        let key = self.generated_key();
        std::fs::remove_dir_all(&self.state_dir).unwrap();
        std::fs::remove_dir_all(&self.workspace).unwrap();
        std::fs::create_dir(&self.workspace).unwrap();
        self.set_env("SANDKEEP_KV_KEY", &key);
        self.set_env("SANDKEEP_RESTORE", "auto");
    }

    /// Runs `sandkeep restore --config <this daemon's config> ARGS` with `env` added.
    pub fn restore_cli(&self, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
        let mut cmd = sandkeep_command();
        cmd.arg("restore")
            .arg("--config")
            .arg(&self.config_path)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_bounded(cmd, None, Duration::from_secs(120))
    }

    /// Extra environment for the next starts of the daemon.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// A `serve` command for this daemon's config, with a clean `SANDKEEP_*`
    /// environment plus `env`; stderr (and stdout) appended to `log`.
    pub fn serve_command(&self, env: &[(String, String)], log: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(&self.config_path);
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        clear_sandkeep_env(&mut cmd);
        cmd.env("SANDKEEP_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        cmd
    }

    /// Starts the process (once more after a stop) and waits until `/readyz` is 200.
    pub async fn spawn_and_wait(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the process (once more after a stop) without waiting for anything.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let child = self
            .serve_command(&self.env.clone(), &self.log_path)
            .spawn()
            .expect("spawn sandkeep serve");
        self.child = Some(child);
    }

    /// Polls `GET /readyz` until it answers 200; panics with the log after
    /// [`READY_TIMEOUT`] or when the process exits first.
    pub async fn wait_ready(&mut self) {
        let client = Client::new(&self.socket, None);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "the daemon exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), client.get("/readyz")).await
                && r.status == 200
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the daemon was not ready within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the daemon again on the same directories and configuration.
    pub async fn restart(&mut self) {
        self.spawn_and_wait().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket, None)
    }

    pub fn client_with_token(&self, token: &str) -> Client {
        Client::new(&self.socket, Some(token.to_string()))
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait after SIGKILL");
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait("TERM")
    }

    /// Sends `SIG<name>` with `kill(1)` and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, name: &str) -> ExitStatus {
        let pid = self.pid();
        let st = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{name} {pid} failed");
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// Waits (bounded) for the process to exit on its own; panics with the log when it
    /// does not (and kills it).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        match wait_child(&mut child, timeout) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Runs another `serve` on this configuration (plus `env`) that is expected to
    /// fail: its exit status and output, or `None` for the status when it was still
    /// running after `timeout` (then it is killed).
    pub fn run_other_serve(
        &self,
        env: &[(String, String)],
        timeout: Duration,
    ) -> (Option<ExitStatus>, String) {
        let log = self.root().join(format!(
            "other-{}.log",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut child = self.serve_command(env, &log).spawn().expect("spawn serve");
        let status = wait_child(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Everything the daemon wrote to stderr/stdout so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The CLI against this daemon's socket.
    pub fn cli(&self) -> Cli {
        Cli::new(&self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}\n---- end of daemon log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A command for the `sandkeep` binary without any inherited `SANDKEEP_*` variable.
pub fn sandkeep_command() -> Command {
    let mut cmd = Command::new(BIN);
    clear_sandkeep_env(&mut cmd);
    cmd
}

fn clear_sandkeep_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SANDKEEP_") {
            cmd.env_remove(k);
        }
    }
}

/// Polls a child for its exit, at most `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// stdout as JSON (panics with the whole output when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs the `sandkeep` binary as a client of one socket.
#[derive(Clone)]
pub struct Cli {
    socket: PathBuf,
    token: Option<String>,
}

/// Longest a CLI run may take before the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

impl Cli {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            token: None,
        }
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        clear_sandkeep_env(&mut cmd);
        cmd.arg("--socket").arg(&self.socket);
        if let Some(t) = &self.token {
            cmd.arg("--token").arg(t);
        }
        cmd.args(args);
        cmd
    }

    /// Runs `sandkeep --socket S ARGS...` to completion (bounded).
    pub async fn run(&self, args: &[&str]) -> CliOutput {
        self.run_stdin(args, None).await
    }

    /// Same, with `stdin` fed to the process.
    pub async fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> CliOutput {
        let cmd = self.command(args);
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || run_bounded(cmd, stdin, CLI_TIMEOUT))
            .await
            .expect("cli task")
    }

    /// Starts the CLI in the background; [`CliRun::wait`] collects it.
    pub fn spawn(&self, args: &[&str]) -> CliRun {
        CliRun::start(self.command(args))
    }
}

/// Runs any command with its output captured in files (no pipe can fill up), killing
/// it after `timeout`.
pub fn run_bounded(mut cmd: Command, stdin: Option<String>, timeout: Duration) -> CliOutput {
    let run = CliRun::start_with_stdin(&mut cmd, stdin);
    run.wait_blocking(timeout)
}

/// A CLI process running in the background.
pub struct CliRun {
    child: Child,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
}

impl CliRun {
    fn start(mut cmd: Command) -> Self {
        Self::start_with_stdin(&mut cmd, None)
    }

    fn start_with_stdin(cmd: &mut Command, stdin: Option<String>) -> Self {
        let out = tempfile::NamedTempFile::new().unwrap();
        let err = tempfile::NamedTempFile::new().unwrap();
        cmd.stdout(out.reopen().unwrap())
            .stderr(err.reopen().unwrap())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().expect("spawn the cli");
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            // A process that exits without reading its stdin is not this helper's error.
            let _ = pipe.write_all(text.as_bytes());
        }
        Self { child, out, err }
    }

    /// Whether the process has exited already.
    pub fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn wait_blocking(mut self, timeout: Duration) -> CliOutput {
        let status = wait_child(&mut self.child, timeout);
        let read = |f: &tempfile::NamedTempFile| {
            let mut s = String::new();
            File::open(f.path())
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        match status {
            Some(s) => CliOutput {
                code: s.code().unwrap_or(-1),
                stdout: read(&self.out),
                stderr: read(&self.err),
            },
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the cli did not finish within {timeout:?}; stdout: {} stderr: {}",
                    read(&self.out),
                    read(&self.err)
                );
            }
        }
    }

    /// Waits (bounded) for the process and returns its output.
    pub async fn wait(self, timeout: Duration) -> CliOutput {
        tokio::task::spawn_blocking(move || self.wait_blocking(timeout))
            .await
            .expect("cli task")
    }
}

/// Asserts an API.md error: the status, `error` = `code`, a non-empty `message`.
/// Returns the body for further checks.
#[track_caller]
pub fn assert_error(r: &Reply, status: u16, code: &str) -> Value {
    let body = r.json();
    assert_eq!(
        r.status,
        status,
        "expected {status} {code}, got {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(body["error"], code, "wrong error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
    if status == 409 {
        assert_eq!(
            r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1"),
            "a 409 needs `Retry-After: 1`: {:?}",
            r.headers
        );
    }
    if status == 503 {
        assert!(
            r.headers.contains_key("retry-after"),
            "a 503 needs `Retry-After`: {:?}",
            r.headers
        );
    }
    body
}

/// Asserts a 2xx status and returns the JSON body.
#[track_caller]
pub fn ok(r: &Reply, status: u16) -> Value {
    assert_eq!(
        r.status,
        status,
        "expected {status}, got {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Parses API.md's RFC 3339 UTC timestamps (`YYYY-MM-DDTHH:MM:SS[.fff]Z`) into
/// milliseconds since the epoch; panics on anything else.
#[track_caller]
pub fn rfc3339_ms(s: &str) -> u64 {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> u64 {
        let t = s
            .get(r.clone())
            .unwrap_or_else(|| panic!("bad timestamp {s}"));
        assert!(
            t.bytes().all(|c| c.is_ascii_digit()),
            "bad timestamp {s} (at {r:?})"
        );
        t.parse().unwrap()
    };
    assert!(
        b.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && *b.last().unwrap() == b'Z',
        "not an RFC 3339 UTC timestamp: {s}"
    );
    let (y, mo, d) = (num(0..4) as i64, num(5..7) as i64, num(8..10) as i64);
    let (h, mi, sec) = (num(11..13), num(14..16), num(17..19));
    let mut ms = 0;
    if b[19] == b'.' {
        let frac = &s[20..s.len() - 1];
        assert!(
            !frac.is_empty() && frac.bytes().all(|c| c.is_ascii_digit()),
            "bad fraction in {s}"
        );
        let padded = format!("{frac:0<3}");
        ms = padded[..3].parse::<u64>().unwrap();
    } else {
        assert_eq!(b.len(), 20, "not an RFC 3339 UTC timestamp: {s}");
    }
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days as u64 * 86_400 + h * 3600 + mi * 60 + sec) * 1000 + ms
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A raw HTTP/1.1 answer read off the socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Writes `head` (request line and headers, ending in an empty line) and then up to
/// `body_bytes` bytes of body in `chunk`-sized writes (as HTTP chunks when `chunked`),
/// on a writer thread that gives up at the first error, while this thread reads the
/// answer (bounded by a 15 s read timeout).
pub async fn raw_request(
    socket: &Path,
    head: String,
    body_bytes: usize,
    chunked: bool,
) -> RawReply {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let w = std::thread::spawn(move || -> usize {
            if writer.write_all(head.as_bytes()).is_err() {
                return 0;
            }
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0;
            while sent < body_bytes {
                let n = chunk.len().min(body_bytes - sent);
                let res = if chunked {
                    writer
                        .write_all(format!("{n:x}\r\n").as_bytes())
                        .and_then(|_| writer.write_all(&chunk[..n]))
                        .and_then(|_| writer.write_all(b"\r\n"))
                } else {
                    writer.write_all(&chunk[..n])
                };
                if res.is_err() {
                    break;
                }
                sent += n;
            }
            if chunked && sent >= body_bytes {
                let _ = writer.write_all(b"0\r\n\r\n");
            }
            sent
        });
        let mut reader = stream;
        let mut buf = Vec::new();
        let mut tmp = [0u8; 8192];
        let reply = loop {
            if let Some(r) = parse_raw(&buf) {
                break r;
            }
            match reader.read(&mut tmp) {
                Ok(0) => break parse_raw(&buf).unwrap_or_else(|| incomplete(&buf)),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => {
                    let _ = reader.shutdown(std::net::Shutdown::Both);
                    let _ = w.join();
                    panic!(
                        "reading the raw answer failed ({e}); got so far: {:?}",
                        String::from_utf8_lossy(&buf)
                    );
                }
            }
        };
        let _ = reader.shutdown(std::net::Shutdown::Both);
        let _ = w.join();
        reply
    })
    .await
    .expect("raw request task")
}

fn incomplete(buf: &[u8]) -> RawReply {
    panic!(
        "the connection closed before a whole answer arrived: {:?}",
        String::from_utf8_lossy(buf)
    )
}

/// A complete answer with a Content-Length body, if `buf` holds one.
fn parse_raw(buf: &[u8]) -> Option<RawReply> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let body = &buf[end + 4..];
    (body.len() >= len).then(|| RawReply {
        status,
        head,
        body: body[..len].to_vec(),
    })
}

/// Runs a closure until it returns `Some`, at most `timeout`, polling every `every`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Longest any single request may take in a test (watch tests pass their own bound).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`Client`] whose calls are bounded by [`REQUEST_TIMEOUT`] and panic on transport
/// errors, so tests read as plain request/answer pairs.
#[derive(Clone)]
pub struct Api {
    pub client: Client,
}

impl From<Client> for Api {
    fn from(client: Client) -> Self {
        Self { client }
    }
}

impl Api {
    /// One request with a raw body, bounded by `timeout`.
    pub async fn request_within(
        &self,
        timeout: Duration,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Reply {
        match tokio::time::timeout(timeout, self.client.request(method.clone(), path, body)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no answer within {timeout:?}"),
        }
    }

    pub async fn raw(&self, method: hyper::Method, path: &str, body: &[u8]) -> Reply {
        self.request_within(REQUEST_TIMEOUT, method, path, Some(body.to_vec()))
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request_within(REQUEST_TIMEOUT, hyper::Method::GET, path, None)
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.request_within(REQUEST_TIMEOUT, hyper::Method::DELETE, path, None)
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.raw(hyper::Method::PUT, path, body.to_string().as_bytes())
            .await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Reply {
        self.raw(hyper::Method::PATCH, path, body.to_string().as_bytes())
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.raw(hyper::Method::POST, path, body.to_string().as_bytes())
            .await
    }

    /// `POST` without a body.
    pub async fn post_empty(&self, path: &str) -> Reply {
        self.request_within(REQUEST_TIMEOUT, hyper::Method::POST, path, None)
            .await
    }

    /// The stored value of `key` in the default namespace (`None` when 404).
    pub async fn value(&self, key: &str) -> Option<Value> {
        self.value_in(None, key).await
    }

    /// The stored value of `key` in `ns` (`None` when 404).
    pub async fn value_in(&self, ns: Option<&str>, key: &str) -> Option<Value> {
        let q = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
        let r = self.get(&format!("/v1/kv/{}{q}", enc(key))).await;
        match r.status {
            200 => Some(r.json()["value"].clone()),
            404 => {
                assert_eq!(r.json()["error"], "not_found", "{r:?}");
                None
            }
            s => panic!(
                "GET {key}: unexpected {s} {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// `GET /v1/kv/{key}?meta=true` body (panics unless 200).
    pub async fn meta(&self, key: &str) -> Value {
        let r = self.get(&format!("/v1/kv/{}?meta=true", enc(key))).await;
        ok(&r, 200)
    }

    /// The namespace version from `GET /v1/kv?meta=true&limit=1`.
    pub async fn ns_version(&self, ns: Option<&str>) -> u64 {
        let q = ns.map(|n| format!("&ns={n}")).unwrap_or_default();
        let r = self.get(&format!("/v1/kv?meta=true&limit=1{q}")).await;
        ok(&r, 200)["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("no namespace version in {}", r.json()))
    }

    /// Stores `value` at `key` (default namespace) and returns the key's new version.
    pub async fn set(&self, key: &str, value: Value) -> u64 {
        let r = self.put(&format!("/v1/kv/{}", enc(key)), &value).await;
        assert!(
            r.status == 200 || r.status == 201,
            "PUT {key}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r.json()["version"].as_u64().unwrap()
    }
}

impl Daemon {
    /// A bounded, panicking client (see [`Api`]).
    pub fn api(&self) -> Api {
        Api::from(self.client())
    }

    pub fn api_with_token(&self, token: &str) -> Api {
        Api::from(self.client_with_token(token))
    }
}

/// Deterministic, incompressible bytes (xorshift), the same for the same `seed`.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
