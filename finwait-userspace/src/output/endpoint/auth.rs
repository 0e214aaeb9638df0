//! `basic_auth_users`: HTTP basic auth against bcrypt hashes, with each pair that passed
//! remembered (bcrypt is slow by design: a scrape a second must not pay it every time).
use std::{
    collections::{BTreeMap, HashSet},
    hash::BuildHasher,
    sync::{Arc, Mutex},
};

use base64::Engine;
use hyper::header::HeaderValue;

/// Pairs that passed, remembered at most (then forgotten all at once, and checked again).
const MAX_REMEMBERED: usize = 1024;

/// The users and their bcrypt hashes.
#[derive(Clone)]
pub(crate) struct Users(Arc<Inner>);

struct Inner {
    hashes: BTreeMap<String, String>,
    /// A hash of each (user, password) that passed, keyed with a random seed: no password is
    /// kept, and a collision cannot be aimed at.
    passed: Mutex<HashSet<u64>>,
    seed: foldhash::quality::RandomState,
    /// One bcrypt check at a time: wrong passwords cost the endpoint one core at most.
    checking: tokio::sync::Semaphore,
}

impl Users {
    /// Each hash must be a bcrypt hash (`$2a$`, `$2b$`, `$2y$`).
    pub(super) fn new(hashes: BTreeMap<String, String>) -> Result<Self, String> {
        for (user, hash) in &hashes {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                ));
            }
        }
        Ok(Self(Arc::new(Inner {
            hashes,
            passed: Mutex::default(),
            seed: foldhash::quality::RandomState::default(),
            checking: tokio::sync::Semaphore::new(1),
        })))
    }

    /// Whether an `Authorization` header names a user with the right password.
    pub(super) async fn allow(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(basic) else {
            return false;
        };
        let key = self.0.seed.hash_one((&user, &password));
        if self.0.passed.lock().is_ok_and(|p| p.contains(&key)) {
            return true;
        }
        // An unknown user costs a check as a known one does: no telling which exist.
        let (known, hash) = match self.0.hashes.get(&user) {
            Some(h) => (true, h.clone()),
            None => match self.0.hashes.values().next() {
                Some(h) => (false, h.clone()),
                None => return false,
            },
        };
        let Ok(_one) = self.0.checking.acquire().await else {
            return false;
        };
        let checked = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash));
        let ok = known && matches!(checked.await, Ok(Ok(true)));
        if ok && let Ok(mut p) = self.0.passed.lock() {
            if p.len() >= MAX_REMEMBERED {
                p.clear();
            }
            p.insert(key);
        }
        ok
    }
}

/// `Basic base64(user:password)`.
fn basic(v: &HeaderValue) -> Option<(String, String)> {
    let v = v.to_str().ok()?;
    let (scheme, encoded) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let e = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::try_from(format!("Basic {e}")).unwrap()
    }

    #[tokio::test]
    async fn the_right_pair_passes_and_is_remembered() {
        let hash = bcrypt::hash("s3cret:x", 4).unwrap();
        let users = Users::new(BTreeMap::from([("alice".into(), hash)])).unwrap();
        assert!(users.allow(Some(&header("alice", "s3cret:x"))).await);
        assert_eq!(users.0.passed.lock().unwrap().len(), 1);
        assert!(users.allow(Some(&header("alice", "s3cret:x"))).await);
        assert!(!users.allow(Some(&header("alice", "wrong"))).await);
        assert!(!users.allow(Some(&header("bob", "s3cret:x"))).await);
        assert!(!users.allow(None).await);
        let bearer = HeaderValue::from_static("Bearer abc");
        assert!(!users.allow(Some(&bearer)).await);
        assert_eq!(users.0.passed.lock().unwrap().len(), 1);
    }

    /// htpasswd writes `$2y$`: the same bcrypt.
    #[tokio::test]
    async fn htpasswds_2y_hashes_are_taken() {
        let hash = bcrypt::hash("pw", 4).unwrap().replacen("$2b$", "$2y$", 1);
        let users = Users::new(BTreeMap::from([("a".into(), hash)])).unwrap();
        assert!(users.allow(Some(&header("a", "pw"))).await);
    }

    #[test]
    fn a_plain_password_is_no_hash() {
        let e = Users::new(BTreeMap::from([("a".into(), "pw".into())])).err();
        assert!(e.unwrap().contains("not a bcrypt hash"));
    }
}
