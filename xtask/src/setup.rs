//! `cargo xtask setup`: the system prerequisites, installed idempotently.
//!
//! Owns the list of Debian packages the project's commands need and the one way they are
//! installed (as root, no stdin, a private apt archive directory, services kept from starting).
//! A second run checks with `dpkg-query` and does nothing. `run`, `test` and `bench` call
//! `setup` with the subset they need. The eBPF toolchain (bpf-linker built against Debian's
//! LLVM 22) is installed here too: see `ebpf_toolchain`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::procs::{self, Signals};

/// Everything `cargo xtask setup` installs.
pub const ALL: [&str; 15] = [
    "curl",
    "wrk",
    "nginx",
    "libnginx-mod-stream",
    "haproxy",
    "openssl",
    "tmux",
    "strace",
    "python3-h2",
    "nghttp2-client",
    "python3-grpcio",
    "libcap2-bin",
    "etcd-server",
    "bird2",
    "tcpdump",
];
/// What `cargo xtask run` needs (for the curl commands it prints).
pub const RUN: [&str; 1] = ["curl"];
/// What the test suite uses: curl and wrk drive the end-to-end tests, openssl the TLS origins
/// of the TCP passthrough tests, tmux the terminal `lbctl top` draws in, strace counts a
/// worker's syscalls per request, python3-h2 writes the HTTP/2 frames lb-proxy's h2 tests read
/// and drives lbd's HTTP/2 end-to-end tests, whose load generator is nghttp2-client's h2load,
/// python3-grpcio is the gRPC client and server of lbd's gRPC end-to-end tests, nginx the h2c
/// backend of its HTTP/2-to-backends tests, and libcap2-bin's capsh runs lbd without
/// CAP_NET_ADMIN in a per-client limits test, and etcd-server the etcd that the `[sync]` test
/// shares between two lbd processes, and bird2 the BGP routers of the `[bgp]` test.
pub const TEST: [&str; 12] = [
    "curl",
    "wrk",
    "nginx",
    "openssl",
    "tmux",
    "strace",
    "python3-h2",
    "nghttp2-client",
    "python3-grpcio",
    "libcap2-bin",
    "etcd-server",
    "bird2",
];
/// The HTTP/2 conformance suite the tests run against an h2c listener (h2spec's cases in
/// Rust), from crates.io. `--locked`: its own lockfile's dependencies, the ones it builds
/// with (a fresh resolution picks a socket2 that one of them does not compile against).
pub const HTTPWG_CLI: &str = "0.2.5";

/// Installs `httpwg-cli` with cargo unless that version is there already.
pub fn httpwg() -> Result<()> {
    let listed = procs::output(Command::new("cargo").args(["install", "--list"]))
        .context("running cargo install --list")?;
    let wanted = format!("httpwg-cli v{HTTPWG_CLI}:");
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.starts_with(&wanted))
    {
        println!("xtask setup: httpwg-cli {HTTPWG_CLI} already installed");
        return Ok(());
    }
    let started = Instant::now();
    let status = Command::new("cargo")
        .args(["install", "httpwg-cli", "--version", HTTPWG_CLI, "--locked"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(std::process::Stdio::null())
        .status()
        .context("starting cargo install httpwg-cli")?;
    if !status.success() {
        bail!("cargo install httpwg-cli {HTTPWG_CLI} --locked failed ({status})");
    }
    println!(
        "xtask setup: installed httpwg-cli {HTTPWG_CLI} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What `cargo xtask bench` needs: the load generator and the proxies to compare with (nginx
/// with its stream module, for TCP passthrough), strace (syscalls per request) and tcpdump
/// (where a scenario's connections wait).
pub const BENCH: [&str; 8] = [
    "curl",
    "wrk",
    "nginx",
    "libnginx-mod-stream",
    "haproxy",
    "strace",
    "nghttp2-client",
    "tcpdump",
];

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// `cargo xtask setup` and what `run`, `test` and `bench` call first.
pub fn setup(signals: &Signals, packages: &[&str]) -> Result<()> {
    let started = Instant::now();
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        println!(
            "xtask setup: nothing to do, already installed: {}",
            packages.join(" ")
        );
    } else {
        install(signals, &missing)?;
        let missing_refs: Vec<&str> = missing.iter().map(String::as_str).collect();
        let still = missing_packages(&missing_refs)?;
        if !still.is_empty() {
            bail!(
                "apt-get finished but these packages are still not installed: {}",
                still.join(" ")
            );
        }
        println!(
            "xtask setup: installed {} in {:.1}s",
            missing.join(" "),
            started.elapsed().as_secs_f64()
        );
    }
    ebpf_toolchain(signals)
}

/// The eBPF toolchain that lbd's build script needs to build the steering program: Debian's
/// rustc-web with its prebuilt BPF `core`, LLVM 22 and bpf-linker 0.13.0 built against it
/// (see `ebpf.rs` and DESIGN.md, "The eBPF toolchain"). Checks first; a no-op when present.
fn ebpf_toolchain(_signals: &Signals) -> Result<()> {
    crate::ebpf::install_toolchain()
}

/// The packages of `packages` that dpkg does not report as "install ok installed".
pub fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    let output = procs::output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(packages),
    );
    let output = match output {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "dpkg-query not found: setup supports Debian and Ubuntu (apt) only; \
             install these yourself: {}",
            packages.join(" ")
        ),
        Err(error) => return Err(error).context("running dpkg-query"),
    };
    // dpkg-query exits 1 when a package is unknown to dpkg; the packages it lists are still
    // reported on stdout, so the exit status is not needed.
    Ok(parse_missing(
        &String::from_utf8_lossy(&output.stdout),
        packages,
    ))
}

fn parse_missing(dpkg_output: &str, packages: &[&str]) -> Vec<String> {
    let installed: Vec<&str> = dpkg_output
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        // Multi-arch packages are listed as name:arch.
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    packages
        .iter()
        .filter(|package| !installed.contains(package))
        .map(|package| (*package).to_string())
        .collect()
}

fn apt_install_line(packages: &[String]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Installs `packages` with apt, as root: the one way the project installs Debian packages
/// (the eBPF toolchain's packages belong here too). Without root it fails with the line to run.
pub fn install(signals: &Signals, packages: &[String]) -> Result<()> {
    install_from(signals, packages, None)
}

/// `install`, with the packages taken from `release` (`apt-get -t`) when given.
fn install_from(signals: &Signals, packages: &[String], release: Option<&str>) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "missing packages: {}. Installing them needs root; run as root:\n    {}\n\
             or run `cargo xtask setup` as root",
            packages.join(" "),
            apt_install_line(packages)
        );
    }
    let archives = crate::target_dir().join("apt-archives");
    std::fs::create_dir_all(archives.join("partial"))
        .with_context(|| format!("creating {}", archives.join("partial").display()))?;
    println!("xtask setup: installing {}", packages.join(" "));

    // Keep the packages' services from starting (nginx would take port 80): policy-rc.d
    // exiting 101 tells invoke-rc.d "not allowed". Removed afterwards if we created it.
    let _policy = PolicyRcD::deny_service_starts(Path::new(POLICY_RC_D))?;

    procs::run_step(
        signals,
        Command::new("apt-get")
            .args(["-q", "-o", "DPkg::Lock::Timeout=120", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let mut archives_dir = archives.into_os_string();
    archives_dir.push("/");
    let mut archives_opt = std::ffi::OsString::from("Dir::Cache::Archives=");
    archives_opt.push(&archives_dir);
    procs::run_step(
        signals,
        Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(["-o", "DPkg::Lock::Timeout=120", "-o"])
            .arg(archives_opt)
            .args(release.map(|r| ["-t", r]).into_iter().flatten())
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    remove_debs(Path::new(&archives_dir));
    Ok(())
}

/// What `cargo xtask vm-image` and `vm-test` need: debootstrap and mke2fs build the image,
/// qemu-img converts it, qemu-system-x86 boots it.
pub const VM: [&str; 4] = ["debootstrap", "e2fsprogs", "qemu-utils", "qemu-system-x86"];
/// Of those, the ones taken from backports: qemu-utils 10.0 from bookworm-backports comes
/// preinstalled on the build machines, and bookworm's qemu-system-x86 7.2 conflicts with it.
const VM_BACKPORTS: [&str; 2] = ["qemu-utils", "qemu-system-x86"];
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/kakehi-backports.sources";

/// The host packages of the appliance image (`VM`), installed idempotently like `setup`'s.
pub fn setup_vm(signals: &Signals) -> Result<()> {
    let started = Instant::now();
    let missing = missing_packages(&VM)?;
    if missing.is_empty() {
        println!(
            "xtask setup: nothing to do, already installed: {}",
            VM.join(" ")
        );
        return Ok(());
    }
    let (backports, plain): (Vec<String>, Vec<String>) = missing
        .iter()
        .cloned()
        .partition(|p| VM_BACKPORTS.contains(&p.as_str()));
    if !plain.is_empty() {
        install(signals, &plain)?;
    }
    if !backports.is_empty() {
        let release = format!("{}-backports", debian_codename()?);
        backports_source(&release)?;
        install_from(signals, &backports, Some(&release))?;
    }
    let still = missing_packages(&VM)?;
    if !still.is_empty() {
        bail!(
            "apt-get finished but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    println!(
        "xtask setup: installed {} in {:.1}s",
        missing.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `bookworm`, from /etc/os-release.
fn debian_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME: setup supports Debian only here")
}

/// Adds `release` (e.g. bookworm-backports) to apt's sources, from the machine's Debian
/// mirror, unless a source already names it. Backports have a low priority: only what is
/// asked for with `-t` comes from there.
fn backports_source(release: &str) -> Result<()> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            texts.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    if texts.iter().any(|t| names_suite(t, release)) {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{release} is not in apt's sources; adding it needs root: run `cargo xtask setup` as root");
    }
    let source = format!(
        "# Written by `cargo xtask setup`: qemu for the appliance image's boot test.\n\
         Types: deb\nURIs: {}\nSuites: {release}\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        crate::vm::debian_mirror()
    );
    std::fs::write(BACKPORTS_SOURCE, source)
        .with_context(|| format!("writing {BACKPORTS_SOURCE}"))?;
    println!("xtask setup: added {release} to apt's sources ({BACKPORTS_SOURCE})");
    Ok(())
}

/// True when an active line of an apt source names `suite`.
fn names_suite(text: &str, suite: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with("Suites:") || l.starts_with("deb "))
        .any(|l| l.split_whitespace().any(|w| w == suite))
}

/// The downloaded .deb files are not needed once installed.
fn remove_debs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A `/usr/sbin/policy-rc.d` that denies every service start, removed on drop when we wrote it.
struct PolicyRcD {
    created: Option<PathBuf>,
}

impl PolicyRcD {
    fn deny_service_starts(path: &Path) -> Result<Self> {
        if path.exists() {
            println!("xtask setup: keeping the existing {}", path.display());
            return Ok(Self { created: None });
        }
        let script =
            "#!/bin/sh\n# Written by `cargo xtask setup` while it installs packages.\nexit 101\n";
        std::fs::write(path, script).with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
        Ok(Self {
            created: Some(path.to_path_buf()),
        })
    }
}

impl Drop for PolicyRcD {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            if let Err(error) = std::fs::remove_file(path) {
                eprintln!("xtask setup: could not remove {}: {error}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_are_the_packages_not_fully_installed() {
        let out = "curl install ok installed\nnginx deinstall ok config-files\n\
                   libc6:amd64 install ok installed\n";
        let missing = parse_missing(out, &["curl", "wrk", "nginx", "libc6"]);
        assert_eq!(missing, ["wrk", "nginx"]);
    }

    #[test]
    fn policy_rc_d_is_removed_only_when_we_wrote_it() {
        let dir = std::env::temp_dir().join(format!("xtask-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy-rc.d");
        {
            let _guard = PolicyRcD::deny_service_starts(&path).unwrap();
            let script = std::fs::read_to_string(&path).unwrap();
            assert!(script.starts_with("#!/bin/sh") && script.contains("exit 101"));
        }
        assert!(!path.exists(), "ours is removed");
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        drop(PolicyRcD::deny_service_starts(&path).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "#!/bin/sh\nexit 0\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_suite_is_found_in_active_source_lines_only() {
        assert!(names_suite(
            "Suites: bookworm bookworm-backports\n",
            "bookworm-backports"
        ));
        assert!(names_suite(
            "deb http://x/debian bookworm-backports main\n",
            "bookworm-backports"
        ));
        assert!(!names_suite(
            "# deb http://x/debian bookworm-backports main\n",
            "bookworm-backports"
        ));
        assert!(!names_suite("Suites: bookworm\n", "bookworm-backports"));
    }

    #[test]
    fn the_root_hint_names_every_package() {
        let line = apt_install_line(&["wrk".into(), "nginx".into()]);
        assert!(
            line.ends_with("--no-install-recommends wrk nginx"),
            "{line}"
        );
    }
}
