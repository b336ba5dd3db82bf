//! `lb-origin`: runs one or more [`lb_testkit::Origin`] listeners until killed.
//!
//! Usage: `lb-origin --name NAME --listen 127.0.0.1:9001 [--listen ADDR ...]`.
//! Prints `lb-origin NAME listening on ADDR` once per listener.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use lb_testkit::Origin;

const USAGE: &str = "usage: lb-origin [--name NAME] --listen ADDR [--listen ADDR ...]";

fn parse() -> Result<(String, Vec<SocketAddr>), String> {
    let mut name = String::from("origin");
    let mut listen = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--name" | "-n" => name = value("--name")?,
            "--listen" | "-l" => {
                let v = value("--listen")?;
                let addr = v
                    .parse()
                    .map_err(|e| format!("--listen {v}: {e} (want IP:PORT)"))?;
                listen.push(addr);
            }
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if listen.is_empty() {
        return Err(format!("at least one --listen is required\n{USAGE}"));
    }
    Ok((name, listen))
}

fn main() -> ExitCode {
    let (name, listen) = match parse() {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let mut origins = Vec::new();
    for addr in listen {
        match Origin::start_on(&name, addr) {
            Ok(o) => {
                println!("lb-origin {name} listening on {}", o.addr());
                origins.push(o);
            }
            Err(e) => {
                eprintln!("lb-origin {name}: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
