//! The `sandkeep` binary: parses the command line and runs the subcommand.

fn main() -> std::process::ExitCode {
    sandkeep::cli::main()
}
