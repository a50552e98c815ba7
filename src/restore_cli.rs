//! `sandkeep restore --to DIR [--snapshot latest|NAME | --objects] [--force] [--no-wait]`: restores a
//! conversation's workspace straight from remote storage, no daemon needed (init
//! containers). A progress bar on a terminal; a JSON summary on stdout otherwise.

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::{EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE};
use crate::config::{Config, RemoteKind};
use crate::restore::{self, NoProgress, Progress, RestoreError, RestoreOptions, Source};

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, _files: u64, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// What `sandkeep restore` is asked for.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub to: &'a Path,
    pub from: &'a Source,
    pub force: bool,
    /// First wait until no other daemon owns the conversation (see
    /// [`crate::owner::wait_until_unowned`]).
    pub wait: bool,
}

pub fn run(config: &Config, req: Request<'_>) -> anyhow::Result<u8> {
    let Request { to, force, .. } = req;
    let marker = to.join(restore::INCOMPLETE_MARKER);
    // A restore from the same place that failed left its marker: what is there is its
    // own, to be resumed.
    let resuming = restore::unfinished_restore_in(to, config);
    if resuming {
        eprintln!(
            "sandkeep: resuming the restore into {} that did not finish",
            to.display()
        );
    } else if !force {
        match restore::holds_nothing_to_keep(config, to) {
            Ok(true) => {}
            Ok(false) => {
                eprintln!(
                    "sandkeep: {} is not empty; restore into an empty directory or pass \
                     --force (which replaces its content with the remote state)",
                    to.display()
                );
                return Ok(EXIT_USAGE);
            }
            Err(e) => {
                eprintln!("sandkeep: cannot read {}: {e}", to.display());
                return Ok(EXIT_ERROR);
            }
        }
    }
    let source = restore::restore_source(config);
    if let Err(e) = std::fs::create_dir_all(to).and_then(|()| std::fs::write(&marker, &source)) {
        eprintln!("sandkeep: cannot write into {}: {e}", to.display());
        return Ok(EXIT_ERROR);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let code = runtime.block_on(restore(config, req))?;
    // Done, or nothing to resume (no such snapshot, nothing in the remote).
    if code == EXIT_OK || code == EXIT_NOT_FOUND {
        let _ = std::fs::remove_file(&marker);
    }
    Ok(code)
}

async fn restore(config: &Config, req: Request<'_>) -> anyhow::Result<u8> {
    let Request {
        to,
        from,
        force,
        wait,
    } = req;
    // Creating a missing root here would turn a mistyped `remote.path` (or a volume
    // not mounted yet) into an empty remote and "nothing to restore", exit 0.
    if config.remote.kind == RemoteKind::Dir && !config.remote.path.is_dir() {
        eprintln!(
            "sandkeep: restore failed: the dir remote's root {} is not a directory \
             (remote.path mistyped, or its volume not mounted?)",
            config.remote.path.display()
        );
        return Ok(EXIT_ERROR);
    }
    let remote = crate::remote::from_config(config).await?;
    let prefix = config.conversation_prefix();
    let mut expired = None;
    if wait {
        // A daemon that still owns the conversation (the sandbox being replaced, not
        // stopped yet) writes on until its final sync: that is what to restore.
        let own = crate::owner::existing_instance_id(&config.state_dir);
        let waited = crate::owner::wait_until_unowned(
            remote.as_ref(),
            &prefix,
            own.as_deref(),
            config.remote.lease.0,
            |holder| {
                let who = holder.map_or_else(
                    || "a daemon (its owner object cannot be read)".to_string(),
                    crate::owner::OwnerRecord::to_string,
                );
                eprintln!(
                    "sandkeep: {who} owns this conversation: waiting until it releases it \
                     (at the end of its final sync) or its lease expires; --no-wait restores \
                     what remote storage holds now"
                );
            },
        )
        .await;
        match waited {
            Ok(u @ crate::owner::Unowned::Expired { .. }) => expired = Some(u),
            Ok(crate::owner::Unowned::Free) => {}
            Err(e) => {
                eprintln!("sandkeep: restore failed: cannot read the conversation's owner: {e}");
                return Ok(EXIT_ERROR);
            }
        }
    }
    // The daemon's own directories inside the target are not the workspace's: `--force`
    // and the clean-up after an older bundle leave them alone, as the daemon does.
    let opts = RestoreOptions::from_config(config, to, force);
    let tty = std::io::stderr().is_terminal();
    let progress: Box<dyn Progress> = if tty {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} restoring [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )?
            .progress_chars("=> "),
        );
        Box::new(Bar(bar))
    } else {
        Box::new(NoProgress)
    };
    let result =
        restore::restore(remote.as_ref(), &prefix, from, to, &opts, progress.as_ref()).await;
    let report = match result {
        Ok(r) => r,
        Err(e @ RestoreError::NoSnapshot(_)) => {
            eprintln!("sandkeep: {e}");
            return Ok(EXIT_NOT_FOUND);
        }
        Err(e @ RestoreError::Manifest(_)) => {
            eprintln!(
                "sandkeep: restore failed: {e}; `--snapshot latest` restores the latest \
                 snapshot instead (as a daemon does), and without a snapshot `--objects` \
                 restores the files' contents from their objects alone"
            );
            return Ok(EXIT_ERROR);
        }
        Err(e) => {
            eprintln!("sandkeep: restore failed: {e}");
            return Ok(EXIT_ERROR);
        }
    };
    if let Some(expired) = &expired {
        // Once everything was read: the daemon that comes next (this init container's
        // sidecar) takes over at once instead of waiting out the lease a second time.
        match crate::owner::mark_released(remote.as_ref(), &prefix, expired).await {
            Ok(true) => eprintln!(
                "sandkeep: the previous owner's lease expired: its owner object is marked \
                 released, so the next daemon takes over at once"
            ),
            Ok(false) => {}
            Err(e) => eprintln!(
                "sandkeep: cannot mark the expired owner object released ({e}); the next \
                 daemon waits for its lease"
            ),
        }
    }
    let summary = match &report {
        Some(r) => {
            let mut v = serde_json::to_value(r)?;
            v["restored"] = json!(true);
            v
        }
        None => {
            let reason = match from {
                Source::Objects => {
                    "the remote holds no workspace object and no git bundle for this conversation"
                }
                _ => "the remote holds no workspace manifest for this conversation",
            };
            json!({"restored": false, "reason": reason})
        }
    };
    if let Some(r) = &report {
        for b in &r.bad {
            tracing::warn!(path = %b.path, error = %b.error, "entry not restored");
        }
    }
    if tty {
        match &report {
            Some(r) => eprintln!(
                "restored {} files ({} bytes, {} already there), {} symlinks, {} empty dirs, {} repositories in {} ms{}",
                r.files + r.unchanged,
                r.bytes,
                r.unchanged,
                r.symlinks,
                r.empty_dirs,
                r.repos.len(),
                r.duration_ms,
                if r.bad.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} entries NOT restored (see the JSON summary)",
                        r.bad.len()
                    )
                }
            ),
            None => {
                eprintln!("nothing to restore: the remote holds no workspace for this conversation")
            }
        }
    }
    println!("{summary}");
    Ok(EXIT_OK)
}
