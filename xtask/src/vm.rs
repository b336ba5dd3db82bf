//! `cargo xtask vm-image` and `cargo xtask vm-test`: the appliance VM image.
//!
//! Owns how the image is built from `vm-images/` and how it is booted and checked. The image
//! is a Debian bookworm system made by debootstrap (the package list is `vm-images/packages`;
//! the tree is cached under `target/vm/` keyed by that list and the mirror), overlaid with
//! `vm-images/rootfs/` (the systemd units, the default config, networkd's DHCP, the boot menu)
//! and the release `lbd` and `lbctl`. The disk is made without mounting anything (DESIGN.md,
//! "The appliance image"): an MBR partition table written here, `mke2fs -d` filling the
//! partition from the tree, GRUB's `boot.img` in the MBR and a `core.img` (from `grub-mkimage`
//! in the tree) in the gap after it, then `qemu-img convert` to qcow2. A second run with
//! the same inputs does nothing.
//!
//! `vm-test` (in `boot_test`) boots that image under qemu and checks it from the host and,
//! through the self-test unit of `vm-images/`, from inside the guest.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::{self, Proc, Signals, SpawnOptions};

mod boot_test;
pub use boot_test::{vm_test, TestArgs};

/// The Debian release of the image.
const SUITE: &str = "bookworm";
/// Used when no Debian mirror is found in the machine's apt sources.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The whole disk; the root file system fills it after the first MiB (the partition table
/// and GRUB's core.img). qcow2 stores only what is written.
const DISK_BYTES: u64 = 2 << 30;
/// Where the root partition starts: 1 MiB, in 512-byte sectors.
const PARTITION_START_SECTOR: u64 = 2048;
const SECTOR: u64 = 512;
/// The root file system's label: fstab and the kernel command line find it by this name.
const ROOT_LABEL: &str = "kakehi-root";
/// In a cached debootstrap tree: written once the tree is complete (what it was made from,
/// and when).
const BASE_MARKER: &str = ".kakehi-debootstrap-complete";
/// Every step that goes to the network or formats the disk is cut off after this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Bake this config into the image as /etc/kakehi/config.toml (validated first) instead of
    /// vm-images/rootfs/etc/kakehi/config.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Bootstrap the Debian tree again even if the cached one matches.
    #[arg(long)]
    pub fresh: bool,
    /// Take target/release/lbd and lbctl as they are instead of running cargo build.
    #[arg(long)]
    pub prebuilt: bool,
    /// Let root log in on the consoles with this password hash (`openssl passwd -6`);
    /// without it root has no password and the image has no login at all.
    #[arg(long, value_name = "HASH")]
    pub root_password_hash: Option<String>,
}

/// What `vm-image` produced: the paths `vm-test` boots.
pub struct Image {
    pub qcow2: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn vm_dir() -> PathBuf {
    crate::target_dir().join("vm")
}

/// The host packages the image build and the boot test need; qemu-system-x86 comes from
/// bookworm-backports, to match the preinstalled qemu-utils (DESIGN.md).
pub fn setup(signals: &Signals) -> Result<()> {
    crate::setup::setup_vm(signals)
}

pub fn vm_image(signals: &Signals, args: &ImageArgs) -> Result<Image> {
    let started = Instant::now();
    setup(signals)?;
    let root = crate::root();
    let (lbd, lbctl) = crate::release_binaries(signals, "vm-image", args.prebuilt)?;
    let images = root.join("vm-images");
    let config = match &args.config {
        Some(path) => path.clone(),
        None => images.join("rootfs/etc/kakehi/config.toml"),
    };
    procs::run_step(
        signals,
        Command::new(&lbd)
            .arg("--config")
            .arg(&config)
            .arg("--check"),
    )
    .with_context(|| format!("{} is not a valid kakehi config", config.display()))?;

    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = Image {
        qcow2: dir.join("kakehi.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let packages = read_packages(&images.join("packages"))?;
    let mirror = debian_mirror();
    let base = base_tree(signals, &dir, &packages, &mirror, args.fresh)?;

    let mut stamp = Stamp::default();
    stamp.file(&base.join(BASE_MARKER))?;
    stamp.file(&lbd)?;
    stamp.file(&lbctl)?;
    stamp.tree(&images)?;
    stamp.file(&config)?;
    stamp.text(args.root_password_hash.as_deref().unwrap_or(""));
    let stamp = stamp.finish();
    let stamp_path = dir.join("kakehi.qcow2.stamp");
    let fresh_enough = [&image.qcow2, &image.kernel, &image.initrd]
        .iter()
        .all(|p| p.exists());
    if fresh_enough && fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        println!(
            "xtask vm-image: {} is up to date ({:.0}s)",
            image.qcow2.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(image);
    }
    let _ = fs::remove_file(&stamp_path);

    let rootfs = dir.join("rootfs");
    assemble(signals, &base, &rootfs, &images, &config, &lbd, &lbctl)?;
    if let Some(hash) = &args.root_password_hash {
        run_bounded(
            signals,
            Command::new("chroot")
                .arg(&rootfs)
                .args(["usermod", "--password", hash, "root"]),
            STEP_TIMEOUT,
        )?;
    }
    let core_img = grub_core(signals, &rootfs)?;
    copy_boot_files(&rootfs, &image)?;
    let raw = dir.join("disk.raw");
    make_disk(signals, &rootfs, &raw, &core_img)?;
    println!("\nxtask vm-image: qemu-img convert -O qcow2");
    let tmp_qcow2 = dir.join("kakehi.qcow2.tmp");
    run_bounded(
        signals,
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&tmp_qcow2),
        STEP_TIMEOUT,
    )?;
    fs::rename(&tmp_qcow2, &image.qcow2)?;
    let _ = fs::remove_file(&raw);
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    fs::write(&stamp_path, &stamp)?;
    let size = fs::metadata(&image.qcow2)?.len();
    println!(
        "\nxtask vm-image: {} ({} MiB, {} GiB disk) built in {:.0}s\n  \
         boot it: qemu-system-x86_64 -m 1024 -nographic -drive file={},if=virtio,format=qcow2 \
         -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:8080-:80",
        image.qcow2.display(),
        size >> 20,
        DISK_BYTES >> 30,
        started.elapsed().as_secs_f64(),
        image.qcow2.display(),
    );
    Ok(image)
}

/// The package list: one name a line, `#` comments and blank lines ignored.
fn read_packages(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let packages = parse_packages(&text);
    if packages.is_empty() {
        bail!("{} lists no package", path.display());
    }
    Ok(packages)
}

fn parse_packages(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

/// The Debian mirror this machine's apt uses (the first `URIs:` of a deb822 source, or the
/// first `deb URI` line, that is not the security archive), else deb.debian.org.
pub fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "list" || e == "sources"))
        .filter_map(|f| fs::read_to_string(f).ok())
        .find_map(|text| mirror_in(&text))
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

fn mirror_in(sources: &str) -> Option<String> {
    let is_debian = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://"))
            && uri.trim_end_matches('/').ends_with("/debian")
    };
    sources.lines().find_map(|line| {
        let line = line.trim();
        let uri = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().next()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace().find(|w| !w.starts_with('['))
        } else {
            None
        }?;
        is_debian(uri).then(|| uri.trim_end_matches('/').to_string())
    })
}

/// The appliance image's Debian tree (debootstrap, cached under target/vm/): what
/// `cargo xtask dist-test` installs the package into.
pub fn debian_tree(signals: &Signals) -> Result<PathBuf> {
    setup(signals)?;
    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let packages = read_packages(&crate::root().join("vm-images").join("packages"))?;
    base_tree(signals, &dir, &packages, &debian_mirror(), false)
}

/// The debootstrap tree for `packages`, cached as `target/vm/base-<key>` (complete once its
/// marker file exists); other cached trees are removed.
fn base_tree(
    signals: &Signals,
    dir: &Path,
    packages: &[String],
    mirror: &str,
    fresh: bool,
) -> Result<PathBuf> {
    let mut key = Stamp::default();
    key.text(SUITE);
    key.text(mirror);
    for package in packages {
        key.text(package);
    }
    let key = key.finish();
    let base = dir.join(format!("base-{key}"));
    let marker = base.join(BASE_MARKER);
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("base-") && (path != base || fresh) {
            println!("xtask vm-image: removing {}", path.display());
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    if marker.exists() {
        println!(
            "xtask vm-image: reusing the debootstrap tree {}",
            base.display()
        );
        return Ok(base);
    }
    let started = Instant::now();
    println!(
        "\nxtask vm-image: debootstrap {SUITE} from {mirror} ({} packages, about 2 minutes)",
        packages.len()
    );
    // A second try when the first fails: a download from the mirror can fail once.
    for attempt in 1..=2 {
        if base.exists() {
            // An earlier debootstrap that did not finish.
            fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))?;
        }
        let result = run_bounded(
            signals,
            Command::new("debootstrap")
                .args(["--variant=minbase", "--merged-usr"])
                .arg(format!("--include={}", packages.join(",")))
                .arg(SUITE)
                .arg(&base)
                .arg(mirror),
            STEP_TIMEOUT,
        );
        match result {
            Ok(()) => break,
            Err(error) if attempt == 1 && signals.stop_requested()?.is_none() => {
                eprintln!("xtask vm-image: {error:#}; trying once more");
            }
            Err(error) => return Err(error),
        }
    }
    // debootstrap leaves a package it could not configure half-installed and still exits 0.
    let broken = procs::output(Command::new("chroot").arg(&base).args([
        "dpkg-query",
        "-W",
        "-f=${Package} ${Status}\\n",
    ]))?;
    let broken: Vec<String> = String::from_utf8_lossy(&broken.stdout)
        .lines()
        .filter(|l| !l.ends_with("install ok installed"))
        .map(str::to_string)
        .collect();
    if !broken.is_empty() {
        bail!(
            "debootstrap left packages not installed: {} (see {}/debootstrap/debootstrap.log)",
            broken.join(", "),
            base.display()
        );
    }
    // Downloaded packages are not needed in the image.
    remove_matching(&base.join("var/cache/apt/archives"), ".deb")?;
    // When it was made goes in too: the image's stamp hashes this file, so a fresh debootstrap
    // (newer package versions, same list) rebuilds the image.
    let made = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    fs::write(
        &marker,
        format!(
            "{SUITE} {mirror}\nmade at {made} (unix time)\n{}\n",
            packages.join("\n")
        ),
    )?;
    println!(
        "xtask vm-image: debootstrap done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(base)
}

fn remove_matching(dir: &Path, suffix: &str) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(suffix) {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

/// The image's tree: a copy of the debootstrap tree, the overlay, the binaries, the config,
/// the kakehi user, the enabled units, and a machine id left for the first boot to make.
fn assemble(
    signals: &Signals,
    base: &Path,
    rootfs: &Path,
    images: &Path,
    config: &Path,
    lbd: &Path,
    lbctl: &Path,
) -> Result<()> {
    println!("\nxtask vm-image: assembling {}", rootfs.display());
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    run_bounded(
        signals,
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(base)
            .arg(rootfs),
        STEP_TIMEOUT,
    )?;
    let _ = fs::remove_file(rootfs.join(BASE_MARKER));
    copy_overlay(&images.join("rootfs"), rootfs)?;
    install_file(config, &rootfs.join("etc/kakehi/config.toml"), 0o644)?;
    install_file(lbd, &rootfs.join("usr/sbin/lbd"), 0o755)?;
    install_file(lbctl, &rootfs.join("usr/bin/lbctl"), 0o755)?;
    // The grub modules the boot menu loads, where core.img's prefix points.
    copy_overlay(
        &rootfs.join("usr/lib/grub/i386-pc"),
        &rootfs.join("boot/grub/i386-pc"),
    )?;

    let chroot = |args: &[&str]| -> Result<()> {
        run_bounded(
            signals,
            Command::new("chroot").arg(rootfs).args(args),
            STEP_TIMEOUT,
        )
    };
    chroot(&["systemd-sysusers"])?;
    chroot(&[
        "systemctl",
        "enable",
        "kakehi.service",
        "kakehi-selftest.service",
        "systemd-networkd.service",
        "systemd-resolved.service",
        // bird2: announces the VIP of a [bgp] section (it announces nothing without one).
        "bird.service",
    ])?;
    // First boot must not wait for someone to type a locale and a root password on the
    // console: the appliance has no interactive setup.
    chroot(&["systemctl", "mask", "systemd-firstboot.service"])?;
    // Each VM makes its own machine id (and so its own DHCP client id) on first boot.
    fs::write(rootfs.join("etc/machine-id"), "")?;
    let _ = fs::remove_file(rootfs.join("var/lib/dbus/machine-id"));
    let resolv = rootfs.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)?;
    Ok(())
}

/// Copies the files of `from` into `to`, keeping the tree's shape: directories 0755, files
/// 0755 when executable in `from`, else 0644, all owned by whoever runs this (root).
fn copy_overlay(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries: Vec<_> = fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_overlay(&src, &dst)?;
        } else if kind.is_file() {
            let executable = entry.metadata()?.permissions().mode() & 0o111 != 0;
            install_file(&src, &dst, if executable { 0o755 } else { 0o644 })?;
        } else {
            bail!(
                "{}: only files and directories belong in the overlay",
                src.display()
            );
        }
    }
    Ok(())
}

fn install_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let _ = fs::remove_file(to);
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", to.display()))
}

/// GRUB's core.img for a BIOS boot from this disk: it finds the ext4 partition by itself
/// (`(hd0,msdos1)`) and reads the boot menu and its modules from /boot/grub there. Made with
/// the image's own grub-mkimage, so the host needs no GRUB.
fn grub_core(signals: &Signals, rootfs: &Path) -> Result<PathBuf> {
    let inside = "/tmp/kakehi-core.img";
    run_bounded(
        signals,
        Command::new("chroot").arg(rootfs).args([
            "grub-mkimage",
            "--format=i386-pc",
            "--prefix=(hd0,msdos1)/boot/grub",
            "--output",
            inside,
            "biosdisk",
            "part_msdos",
            "ext2",
        ]),
        STEP_TIMEOUT,
    )?;
    let core = vm_dir().join("core.img");
    fs::rename(rootfs.join(inside.trim_start_matches('/')), &core)?;
    Ok(core)
}

/// The kernel and initramfs the tree's /vmlinuz and /initrd.img point at, for booting with
/// qemu's -kernel/-initrd.
fn copy_boot_files(rootfs: &Path, image: &Image) -> Result<()> {
    for (link, to) in [("vmlinuz", &image.kernel), ("initrd.img", &image.initrd)] {
        let target = fs::read_link(rootfs.join(link))
            .with_context(|| format!("/{link} in the image is not a symlink to the kernel"))?;
        let from = rootfs.join(target.strip_prefix("/").unwrap_or(&target));
        install_file(&from, to, 0o644)?;
    }
    Ok(())
}

/// The raw disk: MBR with one bootable Linux partition from 1 MiB to the end, GRUB's boot.img
/// in the MBR's code area and core.img right after it, and the ext4 file system made from
/// the tree by `mke2fs -d` inside the partition (no mount, no loop device).
fn make_disk(signals: &Signals, rootfs: &Path, raw: &Path, core_img: &Path) -> Result<()> {
    println!(
        "\nxtask vm-image: mke2fs -d (ext4 '{ROOT_LABEL}') into {}",
        raw.display()
    );
    let _ = fs::remove_file(raw);
    let disk = fs::File::create(raw).with_context(|| format!("creating {}", raw.display()))?;
    disk.set_len(DISK_BYTES)?;
    let partition_bytes = DISK_BYTES - PARTITION_START_SECTOR * SECTOR;
    run_bounded(
        signals,
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", ROOT_LABEL])
            // Features GRUB 2.06 cannot read, and that a 2 GiB disk does not need.
            .args(["-O", "^metadata_csum_seed,^orphan_file"])
            .arg("-E")
            .arg(format!("offset={}", PARTITION_START_SECTOR * SECTOR))
            .arg("-d")
            .arg(rootfs)
            .arg(raw)
            .arg(format!("{}k", partition_bytes / 1024)),
        STEP_TIMEOUT,
    )?;
    let boot_img = fs::read(rootfs.join("usr/lib/grub/i386-pc/boot.img"))?;
    let core = fs::read(core_img)?;
    let mbr = mbr(&boot_img, &core)?;
    disk.write_all_at(&mbr, 0)?;
    disk.write_all_at(&core, SECTOR)?;
    disk.sync_all()?;
    Ok(())
}

/// Sector 0: boot.img's code (its first 440 bytes, which jump to core.img at sector 1), a
/// disk signature, one bootable partition of type 0x83 from `PARTITION_START_SECTOR` to the
/// end of the disk, and the 0x55AA signature. core.img must fit before the partition.
fn mbr(boot_img: &[u8], core_img: &[u8]) -> Result<[u8; 512]> {
    if boot_img.len() != 512 {
        bail!("GRUB's boot.img is {} bytes, not 512", boot_img.len());
    }
    let gap = (PARTITION_START_SECTOR - 1) * SECTOR;
    if core_img.len() as u64 > gap {
        bail!(
            "core.img ({} bytes) does not fit in the {gap} bytes before the partition",
            core_img.len()
        );
    }
    let mut mbr = [0u8; 512];
    mbr[..440].copy_from_slice(&boot_img[..440]);
    mbr[440..444].copy_from_slice(&0x6b61_6b65_u32.to_le_bytes());
    let sectors = u32::try_from(DISK_BYTES / SECTOR - PARTITION_START_SECTOR)?;
    let start = u32::try_from(PARTITION_START_SECTOR)?;
    let entry = &mut mbr[446..462];
    entry[0] = 0x80; // bootable
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use the LBA fields
    entry[4] = 0x83; // Linux
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    Ok(mbr)
}

/// Runs `cmd` like `procs::run_step`, but stops it (SIGTERM, then SIGKILL) and fails once
/// `timeout` has passed.
fn run_bounded(signals: &Signals, cmd: &mut Command, timeout: Duration) -> Result<()> {
    let line = procs::display(cmd);
    cmd.stdin(std::process::Stdio::null());
    let name = Path::new(cmd.get_program())
        .file_name()
        .map_or_else(|| "?".into(), |n| n.to_string_lossy().into_owned());
    let mut proc = Proc::spawn(&name, cmd, SpawnOptions::default())?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.try_exited()? {
            if !status.success() {
                bail!("`{line}` failed: {}", procs::describe(status));
            }
            return Ok(());
        }
        if let Some(signal) = signals.wait(Duration::from_millis(200))? {
            proc.stop();
            bail!("interrupted by {signal}: stopped `{line}`");
        }
        if Instant::now() >= deadline {
            proc.stop();
            bail!("`{line}` took more than {}s: stopped", timeout.as_secs());
        }
    }
}

/// A cache key: a hash of names, file contents and modes.
#[derive(Default)]
struct Stamp(DefaultHasher);

impl Stamp {
    fn text(&mut self, text: &str) {
        self.0.write(text.as_bytes());
        self.0.write_u8(0);
    }

    fn file(&mut self, path: &Path) -> Result<()> {
        let mut file =
            fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        self.0.write_u32(file.metadata()?.permissions().mode());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.0.write(&buf[..n]);
        }
        Ok(())
    }

    fn tree(&mut self, dir: &Path) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.flatten().collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            self.text(&entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                self.tree(&entry.path())?;
            } else {
                self.file(&entry.path())?;
            }
        }
        Ok(())
    }

    fn finish(self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_list_skips_comments_and_blank_lines() {
        let text = "# head\n\nlinux-image-cloud-amd64\nudev  # why\n  busybox\n";
        assert_eq!(
            parse_packages(text),
            ["linux-image-cloud-amd64", "udev", "busybox"]
        );
    }

    #[test]
    fn the_mirror_comes_from_either_sources_format() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/x\n\
                      URIs: http://mirror.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let list = "deb [arch=amd64] http://deb.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(list).as_deref(),
            Some("http://deb.example/debian")
        );
        let security = "URIs: http://deb.debian.org/debian-security\n";
        assert_eq!(mirror_in(security), None);
    }

    #[test]
    fn the_mbr_has_one_bootable_partition_to_the_end_and_the_boot_code() {
        let boot = [0x90u8; 512];
        let sector = mbr(&boot, &[0u8; 30_000]).unwrap();
        assert_eq!(&sector[..440], &boot[..440]);
        assert_eq!(sector[446], 0x80);
        assert_eq!(sector[450], 0x83);
        let start = u32::from_le_bytes(sector[454..458].try_into().unwrap());
        let count = u32::from_le_bytes(sector[458..462].try_into().unwrap());
        assert_eq!(u64::from(start), PARTITION_START_SECTOR);
        assert_eq!((u64::from(start) + u64::from(count)) * SECTOR, DISK_BYTES);
        assert_eq!(
            &sector[462..510],
            &[0u8; 48][..],
            "the other three entries are empty"
        );
        assert_eq!(sector[510..], [0x55, 0xaa]);
        assert!(
            mbr(&boot, &vec![0u8; 1 << 20]).is_err(),
            "core.img too big for the gap"
        );
        assert!(mbr(&boot[..440], &[]).is_err());
    }

    #[test]
    fn the_stamp_changes_with_content_and_names() {
        let stamp = |parts: &[&str]| {
            let mut s = Stamp::default();
            parts.iter().for_each(|p| s.text(p));
            s.finish()
        };
        assert_eq!(stamp(&["a", "b"]), stamp(&["a", "b"]));
        assert_ne!(stamp(&["a", "b"]), stamp(&["ab"]));
    }
}
