//! `control-plane`: meshlet's registry, policy store and push server.
//! Everything lives in the library ([`meshlet_control_plane::server`]).

use std::process::ExitCode;

use clap::Parser;
use meshlet_control_plane::server::{bind, init_logging, run, signalled, Settings};

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
    let serve = async move {
        let listener = bind(&settings).await?;
        run(listener, settings, async {
            if let Err(err) = signalled().await {
                tracing::error!(error = %err, "no signal handling; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        })
        .await
    };
    match runtime.block_on(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("control-plane: error: {err}");
            ExitCode::FAILURE
        }
    }
}
