//! The eBPF toolchain and `cargo xtask build-ebpf`.
//!
//! Owns how the machine gets what building `ebpf/steer` needs (DESIGN.md, "The eBPF
//! toolchain"): Debian's `rustc-web` 1.96 with its prebuilt `core` for `bpfel-unknown-none`,
//! reached as `rustup run /usr`, and bpf-linker 0.13.0 built against Debian's LLVM 22. Both
//! installs check first, so a second run is a fast no-op. It also owns `build-ebpf`: build the
//! program the way `cargo build` does (lbd's build script, through aya-build), find the object
//! in the build script's OUT_DIR, prove that the kernel's verifier accepts it (lbd's
//! `steering` test loads it with lbd's own loader inside a fresh network namespace), and
//! print its path, size and instruction count. The program itself, its loader and its tests
//! live in `ebpf/` and `userspace/lbd`; the wiring of these functions into the command line is
//! `main.rs`'s.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The Debian packages of the eBPF toolchain, all from bookworm-security:
/// - `rustc-web`, `cargo-web`, `libstd-rust-web-dev`: rustc/cargo 1.96 (LLVM 22) in /usr;
/// - `libstd-rust-web-dev-bpf`: the prebuilt `core` for bpfel-unknown-none (no -Zbuild-std);
/// - `llvm-22-dev`: libLLVM 22, which bpf-linker links (dynamically) and must match rustc's LLVM.
pub const APT_PACKAGES: [&str; 5] = [
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];

/// The bpf-linker release that links LLVM 22 bitcode (the `llvm-22` feature).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where Debian's LLVM 22 lives; bpf-linker's and llvm-sys' build scripts are pointed at it,
/// or they pick the first `llvm-config` on PATH (LLVM 14 here) and fail to link.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The custom toolchain aya-build runs (`rustup run /usr cargo build ...`).
const DEBIAN_TOOLCHAIN: &str = "/usr";

/// Installs what building the eBPF program needs, idempotently: the missing Debian packages
/// (apt, as root, no stdin, a private archive directory, a lock timeout) and bpf-linker
/// 0.13.0 (`cargo install`) unless `bpf-linker --version` already reports it.
pub fn install_toolchain() -> Result<()> {
    let started = Instant::now();
    let missing = missing_packages(&APT_PACKAGES)?;
    let mut did = Vec::new();
    if !missing.is_empty() {
        apt_install(&missing)?;
        let still = missing_packages(&APT_PACKAGES)?;
        if !still.is_empty() {
            bail!(
                "apt-get finished but these packages are still not installed: {}",
                still.join(" ")
            );
        }
        did.push(missing.join(" "));
    }
    check_debian_toolchain()?;
    if bpf_linker_version().as_deref() != Some(BPF_LINKER_VERSION) {
        install_bpf_linker()?;
        did.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    if did.is_empty() {
        println!(
            "xtask ebpf: toolchain already installed ({}, bpf-linker {BPF_LINKER_VERSION}) \
             [{:.1}s]",
            APT_PACKAGES.join(" "),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "xtask ebpf: installed {} in {:.1}s",
            did.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `cargo xtask build-ebpf`: installs the toolchain if missing, builds the program through
/// lbd's build script (the path `cargo build` takes), loads it into the kernel with lbd's
/// loader in a fresh network namespace, and prints the object's path, size and instruction
/// counts.
pub fn build_ebpf() -> Result<()> {
    install_toolchain()?;
    let root = crate::root();
    let started = Instant::now();
    let out_dir = build_lbd(&root)?;
    let object = out_dir.join("lb-ebpf");
    let bytes = std::fs::read(&object)
        .with_context(|| format!("reading the eBPF object {}", object.display()))?;
    let programs = elf_programs(&bytes)
        .with_context(|| format!("reading the ELF sections of {}", object.display()))?;
    println!(
        "xtask build-ebpf: built in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!("object: {}", object.display());
    println!("size: {} bytes", bytes.len());
    for (section, instructions) in &programs {
        println!("program section {section}: {instructions} instructions in the object");
    }

    let report = crate::target_dir().join("ebpf-load-report.txt");
    let _ = std::fs::remove_file(&report);
    let status = Command::new("cargo")
        .current_dir(&root)
        .args([
            "test",
            "-p",
            "lbd",
            "--test",
            "steering",
            "--",
            "--exact",
            "verifier_accepts_the_program",
        ])
        .env("KAKEHI_EBPF_LOAD_REPORT", &report)
        .stdin(Stdio::null())
        .status()
        .context("running cargo test -p lbd --test steering")?;
    if !status.success() {
        bail!(
            "loading {} into the kernel failed ({status}); the test's output above has the \
             verifier log",
            object.display()
        );
    }
    let text = std::fs::read_to_string(&report).with_context(|| {
        format!(
            "the load test passed but wrote no report at {}",
            report.display()
        )
    })?;
    println!("verifier: accepted");
    print!("{text}");
    Ok(())
}

/// `cargo build -p lbd`, returning the OUT_DIR of lbd's build script (where aya-build copies
/// the object).
fn build_lbd(root: &Path) -> Result<PathBuf> {
    let output = Command::new("cargo")
        .current_dir(root)
        .args([
            "build",
            "-p",
            "lbd",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build -p lbd")?;
    if !output.status.success() {
        bail!("cargo build -p lbd failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    lbd_out_dir(&stdout).context(
        "cargo build -p lbd reported no build-script-executed message for lbd: \
         is userspace/lbd/build.rs there?",
    )
}

/// The `out_dir` of lbd's build-script-executed message in cargo's JSON message stream.
fn lbd_out_dir(json_lines: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "build-script-executed")
        .filter(|msg| {
            let id = msg["package_id"].as_str().unwrap_or_default();
            // "path+file:///…/userspace/lbd#0.1.0" (cargo >= 1.77) or "lbd 0.1.0 (path+…)".
            id.contains("/userspace/lbd#") || id.starts_with("lbd ")
        })
        .find_map(|msg| msg["out_dir"].as_str().map(PathBuf::from))
}

/// The executable program sections of an ELF64 little-endian BPF object, with their
/// instruction counts (8 bytes a slot; a 64-bit immediate load takes two).
fn elf_programs(elf: &[u8]) -> Result<Vec<(String, usize)>> {
    fn u16_at(b: &[u8], at: usize) -> Option<usize> {
        Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?).into())
    }
    fn u64_at(b: &[u8], at: usize) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
    }
    fn u32_at(b: &[u8], at: usize) -> Option<usize> {
        usize::try_from(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)).ok()
    }
    const SHF_EXECINSTR: usize = 0x4;
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not an ELF64 little-endian file");
    }
    let parse = || -> Option<Vec<(String, usize)>> {
        let shoff = u64_at(elf, 0x28)?;
        let shentsize = u16_at(elf, 0x3a)?;
        let shnum = u16_at(elf, 0x3c)?;
        let shstrndx = u16_at(elf, 0x3e)?;
        let header = |i: usize| shoff + i * shentsize;
        let strtab = u64_at(elf, header(shstrndx) + 0x18)?;
        let mut programs = Vec::new();
        for i in 0..shnum {
            let h = header(i);
            let flags = u64_at(elf, h + 0x08)?;
            let size = u64_at(elf, h + 0x20)?;
            if flags & SHF_EXECINSTR == 0 || size == 0 {
                continue;
            }
            let name_at = strtab + u32_at(elf, h)?;
            let name = elf.get(name_at..)?;
            let end = name.iter().position(|&b| b == 0)?;
            let name = String::from_utf8_lossy(name.get(..end)?).into_owned();
            programs.push((name, size / 8));
        }
        Some(programs)
    };
    parse().context("truncated or malformed section headers")
}

/// The packages of `packages` that dpkg does not report as "install ok installed".
fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query: the eBPF toolchain install supports Debian only")?;
    // dpkg-query exits 1 when it knows nothing of a package; the others are still listed.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(packages
        .iter()
        .filter(|package| !installed.contains(package))
        .map(|package| (*package).to_string())
        .collect())
}

fn apt_install(packages: &[String]) -> Result<()> {
    let line = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        packages.join(" ")
    );
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the eBPF toolchain is missing {}; installing it needs root. Run as root:\n    {line}\n\
             or run `cargo xtask setup` as root",
            packages.join(" ")
        );
    }
    // A private archive directory: another apt run's cleanup hook on this image can delete
    // the shared cache's .debs in the middle of our install.
    let archives = crate::target_dir().join("apt-archives");
    std::fs::create_dir_all(archives.join("partial"))
        .with_context(|| format!("creating {}", archives.join("partial").display()))?;
    let mut archives_opt = OsString::from("Dir::Cache::Archives=");
    archives_opt.push(archives.as_os_str());
    archives_opt.push("/");
    println!("xtask ebpf: apt-get install {}", packages.join(" "));
    run(Command::new("apt-get")
        .args(["-q", "-o", "DPkg::Lock::Timeout=120", "update"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["-q", "install", "-y", "--no-install-recommends"])
        .args(["-o", "DPkg::Lock::Timeout=120", "-o"])
        .arg(&archives_opt)
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    remove_debs(&archives);
    Ok(())
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

/// Checks that `rustup run /usr` reaches Debian's rustc and that its BPF `core` is there:
/// aya-build needs both, and a clear message here beats a linker error later.
fn check_debian_toolchain() -> Result<()> {
    let core = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib");
    if !core.is_dir() {
        bail!(
            "{} is missing: libstd-rust-web-dev-bpf did not install the BPF core library",
            core.display()
        );
    }
    let output = Command::new("rustup")
        .args(["run", DEBIAN_TOOLCHAIN, "rustc", "--version"])
        .stdin(Stdio::null())
        .output()
        .context("running `rustup run /usr rustc --version` (is rustup installed?)")?;
    if !output.status.success() {
        bail!(
            "`rustup run /usr rustc --version` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The version `bpf-linker --version` reports ("bpf-linker 0.13.0"), if one is installed.
fn bpf_linker_version() -> Option<String> {
    let output = Command::new(bpf_linker_path())
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.split_whitespace().nth(1).map(str::to_string)
}

/// `bpf-linker` where `cargo install` puts it ($CARGO_HOME/bin), else whatever PATH finds.
fn bpf_linker_path() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    match cargo_home.map(|home| home.join("bin/bpf-linker")) {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("bpf-linker"),
    }
}

fn install_bpf_linker() -> Result<()> {
    println!(
        "xtask ebpf: cargo install bpf-linker {BPF_LINKER_VERSION} (llvm-22, against \
         {LLVM_PREFIX})"
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg("llvm-22")
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        // The host toolchain builds bpf-linker, whatever directory this runs from.
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    match bpf_linker_version() {
        Some(version) if version == BPF_LINKER_VERSION => Ok(()),
        other => bail!(
            "cargo install finished but `bpf-linker --version` reports {other:?}, \
             not {BPF_LINKER_VERSION}"
        ),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lbd_out_dir_in_cargo_messages() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/config#lb-config@0.1.0"}
{"reason":"build-script-executed","package_id":"registry+https://github.com/rust-lang/crates.io-index#libc@0.2.1","out_dir":"/t/libc"}
{"reason":"build-script-executed","package_id":"path+file:///w/userspace/lbd#0.1.0","out_dir":"/t/build/lbd-1/out"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(lbd_out_dir(json), Some(PathBuf::from("/t/build/lbd-1/out")));
        assert_eq!(lbd_out_dir("{\"reason\":\"build-finished\"}"), None);
    }

    #[test]
    fn rejects_what_is_not_an_elf64_object() {
        assert!(elf_programs(b"not an elf").is_err());
        assert!(elf_programs(b"\x7fELF\x02\x01\x01").is_err());
    }
}
