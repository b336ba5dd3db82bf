//! Prints, as raw bytes on stdout, the frame lbd main sends a worker to give it a configuration:
//! `channel_request ID FILE` reads and checks FILE as lbd does (`State::load_checked`) and
//! writes the `Order::Configure` request with id ID, framed by the shared codec. It shows what
//! a worker receives, and `fuzz/seeds_parsers.sh` writes the `control_frames` seeds with it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use lb_config::protocol::channel::{self, Order, Request};
use lb_config::state::State;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [id, file] = args.as_slice() else {
        eprintln!("usage: channel_request ID FILE");
        return ExitCode::from(2);
    };
    let Ok(id) = id.parse::<u64>() else {
        eprintln!("channel_request: the id {id:?} is not a number");
        return ExitCode::from(2);
    };
    let checked = match State::load_checked(&PathBuf::from(file)) {
        Ok(checked) => checked,
        Err(e) => {
            eprintln!("channel_request: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request = Request {
        id,
        order: Order::Configure {
            config: Box::new(checked.config),
        },
    };
    let written = channel::encode(&request)
        .map_err(|e| e.to_string())
        .and_then(|frame| {
            std::io::stdout()
                .write_all(&frame)
                .map_err(|e| e.to_string())
        });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("channel_request: {e}");
            ExitCode::FAILURE
        }
    }
}
