//! The access log: one structured line per request, in logfmt or JSON, to stdout or a file.
//!
//! Lines are collected in a buffer during one turn of the event loop and written with one
//! syscall at its end, so logging costs no write per request. Values are escaped so that a
//! hostile Host or path cannot forge fields or lines.

use crate::cut::Cut;
use lb_config::{AccessLog as AccessLogConfig, LogFormat, LogTarget};
use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// The fields of one access log line.
pub struct Record<'a> {
    pub request_id: &'a str,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    pub cluster: &'a str,
    pub backend: Option<SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// `h1`, `h2` or `tcp`.
    pub proto: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    /// Time from the backend connection being ready to the first response byte.
    pub backend_time: Option<Duration>,
    /// Why kakehi answered itself or cut the exchange short, if it did.
    pub error: Option<Cut>,
    /// The client certificate the listener's `client_ca` verified, if any.
    pub client_cert: Option<&'a crate::tls::ClientCert>,
}

pub struct AccessLog {
    format: LogFormat,
    sink: Option<Box<dyn Write>>,
    buf: String,
}

impl AccessLog {
    pub fn new(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let sink: Option<Box<dyn Write>> = match &config.target {
            LogTarget::Off => None,
            LogTarget::Stdout => Some(Box::new(std::io::stdout())),
            LogTarget::File(path) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
        };
        Ok(AccessLog {
            format: config.format,
            sink,
            buf: String::new(),
        })
    }

    pub fn set_format(&mut self, format: LogFormat) {
        self.format = format;
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    pub fn log(&mut self, r: &Record<'_>) {
        if self.sink.is_none() {
            return;
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let backend = r.backend.map(|b| b.to_string()).unwrap_or_default();
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
        let backend_ms = r.backend_time.map(ms).unwrap_or_default();
        let (subject, fingerprint) = r
            .client_cert
            .map_or(("", ""), |c| (c.subject.as_str(), c.fingerprint.as_str()));
        let fields: [(&str, Value<'_>); 18] = [
            ("time", Value::Str(&time)),
            ("request_id", Value::Str(r.request_id)),
            ("client", Value::Owned(r.client.to_string())),
            ("listener", Value::Owned(r.listener.to_string())),
            ("cluster", Value::Str(r.cluster)),
            ("backend", Value::Str(&backend)),
            ("method", Value::Str(r.method)),
            ("host", Value::Str(r.host)),
            ("path", Value::Str(r.path)),
            ("proto", Value::Str(r.proto)),
            ("status", Value::Num(u64::from(r.status))),
            ("bytes_in", Value::Num(r.bytes_in)),
            ("bytes_out", Value::Num(r.bytes_out)),
            ("duration_ms", Value::Raw(ms(r.duration))),
            ("backend_ms", Value::Raw(backend_ms)),
            ("error", Value::Str(r.error.map_or("", Cut::as_str))),
            ("client_subject", Value::Str(subject)),
            ("client_fingerprint", Value::Str(fingerprint)),
        ];
        match self.format {
            LogFormat::Logfmt => {
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        self.buf.push(' ');
                    }
                    self.buf.push_str(k);
                    self.buf.push('=');
                    v.logfmt(&mut self.buf);
                }
            }
            LogFormat::Json => {
                self.buf.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        self.buf.push(',');
                    }
                    let _ = write!(self.buf, "\"{k}\":");
                    v.json(&mut self.buf);
                }
                self.buf.push('}');
            }
        }
        self.buf.push('\n');
    }

    /// Writes what was logged since the last flush.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(sink) = self.sink.as_mut() {
            // A failing log sink must not stop the proxy: the lines are dropped.
            let _ = sink.write_all(self.buf.as_bytes());
            let _ = sink.flush();
        }
        self.buf.clear();
    }
}

enum Value<'a> {
    Str(&'a str),
    Owned(String),
    Num(u64),
    /// A number already formatted, or empty for "no value".
    Raw(String),
}

impl Value<'_> {
    fn logfmt(&self, out: &mut String) {
        match self {
            Value::Str(s) => logfmt_str(s, out),
            Value::Owned(s) => logfmt_str(s, out),
            Value::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Raw(s) => out.push_str(s),
        }
    }

    fn json(&self, out: &mut String) {
        match self {
            Value::Str(s) => json_str(s, out),
            Value::Owned(s) => json_str(s, out),
            Value::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Raw(s) if s.is_empty() => out.push_str("null"),
            Value::Raw(s) => out.push_str(s),
        }
    }
}

fn logfmt_str(s: &str, out: &mut String) {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        out.push_str(s);
        return;
    }
    json_str(s, out);
}

/// `s` in double quotes, escaped as JSON strings are (quotes, backslashes, `\n`, `\r`, `\t`,
/// and every other control character as `\u00XX`): how the access log writes a value that is
/// not a plain token, and how lbd's own log writes its messages.
pub fn json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        let mut s = String::new();
        logfmt_str("/a b\"=\n", &mut s);
        assert_eq!(s, "\"/a b\\\"=\\n\"");
        let mut s = String::new();
        logfmt_str("/plain", &mut s);
        assert_eq!(s, "/plain");
        let mut s = String::new();
        logfmt_str("", &mut s);
        assert_eq!(s, "\"\"");
    }
}
