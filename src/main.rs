//! The `tidewire` binary: parses the command line and hands it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tidewire::cli::run(tidewire::cli::Cli::parse())
}
