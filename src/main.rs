//! The `sandkeep` binary: parses the command line and runs the subcommand.

// jemalloc rather than glibc's malloc. The KV path frees on one thread what another
// allocated (requests parsed on tokio's workers, records built on the writer thread),
// and glibc's arenas turn that into lock traffic: with glibc's arena count capped at two
// (to keep its resident memory down) a durable SET cost about 2 futex calls (200k per
// 100k SETs; 16k with jemalloc). A/B against Redis `appendfsync always`, SET at C=50: glibc
// capped 0.64x, glibc uncapped 0.74x, jemalloc 0.82x; and the smallest idle daemon.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (read once, at the first allocation): two arenas are enough for a
/// daemon with two tokio workers and a few helper threads, and a background thread
/// hands freed pages back to the system after a second, so an idle daemon stays small
/// (26 MiB resident watching 10,000 files, against 42 MiB with jemalloc's defaults).
/// `_RJEM_MALLOC_CONF` in the environment still overrides these. (A reference to an
/// array, not a slice: jemalloc reads this symbol as one C pointer.)
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 70] =
    b"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    sandkeep::cli::main()
}
