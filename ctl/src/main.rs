//! `lbctl`, the operator's tool: changes a running lbd over its command socket.
//!
//! `lbctl [--config FILE | --socket PATH] [--json] VERB ...` sends one request and prints the
//! answer: tables by default, JSON with `--json`. `lbctl config check FILE` runs lbd's own
//! validator locally, without lbd. Exit status: 0 success; 1 refused by lbd (or an invalid file,
//! or a change that some workers did not apply); 2 usage; 3 lbd cannot be reached. Every failure
//! is one line on stderr. The verbs are in `cli.rs`, the socket in `client.rs`, the output in
//! `render.rs`; lbctl depends on lb-config only, never on lbd.

#![forbid(unsafe_code)]

mod cli;
mod client;
mod render;
mod top;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cli::{Cli, Command, ConfigCmd};
use lb_config::protocol::Payload;

/// Why lbctl failed; the `Display` is the line on stderr.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    /// lbd answered no (exit 1).
    #[error("{verb}: {message}")]
    Refused { verb: &'static str, message: String },
    /// `config check` found the file invalid (exit 1).
    #[error("{0}")]
    Invalid(#[source] lb_config::ConfigError),
    /// Accepted by lbd, not applied by every worker (exit 1).
    #[error("{0}")]
    Partial(String),
    /// The command line cannot be acted on (exit 2).
    #[error("{0}")]
    Usage(String),
    /// lbd could not be reached (exit 3).
    #[error(transparent)]
    Unreachable(#[from] client::ClientError),
}

impl CtlError {
    fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused { .. } | CtlError::Invalid(_) | CtlError::Partial(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable(_) => 3,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and exit 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let mut stdout = std::io::stdout().lock();
    match run(&cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = stdout.flush();
            eprintln!("lbctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the command, writing its answer to `out` (a closed stdout is not an error).
fn run(cli: &Cli, out: &mut impl Write) -> Result<(), CtlError> {
    if let Command::Config(ConfigCmd::Check { file }) = &cli.command {
        return config_check(file, cli.json, out);
    }
    if let Command::Completions { shell } = &cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        // Into memory first: clap_complete panics when its writer fails (a closed pipe).
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut command, "lbctl", &mut script);
        let _ = out.write_all(&script);
        return Ok(());
    }
    if let Command::Top { interval, frames } = &cli.command {
        let socket = socket(cli)?;
        return top::run(
            &socket,
            Duration::from_secs(cli.timeout),
            Duration::from_secs_f64(*interval),
            *frames,
        );
    }
    if let Command::Manpage = &cli.command {
        let command = <Cli as clap::CommandFactory>::command();
        let mut page = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut page)
            .map_err(|e| CtlError::Usage(format!("rendering the manual page: {e}")))?;
        let _ = out.write_all(&page);
        return Ok(());
    }
    let Some(verb) = cli.command.verb() else {
        return Err(CtlError::Usage("this command needs no lbd".to_owned()));
    };
    let name = verb.name();
    let socket = socket(cli)?;
    let timeout = Duration::from_secs(cli.timeout);
    let payload = client::call(&socket, verb, timeout)?.map_err(|message| CtlError::Refused {
        verb: name,
        // The server prefixes refusals it makes without the supervisor; one "refused" is enough.
        message: message
            .strip_prefix("refused: ")
            .unwrap_or(&message)
            .to_owned(),
    })?;
    let text = if cli.json {
        render::json(&payload)
    } else {
        render::human(&payload)
    };
    let _ = out.write_all(text.as_bytes());
    if let Payload::Applied(applied) = &payload {
        if let Some(line) = render::failed_workers(applied) {
            return Err(CtlError::Partial(line));
        }
    }
    Ok(())
}

/// The command socket: --socket, else the config file's, else the default.
fn socket(cli: &Cli) -> Result<PathBuf, CtlError> {
    if let Some(socket) = &cli.socket {
        return Ok(socket.clone());
    }
    let Some(config) = &cli.config else {
        return Ok(PathBuf::from(lb_config::DEFAULT_COMMAND_SOCKET));
    };
    lb_config::load(config)
        .map(|c| c.command_socket)
        .map_err(|e| {
            CtlError::Usage(format!(
                "{e} (lbctl reads --config to find the command socket: fix the file, or use --socket)"
            ))
        })
}

/// `lbctl config check FILE`: the validator of `lbd --check`, run here.
fn config_check(file: &Path, json: bool, out: &mut impl Write) -> Result<(), CtlError> {
    let config = lb_config::load(file).map_err(CtlError::Invalid)?;
    let text = if json {
        let value = serde_json::json!({
            "file": file,
            "valid": true,
            "listeners": config.listeners.len(),
            "clusters": config.clusters.len(),
        });
        format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )
    } else {
        format!(
            "{}: configuration is valid ({} listeners, {} clusters)\n",
            file.display(),
            config.listeners.len(),
            config.clusters.len()
        )
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
    }

    fn check(file: &Path, json: bool) -> (Result<(), CtlError>, String) {
        let mut out = Vec::new();
        let result = config_check(file, json, &mut out);
        (result, String::from_utf8(out).unwrap())
    }

    #[test]
    fn config_check_accepts_a_good_file() {
        let file = examples().join("quickstart.toml");
        let (result, out) = check(&file, false);
        result.unwrap();
        assert_eq!(
            out,
            format!(
                "{}: configuration is valid (1 listeners, 2 clusters)\n",
                file.display()
            )
        );
        let (result, out) = check(&examples().join("full.toml"), true);
        result.unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["valid"], true);
        assert_eq!(value["clusters"], 2);
    }

    #[test]
    fn config_check_names_the_line_of_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("lbctl-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "workers = 1\nwokers = 2\n").unwrap();
        let (result, out) = check(&file, false);
        let e = result.unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2:1: wokers: unknown field `wokers`, expected one of `workers`, `max_connections`, `command_socket`, `steering`, `steering_policy`, `user`, `group`, `buffer_size`, `max_request_body`, `timeouts`, `access_log`, `metrics`, `sync`, `bgp`, `listeners`, `clusters`",
                file.display()
            )
        );
        assert!(out.is_empty());
        let (result, _) = check(&dir.join("missing.toml"), false);
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("cannot read the config file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_comes_from_the_flag_the_config_or_the_default() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        let cli = parse(&["lbctl", "--socket", "/tmp/x.sock", "status"]);
        assert_eq!(socket(&cli).unwrap(), Path::new("/tmp/x.sock"));
        let quickstart = examples().join("quickstart.toml");
        let cli = parse(&["lbctl", "--config", quickstart.to_str().unwrap(), "status"]);
        assert_eq!(
            socket(&cli).unwrap(),
            Path::new("/tmp/kakehi-quickstart.sock")
        );
        let cli = parse(&["lbctl", "status"]);
        assert_eq!(
            socket(&cli).unwrap(),
            Path::new(lb_config::DEFAULT_COMMAND_SOCKET)
        );
        let cli = parse(&["lbctl", "--config", "/nonexistent/lb.toml", "status"]);
        let e = socket(&cli).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("or use --socket"), "{e}");
    }
}
