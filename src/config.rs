//! Configuration: the TOML schema, `SANDKEEP_*` environment overrides, duration strings
//! and validation.
//!
//! The names here are a contract with operators (see `config/sandkeep.toml`). Loading is
//! three steps: parse the file into a TOML table, overlay the environment
//! (`SANDKEEP_<SECTION>_<KEY>`, top-level keys `SANDKEEP_<KEY>`), then deserialize with
//! `deny_unknown_fields` and validate. Environment values are typed by the schema's
//! default, so `SANDKEEP_KV_MAX_VALUE_BYTES=100` is an integer and
//! `SANDKEEP_IDENTITY_USER=42` stays a string.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The embedded default configuration (`config/dev.toml`): runs with nothing installed.
pub const DEV_CONFIG: &str = include_str!("../config/dev.toml");

/// Default path of the configuration file used by `serve`, `restore` and `token mint`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sandkeep/sandkeep.toml";
/// The shortest `auth.secret` a daemon in token mode accepts (and `token mint` signs with).
pub const MIN_AUTH_SECRET: usize = 16;

/// Environment variables that start with `SANDKEEP_` but are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &[
    "SANDKEEP_CONFIG",
    "SANDKEEP_TOKEN",
    "SANDKEEP_KV_KEY",
    "SANDKEEP_LOG",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error` (not `source`): it is part of the message, not a cause printed again.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown configuration key `{key}` (from environment variable {var})")]
    UnknownEnv { key: String, var: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A duration written as `"500ms"`, `"2s"`, `"5m"`, `"24h"` (or the integer `0`).
/// Zero disables an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

/// The longest duration a configuration value may name: 10 years (of 365.25 days, as
/// `"10y"` reads).
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

impl HumanDuration {
    pub fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
    pub fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Self(Duration::ZERO));
        }
        let d = humantime::parse_duration(s).map_err(|e| {
            format!("`{s}` is not a duration such as \"500ms\", \"2s\", \"5m\": {e}")
        })?;
        // Longer is a typo, and deadlines computed from it would overflow.
        if d > MAX_DURATION {
            return Err(format!(
                "`{s}` is longer than the longest duration allowed, 10 years"
            ));
        }
        Ok(Self(d))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
            Other(serde::de::IgnoredAny),
        }
        match Raw::deserialize(d)? {
            Raw::Int(0) => Ok(Self(Duration::ZERO)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "durations are strings with a unit, such as \"{n}s\" (only 0 may be written bare)"
            ))),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::Other(_) => Err(serde::de::Error::custom(
                "a duration is a string with a unit, such as \"500ms\", \"2s\" or \"5m\"",
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    #[default]
    Auto,
    Never,
    Force,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    S3,
    Dir,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    #[default]
    Auto,
    Native,
    Poll,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: String,
    pub state_dir: PathBuf,
    pub workspace: PathBuf,
    pub restore: RestoreMode,
    pub identity: Identity,
    pub remote: Remote,
    pub auth: Auth,
    pub kv: Kv,
    pub files: Files,
    pub watch: Watch,
    pub sync: Sync,
    pub snapshot: Snapshot,
    pub git: Git,
    pub shutdown: Shutdown,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: "/run/sandkeep/sandkeep.sock".into(),
            socket_mode: "0660".into(),
            state_dir: "/var/lib/sandkeep".into(),
            workspace: "/workspace".into(),
            restore: RestoreMode::Auto,
            identity: Identity::default(),
            remote: Remote::default(),
            auth: Auth::default(),
            kv: Kv::default(),
            files: Files::default(),
            watch: Watch::default(),
            sync: Sync::default(),
            snapshot: Snapshot::default(),
            git: Git::default(),
            shutdown: Shutdown::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub user: String,
    pub conversation: String,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            user: "u1".into(),
            conversation: "c1".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Remote {
    pub kind: RemoteKind,
    pub path: PathBuf,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    pub force_path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub allow_insecure: bool,
    /// How long this daemon's claim on the conversation (`.sandkeep/owner.json`) lasts
    /// without a renewal; see [`crate::owner`].
    pub lease: HumanDuration,
}

impl Default for Remote {
    fn default() -> Self {
        Self {
            kind: RemoteKind::S3,
            path: "./.sandkeep/remote".into(),
            bucket: "sandboxes".into(),
            prefix: String::new(),
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            force_path_style: true,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_insecure: false,
            lease: HumanDuration::secs(30),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub mode: AuthMode,
    pub secret: String,
    pub max_ttl: HumanDuration,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            secret: String::new(),
            max_ttl: HumanDuration::secs(24 * 3600),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Kv {
    pub key_file: PathBuf,
    pub max_value_bytes: u64,
    pub max_namespace_bytes: u64,
    pub replicate_delay: HumanDuration,
}

impl Default for Kv {
    fn default() -> Self {
        Self {
            key_file: PathBuf::new(),
            max_value_bytes: 65_536,
            max_namespace_bytes: 16 * 1024 * 1024,
            replicate_delay: HumanDuration::secs(1),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Files {
    pub max_file_bytes: u64,
}

impl Default for Files {
    fn default() -> Self {
        Self {
            max_file_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watch {
    pub mode: WatchMode,
    pub poll_interval: HumanDuration,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            mode: WatchMode::Auto,
            poll_interval: HumanDuration::secs(2),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sync {
    pub debounce_min: HumanDuration,
    pub debounce_max: HumanDuration,
    pub burst_threshold: u64,
    pub concurrency: u64,
    pub multipart_threshold_bytes: u64,
    pub exclude: Vec<String>,
    pub max_file_bytes: u64,
    pub max_workspace_bytes: u64,
    pub mass_delete_hold: HumanDuration,
    /// How often the remote mirror is listed and compared with the manifest (objects
    /// deleted by someone are uploaded again); 0 disables.
    pub verify_interval: HumanDuration,
}

impl Default for Sync {
    fn default() -> Self {
        Self {
            debounce_min: HumanDuration::secs(2),
            debounce_max: HumanDuration::secs(30),
            burst_threshold: 10,
            concurrency: 10,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            exclude: [
                "node_modules/",
                "__pycache__/",
                ".venv/",
                "*.swp",
                "*.tmp",
                ".DS_Store",
            ]
            .map(String::from)
            .to_vec(),
            max_file_bytes: 1 << 30,
            max_workspace_bytes: 10 << 30,
            mass_delete_hold: HumanDuration::secs(300),
            verify_interval: HumanDuration::secs(3600),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Snapshot {
    pub interval: HumanDuration,
    pub keep: u64,
    pub exclude: Vec<String>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(300),
            keep: 12,
            exclude: vec!["node_modules/".into(), "__pycache__/".into()],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Git {
    pub interval: HumanDuration,
}

impl Default for Git {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(60),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    pub deadline: HumanDuration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            deadline: HumanDuration::secs(25),
        }
    }
}

/// Where the configuration text came from, for error messages.
pub enum Source<'a> {
    File(&'a Path),
    Embedded,
}

impl Config {
    /// Loads `path` (or the embedded dev config when `path` is `None`), applies the
    /// environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env = sandkeep_env()?;
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                    path: p.to_path_buf(),
                    error,
                })?;
                Self::from_parts(&text, Source::File(p), &env)
            }
            None => Self::from_parts(DEV_CONFIG, Source::Embedded, &env),
        }
    }

    /// Parses `text`, overlays `env` and validates. Pure: tests pass their own env.
    pub fn from_parts(
        text: &str,
        source: Source<'_>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let origin = match source {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => "(embedded config/dev.toml)".to_string(),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let from_env = apply_env(&mut table, env)?;
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let message = e.to_string();
            // A value that came from the environment is blamed on its variable: the
            // error's last line says where it is (`in `sync.debounce_min``).
            let at = message
                .trim_end()
                .rsplit_once("\nin `")
                .map(|(_, at)| at.trim_end_matches('`'));
            let origin = from_env
                .iter()
                .find(|(key, _)| at == Some(key.as_str()))
                .map_or(origin, |(_, var)| format!("(environment variable {var})"));
            ConfigError::Parse { origin, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// What only the daemon needs beyond [`Config::validate`]: in token mode, a secret.
    /// Client commands read the configuration for the socket path and `restore` for the
    /// remote; neither verifies tokens, so neither needs the secret, which an operator
    /// may give the daemon alone (`SANDKEEP_AUTH_SECRET` in its unit's environment file).
    pub fn validate_serve(&self) -> Result<(), ConfigError> {
        if self.auth.mode == AuthMode::Token && self.auth.secret.len() < MIN_AUTH_SECRET {
            return Err(invalid(
                "auth.secret",
                "auth.mode = \"token\" needs a secret of at least 16 bytes (or SANDKEEP_AUTH_SECRET)",
            ));
        }
        Ok(())
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("identity.user", &self.identity.user)?;
        validate_id("identity.conversation", &self.identity.conversation)?;
        self.socket_mode_bits()?;
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "must not be empty"));
        }
        // sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return Err(invalid(
                "socket",
                "path is longer than the 107 bytes a Unix socket address can hold",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty"));
        }
        if self.workspace.as_os_str().is_empty() {
            return Err(invalid("workspace", "must not be empty"));
        }
        if self.remote.kind == RemoteKind::Dir && self.remote.path.as_os_str().is_empty() {
            return Err(invalid(
                "remote.path",
                "must be set when remote.kind = \"dir\"",
            ));
        }
        if self.remote.kind == RemoteKind::S3 && self.remote.bucket.is_empty() {
            return Err(invalid(
                "remote.bucket",
                "must be set when remote.kind = \"s3\"",
            ));
        }
        if self.remote.access_key_id.is_empty() != self.remote.secret_access_key.is_empty() {
            let (set, unset) = if self.remote.access_key_id.is_empty() {
                ("remote.secret_access_key", "remote.access_key_id")
            } else {
                ("remote.access_key_id", "remote.secret_access_key")
            };
            return Err(invalid(
                unset,
                format!("must be set with {set} (or both left empty for the AWS credential chain)"),
            ));
        }
        if self.remote.kind == RemoteKind::S3 && !self.remote.endpoint.is_empty() {
            let uri = self.remote.endpoint.parse::<hyper::Uri>();
            let ok = uri.is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
                    && u.query().is_none()
            });
            if !ok {
                return Err(invalid(
                    "remote.endpoint",
                    "must be an http:// or https:// URL with a host (such as \"https://minio.example:9000\"), or empty for AWS",
                ));
            }
        }
        if self.remote.lease < HumanDuration::secs(1) {
            return Err(invalid("remote.lease", "must be at least 1s"));
        }
        if !self.remote.prefix.is_empty() && !self.remote.prefix.ends_with('/') {
            return Err(invalid("remote.prefix", "must end with `/` when set"));
        }
        let prefix = self.remote.prefix.strip_suffix('/').unwrap_or_default();
        if !self.remote.prefix.is_empty()
            && prefix.split('/').any(|seg| {
                seg.is_empty() || seg == "." || seg == ".." || seg.chars().any(char::is_control)
            })
        {
            return Err(invalid(
                "remote.prefix",
                "must be `/`-separated names, with no empty, `.` or `..` segment and no control characters",
            ));
        }
        // A `dir` remote keeps its own files at its root under these names.
        let first = prefix.split('/').next().unwrap_or_default();
        if self.remote.kind == RemoteKind::Dir && crate::remote::dir::RESERVED.contains(&first) {
            return Err(invalid(
                "remote.prefix",
                format!("`{first}` is the `dir` remote's own name at its root"),
            ));
        }
        // Tokens carry whole seconds (`iat`, `exp`): a shorter cap would refuse them all.
        if self.auth.max_ttl < HumanDuration::secs(1) {
            return Err(invalid("auth.max_ttl", "must be at least 1s"));
        }
        if self.kv.max_value_bytes == 0 {
            return Err(invalid("kv.max_value_bytes", "must be greater than 0"));
        }
        if self.kv.max_namespace_bytes < self.kv.max_value_bytes {
            return Err(invalid(
                "kv.max_namespace_bytes",
                "must be at least kv.max_value_bytes",
            ));
        }
        if self.files.max_file_bytes == 0 {
            return Err(invalid("files.max_file_bytes", "must be greater than 0"));
        }
        if self.sync.debounce_min > self.sync.debounce_max {
            return Err(invalid(
                "sync.debounce_min",
                "must not be greater than sync.debounce_max",
            ));
        }
        if self.sync.max_file_bytes == 0 {
            // Not "no limit": every file but empty ones would be left out of the mirror.
            return Err(invalid("sync.max_file_bytes", "must be greater than 0"));
        }
        if self.sync.concurrency == 0 {
            return Err(invalid("sync.concurrency", "must be at least 1"));
        }
        if self.sync.multipart_threshold_bytes < 5 * 1024 * 1024 {
            return Err(invalid(
                "sync.multipart_threshold_bytes",
                "must be at least 5 MiB (the S3 minimum part size)",
            ));
        }
        let verify = self.sync.verify_interval.0;
        if !verify.is_zero() && verify < Duration::from_secs(1) {
            return Err(invalid(
                "sync.verify_interval",
                "must be 0 (off) or at least 1s",
            ));
        }
        if self.watch.poll_interval.0 < Duration::from_millis(100) {
            // Each poll rescans the whole tree.
            return Err(invalid("watch.poll_interval", "must be at least 100ms"));
        }
        if self.snapshot.keep == 0 {
            return Err(invalid("snapshot.keep", "must be at least 1"));
        }
        if self.shutdown.deadline.0 < Duration::from_secs(1) {
            // Below that no final sync could ever finish: every stop would exit 75.
            return Err(invalid("shutdown.deadline", "must be at least 1s"));
        }
        Ok(())
    }

    /// `socket_mode` as permission bits (an octal string such as `"0660"`).
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let digits = self.socket_mode.trim_start_matches("0o");
        let octal = !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if bits <= 0o777 && octal => Ok(bits),
            _ => Err(invalid(
                "socket_mode",
                format!(
                    "`{}` is not an octal permission such as \"0660\"",
                    self.socket_mode
                ),
            )),
        }
    }

    /// The remote key prefix of this sandbox: `<prefix>conversations/<user>/<conversation>/`.
    pub fn conversation_prefix(&self) -> String {
        format!(
            "{}conversations/{}/{}/",
            self.remote.prefix, self.identity.user, self.identity.conversation
        )
    }
}

/// Identity ids place a sandbox in remote storage: `[A-Za-z0-9._-]{1,128}`, and never
/// `.` or `..` (they would climb out of the prefix on a `dir` remote).
pub fn validate_id(key: &str, id: &str) -> Result<(), ConfigError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("`{id}` must be 1-128 characters of [A-Za-z0-9._-] (and not `.` or `..`)"),
        ))
    }
}

/// The process's `SANDKEEP_*` variables. Others are none of sandkeep's business,
/// whatever bytes they hold; one of its own that is not UTF-8 is refused by name.
fn sandkeep_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with("SANDKEEP_")) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => out.push((name.to_string(), value)),
            Err(_) => {
                return Err(ConfigError::Parse {
                    origin: format!("(environment variable {name})"),
                    message: "the value is not valid UTF-8".into(),
                });
            }
        }
    }
    Ok(out)
}

/// Overlays the `SANDKEEP_*` variables on `table`; returns which dotted key each one set.
fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut applied = Vec::new();
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("Config always serializes to a table"),
    };
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("SANDKEEP_") && !NON_CONFIG_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let name = var["SANDKEEP_".len()..].to_ascii_lowercase();
        // Top-level key first (`SANDKEEP_STATE_DIR`), then `<section>_<key>`.
        if let Some(default) = defaults.get(&name).filter(|v| !v.is_table()) {
            let v = typed_env_value(&name, default, value)?;
            applied.push((name.clone(), var.clone()));
            table.insert(name, v);
            continue;
        }
        let section = defaults.iter().find_map(|(section, v)| {
            let rest = name.strip_prefix(section.as_str())?.strip_prefix('_')?;
            v.as_table().map(|t| (section.clone(), rest.to_string(), t))
        });
        match section {
            Some((section, key, section_defaults)) => {
                let dotted = format!("{section}.{key}");
                let Some(default) = section_defaults.get(&key) else {
                    return Err(ConfigError::UnknownEnv {
                        key: dotted,
                        var: var.clone(),
                    });
                };
                let v = typed_env_value(&dotted, default, value)?;
                applied.push((dotted, var.clone()));
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry.as_table_mut() {
                    Some(t) => {
                        t.insert(key, v);
                    }
                    None => return Err(invalid(&section, "must be a table")),
                }
            }
            None => {
                tracing::warn!(variable = %var, "ignoring environment variable that names no configuration key");
            }
        }
    }
    Ok(applied)
}

fn typed_env_value(
    key: &str,
    default: &toml::Value,
    raw: &str,
) -> Result<toml::Value, ConfigError> {
    let bad = |what: &str| invalid(key, format!("environment value `{raw}` is not {what}"));
    Ok(match default {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?)
        }
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(bad("a boolean (true/false)")),
        }),
        toml::Value::Array(_) => {
            let trimmed = raw.trim();
            if trimmed.starts_with('[') {
                let parsed: toml::Table =
                    toml::from_str(&format!("v = {trimmed}")).map_err(|_| bad("a TOML array"))?;
                parsed
                    .get("v")
                    .cloned()
                    .ok_or_else(|| bad("a TOML array"))?
            } else {
                toml::Value::Array(
                    trimmed
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                )
            }
        }
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_dev_config_is_valid() {
        let c = Config::from_parts(DEV_CONFIG, Source::Embedded, &[]).unwrap();
        assert_eq!(c.remote.kind, RemoteKind::Dir);
    }

    #[test]
    fn example_config_is_valid_and_matches_defaults() {
        let text = include_str!("../config/sandkeep.toml");
        let c = Config::from_parts(text, Source::Embedded, &[]).unwrap();
        let d = Config::default();
        assert_eq!(
            toml::Value::try_from(&c).unwrap(),
            toml::Value::try_from(&d).unwrap(),
            "config/sandkeep.toml must document exactly the defaults"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_parts("[sync]\ndebounce_mni = \"1s\"\n", Source::Embedded, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("debounce_mni"), "{err}");
        let err = Config::from_parts("sockt = \"/x\"\n", Source::Embedded, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sockt"), "{err}");
    }

    #[test]
    fn durations_parse_and_reject() {
        let c = Config::from_parts(
            "[sync]\ndebounce_min = \"500ms\"\n[snapshot]\ninterval = 0\n",
            Source::Embedded,
            &[],
        )
        .unwrap();
        assert_eq!(c.sync.debounce_min, HumanDuration::millis(500));
        assert!(c.snapshot.interval.is_zero());
        let err = Config::from_parts("[git]\ninterval = \"soon\"\n", Source::Embedded, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("interval") && err.contains("soon"), "{err}");
        assert!(Config::from_parts("[git]\ninterval = 5\n", Source::Embedded, &[]).is_err());
    }

    #[test]
    fn env_overrides_are_typed_by_schema() {
        let c = Config::from_parts(
            "",
            Source::Embedded,
            &env(&[
                ("SANDKEEP_SYNC_DEBOUNCE_MIN", "500ms"),
                ("SANDKEEP_WORKSPACE", "/w"),
                ("SANDKEEP_IDENTITY_USER", "42"),
                ("SANDKEEP_KV_MAX_VALUE_BYTES", "100"),
                ("SANDKEEP_REMOTE_FORCE_PATH_STYLE", "false"),
                ("SANDKEEP_REMOTE_LEASE", "2s"),
                ("SANDKEEP_SYNC_EXCLUDE", "a/, *.log"),
                ("SANDKEEP_STATE_DIR", "/s"),
                ("SANDKEEP_TOKEN", "not a config key"),
            ]),
        )
        .unwrap();
        assert_eq!(c.sync.debounce_min, HumanDuration::millis(500));
        assert_eq!(c.workspace, PathBuf::from("/w"));
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.identity.user, "42");
        assert_eq!(c.kv.max_value_bytes, 100);
        assert!(!c.remote.force_path_style);
        assert_eq!(c.remote.lease, HumanDuration::secs(2));
        assert_eq!(c.sync.exclude, vec!["a/", "*.log"]);
    }

    #[test]
    fn env_errors_name_the_key() {
        let err = Config::from_parts(
            "",
            Source::Embedded,
            &env(&[("SANDKEEP_KV_MAX_VALUE_BYTES", "lots")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kv.max_value_bytes"), "{err}");
        let err = Config::from_parts("", Source::Embedded, &env(&[("SANDKEEP_SYNC_BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sync.bogus"), "{err}");
        // A value that parses as a string but is no valid duration or variant names
        // its variable, not the file.
        for (var, value, key) in [
            ("SANDKEEP_SYNC_DEBOUNCE_MIN", "5x", "sync.debounce_min"),
            ("SANDKEEP_RESTORE", "bogus", "restore"),
        ] {
            let err = Config::from_parts(
                "",
                Source::File(Path::new("/f.toml")),
                &env(&[(var, value)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(var) && err.contains(key) && !err.contains("/f.toml"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_mistake_in_the_file_is_not_blamed_on_the_environment() {
        let env = env(&[
            ("SANDKEEP_WORKSPACE", "/w"),
            ("SANDKEEP_SYNC_DEBOUNCE_MAX", "5s"),
        ]);
        for text in [
            "bogus = 1\n",
            "[sync]\nbogus = 1\n",
            "[sync]\ndebounce_min = \"5x\"\n",
        ] {
            let err = Config::from_parts(text, Source::File(Path::new("/f.toml")), &env)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/f.toml") && !err.contains("environment"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_duration_of_another_type_says_what_a_duration_is() {
        for text in ["[git]\ninterval = 1.5\n", "[git]\ninterval = -1\n"] {
            let err = Config::from_parts(text, Source::Embedded, &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("git.interval") && err.contains("a string with a unit"),
                "{err}"
            );
        }
    }

    #[test]
    fn extreme_values_are_refused_by_name() {
        for (text, key) in [
            (
                "[kv]\nreplicate_delay = \"100000000000y\"\n",
                "replicate_delay",
            ),
            ("[git]\ninterval = \"11years\"\n", "interval"),
            ("[shutdown]\ndeadline = \"1ms\"\n", "shutdown.deadline"),
            ("[watch]\npoll_interval = \"1ns\"\n", "watch.poll_interval"),
            (
                "[sync]\nverify_interval = \"10ms\"\n",
                "sync.verify_interval",
            ),
            ("[sync]\nmax_file_bytes = 0\n", "sync.max_file_bytes"),
            ("[remote]\nprefix = \"../escape/\"\n", "remote.prefix"),
            ("[remote]\nprefix = \"a//b/\"\n", "remote.prefix"),
            ("[remote]\nprefix = \"a//\"\n", "remote.prefix"),
            (
                "[remote]\nkind = \"dir\"\npath = \"/r\"\nprefix = \".sandkeep-tmp/\"\n",
                "remote.prefix",
            ),
            (
                "[remote]\nkind = \"dir\"\npath = \"/r\"\nprefix = \".sandkeep-lock/x/\"\n",
                "remote.prefix",
            ),
            ("[remote]\nprefix = \"//\"\n", "remote.prefix"),
            ("[remote]\nprefix = \"/\"\n", "remote.prefix"),
            ("workspace = \"\"\n", "workspace"),
            ("state_dir = \"\"\n", "state_dir"),
            (
                "[remote]\nkind = \"s3\"\nendpoint = \"127.0.0.1:9000\"\n",
                "remote.endpoint",
            ),
            (
                "[remote]\nkind = \"s3\"\nendpoint = \"ftp://minio:9000\"\n",
                "remote.endpoint",
            ),
            (
                "[remote]\nkind = \"s3\"\nendpoint = \"http://\"\n",
                "remote.endpoint",
            ),
            (
                "[remote]\nkind = \"s3\"\naccess_key_id = \"AK\"\n",
                "remote.secret_access_key",
            ),
            (
                "[remote]\nkind = \"s3\"\nsecret_access_key = \"SK\"\n",
                "remote.access_key_id",
            ),
        ] {
            let err = Config::from_parts(text, Source::Embedded, &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(Config::from_parts("[git]\ninterval = \"10y\"\n", Source::Embedded, &[]).is_ok());
        let c = Config::from_parts("[remote]\nprefix = \"team/a/\"\n", Source::Embedded, &[]);
        assert!(c.is_ok(), "{c:?}");
        for endpoint in [
            "",
            "http://minio.storage.svc:9000",
            "https://s3.eu-west-1.amazonaws.com",
        ] {
            let text = format!("[remote]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\n");
            let c = Config::from_parts(&text, Source::Embedded, &[]);
            assert!(c.is_ok(), "{endpoint}: {c:?}");
        }
    }

    #[test]
    fn identity_is_validated() {
        for bad in ["", "a/b", "..", "é", &"x".repeat(129)] {
            let text = format!("[identity]\nuser = {bad:?}\n");
            let err = Config::from_parts(&text, Source::Embedded, &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("identity.user"), "{bad}: {err}");
        }
        assert!(
            Config::from_parts("[identity]\nuser = \"a.B_9-z\"\n", Source::Embedded, &[]).is_ok()
        );
    }

    #[test]
    fn token_mode_needs_a_secret_to_serve_only() {
        // Loads (a client command needs the socket path only), but cannot serve.
        let c = Config::from_parts("[auth]\nmode = \"token\"\n", Source::Embedded, &[]).unwrap();
        let err = c.validate_serve().unwrap_err().to_string();
        assert!(err.contains("auth.secret"), "{err}");
        let c = Config::from_parts(
            "[auth]\nmode = \"token\"\n",
            Source::Embedded,
            &env(&[("SANDKEEP_AUTH_SECRET", "0123456789abcdef0123")]),
        )
        .unwrap();
        assert_eq!(c.auth.mode, AuthMode::Token);
        c.validate_serve().unwrap();
        // Mode none serves without one.
        Config::default().validate_serve().unwrap();
    }

    #[test]
    fn max_ttl_is_at_least_a_second() {
        for bad in ["0s", "500ms", "999ms"] {
            let text = format!("[auth]\nmax_ttl = {bad:?}\n");
            let err = Config::from_parts(&text, Source::Embedded, &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("auth.max_ttl"), "{bad}: {err}");
        }
        let c = Config::from_parts("[auth]\nmax_ttl = \"1s\"\n", Source::Embedded, &[]).unwrap();
        assert_eq!(c.auth.max_ttl, HumanDuration::secs(1));
    }

    #[test]
    fn socket_mode_is_octal() {
        let mut c = Config::default();
        assert_eq!(c.socket_mode_bits().unwrap(), 0o660);
        c.socket_mode = "rw".into();
        assert!(c.socket_mode_bits().is_err());
        c.socket_mode = "1777".into();
        assert!(c.socket_mode_bits().is_err());
        for bad in ["+660", "", "0o", "66 0"] {
            c.socket_mode = bad.into();
            assert!(c.socket_mode_bits().is_err(), "{bad:?}");
        }
        c.socket_mode = "0o640".into();
        assert_eq!(c.socket_mode_bits().unwrap(), 0o640);
    }
}
