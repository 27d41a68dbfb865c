//! `meshctl`: the command-line client of meshlet. Flags and dispatch live
//! in the library ([`meshctl::cli`]).

use std::process::ExitCode;

use clap::Parser;
use meshctl::cli::{run, Args};

fn main() -> ExitCode {
    run(Args::parse())
}
