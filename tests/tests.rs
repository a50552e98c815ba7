//! The integration test binary: every module starts real `sandkeep` processes (daemon
//! and CLI) on temporary directories and talks to them over the Unix socket.
//!
//! The modules live in `tests/suite/` (and the fixtures in `tests/util/`) so that Cargo
//! builds them all into this one binary instead of one binary per file.

mod util;

#[path = "suite/auth.rs"]
mod auth;
#[path = "suite/cli.rs"]
mod cli;
#[path = "suite/kv_batch_versions.rs"]
mod kv_batch_versions;
#[path = "suite/kv_concurrency.rs"]
mod kv_concurrency;
#[path = "suite/kv_errors.rs"]
mod kv_errors;
#[path = "suite/kv_lifecycle.rs"]
mod kv_lifecycle;
#[path = "suite/kv_routes.rs"]
mod kv_routes;
#[path = "suite/kv_ttl_namespaces.rs"]
mod kv_ttl_namespaces;

#[path = "suite/files_replication.rs"]
mod files_replication;
#[path = "suite/git_bundle.rs"]
mod git_bundle;
#[path = "suite/lifecycle_e2e.rs"]
mod lifecycle_e2e;
#[path = "suite/owner.rs"]
mod owner;
#[path = "suite/remote_contract.rs"]
mod remote_contract;
#[path = "suite/restore_e2e.rs"]
mod restore_e2e;
#[path = "suite/s3_server.rs"]
mod s3_server;
#[path = "suite/snapshot_e2e.rs"]
mod snapshot_e2e;
#[path = "suite/sync_e2e.rs"]
mod sync_e2e;
