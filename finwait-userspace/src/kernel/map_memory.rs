//! What each of finwait's BPF maps costs the kernel, as the kernel accounts it: the `memlock`
//! line of the map's fdinfo (from Linux 6.4 its memory in use; before, what it charged at
//! creation), named by the map's own name.
use std::{collections::BTreeMap, os::fd::BorrowedFd};

/// Per map name, bytes, for every map fd this process holds (maps of the same name summed).
pub(crate) fn by_map() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some((id, bytes)) = parse(&info) else {
            continue;
        };
        let fd = entry
            .file_name()
            .to_str()
            .and_then(|f| f.parse::<i32>().ok());
        // SAFETY: an fd of this process, named by its fdinfo entry just read; borrowed for one
        // call (were it closed and reused since, the call fails or names another map).
        let name =
            fd.and_then(|fd| super::prog_stats::map_name(unsafe { BorrowedFd::borrow_raw(fd) }));
        *out.entry(name.unwrap_or_else(|| format!("map {id}")))
            .or_default() += bytes;
    }
    out
}

/// A map's fdinfo: its id and `memlock` bytes; None for any other file.
fn parse(fdinfo: &str) -> Option<(u32, u64)> {
    let field = |key: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    let id = u32::try_from(field("map_id:")?).ok()?;
    Some((id, field("memlock:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_map_fdinfo_has_a_size() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2069\nmap_type:\t1\n\
                   key_size:\t8\nvalue_size:\t56\nmax_entries:\t65536\nmap_flags:\t0x1\n\
                   map_extra:\t0x0\nmemlock:\t2359296\nmap_id:\t412\nfrozen:\t0\n";
        assert_eq!(parse(map), Some((412, 2_359_296)));
        let socket = "pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t40\n";
        assert_eq!(parse(socket), None);
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nmemlock:\t4096\nprog_id:\t77\n";
        assert_eq!(parse(prog), None, "a program's fdinfo has memlock too");
        assert_eq!(parse("map_id:\tx\nmemlock:\t1\n"), None);
    }

    #[test]
    fn a_map_this_process_creates_is_named_and_sized() {
        // Creating a map needs CAP_BPF: without it there is nothing to see.
        let Ok(map) = aya::maps::HashMap::<aya::maps::MapData, u32, u64>::create(1024, 0) else {
            return;
        };
        let sizes = by_map();
        // aya names a standalone hash map so; 1,024 preallocated entries of 16 bytes at least.
        assert!(
            sizes
                .get("standalone_hash")
                .is_some_and(|b| *b >= 1024 * 16),
            "{sizes:?}"
        );
        drop(map);
    }
}
