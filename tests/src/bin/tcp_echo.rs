//! `meshlet-tcp-echo`: the non-HTTP TCP of the transparent-mode test, a
//! line echo (std only, no mesh code).
//!
//! ```text
//! meshlet-tcp-echo serve PORT        # answers each line with the same line
//! meshlet-tcp-echo call ADDR LINE    # sends LINE, prints the answer line
//! ```
//!
//! The client speaks first with a line that is not HTTP, so a transparent
//! sidecar must recognise opaque TCP and splice it through.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port] => serve(port),
        ["call", addr, line] => call(addr, line),
        _ => Err("usage: meshlet-tcp-echo serve PORT | call ADDR LINE".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshlet-tcp-echo: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: &str) -> Result<(), String> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| e.to_string())?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || echo_lines(stream));
    }
    Ok(())
}

fn echo_lines(stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

fn call(addr: &str, line: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{line}").map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("read the answer: {e}"))?;
    print!("{answer}");
    Ok(())
}
