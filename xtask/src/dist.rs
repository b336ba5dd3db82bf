//! `cargo xtask dist`: kakehi as a Debian package, and `cargo xtask dist-test`, which installs
//! it with apt into a Debian 12 tree and sees it serve.
//!
//! Owns the package's layout: the release `lbd` (/usr/sbin) and `lbctl` (/usr/bin), the
//! appliance's systemd unit and sysusers entry (from `vm-images/rootfs/`), the appliance's
//! default config as a conffile (/etc/kakehi/config.toml), manual pages rendered by clap_mangen
//! (`lbd --manpage`, `lbctl manpage`) and lbctl's shell completions (`lbctl completions`). The
//! maintainer scripts create the `kakehi` user and enable the unit when systemd runs. The
//! package is built with `dpkg-deb` from a staged tree; no cargo-deb.
//!
//! The install test reuses the appliance image's cached debootstrap tree (Debian bookworm, see
//! `vm.rs`), copies it, runs `apt-get install ./kakehi_*.deb` in it with chroot, then starts the
//! installed lbd on the installed config inside a fresh network and mount namespace and expects
//! kakehi's own answer on port 80 (a 502: the default config's backend is a placeholder).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::procs::{self, Signals};

const PACKAGE: &str = "kakehi";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Take target/release/lbd and lbctl as they are instead of running cargo build.
    #[arg(long)]
    pub prebuilt: bool,
}

/// Builds target/kakehi_VERSION_ARCH.deb and returns its path.
pub fn dist(signals: &Signals, args: &Args) -> Result<PathBuf> {
    let root = crate::root();
    let (lbd, lbctl) = crate::release_binaries(signals, "dist", args.prebuilt)?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = text_of(Command::new("dpkg").arg("--print-architecture"))?;
    let stage = crate::target_dir()
        .join("dist")
        .join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let rootfs = root.join("vm-images/rootfs");
    let put = |relative: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let path = stage.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    };
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));

    put("usr/sbin/lbd", &read(&lbd)?, 0o755)?;
    put("usr/bin/lbctl", &read(&lbctl)?, 0o755)?;
    // The release profile keeps debug info (for perf); the package does not ship it.
    procs::run_step(
        signals,
        Command::new("strip")
            .arg("--strip-debug")
            .arg(stage.join("usr/sbin/lbd"))
            .arg(stage.join("usr/bin/lbctl")),
    )?;
    for unit in [
        "usr/lib/systemd/system/kakehi.service",
        "usr/lib/sysusers.d/kakehi.conf",
    ] {
        put(unit, &read(&rootfs.join(unit))?, 0o644)?;
    }
    put(
        "etc/kakehi/config.toml",
        &read(&rootfs.join("etc/kakehi/config.toml"))?,
        0o644,
    )?;
    let lbd_man = output_of(Command::new(&lbd).arg("--manpage"))?;
    put("usr/share/man/man8/lbd.8.gz", &gzip(&lbd_man)?, 0o644)?;
    let lbctl_man = output_of(Command::new(&lbctl).arg("manpage"))?;
    put("usr/share/man/man1/lbctl.1.gz", &gzip(&lbctl_man)?, 0o644)?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/lbctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_lbctl"),
        ("fish", "usr/share/fish/vendor_completions.d/lbctl.fish"),
    ] {
        let script = output_of(Command::new(&lbctl).args(["completions", shell]))?;
        put(path, &script, 0o644)?;
    }
    put(
        "usr/share/doc/kakehi/copyright",
        format!(
            "kakehi {version}: an eBPF-assisted L4/L7 load balancer.\nLicense: {}\n",
            env!("CARGO_PKG_LICENSE")
        )
        .as_bytes(),
        0o644,
    )?;

    let installed_kib = du_kib(&stage)?;
    put(
        "DEBIAN/control",
        format!(
            "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\n\
             Maintainer: kakehi developers <kakehi@example.invalid>\n\
             Depends: libc6 (>= 2.34), libgcc-s1\nSection: net\nPriority: optional\n\
             Installed-Size: {installed_kib}\n\
             Description: eBPF-assisted L4/L7 load balancer\n \
             lbd: HTTP/1.1 and HTTPS reverse proxy and TCP passthrough with sandboxed\n \
             worker processes, eBPF (sk_reuseport) connection steering, runtime\n \
             configuration and zero-downtime binary upgrades; lbctl: its operator tool.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    put("DEBIAN/conffiles", b"/etc/kakehi/config.toml\n", 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let deb = crate::target_dir().join(format!("{PACKAGE}_{version}_{arch}.deb"));
    procs::run_step(
        signals,
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("xtask dist: {}", deb.display());
    Ok(deb)
}

/// The `kakehi` user (sysusers, or adduser where systemd-sysusers is missing), then the unit
/// enabled and started when systemd runs (not in a chroot or a container build).
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/kakehi.conf
    elif ! getent passwd kakehi >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent kakehi
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable kakehi.service
        systemctl restart kakehi.service || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop kakehi.service || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ] && [ -d /run/systemd/system ]; then
    systemctl disable kakehi.service >/dev/null 2>&1 || true
fi
exit 0
"#;

/// Builds the package, installs it with apt into a copy of the appliance's Debian 12 tree,
/// checks what landed, and sees the installed lbd serve.
pub fn dist_test(signals: &Signals, args: &Args) -> Result<()> {
    let deb = dist(signals, args)?;
    let base = crate::vm::debian_tree(signals)?;
    let dir = crate::target_dir().join("dist").join("chroot");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!("\nxtask dist-test: a copy of {}", base.display());
    procs::run_step(
        signals,
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&base)
            .arg(&dir),
    )?;
    let file = deb.file_name().context("the package has no file name")?;
    fs::copy(&deb, dir.join("tmp").join(file)).context("copying the package into the tree")?;
    println!(
        "xtask dist-test: apt-get install /tmp/{}",
        file.to_string_lossy()
    );
    // In a mount namespace of its own, with /proc and /dev for apt and dpkg.
    let install = format!(
        "set -e\n\
         mount -t proc proc {dir}/proc\n\
         mount --rbind /dev {dir}/dev\n\
         DEBIAN_FRONTEND=noninteractive chroot {dir} apt-get install -y /tmp/{file}\n",
        dir = dir.display(),
        file = file.to_string_lossy()
    );
    procs::run_step(
        signals,
        Command::new("unshare")
            .args(["--mount", "--fork", "sh", "-c"])
            .arg(&install),
    )?;
    for path in [
        "usr/sbin/lbd",
        "usr/bin/lbctl",
        "usr/lib/systemd/system/kakehi.service",
        "etc/kakehi/config.toml",
        "usr/share/man/man8/lbd.8.gz",
        "usr/share/man/man1/lbctl.1.gz",
        "usr/share/bash-completion/completions/lbctl",
    ] {
        if !dir.join(path).is_file() {
            bail!("the installed package has no /{path}");
        }
    }
    let passwd = fs::read_to_string(dir.join("etc/passwd")).context("reading etc/passwd")?;
    if !passwd.lines().any(|l| l.starts_with("kakehi:")) {
        bail!("installing the package did not create the kakehi user");
    }
    // The installed lbd on the installed config, in namespaces of its own: its eBPF program
    // attaches in a fresh network namespace, /proc is mounted for it in the tree.
    let script = format!(
        "set -e\n\
         mount -t proc proc {dir}/proc\n\
         ip link set lo up\n\
         chroot {dir} /usr/sbin/lbd --config /etc/kakehi/config.toml --check\n\
         chroot {dir} /usr/sbin/lbd --config /etc/kakehi/config.toml 2>{dir}/tmp/lbd.log &\n\
         lbd=$!\n\
         code=000\n\
         for i in $(seq 1 100); do\n\
           code=$(curl -s -o {dir}/tmp/answer -w '%{{http_code}}' http://127.0.0.1:80/ || true)\n\
           [ \"$code\" = 502 ] && break\n\
           sleep 0.1\n\
         done\n\
         kill -TERM $lbd; wait $lbd || true\n\
         echo \"answer: $code\"\n\
         [ \"$code\" = 502 ] && grep -q 'Bad Gateway' {dir}/tmp/answer || {{ cat {dir}/tmp/lbd.log; exit 1; }}\n",
        dir = dir.display()
    );
    println!("xtask dist-test: the installed lbd serves port 80 (in its own namespaces)");
    procs::run_step(
        signals,
        Command::new("unshare")
            .args(["--mount", "--net", "--fork", "sh", "-c"])
            .arg(&script),
    )
    .context("the installed lbd did not answer on port 80")?;
    println!("xtask dist-test: installed with apt, started, answered: ok");
    Ok(())
}

fn output_of(cmd: &mut Command) -> Result<Vec<u8>> {
    let line = procs::display(cmd);
    let out = procs::output(cmd).with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed: {}\n{}",
            procs::describe(out.status),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn text_of(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_of(cmd)?).trim().to_owned())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("gzip")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip's writer panicked"))?
        .context("writing to gzip")?;
    if !out.status.success() {
        bail!("gzip failed: {}", procs::describe(out.status));
    }
    Ok(out.stdout)
}

fn du_kib(dir: &Path) -> Result<u64> {
    let text = text_of(Command::new("du").args(["-sk"]).arg(dir))?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sk {}: {text:?}", dir.display()))
}
