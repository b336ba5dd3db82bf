//! `[bgp]`: the virtual IP announced over BGP while this appliance serves (issue 17, part 3).
//!
//! lbd does not speak BGP: bird2 does. At start, lbd writes bird's configuration from `[bgp]`
//! (`bird_config`): the router id, a BGP session to each peer that exports only the VIP, and
//! the VIP itself as a static route in a protocol named `kakehi_vip`, **disabled**; then it
//! asks bird to load it (`configure`) through bird's control socket, unless the file held
//! that text already and bird has `kakehi_vip` (after `lbctl upgrade`: a `configure` would
//! reset `kakehi_vip` to the file's `disabled` and withdraw the VIP until the next `enable`). From then on, lbd enables
//! `kakehi_vip` while it serves and disables it when it should not be announced, which
//! withdraws the route from every peer at once:
//!
//! - lbd stops (SIGTERM, `lbctl shutdown`): withdrawn when the drain begins, so routers send
//!   new flows to the other appliances while this one finishes its requests;
//! - no cluster has a backend up (by the health checks, every appliance's with `[sync]`);
//! - no worker is running.
//!
//! `lbctl upgrade` keeps it announced: the old lbd leaves it as it is and the next one holds
//! it. A bird that restarts comes up with `kakehi_vip` disabled, as its configuration says,
//! and lbd says what it wants again every [`REASSERT`]. If lbd's main process is killed
//! outright, bird goes on announcing until told otherwise (the appliance's unit disables it
//! when lbd stops; see the README). The sessions' hold time is 9 s, so an appliance that
//! disappears whole is withdrawn by its peers within 9 s.

use lb_config::Bgp;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The static protocol lbd enables and disables.
pub const PROTOCOL: &str = "kakehi_vip";
/// How often lbd tells bird what it wants even when nothing changed.
const REASSERT: Duration = Duration::from_secs(2);
/// How long a talk with bird may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct Announcer {
    settings: Bgp,
    /// bird loaded lbd's configuration.
    configured: bool,
    /// The file already held this configuration, as after `lbctl upgrade`: the lbd that wrote
    /// it had bird load it, so bird is not asked to load it again when it has `kakehi_vip`.
    /// A `configure` resets every protocol to the file's state, `kakehi_vip` to disabled,
    /// which withdrew the VIP from the routers for the moment until the next `enable`.
    unchanged: bool,
    /// What bird was last told, and when.
    told: Option<(bool, Instant)>,
    /// After a failed talk: not before then.
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl Announcer {
    /// Writes bird's configuration; bird is asked to load it at the first turn, unless the
    /// file held it already.
    pub fn new(settings: &Bgp, source: &std::path::Path) -> Announcer {
        let text = bird_config(settings, source);
        let unchanged = std::fs::read_to_string(&settings.bird_config).is_ok_and(|t| t == text);
        // bird reads it as its own user, and lbd's umask may be 0077 (the appliance's unit):
        // the file says which routes are announced and holds no secret.
        let written = std::fs::write(&settings.bird_config, text).and_then(|()| {
            std::fs::set_permissions(
                &settings.bird_config,
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
        });
        if let Err(e) = written {
            log::error!(
                "bgp: cannot write bird's configuration {}: {e}",
                settings.bird_config.display()
            );
        }
        Announcer {
            settings: settings.clone(),
            configured: false,
            unchanged,
            told: None,
            retry_at: None,
            last_error: None,
        }
    }

    /// Tells bird to announce the VIP or not, when that changes, after an error (once a
    /// second), and every [`REASSERT`].
    pub fn want(&mut self, announce: bool) {
        let now = Instant::now();
        let due = match self.told {
            Some((told, at)) => told != announce || now.duration_since(at) >= REASSERT,
            None => true,
        };
        if !due || self.retry_at.is_some_and(|r| now < r) {
            return;
        }
        let outcome = self.tell(announce);
        match outcome {
            Ok(()) => {
                if self.told.map(|(t, _)| t) != Some(announce) || self.last_error.is_some() {
                    log::warn!(
                        "bgp: {} {} ({PROTOCOL} {})",
                        if announce {
                            "announcing"
                        } else {
                            "withdrawing"
                        },
                        self.settings.vip,
                        if announce { "enabled" } else { "disabled" }
                    );
                }
                self.last_error = None;
                self.retry_at = None;
                self.told = Some((announce, now));
            }
            Err(e) => {
                if self.last_error.as_deref() != Some(e.as_str()) {
                    log::warn!(
                        "bgp: cannot tell bird ({}): {e}",
                        self.settings.bird_socket.display()
                    );
                }
                self.last_error = Some(e);
                self.retry_at = Some(now + Duration::from_secs(1));
            }
        }
    }

    fn tell(&mut self, announce: bool) -> Result<(), String> {
        if !self.configured {
            let socket = &self.settings.bird_socket;
            let loaded =
                self.unchanged && command(socket, &format!("show protocols {PROTOCOL}")).is_ok();
            if !loaded {
                command(socket, "configure")?;
            }
            self.configured = true;
        }
        let verb = if announce { "enable" } else { "disable" };
        command(&self.settings.bird_socket, &format!("{verb} {PROTOCOL}"))
    }
}

/// Sends one command on bird's control socket and reads its answer to the end: lines of a
/// four-digit code and a space (the last) or a dash (more follow); codes from 8000 are errors.
fn command(socket: &std::path::Path, line: &str) -> Result<(), String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    // The greeting: "0001 BIRD 2.0.12 ready."
    read_answer(&mut reader)?;
    writer
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let answer = read_answer(&mut reader)?;
    log::debug!("bgp: bird answered {line:?} with {answer:?}");
    Ok(())
}

fn read_answer(reader: &mut impl BufRead) -> Result<String, String> {
    let mut all = String::new();
    for _ in 0..10_000 {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("bird closed the connection".into());
        }
        let code: Option<u32> = line.get(..4).and_then(|c| c.parse().ok());
        let last = line.as_bytes().get(4) == Some(&b' ');
        all.push_str(line.trim_end());
        all.push('\n');
        if let (Some(code), true) = (code, last) {
            if code >= 8000 {
                return Err(format!("bird refused: {}", line.trim_end()));
            }
            return Ok(all);
        }
    }
    Err("bird's answer never ended".into())
}

/// bird's configuration for `settings`.
pub fn bird_config(b: &Bgp, source: &std::path::Path) -> String {
    let (family, len) = if b.vip.is_ipv4() {
        ("ipv4", 32)
    } else {
        ("ipv6", 128)
    };
    let mut out = format!(
        "# Written by kakehi's lbd from [bgp] of {}: lbd rewrites it at each start.\n\
         router id {};\n\
         protocol device {{ scan time 10; }}\n\n\
         # Enabled by lbd while it serves (lbctl status, the README's \"BGP\").\n\
         protocol static {PROTOCOL} {{\n  disabled;\n  {family};\n  route {}/{len} blackhole;\n}}\n",
        source.display(),
        b.router_id,
        b.vip
    );
    for (i, (address, asn)) in b.peers.iter().enumerate() {
        out.push_str(&format!(
            "\nprotocol bgp peer{} {{\n  local as {};\n  neighbor {address} as {asn};\n  \
             hold time 9; keepalive time 3;\n  \
             connect delay time 1; connect retry time 2; error wait time 1, 10;\n  \
             {family} {{ import none; export where proto = \"{PROTOCOL}\"; }};\n}}\n",
            i + 1,
            b.local_as
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_config_exports_only_the_vip_to_each_peer() {
        let b = Bgp {
            vip: "192.0.2.10".parse().unwrap_or_else(|_| unreachable!()),
            local_as: 65001,
            router_id: std::net::Ipv4Addr::new(10, 0, 0, 2),
            peers: vec![
                ("10.0.0.1".parse().unwrap_or_else(|_| unreachable!()), 65000),
                ("10.0.1.1".parse().unwrap_or_else(|_| unreachable!()), 65000),
            ],
            bird_socket: "/run/bird/bird.ctl".into(),
            bird_config: "/etc/bird/bird.conf".into(),
        };
        let text = bird_config(&b, std::path::Path::new("/etc/kakehi/config.toml"));
        assert!(text.contains("router id 10.0.0.2;"));
        assert!(text.contains(
            "protocol static kakehi_vip {\n  disabled;\n  ipv4;\n  route 192.0.2.10/32 blackhole;"
        ));
        assert!(
            text.contains("protocol bgp peer1 {\n  local as 65001;\n  neighbor 10.0.0.1 as 65000;")
        );
        assert!(text.contains("protocol bgp peer2"));
        assert_eq!(
            text.matches("export where proto = \"kakehi_vip\"").count(),
            2
        );
    }

    #[test]
    fn answers_end_at_a_code_and_a_space_and_errors_are_refusals() {
        let ok = "0001 BIRD 2.0.12 ready.\n";
        assert!(read_answer(&mut ok.as_bytes()).is_ok());
        let multi = "1002-first\n more\n0011 kakehi_vip: enabled\n";
        assert!(read_answer(&mut multi.as_bytes())
            .unwrap_or_default()
            .contains("enabled"));
        let err = "8003 No protocols match\n";
        assert!(read_answer(&mut err.as_bytes()).is_err());
        assert!(read_answer(&mut "0001-half".as_bytes()).is_err());
    }
}
