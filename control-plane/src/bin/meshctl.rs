//! `meshctl`: the command-line client of meshlet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshlet_control_plane::validate::validate_path;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "meshlet command-line client")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check resource files (YAML) offline: syntax, unknown fields, values.
    Validate {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Validate { file } => match validate_path(&file) {
            Ok(resources) => {
                for r in resources {
                    println!(
                        "{}/{} valid",
                        r.kind().to_ascii_lowercase(),
                        r.metadata().name
                    );
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("meshctl: error: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
