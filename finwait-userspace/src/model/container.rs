//! Which container, pod and systemd unit a task runs in, read from its cgroup path: the
//! identity every output names a workload by. Pure: the path comes from [`crate::host::cgroup`].
use std::sync::Arc;

/// A cgroup path's meaning. Fields are `None` where the path does not say; shared strings, as
/// they become metric labels on every report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Container {
    /// The cgroup v2 path (or, on v1-only hosts, the path of the systemd hierarchy).
    pub(crate) cgroup: String,
    /// The container's id (`container.id`): 64 hex digits for docker, containerd, cri-o and
    /// podman; the container's name for LXC.
    pub(crate) id: Option<Arc<str>>,
    /// `docker`, `containerd`, `cri-o`, `podman` or `lxc` (`container.runtime`).
    pub(crate) runtime: Option<&'static str>,
    /// The Kubernetes pod's UID (`k8s.pod.uid`), with dashes.
    pub(crate) pod_uid: Option<Arc<str>>,
    /// The pod's namespace and name (`k8s.namespace.name`, `k8s.pod.name`), where the node
    /// shows them (the path does not: [`crate::host::pods`]).
    pub(crate) pod: Option<(Arc<str>, Arc<str>)>,
    /// The pod's QoS class: `guaranteed`, `burstable` or `besteffort`.
    pub(crate) qos: Option<&'static str>,
    /// The innermost systemd unit (`nginx.service`, `docker-<id>.scope`).
    pub(crate) systemd_unit: Option<Arc<str>>,
}

impl Container {
    /// Reads a cgroup path, e.g.
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`.
    pub(crate) fn from_path(path: &str) -> Self {
        // Cgroup names are chosen by whoever may create one (a delegated subtree: any user).
        let escaped = super::escape::sanitize(path);
        let path = escaped.as_str();
        let mut c = Container {
            cgroup: path.to_string(),
            ..Default::default()
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            if let Some(unit) = systemd_unit(part) {
                c.systemd_unit = Some(unit.into());
            }
            if let Some((runtime, id)) = container_id(part, i.checked_sub(1).map(|p| parts[p])) {
                c.runtime = Some(runtime);
                c.id = Some(id.into());
            }
            if let Some(uid) = pod_uid(part) {
                c.pod_uid = Some(uid.into());
            }
            if let Some(q) = qos(part) {
                c.qos = Some(q);
            }
        }
        if c.pod_uid.is_some() && c.qos.is_none() {
            c.qos = Some("guaranteed"); // a pod directly under kubepods
        }
        c
    }

    /// For human lines: `docker:3f2a9c1b7d4e` (12 digits, as `docker ps` shows), `lxc:web`;
    /// None without a container.
    pub(crate) fn short(&self) -> Option<String> {
        let id = self.id.as_deref()?;
        let shown = if is_hex_id(id) { &id[..12] } else { id };
        let mut s = format!("{}:{shown}", self.runtime.unwrap_or("container"));
        if let Some((ns, name)) = &self.pod {
            s += &format!(", pod {ns}/{name}");
        }
        Some(s)
    }
}

impl Container {
    /// Whether it is one of `ids` (container ids or prefixes, lowercase) or `pods` (UIDs,
    /// names, or NAMESPACE/NAME).
    pub(crate) fn is_one_of(&self, ids: &[String], pods: &[String]) -> bool {
        let id = self.id.as_deref().filter(|id| is_hex_id(id));
        let by_id = id.is_some_and(|id| ids.iter().any(|want| id.starts_with(want.as_str())));
        let by_pod = pods.iter().any(|want| {
            let uid = self.pod_uid.as_deref() == Some(want.as_str());
            let named = self
                .pod
                .as_ref()
                .is_some_and(|(ns, name)| match want.split_once('/') {
                    Some((wns, wname)) => **ns == *wns && **name == *wname,
                    None => **name == **want,
                });
            uid || named
        });
        by_id || by_pod
    }
}

impl Container {
    /// What people know a process by beside its name: its container (see [`Self::short`]),
    /// else the systemd service it runs in (`nginx.service`). A session's scope or the root
    /// says nothing more.
    pub(crate) fn label(&self) -> Option<String> {
        self.short().or_else(|| {
            let unit = self.systemd_unit.as_deref()?;
            unit.ends_with(".service").then(|| unit.to_string())
        })
    }
}

/// ` (docker:3f2a9c1b7d4e)` or ` (nginx.service)` after a process's name, where it runs in a
/// container or a systemd service.
pub(crate) fn write_short(out: &mut String, c: Option<&Container>) {
    if let Some(short) = c.and_then(Container::label) {
        out.push_str(" (");
        out.push_str(&short);
        out.push(')');
    }
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`,
/// cgroupfs-driver directories named by the bare id, and LXC's `lxc.payload.<name>` or
/// `lxc/<name>`. Conmon's own scopes (`crio-conmon-`, `libpod-conmon-`) are not the container.
fn container_id<'a>(part: &'a str, parent: Option<&str>) -> Option<(&'static str, &'a str)> {
    const SCOPES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    let bare = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in SCOPES {
        if let Some(id) = bare.strip_prefix(prefix)
            && is_hex_id(id)
        {
            return Some((runtime, id));
        }
    }
    if let Some(name) = part.strip_prefix("lxc.payload.") {
        return Some(("lxc", name));
    }
    match parent {
        Some("lxc") => Some(("lxc", part)),
        Some("docker") if is_hex_id(part) => Some(("docker", part)),
        Some("libpod_parent") => bare
            .strip_prefix("libpod-")
            .filter(|id| is_hex_id(id))
            .map(|id| ("podman", id)),
        // kubepods/<qos>/pod<uid>/<id> (cgroupfs driver): the runtime is not in the path.
        Some(p) if p.starts_with("pod") && is_hex_id(part) => Some(("containerd", part)),
        _ => None,
    }
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `kubepods-burstable-pod<uid>.slice` (dashes in the uid written as `_`) or `pod<uid>`.
fn pod_uid(part: &str) -> Option<String> {
    let bare = part.strip_suffix(".slice").unwrap_or(part);
    let uid = match bare.strip_prefix("pod") {
        Some(uid) => uid,
        None if bare.starts_with("kubepods-") => &bare[bare.rfind("-pod")? + 4..],
        None => return None,
    };
    let uid = uid.replace('_', "-");
    let looks_like_uid = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    looks_like_uid.then_some(uid)
}

/// `kubepods-burstable.slice`, `kubepods/besteffort`.
fn qos(part: &str) -> Option<&'static str> {
    let bare = part.strip_suffix(".slice").unwrap_or(part);
    let class = bare.strip_prefix("kubepods-").unwrap_or(bare);
    match class {
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    }
}

fn systemd_unit(part: &str) -> Option<&str> {
    (part.ends_with(".service") || part.ends_with(".scope")).then_some(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff";
    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    fn uid_(s: &str) -> String {
        s.replace('-', "_")
    }

    #[test]
    fn docker_with_the_systemd_driver() {
        let c = Container::from_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(c.id.as_deref(), Some(ID));
        assert_eq!(c.runtime, Some("docker"));
        assert_eq!(
            c.systemd_unit.as_deref(),
            Some(format!("docker-{ID}.scope").as_str())
        );
        assert_eq!(c.pod_uid, None);
        assert_eq!(c.short().as_deref(), Some("docker:3f2a9c1b7d4e"));
    }

    #[test]
    fn docker_with_the_cgroupfs_driver() {
        let c = Container::from_path(&format!("/docker/{ID}"));
        assert_eq!((c.runtime, c.id.as_deref()), (Some("docker"), Some(ID)));
        assert_eq!(c.systemd_unit.as_deref(), None);
    }

    #[test]
    fn containerd_in_a_burstable_pod() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid_(UID)
        );
        let c = Container::from_path(&p);
        assert_eq!((c.runtime, c.id.as_deref()), (Some("containerd"), Some(ID)));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.qos, Some("burstable"));
    }

    #[test]
    fn containerd_in_a_besteffort_pod_with_the_cgroupfs_driver() {
        let c = Container::from_path(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(c.id.as_deref(), Some(ID));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.qos, Some("besteffort"));
    }

    #[test]
    fn guaranteed_pods_sit_directly_under_kubepods() {
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            uid_(UID)
        );
        let c = Container::from_path(&p);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.qos, Some("guaranteed"));
    }

    #[test]
    fn cri_o_and_not_its_conmon() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
            uid_(UID)
        );
        let c = Container::from_path(&p);
        assert_eq!((c.runtime, c.id.as_deref()), (Some("cri-o"), Some(ID)));
        assert_eq!(c.qos, Some("besteffort"));
        let conmon = Container::from_path(&format!("/machine.slice/crio-conmon-{ID}.scope"));
        assert_eq!(conmon.id, None);
    }

    #[test]
    fn podman_rootless_and_rootful() {
        let p =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        let c = Container::from_path(&p);
        assert_eq!((c.runtime, c.id.as_deref()), (Some("podman"), Some(ID)));
        assert_eq!(
            c.systemd_unit.as_deref(),
            Some(format!("libpod-{ID}.scope").as_str())
        );
        let c = Container::from_path(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(c.id.as_deref(), Some(ID));
        let c = Container::from_path(&format!("/libpod_parent/libpod-{ID}"));
        assert_eq!(c.id.as_deref(), Some(ID));
    }

    #[test]
    fn lxc_by_name() {
        let c = Container::from_path("/lxc.payload.web01/system.slice/nginx.service");
        assert_eq!((c.runtime, c.id.as_deref()), (Some("lxc"), Some("web01")));
        assert_eq!(c.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(c.short().as_deref(), Some("lxc:web01"));
        assert_eq!(
            c.label().as_deref(),
            Some("lxc:web01"),
            "the container first"
        );
        let c = Container::from_path("/lxc/db");
        assert_eq!(c.id.as_deref(), Some("db"));
    }

    #[test]
    fn a_systemd_service_is_no_container() {
        let c = Container::from_path("/system.slice/nginx.service");
        assert_eq!(c.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(
            (c.short(), c.id.clone(), c.pod_uid.clone()),
            (None, None, None)
        );
        assert_eq!(c.label().as_deref(), Some("nginx.service"));
        let mut line = "nginx[42]".to_string();
        write_short(&mut line, Some(&c));
        assert_eq!(line, "nginx[42] (nginx.service)");
        let session = Container::from_path("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(session.label(), None);
        let root = Container::from_path("/");
        assert_eq!(
            root,
            Container {
                cgroup: "/".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_container_is_found_by_id_prefix_pod_uid_or_pod_name() {
        let mut c = Container::from_path(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b7c1d2e_3f40_4a5b_8c6d_7e8f90a1b2c3.slice/cri-containerd-3f2a9c1b7d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcd.scope",
        );
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert!(c.is_one_of(&s(&["3f2a9c1b"]), &[]));
        assert!(!c.is_one_of(&s(&["3f2a9c1c"]), &[]));
        assert!(c.is_one_of(&[], &s(&["6b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3"])));
        assert!(!c.is_one_of(&[], &s(&["checkout"])), "no name known yet");
        c.pod = Some(("shop".into(), "checkout".into()));
        assert!(c.is_one_of(&[], &s(&["checkout"])));
        assert!(c.is_one_of(&[], &s(&["shop/checkout"])));
        assert!(!c.is_one_of(&[], &s(&["other/checkout"])));
    }

    #[test]
    fn names_that_only_look_alike_are_not_ids() {
        for p in [
            "/system.slice/docker.service",
            "/system.slice/docker-abc.scope",
            "/user.slice/podcast.slice",
            "/kubepods.slice/kubepods-burstable.slice",
        ] {
            let c = Container::from_path(p);
            assert_eq!((c.id.as_deref(), c.pod_uid.as_deref()), (None, None), "{p}");
        }
    }
}
