//! `cargo xtask vm-test`: boots the appliance image and checks it from outside and inside.
//!
//! Owns the boot test: qemu (TCG) on the image built by `vm-image` (booted by its own boot
//! loader, or by qemu's -kernel/-initrd), the guest's port 80 forwarded to a free 127.0.0.1
//! port, a random token handed to the guest as the systemd credential `kakehi.selftest`
//! (which starts `kakehi-selftest.service`: an origin on the default backend address and the
//! sandbox, eBPF, `lbctl upgrade` and `lbctl status` checks, printed on the serial console)
//! and a config with another worker count as the credential `kakehi.config`, HTTP requests
//! from the host through the appliance, and qemu stopped by its pid. An answer without the token (a
//! leftover guest) fails the test. The checks run inside the guest are the self-test
//! script's, in `vm-images/`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{vm_dir, vm_image, ImageArgs, ROOT_LABEL};
use crate::procs::{self, Proc, Signals, SpawnOptions};

/// The boot test's time limit, from qemu's start to the last check: a boot under TCG to the
/// self-test's last line took 45-80 s here.
const DEFAULT_TIMEOUT_SECS: u64 = 300;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Boot with qemu's -kernel/-initrd (the kernel and initramfs taken from the image)
    /// instead of the image's own boot loader.
    #[arg(long)]
    pub direct_kernel: bool,
    /// Give up this many seconds after qemu starts (boot, checks, requests); building the
    /// image first, when needed, has its own limits.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Build the image, if it is not up to date, from target/release/lbd and lbctl as they
    /// are instead of running cargo build.
    #[arg(long)]
    pub prebuilt: bool,
}

impl Default for TestArgs {
    /// What `cargo xtask test` runs: the image's own boot loader, the default time limit.
    fn default() -> Self {
        Self {
            direct_kernel: false,
            timeout: DEFAULT_TIMEOUT_SECS,
            prebuilt: false,
        }
    }
}

/// `cargo xtask vm-test`.
pub fn vm_test(signals: &Signals, args: &TestArgs) -> Result<()> {
    let image = vm_image(
        signals,
        &ImageArgs {
            config: None,
            fresh: false,
            prebuilt: args.prebuilt,
            root_password_hash: None,
        },
    )?;
    // The image build has its own limits per step; this one is the boot's and the checks'.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let dir = vm_dir().join("test");
    fs::create_dir_all(&dir)?;
    let serial = dir.join("serial.log");
    let qemu_log = dir.join("qemu.log");
    let _ = fs::remove_file(&serial);
    let token = token()?;

    let port = procs::free_ports(1)?[0];
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    // The port must be free now; then only our qemu can be answering on it.
    if !procs::port_free(front) {
        bail!("{front} is already taken: a leftover guest? Stop it and run again");
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "1024", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,snapshot=on",
            image.qcow2.display()
        ))
        .arg("-nic")
        .arg(format!(
            "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:80"
        ))
        // Both credentials in one SMBIOS type 11 table (OEM strings), one string each.
        .arg("-smbios")
        .arg(format!(
            "type=11,value=io.systemd.credential:kakehi.selftest={token},\
             value=io.systemd.credential.binary:kakehi.config={}",
            config_credential(&dir)?
        ));
    if args.direct_kernel {
        qemu.arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!("root=LABEL={ROOT_LABEL} ro console=ttyS0,115200n8"));
    }
    let how = if args.direct_kernel {
        "qemu -kernel/-initrd"
    } else {
        "the image's boot loader"
    };
    println!(
        "\nxtask vm-test: booting {} with {how} (TCG), guest :80 on {front}; serial console in {}",
        image.qcow2.display(),
        serial.display()
    );
    let mut vm = Proc::spawn_logged("qemu", &mut qemu, SpawnOptions::default(), &qemu_log)?;
    println!("xtask vm-test: qemu pid {}", vm.pid());
    let result = drive(
        signals, &mut vm, &serial, &qemu_log, front, &token, deadline, started,
    );
    let status = vm.stop();
    println!(
        "xtask vm-test: stopped qemu (pid {}){}",
        vm.pid(),
        status
            .map(|s| format!(": {}", procs::describe(s)))
            .unwrap_or_default()
    );
    result?;
    println!(
        "\nxtask vm-test: passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The number of workers in the config the test hands the guest: not the default's, so that
/// the self-test's worker count shows the `kakehi.config` credential was applied.
const TEST_WORKERS: u32 = 3;

/// The `[bgp]` section of the test's config: the image's bird2 announces the VIP while lbd
/// serves (the self-test watches `kakehi_vip` in bird). The peer is qemu's user-network
/// gateway, where no BGP speaker answers: the session stays down, which is not checked.
const TEST_BGP: &str = "
[bgp]
vip = \"192.0.2.10\"
local_as = 65010
router_id = \"10.0.2.15\"
peers = [ { address = \"10.0.2.2\", as = 65000 } ]
bird_config = \"/var/lib/kakehi/bird.conf\"
";

/// The image's default config with `workers = TEST_WORKERS` and [`TEST_BGP`],
/// base64-encoded for the `kakehi.config` credential (kakehi.service installs it as
/// /etc/kakehi/config.toml).
fn config_credential(dir: &Path) -> Result<String> {
    let default = crate::root().join("vm-images/rootfs/etc/kakehi/config.toml");
    let text =
        fs::read_to_string(&default).with_context(|| format!("reading {}", default.display()))?;
    let config = with_workers(&text, TEST_WORKERS)
        .with_context(|| format!("{} has no `workers = N` line", default.display()))?
        + TEST_BGP;
    let path = dir.join("config.toml");
    fs::write(&path, config)?;
    let out = procs::output(Command::new("base64").arg("-w0").arg(&path))?;
    if !out.status.success() {
        bail!("base64 {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn with_workers(config: &str, workers: u32) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = config
        .lines()
        .map(|line| {
            if !found && line.trim_start().starts_with("workers") && line.contains('=') {
                found = true;
                format!("workers = {workers}")
            } else {
                line.to_string()
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

/// A random token from the kernel: the answers of this run's guest carry it, a leftover's
/// cannot.
fn token() -> Result<String> {
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")?;
    Ok(uuid.trim().replace('-', ""))
}

#[allow(clippy::too_many_arguments)]
fn drive(
    signals: &Signals,
    vm: &mut Proc,
    serial: &Path,
    qemu_log: &Path,
    front: SocketAddr,
    token: &str,
    deadline: Instant,
    started: Instant,
) -> Result<()> {
    let mut console = Console::new(serial);
    let ready = format!("kakehi-selftest: ready {token}");
    let done = format!("kakehi-selftest: done {token} failures=");
    let mut failures = Vec::new();
    // The self-test says "ready" once its requests come back through kakehi; when they do
    // not, it goes on to its other checks and says "done" without it.
    let first = console.wait_for(signals, vm, qemu_log, &[&ready, &done], deadline)?;
    if first.starts_with(&done) {
        failures.push("the guest could not reach its origin through kakehi".to_string());
    } else {
        println!(
            "xtask vm-test: the guest's self-test reached kakehi ({:.0}s after start)",
            started.elapsed().as_secs_f64()
        );
        host_requests(front, token, &mut failures);
    }
    let last = console.wait_for(signals, vm, qemu_log, &[&done], deadline)?;
    println!("xtask vm-test: the guest's self-test:");
    for line in console.lines_with("kakehi-selftest: ") {
        println!("  {line}");
        if line.starts_with("kakehi-selftest: FAIL") {
            failures.push(format!("guest: {line}"));
        }
    }
    if !last.ends_with("failures=0") {
        failures.push(format!("guest: {last}"));
    }
    let workers = format!("ok workers {TEST_WORKERS} workers");
    let needed = [
        "ok sandbox",
        &workers,
        "ok bpf-loaded",
        "ok bpf-steering",
        "ok lbctl-status",
        "ok upgrade ",
        "ok upgrade-proxy",
        "ok bgp-announced",
        "ok bgp-upgrade",
        "ok bgp-stop",
        "ok bgp-start",
        "ok bgp-killed",
    ];
    for check in needed {
        let wanted = format!("kakehi-selftest: {check}");
        if console.lines_with(&wanted).next().is_none() {
            failures.push(format!("guest: no `{check}` line"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "vm-test failed ({} problems; serial console in {}):\n  {}",
            failures.len(),
            serial.display(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Requests from the host through the forwarded port: the origin's page with this run's
/// token, the headers kakehi added, and the origin's own 404, each on a new connection.
fn host_requests(front: SocketAddr, token: &str, failures: &mut Vec<String>) {
    let before = failures.len();
    let page = format!("kakehi-selftest origin {token}\n");
    for i in 1..=6 {
        match http_get(front, "/") {
            Ok((200, body)) if body == page.as_bytes() => {}
            Ok((status, body)) => failures.push(format!(
                "GET / #{i}: {status} {:?}, wanted 200 with this run's token",
                String::from_utf8_lossy(&body)
            )),
            Err(error) => failures.push(format!("GET / #{i}: {error:#}")),
        }
    }
    match http_get(front, "/cgi-bin/echo") {
        Ok((200, body)) => {
            let body = String::from_utf8_lossy(&body);
            let request_id = body
                .lines()
                .find_map(|l| l.strip_prefix("HTTP_X_REQUEST_ID="))
                .unwrap_or("");
            if request_id.len() != 24 || !request_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                failures.push(format!(
                    "the origin got no X-Request-Id from kakehi: {body:?}"
                ));
            }
            if !body.lines().any(|l| l.starts_with("HTTP_X_FORWARDED_FOR=")) {
                failures.push(format!("the origin got no X-Forwarded-For: {body:?}"));
            }
        }
        Ok((status, body)) => failures.push(format!(
            "GET /cgi-bin/echo: {status} {:?}",
            String::from_utf8_lossy(&body)
        )),
        Err(error) => failures.push(format!("GET /cgi-bin/echo: {error:#}")),
    }
    match http_get(front, "/no-such-page") {
        Ok((404, _)) => {}
        Ok((status, _)) => failures.push(format!(
            "GET /no-such-page: {status}, wanted the origin's 404"
        )),
        Err(error) => failures.push(format!("GET /no-such-page: {error:#}")),
    }
    if failures.len() == before {
        println!(
            "xtask vm-test: host → {front} → guest kakehi → origin: 8 requests answered as expected"
        );
    }
}

/// The guest's serial console, read as qemu writes it to a file.
struct Console {
    path: PathBuf,
    text: String,
}

impl Console {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            text: String::new(),
        }
    }

    fn refresh(&mut self) {
        if let Ok(bytes) = fs::read(&self.path) {
            self.text = String::from_utf8_lossy(&bytes).replace('\r', "");
        }
    }

    /// The console lines holding `needle`, from where it starts.
    fn lines_with<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.text
            .lines()
            .filter_map(move |line| line.find(needle).map(|at| line[at..].trim_end()))
    }

    /// Waits for a console line holding one of `needles` and returns it from there. Fails
    /// when qemu exits, xtask is told to stop, or the deadline passes.
    fn wait_for(
        &mut self,
        signals: &Signals,
        vm: &mut Proc,
        qemu_log: &Path,
        needles: &[&str],
        deadline: Instant,
    ) -> Result<String> {
        let needle = needles.join("` or `");
        loop {
            self.refresh();
            for needle in needles {
                if let Some(line) = self.lines_with(needle).next() {
                    return Ok(line.to_string());
                }
            }
            if let Some(status) = vm.try_exited()? {
                bail!(
                    "qemu exited ({}) before the console showed `{needle}`: {}\n{}",
                    procs::describe(status),
                    fs::read_to_string(qemu_log).unwrap_or_default().trim(),
                    self.tail(30)
                );
            }
            if let Some(signal) = signals.wait(Duration::from_millis(250))? {
                bail!("interrupted by {signal}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out waiting for `{needle}` on the guest's console; its last lines:\n{}",
                    self.tail(40)
                );
            }
        }
    }

    fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// One HTTP/1.1 GET on a new connection; returns the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: kakehi.test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete response header")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let body = &response[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        },
    ))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_config_changes_only_the_workers_line() {
        let config = "# workers = 9 in a comment\nworkers = 2\nsteering = \"ebpf\"\n";
        assert_eq!(
            with_workers(config, 3).unwrap(),
            "# workers = 9 in a comment\nworkers = 3\nsteering = \"ebpf\"\n"
        );
        assert_eq!(with_workers("steering = \"ebpf\"\n", 3), None);
    }

    #[test]
    fn responses_are_read_plain_or_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(parse_response(plain).unwrap(), (200, b"abc".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
                        3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"abcde".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
