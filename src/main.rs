//! Entry point: parse the command line, set up logging, hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = transferd::cli::Cli::parse();
    transferd::telemetry::init_logging(cli.log_format);
    transferd::cli::run(cli)
}
