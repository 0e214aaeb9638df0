//! The kernels to boot: a Debian cloud kernel by name (fetched by `debian`), a package, an
//! unpacked package or a bare vmlinuz.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::debian;
use crate::{file_name, sh};

/// A kernel ready to boot: its image, release and the directory holding its modules.
pub(super) struct Kernel {
    pub(super) label: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) modules: Option<PathBuf>,
}

/// A Debian cloud kernel by name (`6.1`, `6.12`, `5.10`, `7.2`, `sid`: see `debian`); anything
/// else is a path to a `.deb`, an unpacked package directory, or a bare `vmlinuz` (no modules).
pub(super) fn fetch_kernel(vm_dir: &Path, spec: &str) -> Result<Kernel> {
    let path = match debian::fetch(vm_dir, spec)? {
        Some(path) => path,
        None => PathBuf::from(spec),
    };
    if path.is_file() && path.extension().is_none_or(|e| e != "deb") {
        return Ok(Kernel {
            label: file_name(&path),
            vmlinuz: path,
            modules: None,
        });
    }
    let dir = if path.is_dir() {
        path
    } else {
        let dir = vm_dir
            .join("kernels")
            .join(file_name(&path).replace(".deb", ""));
        if !dir.join("boot").is_dir() {
            fs::create_dir_all(&dir)?;
            sh(Command::new("dpkg").arg("-x").arg(&path).arg(&dir))?;
        }
        dir
    };
    unpacked_kernel(&dir)
}

/// The kernel in an unpacked package: boot/vmlinuz-RELEASE with lib/modules/RELEASE, or (the
/// split packages of Linux 7.x) usr/lib/modules/RELEASE/vmlinuz beside its modules.
fn unpacked_kernel(dir: &Path) -> Result<Kernel> {
    let in_boot = fs::read_dir(dir.join("boot"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| file_name(p).starts_with("vmlinuz-"));
    if let Some(vmlinuz) = in_boot {
        let release = file_name(&vmlinuz)
            .trim_start_matches("vmlinuz-")
            .to_string();
        let modules = dir.join("lib/modules").join(&release);
        return Ok(Kernel {
            label: release,
            modules: modules.is_dir().then_some(modules),
            vmlinuz,
        });
    }
    let beside_modules = fs::read_dir(dir.join("usr/lib/modules"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|m| m.join("vmlinuz").is_file());
    let modules = beside_modules.with_context(|| {
        format!(
            "{}: no boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz",
            dir.display()
        )
    })?;
    Ok(Kernel {
        label: file_name(&modules),
        vmlinuz: modules.join("vmlinuz"),
        modules: Some(modules),
    })
}
