//! lbd's own log (not the access log): one logfmt line per event on stderr, with a timestamp,
//! the level, the pid and the message.

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
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        let msg = format!("{}", record.args()).replace('"', "\\\"");
        let line = format!(
            "time={time} level={} pid={} target={} msg=\"{msg}\"\n",
            record.level().as_str().to_ascii_lowercase(),
            std::process::id(),
            record.target()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
