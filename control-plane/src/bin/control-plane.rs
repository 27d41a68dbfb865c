//! `control-plane`: meshlet's registry, policy store and push server.
//! Everything lives in the library ([`meshlet_control_plane::server`]).

use std::process::ExitCode;

use clap::Parser;
use meshlet_control_plane::server::{init_logging, run, Settings};

fn main() -> ExitCode {
    let settings = Settings::parse();
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("control-plane: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("control-plane: error: {err}");
            ExitCode::FAILURE
        }
    }
}
