//! Debian's cloud kernels fetched by name for the VM runner. `6.1` and `6.12` come from the
//! system's own suites (as they always have); `5.10` from Debian 11 (`bullseye`) and `7.N` or
//! `sid` from Debian unstable, through a source list of xtask's own under target/vm/apt/SUITE,
//! so the system's apt configuration is never touched. Since 6.19 Debian splits the kernel into
//! `linux-binary-*` (the vmlinuz under usr/lib/modules/RELEASE/) and `linux-modules-*` (`.ko.xz`):
//! both are unpacked into one directory, which the runner reads like an unpacked image package.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{file_name, sh};

/// Where a kernel named on the command line comes from.
enum Named {
    /// A package of the system's own suites (a meta-package is followed to its kernel).
    System(&'static str),
    /// One image package of another suite.
    Suite {
        suite: &'static str,
        package: &'static str,
    },
    /// The newest `linux-binary-PREFIX*-cloud-amd64` in sid, with its `linux-modules-*`.
    Split { prefix: String },
}

/// The kernel a name stands for, or None when `spec` is not one of the names.
fn named(spec: &str) -> Option<Named> {
    match spec {
        "6.1" => Some(Named::System("linux-image-cloud-amd64")),
        "6.12" => Some(Named::System("linux-image-6.12-cloud-amd64")),
        "5.10" => Some(Named::Suite {
            suite: "bullseye",
            package: "linux-image-5.10.0-32-cloud-amd64",
        }),
        "sid" => Some(Named::Split {
            prefix: String::new(),
        }),
        _ => {
            // `7` or `7.2`: the newest such release in sid (split packages, 7.x and later).
            let major: u32 = spec.split('.').next()?.parse().ok()?;
            let minor_ok = spec.split('.').skip(1).all(|p| p.parse::<u32>().is_ok());
            (major >= 7 && minor_ok && spec.split('.').count() <= 2).then(|| Named::Split {
                prefix: format!("{spec}."),
            })
        }
    }
}

/// The kernel named by `spec`, fetched (once, cached in target/vm/kernels): a `.deb` or an
/// unpacked directory. None when `spec` is no name (then it is a path).
pub(crate) fn fetch(vm_dir: &Path, spec: &str) -> Result<Option<PathBuf>> {
    let cache = vm_dir.join("kernels");
    fs::create_dir_all(&cache)?;
    let path = match named(spec) {
        None => return Ok(None),
        Some(Named::System(meta)) => {
            let pkg = system_package(meta)?;
            fetch_deb(&cache, &[], &pkg)?
        }
        Some(Named::Suite { suite, package }) => {
            let apt = SuiteApt::new(vm_dir, suite)?;
            fetch_deb(&cache, &apt.options(), package).or_else(|e| {
                // Lists read on an earlier day may name a version the mirror dropped since.
                eprintln!("xtask: {e:#}; reading the lists of {suite} again");
                apt.update()?;
                fetch_deb(&cache, &apt.options(), package)
            })?
        }
        Some(Named::Split { prefix }) => fetch_split(vm_dir, &cache, &prefix).or_else(|e| {
            eprintln!("xtask: {e:#}; reading the lists of sid again");
            SuiteApt::new(vm_dir, "sid")?.update()?;
            fetch_split(vm_dir, &cache, &prefix)
        })?,
    };
    Ok(Some(path))
}

/// The package a meta-package of the system's suites depends on (the meta itself when it
/// depends on nothing); `apt-get update` first if apt does not know it yet.
fn system_package(meta: &str) -> Result<String> {
    let depends = |meta: &str| -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", meta])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
    };
    match depends(meta) {
        Some(p) => Ok(p),
        None => {
            sh(Command::new("apt-get").args(["update", "-q"]))?;
            depends(meta).with_context(|| format!("apt-cache depends {meta}: no kernel package"))
        }
    }
}

/// `pkg`'s `.deb` in `cache`, downloaded with the apt `options` unless already there.
fn fetch_deb(cache: &Path, options: &[String], pkg: &str) -> Result<PathBuf> {
    let cached = || {
        fs::read_dir(cache)
            .ok()?
            .filter_map(std::result::Result::ok)
            .find_map(|e| {
                let name = file_name(&e.path());
                (name.starts_with(&format!("{pkg}_")) && name.ends_with(".deb")).then(|| e.path())
            })
    };
    if let Some(deb) = cached() {
        return Ok(deb);
    }
    eprintln!("xtask: downloading {pkg}...");
    sh(Command::new("apt-get")
        .args(options)
        // apt's _apt sandbox user cannot write into target/: download as ourselves.
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", pkg])
        .current_dir(cache))?;
    cached().with_context(|| format!("apt-get download {pkg} left no .deb"))
}

/// The newest split kernel in sid whose release starts with `prefix`, its binary and modules
/// packages unpacked into one directory (done once: an unpacked directory is reused).
fn fetch_split(vm_dir: &Path, cache: &Path, prefix: &str) -> Result<PathBuf> {
    let apt = SuiteApt::new(vm_dir, "sid")?;
    let binary = apt.newest_split(prefix)?;
    let release = binary
        .trim_start_matches("linux-binary-")
        .trim_end_matches("-cloud-amd64");
    let modules = format!("linux-modules-{release}-cloud-amd64");
    let dir = cache.join(format!("{release}-cloud-amd64-split"));
    if dir.join("usr/lib/modules").is_dir() {
        return Ok(dir);
    }
    let debs = [
        fetch_deb(cache, &apt.options(), &binary)?,
        fetch_deb(cache, &apt.options(), &modules)?,
    ];
    // Unpack beside, then rename: a half-unpacked directory is never taken for a whole one.
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    for deb in &debs {
        sh(Command::new("dpkg").arg("-x").arg(deb).arg(&partial))?;
    }
    fs::rename(&partial, &dir)?;
    Ok(dir)
}

/// apt pointed at one Debian suite through xtask's own source list and package lists.
struct SuiteApt {
    sources: PathBuf,
    lists: PathBuf,
}

impl SuiteApt {
    /// The suite's source list (the system's Debian mirror, main) and lists, updated once.
    fn new(vm_dir: &Path, suite: &str) -> Result<Self> {
        let dir = vm_dir.join("apt").join(suite);
        let apt = Self {
            sources: dir.join("sources.list"),
            lists: dir.join("lists"),
        };
        fs::create_dir_all(apt.lists.join("partial"))?;
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        let signed = if keyring.exists() {
            format!("[signed-by={}] ", keyring.display())
        } else {
            String::new()
        };
        let line = format!("deb {signed}{} {suite} main\n", debian_mirror());
        fs::write(&apt.sources, line)?;
        if !apt.has_lists()? {
            eprintln!("xtask: reading the package lists of Debian {suite}...");
            apt.update()?;
        }
        Ok(apt)
    }

    /// `apt-get update` of this suite's lists alone.
    fn update(&self) -> Result<()> {
        sh(Command::new("apt-get")
            .args(self.options())
            .args(["update", "-q"]))
    }

    /// The options that make one apt call use this suite alone.
    fn options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            format!("Dir::Etc::SourceList={}", self.sources.display()),
            "-o".into(),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "-o".into(),
            format!("Dir::State::Lists={}", self.lists.display()),
        ]
    }

    /// Whether an earlier update left a package index here.
    fn has_lists(&self) -> Result<bool> {
        Ok(fs::read_dir(&self.lists)?
            .filter_map(std::result::Result::ok)
            .any(|e| file_name(&e.path()).ends_with("_Packages")))
    }

    /// The newest `linux-binary-PREFIX*-cloud-amd64` package, by the release in its name.
    fn newest_split(&self, prefix: &str) -> Result<String> {
        let pattern = format!(
            "^linux-binary-{}.*-cloud-amd64$",
            prefix.replace('.', "\\.")
        );
        let out = Command::new("apt-cache")
            .args(self.options())
            .args(["search", "--names-only", &pattern])
            .output()?;
        let names = String::from_utf8_lossy(&out.stdout);
        let newest = names
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| release_numbers(name));
        match newest {
            Some(n) => Ok(n.to_string()),
            None => bail!("no package matches {pattern} in Debian sid"),
        }
    }
}

/// The numbers in a package name, in order (`linux-binary-7.2.13+deb14-…` -> [7, 2, 13, 14]).
fn release_numbers(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The Debian mirror the system's sources name (deb.debian.org when none is found); also
/// where the old-userland test's debootstrap reads.
pub fn debian_mirror() -> String {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.filter_map(std::result::Result::ok) {
            texts.push(fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    texts
        .iter()
        .flat_map(|t| t.split_whitespace())
        .map(|w| w.trim_end_matches('/'))
        .find(|w| w.starts_with("http") && w.ends_with("/debian"))
        .map_or_else(|| "http://deb.debian.org/debian".into(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pick_their_source() {
        assert!(matches!(named("6.1"), Some(Named::System(_))));
        assert!(matches!(
            named("5.10"),
            Some(Named::Suite {
                suite: "bullseye",
                ..
            })
        ));
        let prefix = |s| match named(s) {
            Some(Named::Split { prefix }) => Some(prefix),
            _ => None,
        };
        assert_eq!(prefix("7.2").as_deref(), Some("7.2."));
        assert_eq!(prefix("7").as_deref(), Some("7."));
        assert_eq!(prefix("sid").as_deref(), Some(""));
        assert!(named("6.6").is_none() && named("/x/linux.deb").is_none());
    }

    #[test]
    fn newest_release_by_numbers() {
        let names = [
            "linux-binary-7.2.9+deb14-cloud-amd64",
            "linux-binary-7.2.13+deb14-cloud-amd64",
        ];
        let newest = names.iter().max_by_key(|n| release_numbers(n));
        assert_eq!(newest, Some(&names[1]));
    }
}
