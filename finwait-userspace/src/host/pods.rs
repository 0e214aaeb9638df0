//! Kubernetes pod names and namespaces by pod UID, from the kubelet's log directories on the
//! node (`/var/log/pods/NAMESPACE_NAME_UID`): a cgroup path names a pod by UID only, which no
//! operator recognises.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

/// Where the kubelet keeps one directory per pod.
const POD_LOGS: &str = "/var/log/pods";
/// An unknown UID reads the directory again at most this often (a new pod).
const REREAD_AFTER: Duration = Duration::from_secs(5);
/// Pods remembered at most (a node runs a few hundred).
const MAX_PODS: usize = 16_384;

/// A pod's namespace and name.
pub(crate) type PodName = (Arc<str>, Arc<str>);

pub(crate) struct Pods {
    dir: PathBuf,
    by_uid: HashMap<Arc<str>, PodName>,
    read_at: Option<Instant>,
}

impl Pods {
    pub(crate) fn new() -> Self {
        Self::at(PathBuf::from(POD_LOGS))
    }

    fn at(dir: PathBuf) -> Self {
        Self {
            dir,
            by_uid: HashMap::new(),
            read_at: None,
        }
    }

    /// The namespace and name of the pod with this UID, if the node shows it.
    pub(crate) fn name(&mut self, uid: &str) -> Option<PodName> {
        if let Some(n) = self.by_uid.get(uid) {
            return Some(n.clone());
        }
        if self.read_at.is_some_and(|at| at.elapsed() < REREAD_AFTER) {
            return None;
        }
        self.read();
        self.by_uid.get(uid).cloned()
    }

    fn read(&mut self) {
        self.read_at = Some(Instant::now());
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        if self.by_uid.len() >= MAX_PODS {
            self.by_uid.clear();
        }
        for e in dir.flatten().take(MAX_PODS) {
            if let Some((ns, name, uid)) = e.file_name().to_str().and_then(parse) {
                self.by_uid.insert(uid.into(), (ns.into(), name.into()));
            }
        }
    }
}

/// `NAMESPACE_NAME_UID`, each part as Kubernetes allows it (DNS names and a UID): anything
/// else on the node is not taken for a pod.
fn parse(dir: &str) -> Option<(&str, &str, &str)> {
    let mut parts = dir.split('_');
    let (ns, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let dns = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    let uid_ok = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    (parts.next().is_none() && dns(ns, 63) && dns(name, 253) && uid_ok).then_some((ns, name, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d3c1a52-7e7f-4c5e-9a1b-2f6e8d9c0b1a";

    #[test]
    fn names_from_the_kubelets_directories() {
        assert_eq!(
            parse(&format!("shop_checkout-7d9f8-x2x_{UID}")),
            Some(("shop", "checkout-7d9f8-x2x", UID))
        );
        for bad in [
            format!("Shop_checkout_{UID}"),
            format!("shop_check\u{202e}out_{UID}"),
            format!("shop_checkout_{UID}_extra"),
            "shop_checkout_not-a-uid".to_string(),
            format!("_checkout_{UID}"),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
        let dir = std::env::temp_dir().join(format!("finwait-pods-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(format!("shop_checkout_{UID}"))).unwrap();
        let mut pods = Pods::at(dir.clone());
        assert_eq!(
            pods.name(UID)
                .map(|(ns, n)| (ns.to_string(), n.to_string())),
            Some(("shop".into(), "checkout".into()))
        );
        assert_eq!(pods.name("00000000-0000-0000-0000-000000000000"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
