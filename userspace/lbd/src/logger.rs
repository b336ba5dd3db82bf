//! lbd's own log (not the access log): one logfmt line per event on stderr, with a timestamp,
//! the level, the pid, the target and the message. The message is quoted and escaped as the
//! access log escapes its values (quotes, backslashes, newlines and every other control
//! character), so whatever it holds (an error with a verifier log, a worker's words, a peer's
//! bytes) stays on its one line. A panic is logged the same way, as one line, by the hook
//! [`init`] installs.

use log::{LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::time::SystemTime;

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let line = line(
            &time,
            record.level(),
            std::process::id(),
            record.target(),
            &record.args().to_string(),
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// One log line, newline included.
fn line(time: &str, level: log::Level, pid: u32, target: &str, msg: &str) -> String {
    let mut out = format!(
        "time={time} level={} pid={pid} target={target} msg=",
        level.as_str().to_ascii_lowercase()
    );
    lb_proxy::accesslog::json_str(msg, &mut out);
    out.push('\n');
    out
}

static LOGGER: Logger = Logger;

/// Installs the logger at `level`, and a panic hook that logs the panic as one error line
/// (where and why) instead of the default lines on stderr.
pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    std::panic::set_hook(Box::new(|info| {
        log::error!("panic: {info}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_stays_on_its_one_line_whatever_it_holds() {
        let line = line(
            "2026-12-05T14:00:00.000Z",
            log::Level::Warn,
            42,
            "lbd::workers",
            "refused \"x\"\nverifier log:\r\n\tC:\\ \u{1b}[31m\u{7f} ü",
        );
        assert_eq!(
            line,
            "time=2026-12-05T14:00:00.000Z level=warn pid=42 target=lbd::workers \
             msg=\"refused \\\"x\\\"\\nverifier log:\\r\\n\\tC:\\\\ \\u001b[31m\\u007f ü\"\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
    }
}
