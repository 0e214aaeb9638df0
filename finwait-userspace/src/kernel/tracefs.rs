//! tracefs: where it is (mounting it if needed) and the field layout of a tracepoint.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs mount, mounting it at /sys/kernel/tracing when it is missing.
pub(crate) fn ensure_mounted() -> Result<PathBuf> {
    if let Some(found) = CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
    {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    let c_target = std::ffi::CString::new(CANDIDATES[0]).unwrap();
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    let err = std::io::Error::last_os_error();
    if !target.join("events").is_dir() {
        // The OS error stays in the chain: without the privilege to mount, the load error says
        // which privileges are missing.
        return Err(anyhow::Error::new(err).context(
            "tracefs is not mounted and mounting it failed.\n  \
             Fix: mount -t tracefs tracefs /sys/kernel/tracing",
        ));
    }
    // A failed mount that left tracefs there: another process (a second finwait starting at the
    // same time) mounted it first, and the kernel refuses it twice on one mount point (EBUSY).
    if rc == 0 {
        eprintln!(
            "finwait-trace: note: tracefs was not mounted; mounted it at {}",
            CANDIDATES[0]
        );
    }
    Ok(target.to_path_buf())
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) offset: u32,
    pub(crate) size: u32,
}

/// The fields of a tracepoint, parsed from its `format` file.
#[derive(Debug, Default)]
pub(crate) struct Format {
    fields: HashMap<String, Field>,
}

impl Format {
    pub(crate) fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "tracepoint {category}:{name} is missing ({})",
                path.display()
            )
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses lines like `field:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`.
    pub(crate) fn parse(text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let Some(decl) = parts.next() else { continue };
            // The name is the last word of the declaration, without any array suffix.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .unwrap_or("")
                .split('[')
                .next()
                .unwrap_or("");
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            if let (Some(offset), Some(size), false) = (offset, size, name.is_empty()) {
                fields.insert(name.to_string(), Field { offset, size });
            }
        }
        Self { fields }
    }

    pub(crate) fn field(&self, name: &str) -> Result<Field> {
        self.fields
            .get(name)
            .copied()
            .with_context(|| format!("tracepoint has no field `{name}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE_6_18: &str = "name: inet_sock_set_state
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
";

    // Older kernels declare protocol as one byte.
    const STATE_6_1: &str = "\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 protocol;\toffset:30;\tsize:1;\tsigned:0;
";

    #[test]
    fn parses_pointer_scalar_and_array_fields() {
        let f = Format::parse(STATE_6_18);
        assert_eq!(f.field("skaddr").unwrap(), Field { offset: 8, size: 8 });
        assert_eq!(
            f.field("oldstate").unwrap(),
            Field {
                offset: 16,
                size: 4
            }
        );
        assert_eq!(
            f.field("protocol").unwrap(),
            Field {
                offset: 30,
                size: 2
            }
        );
        assert_eq!(
            f.field("saddr_v6").unwrap(),
            Field {
                offset: 40,
                size: 16
            }
        );
        assert!(f.field("daddr").is_err());
    }

    #[test]
    fn one_byte_protocol_of_older_kernels() {
        let f = Format::parse(STATE_6_1);
        assert_eq!(
            f.field("protocol").unwrap(),
            Field {
                offset: 30,
                size: 1
            }
        );
    }
}
