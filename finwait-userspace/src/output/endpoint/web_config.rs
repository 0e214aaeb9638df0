//! `--web-config-file`: TLS, client certificates, basic auth and response headers, in the
//! Prometheus exporter-toolkit's format (node_exporter's `web-config.yml`), read and checked
//! once at start so a bad file is an error before anything loads.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{auth::Users, tls};

/// A `--web-config-file` that cannot be used: each says the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebConfigError {
    #[error("--web-config-file {}: cannot read it: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--web-config-file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("--web-config-file {}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

/// The file as written: exporter-toolkit's keys, and only those.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_auth_type: ClientAuth,
    pub(super) client_ca_file: Option<PathBuf>,
    pub(super) min_version: Option<TlsVersion>,
    pub(super) max_version: Option<TlsVersion>,
    /// Accepted for compatibility; rustls always picks the suite itself (as Go does now).
    #[allow(dead_code)]
    pub(super) prefer_server_cipher_suites: Option<bool>,
}

/// exporter-toolkit's names, Go's `tls.ClientAuthType`s.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) enum ClientAuth {
    #[default]
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub(super) enum TlsVersion {
    TLS10,
    TLS11,
    TLS12,
    TLS13,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    /// Accepted for compatibility: the endpoint speaks HTTP/1.1 only.
    #[allow(dead_code)]
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The checked configuration the endpoint serves with.
#[derive(Clone, Default)]
pub(crate) struct WebConfig {
    pub(super) tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub(super) users: Option<Users>,
    /// Added to every response.
    pub(super) headers: HeaderMap,
}

impl WebConfig {
    /// Reads and checks `path`; relative paths in it are relative to its directory.
    pub(crate) fn read(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.into(),
            source,
        })?;
        let invalid = |what: String| WebConfigError::Invalid {
            path: path.into(),
            what,
        };
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text).map_err(|source| WebConfigError::Parse {
                path: path.into(),
                source,
            })?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => tls::server_config(&relative_to(dir, t)).map_err(invalid)?,
            None => None,
        };
        let users = file
            .basic_auth_users
            .map(Users::new)
            .transpose()
            .map_err(invalid)?;
        let headers =
            headers(&file.http_server_config.unwrap_or_default().headers).map_err(invalid)?;
        Ok(Self {
            tls,
            users,
            headers,
        })
    }
}

/// The file's paths, relative to its directory (as exporter-toolkit reads them).
fn relative_to(dir: &Path, mut t: TlsFile) -> TlsFile {
    for p in [&mut t.cert_file, &mut t.key_file, &mut t.client_ca_file]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    }
    t
}

fn headers(given: &BTreeMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in given {
        let n = HeaderName::try_from(name.as_str())
            .map_err(|_| format!("http_server_config.headers: {name:?} is no header name"))?;
        let v = HeaderValue::try_from(value.as_str()).map_err(|_| {
            format!("http_server_config.headers.{name}: {value:?} is no header value")
        })?;
        map.insert(n, v);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("finwait-webcfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_file_and_the_key() {
        let d = temp_dir("unknown");
        let p = write(&d, "web.yml", "tls_server_config:\n  cert_fil: x.pem\n");
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("cert_fil"), "{e}");
        let p = write(&d, "web2.yml", "basic_auth:\n  a: b\n");
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains("basic_auth"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_empty_file_serves_plain_http_without_auth() {
        let d = temp_dir("empty");
        let c = WebConfig::read(&write(&d, "web.yml", "")).unwrap();
        assert!(c.tls.is_none() && c.users.is_none() && c.headers.is_empty());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn paths_are_relative_to_the_files_directory() {
        let t = TlsFile {
            cert_file: Some("certs/a.pem".into()),
            key_file: Some("/abs/k.pem".into()),
            client_ca_file: Some("ca.pem".into()),
            ..TlsFile::default()
        };
        let t = relative_to(Path::new("/etc/finwait"), t);
        assert_eq!(t.cert_file.unwrap(), Path::new("/etc/finwait/certs/a.pem"));
        assert_eq!(t.key_file.unwrap(), Path::new("/abs/k.pem"));
        assert_eq!(t.client_ca_file.unwrap(), Path::new("/etc/finwait/ca.pem"));
    }

    #[test]
    fn a_missing_relative_cert_is_named_where_it_was_looked_for() {
        let d = temp_dir("missing");
        let p = write(
            &d,
            "web.yml",
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
        );
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains(&d.join("nope.crt").display().to_string()), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn users_need_bcrypt_hashes_and_headers_must_be_valid() {
        let d = temp_dir("users");
        let p = write(&d, "web.yml", "basic_auth_users:\n  alice: plaintext\n");
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains("alice") && e.contains("bcrypt"), "{e}");
        let hash = bcrypt::hash("secret", 4).unwrap();
        let text = format!(
            "basic_auth_users:\n  alice: {hash}\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        );
        let c = WebConfig::read(&write(&d, "ok.yml", &text)).unwrap();
        assert!(c.users.is_some());
        assert_eq!(c.headers["x-frame-options"], "deny");
        let p = write(
            &d,
            "bad.yml",
            "http_server_config:\n  headers:\n    \"a b\": c\n",
        );
        assert!(WebConfig::read(&p).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn client_auth_types_and_versions_have_exporter_toolkits_names() {
        let d = temp_dir("names");
        let p = write(
            &d,
            "web.yml",
            "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n  cert_file: a\n  key_file: b\n  min_version: TLS12\n",
        );
        // Parsed (the names are right); the missing files are the error.
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let p = write(
            &d,
            "bad.yml",
            "tls_server_config:\n  client_auth_type: Maybe\n",
        );
        let e = WebConfig::read(&p).err().unwrap().to_string();
        assert!(e.contains("Maybe"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
