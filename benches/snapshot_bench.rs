//! `snapshot_bench`: times sandkeep's snapshot and git bundle code on a given tree, for
//! `benches/snapshot-vs-tar.sh`, which runs it beside GNU tar and `git bundle create`.
//!
//! ```text
//! cargo bench --no-run --bench snapshot_bench
//! snapshot_bench snapshot-file DIR OUT.tar.gz   # the archive builder into a file
//! snapshot_bench snapshot-remote DIR REMOTE_DIR # the daemon's path: pipe + dir remote
//! snapshot_bench bundle REPO OUT.bundle         # the bundle writer into a file
//! snapshot_bench bundle-check REPO              # the change check alone (no pack)
//! ```
//!
//! Each prints one line: `<seconds> <bytes>`. The file modes do not fsync (neither does
//! `tar -czf`); the remote mode does, as the daemon does. `cargo bench` runs this binary with
//! `--bench` and no mode: it then prints the usage and exits 0.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

const USAGE: &str = "usage: snapshot_bench (snapshot-file DIR OUT | snapshot-remote DIR REMOTE_DIR | bundle REPO OUT | bundle-check REPO)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["snapshot-file", dir, out] => snapshot_file(Path::new(dir), Path::new(out)),
        ["snapshot-remote", dir, remote] => snapshot_remote(Path::new(dir), Path::new(remote)),
        ["bundle", repo, out] => bundle(Path::new(repo), Path::new(out)),
        ["bundle-check", repo] => bundle_check(Path::new(repo)),
        _ => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok((secs, bytes)) => {
            println!("{secs:.3} {bytes}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapshot_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn snapshot_file(dir: &Path, out: &Path) -> anyhow::Result<(f64, u64)> {
    let root = dir.canonicalize()?;
    let started = Instant::now();
    let rules = sandkeep::sync::rules::Rules::new(&root, &[])?.keeping_git();
    let mut file = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    sandkeep::snapshot::write_archive(&rules, u64::MAX, &mut file, sandkeep::snapshot::LEVEL)?;
    file.flush()?;
    Ok((
        started.elapsed().as_secs_f64(),
        std::fs::metadata(out)?.len(),
    ))
}

fn snapshot_remote(dir: &Path, remote_dir: &Path) -> anyhow::Result<(f64, u64)> {
    let state = tempfile::tempdir()?;
    let mut config = sandkeep::config::Config {
        workspace: dir.canonicalize()?,
        state_dir: state.path().to_path_buf(),
        ..Default::default()
    };
    config.sync.exclude.clear();
    config.snapshot.exclude.clear();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let remote = Arc::new(sandkeep::remote::dir::DirRemote::new(remote_dir)?);
        let metrics = Arc::new(sandkeep::metrics::Metrics::new());
        let snapshots = sandkeep::snapshot::Snapshots::new(&config, remote, metrics);
        let started = Instant::now();
        let taken = snapshots.take().await?;
        Ok((started.elapsed().as_secs_f64(), taken.bytes))
    })
}

fn bundle(repo: &Path, out: &Path) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let mut file = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    sandkeep::gitbundle::write_bundle(repo, None, || {}, &mut file)?;
    file.flush()?;
    Ok((
        started.elapsed().as_secs_f64(),
        std::fs::metadata(out)?.len(),
    ))
}

/// What a periodic pass costs when nothing changed: refs, HEAD and both WIP trees are
/// computed, no pack is written.
fn bundle_check(repo: &Path) -> anyhow::Result<(f64, u64)> {
    let mut sink = std::io::sink();
    let first = sandkeep::gitbundle::write_bundle(repo, None, || {}, &mut sink)?
        .ok_or_else(|| anyhow::anyhow!("no bundle written"))?;
    let started = Instant::now();
    let again = sandkeep::gitbundle::write_bundle(repo, Some(first.digest), || {}, &mut sink)?;
    anyhow::ensure!(again.is_none(), "the repository changed during the check");
    Ok((started.elapsed().as_secs_f64(), 0))
}
