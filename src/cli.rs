//! The `sandkeep` command line: `serve` runs the daemon; every other subcommand talks
//! to a running daemon over its socket (the redb file is locked by the daemon).
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use crate::auth::{self, Scope};
use crate::client::{Client, Reply, encode_query, encode_segment};
use crate::config::{self, Config, HumanDuration};

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_CONFLICT: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "sandkeep",
    version,
    about = "Keeps an AI agent sandbox's state alive beyond the sandbox"
)]
pub struct Cli {
    /// Configuration file (default /etc/sandkeep/sandkeep.toml if it exists, else the
    /// embedded development config).
    #[arg(long, global = true, env = "SANDKEEP_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon's socket (default: `socket` from the configuration).
    #[arg(long, global = true, env = "SANDKEEP_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Bearer token when the daemon runs with auth.mode = "token".
    #[arg(long, global = true, env = "SANDKEEP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Serve,
    /// Key-value commands.
    Kv(KvArgs),
    /// File store commands (event logs, conversation state).
    #[command(subcommand)]
    Files(FilesCommand),
    /// Token commands.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Wait until every workspace change made so far is in remote storage.
    Sync {
        /// Seconds to wait (1-3600).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// Allow this sync to delete what the delete guards hold back.
        #[arg(long)]
        confirm_deletes: bool,
    },
    /// Take a tar.gz snapshot of the workspace now (or list them with --list).
    Snapshot {
        /// List the stored snapshots, newest first, instead.
        #[arg(long)]
        list: bool,
    },
    /// Print the daemon's status.
    Status {
        /// Only ask `/readyz`: exit 0 when the daemon is ready, 1 otherwise (for probes).
        #[arg(long)]
        ready: bool,
    },
    /// Ask the daemon to do its final sync and exit; waits until it is gone, at most
    /// `--wait` seconds (0: do not wait), and exits with the daemon's exit code (0, or
    /// 75 when the final sync was cut short).
    Shutdown {
        /// Seconds to wait for the daemon to be gone (0-3600; 0: do not wait).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
        wait: u64,
    },
    /// Restore the conversation's workspace into DIR straight from remote storage (no
    /// daemon needed: for init containers). Prints a JSON summary.
    Restore {
        /// The directory to restore into (created if missing; must be empty unless
        /// --force).
        #[arg(long)]
        to: PathBuf,
        /// Restore a tar.gz snapshot instead of the file mirror: `latest`, an object
        /// name or its timestamp part (20261130T120000123Z).
        #[arg(long)]
        snapshot: Option<String>,
        /// Restore the files from their objects alone, for a remote whose manifest
        /// cannot be read and that has no snapshot: contents come back (and the git
        /// bundles), but files outside a repository get mode 0644, and symlinks and
        /// empty directories are lost.
        #[arg(long, conflicts_with = "snapshot")]
        objects: bool,
        /// Restore into a non-empty DIR, replacing its content with the remote state.
        #[arg(long)]
        force: bool,
        /// Read remote storage at once, even while a daemon owns the conversation (by
        /// default the restore first waits until its owner releases it, at the end of
        /// its final sync, or its lease expires).
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a signed token (HS256) for the given namespaces and scopes.
    Mint {
        /// Namespace to grant (repeatable); a trailing `*` grants a prefix.
        #[arg(long = "ns", required = true)]
        ns: Vec<String>,
        /// kv:read, kv:write, files:read, files:write, admin (repeatable; default:
        /// kv:read kv:write files:read files:write).
        #[arg(long = "scope")]
        scope: Vec<String>,
        /// Lifetime, capped at auth.max_ttl (default: auth.max_ttl).
        #[arg(long)]
        ttl: Option<HumanDuration>,
        /// Subject recorded in the token.
        #[arg(long)]
        sub: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum FilesCommand {
    /// Write a stored file's bytes to stdout (or to --out).
    Get {
        path: String,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Store a file: the content of FILE, or stdin when FILE is `-` or missing.
    Put {
        path: String,
        file: Option<PathBuf>,
        /// Fail (exit 4) if the file exists.
        #[arg(long)]
        if_absent: bool,
        /// Answer only once the file is in remote storage.
        #[arg(long)]
        sync: bool,
    },
    /// List stored paths (`{"paths": [...]}`), optionally below a prefix.
    Ls {
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Delete a stored file (`{"deleted": bool}`).
    Rm { path: String },
}

#[derive(Args, Debug)]
pub struct KvArgs {
    /// Namespace (default: `default`, or the token's only namespace).
    #[arg(long, global = true, value_parser = namespace_arg)]
    pub ns: Option<String>,
    #[command(subcommand)]
    pub command: KvCommand,
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value (`{"key","value"}`, plus metadata with --meta).
    Get {
        key: String,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        meta: bool,
    },
    /// Store a JSON value (`-` reads it from stdin; --string stores the text as a string).
    Set {
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: String,
        #[arg(long)]
        string: bool,
        #[arg(long, conflicts_with = "xx")]
        nx: bool,
        #[arg(long)]
        xx: bool,
        #[arg(long)]
        if_version: Option<u64>,
        /// Seconds to live.
        #[arg(long, conflicts_with = "keep_ttl", value_parser = parse_ttl)]
        ttl: Option<f64>,
        #[arg(long)]
        keep_ttl: bool,
        /// Also print the previous value.
        #[arg(long)]
        get: bool,
    },
    /// Delete a key.
    Del {
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Add to an integer (missing keys start at 0).
    Incr {
        key: String,
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Subtract from an integer (missing keys start at 0).
    Decr {
        key: String,
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Push JSON values at the front, one by one (like Redis LPUSH).
    Lpush {
        key: String,
        #[arg(required = true, allow_negative_numbers = true)]
        values: Vec<String>,
    },
    /// Push JSON values at the back.
    Rpush {
        key: String,
        #[arg(required = true, allow_negative_numbers = true)]
        values: Vec<String>,
    },
    /// Pop from the front.
    Lpop {
        key: String,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Pop from the back.
    Rpop {
        key: String,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Length of a list.
    Len { key: String },
    /// List keys (one page, or every page with --all).
    List {
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Set (seconds) or clear (0) a key's time to live.
    Expire {
        key: String,
        /// Seconds to live; 0 clears the TTL.
        #[arg(value_parser = parse_expire)]
        ttl: f64,
    },
    /// Run a batch: the JSON body from FILE or stdin (`-`).
    Batch {
        #[arg(default_value = "-")]
        file: String,
    },
    /// Wait until a key changes; exit 3 if nothing changed within the timeout.
    Watch {
        key: String,
        #[arg(long)]
        after_version: Option<u64>,
        /// Seconds (at most 300).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=300))]
        timeout: u64,
    },
}

/// `--ns`: a namespace name as the daemon accepts it.
fn namespace_arg(s: &str) -> Result<String, String> {
    crate::kv::validate::namespace(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(matches!(cli.command, Command::Serve));
    // The commands that read or write repositories.
    if matches!(cli.command, Command::Serve | Command::Restore { .. }) {
        crate::gitbundle::set_up_libgit2();
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sandkeep: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_ERROR)
            }
        }
    }
}

/// A bad argument, found before anything is asked of the daemon: exit 2, like the
/// argument parser's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let directives = log_directives(std::env::var("SANDKEEP_LOG").ok().as_deref(), default);
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The log filter for `SANDKEEP_LOG`: its directives, after `default` (the level of
/// everything they do not name) unless they set a level of their own. A bare word that
/// is no level (`warning`, a typo) names a module: alone, it would silence every
/// other line, the final sync's error among them.
fn log_directives(var: Option<&str>, default: &str) -> String {
    let var = var.map(str::trim).unwrap_or_default();
    let sets_level = var.split(',').any(|d| {
        let d = d.trim();
        ["trace", "debug", "info", "warn", "error", "off"]
            .iter()
            .any(|l| d.eq_ignore_ascii_case(l))
    });
    match (var.is_empty(), sets_level) {
        (true, _) => default.to_string(),
        (false, true) => var.to_string(),
        (false, false) => format!("{default},{var}"),
    }
}

/// Loads the configuration: `--config`, else /etc/sandkeep/sandkeep.toml when it
/// exists, else the embedded development config. `for_storage`: the command keeps or
/// restores state (`serve`, `restore`), where falling back to the development config
/// (a config volume not mounted?) deserves a warning.
pub fn load_config(path: Option<&Path>, for_storage: bool) -> anyhow::Result<Config> {
    let default = Path::new(config::DEFAULT_CONFIG_PATH);
    let chosen = match path {
        Some(p) => Some(p),
        None if default.exists() => Some(default),
        None => None,
    };
    if chosen.is_none() {
        let what = "no configuration file: using the embedded development config \
                    (config/dev.toml: everything under ./.sandkeep)";
        if for_storage {
            tracing::warn!(default = config::DEFAULT_CONFIG_PATH, "{what}");
        } else {
            tracing::info!("{what}");
        }
    }
    Ok(Config::load(chosen)?)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Serve => {
            let mut config = load_config(cli.config.as_deref(), true)?;
            if let Some(socket) = cli.socket {
                config.socket = socket;
                config.validate()?;
            }
            config.validate_serve()?;
            crate::lifecycle::serve(config)
        }
        Command::Token(TokenCommand::Mint {
            ns,
            scope,
            ttl,
            sub,
        }) => {
            let config = load_config(cli.config.as_deref(), false)?;
            mint(&config, &ns, &scope, ttl, sub)
        }
        Command::Restore {
            to,
            snapshot,
            objects,
            force,
            no_wait,
        } => {
            let config = load_config(cli.config.as_deref(), true)?;
            let from = match snapshot {
                Some(name) => crate::restore::Source::Snapshot(name),
                None if objects => crate::restore::Source::Objects,
                None => crate::restore::Source::Mirror,
            };
            let req = crate::restore_cli::Request {
                to: &to,
                from: &from,
                force,
                wait: !no_wait,
            };
            crate::restore_cli::run(&config, req)
        }
        command => {
            let socket = match cli.socket {
                Some(s) => s,
                None => load_config(cli.config.as_deref(), false)?.socket,
            };
            let client = Client::new(socket, cli.token);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(remote(&client, command))
        }
    }
}

fn mint(
    config: &Config,
    ns: &[String],
    scope: &[String],
    ttl: Option<HumanDuration>,
    sub: Option<String>,
) -> anyhow::Result<u8> {
    if config.auth.secret.len() < crate::config::MIN_AUTH_SECRET {
        anyhow::bail!(
            "auth.secret (or SANDKEEP_AUTH_SECRET) must be at least {} bytes, as the daemon requires",
            crate::config::MIN_AUTH_SECRET
        );
    }
    for n in ns {
        let name = n.strip_suffix('*').unwrap_or(n);
        if !(name.is_empty() && n == "*") {
            crate::kv::validate::namespace(name).map_err(|e| usage(format!("--ns {n}: {e}")))?;
        }
    }
    let scopes = if scope.is_empty() {
        Scope::DEFAULT.to_vec()
    } else {
        scope
            .iter()
            .map(|s| Scope::parse(s).ok_or_else(|| usage(format!("unknown scope `{s}`"))))
            .collect::<anyhow::Result<_>>()?
    };
    let max = config.auth.max_ttl.0;
    let ttl = ttl.map_or(max, |t| t.0);
    if ttl < Duration::from_secs(1) {
        return Err(usage("--ttl must be at least 1s"));
    }
    if ttl > max {
        eprintln!(
            "sandkeep: --ttl {} exceeds auth.max_ttl; the token lives {}",
            HumanDuration(ttl),
            config.auth.max_ttl
        );
    }
    let token = auth::mint(&config.auth.secret, ns, &scopes, ttl, max, sub)?;
    println!("{token}");
    Ok(EXIT_OK)
}

/// `shutdown`: asks for the stop, prints the final sync's outcome, waits until the
/// daemon has removed its socket (its last act), and exits with the daemon's exit code
/// (0, or 75 when the final sync was cut short).
async fn shutdown_and_wait(client: &Client, wait: Duration) -> anyhow::Result<u8> {
    let until = tokio::time::Instant::now() + wait;
    let still_running = || {
        eprintln!(
            "sandkeep: the daemon is still stopping after {} s",
            wait.as_secs()
        );
        Ok(EXIT_ERROR)
    };
    let asked = client.request(Method::POST, "/v1/shutdown?wait=true", None);
    let reply = match tokio::time::timeout_at(until, asked).await {
        Ok(r) => r?,
        Err(_) => return still_running(),
    };
    let code = print_reply(&reply);
    if code != EXIT_OK {
        return Ok(code);
    }
    let exit = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|b| b["exit_code"].as_u64())
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(EXIT_ERROR);
    while client.socket().exists() {
        if tokio::time::Instant::now() >= until {
            return still_running();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(exit)
}

/// Maps an answer's HTTP status and error code to the CLI's exit code. A 409
/// `workspace_unavailable` or `conversation_lost` is no lost compare-and-set: a
/// script that retries on 4 must not retry it forever.
pub fn exit_code(status: u16, error: Option<&str>) -> u8 {
    match (status, error) {
        (200..=299, _) => EXIT_OK,
        (404, _) => EXIT_NOT_FOUND,
        (409, Some("workspace_unavailable" | "conversation_lost")) => EXIT_ERROR,
        (409 | 412, _) => EXIT_CONFLICT,
        _ => EXIT_ERROR,
    }
}

/// Prints a reply: the JSON body on stdout when it succeeded, on stderr otherwise.
fn print_reply(reply: &Reply) -> u8 {
    let text = String::from_utf8_lossy(&reply.body);
    if reply.is_success() {
        if !text.is_empty() {
            println!("{}", text.trim_end());
        }
    } else {
        eprintln!("{}", text.trim_end());
    }
    let error = serde_json::from_slice::<Value>(&reply.body).ok();
    let code = error.as_ref().and_then(|e| e["error"].as_str());
    exit_code(reply.status, code)
}

/// `--ttl`: checked here as the daemon would, so that a bad one is a usage error.
fn parse_ttl(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    crate::kv::Ttl::from_secs_f64(secs, "ttl").map_err(|e| e.to_string())?;
    Ok(secs)
}

/// `kv expire SECONDS`: 0 clears the TTL, anything else is a `--ttl`.
fn parse_expire(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(0.0) => Ok(0.0),
        _ => parse_ttl(s),
    }
}

fn parse_value(text: &str, as_string: bool) -> anyhow::Result<Value> {
    let text = if text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| usage(format!("cannot read the value from standard input: {e}")))?;
        s
    } else {
        text.to_string()
    };
    if as_string {
        return Ok(Value::String(text));
    }
    use crate::kv::validate::{MAX_DEPTH, depth, past_parser_depth};
    let too_deep = || {
        usage(format!(
            "the value nests deeper than {MAX_DEPTH} levels, more than a stored value may"
        ))
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if depth(&v) > MAX_DEPTH => Err(too_deep()),
        Ok(v) => Ok(v),
        Err(e) if past_parser_depth(&e) => Err(too_deep()),
        Err(e) => Err(usage(format!(
            "value is not JSON ({e}); quote it (e.g. '\"text\"') or pass --string"
        ))),
    }
}

struct Q(Vec<String>);

impl Q {
    fn new(ns: &Option<String>) -> Self {
        let mut q = Q(Vec::new());
        if let Some(ns) = ns {
            q.push("ns", ns);
        }
        q
    }
    fn push(&mut self, k: &str, v: impl ToString) -> &mut Self {
        self.0.push(format!("{k}={}", encode_query(&v.to_string())));
        self
    }
    fn flag(&mut self, k: &str, on: bool) -> &mut Self {
        if on {
            self.push(k, "true");
        }
        self
    }
    fn opt(&mut self, k: &str, v: Option<impl ToString>) -> &mut Self {
        if let Some(v) = v {
            self.push(k, v);
        }
        self
    }
    fn path(&self, base: &str) -> String {
        if self.0.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", self.0.join("&"))
        }
    }
}

async fn remote(client: &Client, command: Command) -> anyhow::Result<u8> {
    let reply = match command {
        Command::Status { ready: false } => client.get("/v1/status").await?,
        Command::Status { ready: true } => {
            // A probe: silent, whatever the answer (or none).
            let ready = client.get("/readyz").await.is_ok_and(|r| r.status == 200);
            return Ok(if ready { EXIT_OK } else { EXIT_ERROR });
        }
        Command::Snapshot { list: true } => client.get("/v1/snapshots").await?,
        Command::Snapshot { list: false } => {
            client.request(Method::POST, "/v1/snapshots", None).await?
        }
        Command::Sync {
            timeout,
            confirm_deletes,
        } => {
            let body = json!({"timeout_s": timeout, "confirm_deletes": confirm_deletes});
            tokio::time::timeout(
                Duration::from_secs(timeout + 30),
                client.post_json("/v1/sync", &body),
            )
            .await
            .map_err(|_| anyhow::anyhow!("the daemon did not answer the sync in time"))??
        }
        Command::Shutdown { wait } => {
            if wait == 0 {
                client.request(Method::POST, "/v1/shutdown", None).await?
            } else {
                return shutdown_and_wait(client, Duration::from_secs(wait)).await;
            }
        }
        Command::Kv(args) => return kv(client, args).await,
        Command::Files(cmd) => return files(client, cmd).await,
        Command::Serve | Command::Token(_) | Command::Restore { .. } => {
            unreachable!("handled locally")
        }
    };
    Ok(print_reply(&reply))
}

/// `/v1/files/<path>` with every segment percent-encoded.
fn file_route(path: &str, query: &Q) -> String {
    let encoded: Vec<String> = path.split('/').map(encode_segment).collect();
    query.path(&format!("/v1/files/{}", encoded.join("/")))
}

async fn files(client: &Client, cmd: FilesCommand) -> anyhow::Result<u8> {
    let reply = match cmd {
        FilesCommand::Get { path, out } => {
            let reply = client.get(&file_route(&path, &Q(vec![]))).await?;
            if !reply.is_success() {
                return Ok(print_reply(&reply));
            }
            match out {
                Some(f) => std::fs::write(&f, &reply.body)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", f.display()))?,
                None => {
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&reply.body)?;
                    stdout.flush()?;
                }
            }
            return Ok(EXIT_OK);
        }
        FilesCommand::Put {
            path,
            file,
            if_absent,
            sync,
        } => {
            let data = match file.as_deref() {
                None => read_stdin()?,
                Some(f) if f == Path::new("-") => read_stdin()?,
                Some(f) => std::fs::read(f)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
            };
            let mut q = Q(vec![]);
            q.flag("if_absent", if_absent).flag("sync", sync);
            client
                .request(Method::PUT, &file_route(&path, &q), Some(data))
                .await?
        }
        FilesCommand::Ls { prefix } => {
            let mut q = Q(vec![]);
            if !prefix.is_empty() {
                q.push("prefix", prefix);
            }
            client.get(&q.path("/v1/files")).await?
        }
        FilesCommand::Rm { path } => client.delete(&file_route(&path, &Q(vec![]))).await?,
    };
    Ok(print_reply(&reply))
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::io::stdin().read_to_end(&mut data)?;
    Ok(data)
}

async fn kv(client: &Client, args: KvArgs) -> anyhow::Result<u8> {
    let ns = args.ns;
    let key_path = |key: &str, suffix: &str| format!("/v1/kv/{}{suffix}", encode_segment(key));
    let reply = match args.command {
        KvCommand::Get { key, path, meta } => {
            let p = Q::new(&ns)
                .opt("path", path)
                .flag("meta", meta)
                .path(&key_path(&key, ""));
            client.get(&p).await?
        }
        KvCommand::Set {
            key,
            value,
            string,
            nx,
            xx,
            if_version,
            ttl,
            keep_ttl,
            get,
        } => {
            let value = parse_value(&value, string)?;
            let p = Q::new(&ns)
                .flag("nx", nx)
                .flag("xx", xx)
                .opt("if_version", if_version)
                .opt("ttl", ttl)
                .flag("keep_ttl", keep_ttl)
                .flag("get", get)
                .path(&key_path(&key, ""));
            client.put_json(&p, &value).await?
        }
        KvCommand::Del { key, if_version } => {
            let p = Q::new(&ns)
                .opt("if_version", if_version)
                .path(&key_path(&key, ""));
            client.delete(&p).await?
        }
        KvCommand::Incr { key, by } => {
            let p = Q::new(&ns).path(&key_path(&key, "/incr"));
            client.post_json(&p, &json!({"by": by})).await?
        }
        KvCommand::Decr { key, by } => {
            let p = Q::new(&ns).path(&key_path(&key, "/decr"));
            client.post_json(&p, &json!({"by": by})).await?
        }
        KvCommand::Lpush { key, values } => push(client, &ns, &key, "/lpush", &values).await?,
        KvCommand::Rpush { key, values } => push(client, &ns, &key, "/rpush", &values).await?,
        KvCommand::Lpop { key, count } => pop(client, &ns, &key, "/lpop", count).await?,
        KvCommand::Rpop { key, count } => pop(client, &ns, &key, "/rpop", count).await?,
        KvCommand::Len { key } => {
            client
                .get(&Q::new(&ns).path(&key_path(&key, "/len")))
                .await?
        }
        KvCommand::List {
            prefix,
            limit,
            cursor,
            all,
        } => {
            if !all {
                let p = Q::new(&ns)
                    .opt("prefix", prefix)
                    .opt("limit", limit)
                    .opt("cursor", cursor)
                    .path("/v1/kv");
                client.get(&p).await?
            } else {
                return list_all(client, &ns, prefix, limit, cursor).await;
            }
        }
        KvCommand::Expire { key, ttl } => {
            let p = Q::new(&ns).path(&key_path(&key, "/expire"));
            client.post_json(&p, &json!({"ttl": ttl})).await?
        }
        KvCommand::Batch { file } => {
            let body = if file == "-" {
                let mut s = Vec::new();
                std::io::stdin().read_to_end(&mut s)?;
                s
            } else {
                std::fs::read(&file).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
            };
            // A batch nested past the parser's limit (128 levels) goes out as it is: the
            // daemon answers for it as for any value nested past 32 (422).
            if let Err(e) = serde_json::from_slice::<Value>(&body)
                && !crate::kv::validate::past_parser_depth(&e)
            {
                return Err(usage(format!("the batch is not JSON ({e})")));
            }
            let p = Q::new(&ns).path("/v1/kv/batch");
            client.request(Method::POST, &p, Some(body)).await?
        }
        KvCommand::Watch {
            key,
            after_version,
            timeout,
        } => {
            let p = Q::new(&ns)
                .opt("after_version", after_version)
                .push("timeout_s", timeout)
                .path(&key_path(&key, "/watch"));
            let reply = tokio::time::timeout(Duration::from_secs(timeout + 30), client.get(&p))
                .await
                .map_err(|_| anyhow::anyhow!("the daemon did not answer the watch in time"))??;
            if reply.status == 204 {
                eprintln!("no change within {timeout} s");
                return Ok(EXIT_NOT_FOUND);
            }
            reply
        }
    };
    Ok(print_reply(&reply))
}

async fn push(
    client: &Client,
    ns: &Option<String>,
    key: &str,
    suffix: &str,
    values: &[String],
) -> anyhow::Result<Reply> {
    let values = values
        .iter()
        .map(|v| parse_value(v, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p = Q::new(ns).path(&format!("/v1/kv/{}{suffix}", encode_segment(key)));
    Ok(client.post_json(&p, &json!({"values": values})).await?)
}

async fn pop(
    client: &Client,
    ns: &Option<String>,
    key: &str,
    suffix: &str,
    count: Option<u64>,
) -> anyhow::Result<Reply> {
    let p = Q::new(ns).path(&format!("/v1/kv/{}{suffix}", encode_segment(key)));
    let body = match count {
        Some(c) => json!({"count": c}),
        None => json!({}),
    };
    Ok(client.post_json(&p, &body).await?)
}

/// Follows `next_cursor` to the end and prints one `{"keys", "count"}`.
async fn list_all(
    client: &Client,
    ns: &Option<String>,
    prefix: Option<String>,
    limit: Option<u64>,
    mut cursor: Option<String>,
) -> anyhow::Result<u8> {
    let mut keys = Vec::new();
    loop {
        let p = Q::new(ns)
            .opt("prefix", prefix.clone())
            .opt("limit", limit)
            .opt("cursor", cursor.clone())
            .path("/v1/kv");
        let reply = client.get(&p).await?;
        if !reply.is_success() {
            return Ok(print_reply(&reply));
        }
        let body = reply.json();
        if let Some(page) = body["keys"].as_array() {
            keys.extend(page.iter().cloned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    println!("{}", json!({"keys": keys, "count": keys.len()}));
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SANDKEEP_LOG` never silences the daemon by mistake: empty is the default, and
    /// directives without a level of their own keep the default for the rest.
    #[test]
    fn log_directives_keep_a_level() {
        let d = |var: Option<&str>| log_directives(var, "info");
        assert_eq!(d(None), "info");
        assert_eq!(d(Some("")), "info");
        assert_eq!(d(Some("  ")), "info");
        assert_eq!(d(Some("debug")), "debug");
        assert_eq!(d(Some("WARN")), "WARN");
        assert_eq!(d(Some("warn,aws=error")), "warn,aws=error");
        assert_eq!(d(Some("warning")), "info,warning");
        assert_eq!(d(Some("sandkeep=debug")), "info,sandkeep=debug");
    }
}
