//! The endpoint's TLS (rustls with the `ring` provider) from `tls_server_config`: the
//! certificate and key, the TLS versions, and client certificates as exporter-toolkit's
//! `client_auth_type` asks for them.
use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use tokio_rustls::rustls::{
    self, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::web_config::{ClientAuth, TlsFile, TlsVersion};

/// The server's TLS configuration; `None` when the file names no certificate (plain HTTP, as
/// exporter-toolkit serves then).
pub(super) fn server_config(t: &TlsFile) -> Result<Option<Arc<ServerConfig>>, String> {
    let (cert, key) = match (&t.cert_file, &t.key_file) {
        (None, None) if t.client_auth_type == ClientAuth::NoClientCert => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (None, _) => return Err("tls_server_config: cert_file is missing".into()),
        (_, None) => return Err("tls_server_config: key_file is missing".into()),
    };
    let certs = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("key_file {}: no private key: {e}", key.display()))?;
    let provider = Arc::new(provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(t)?)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match client_verifier(t, &provider)? {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file {} with key_file: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// `ring`, not aws-lc-rs (which needs cmake to build): no post-quantum key exchange, which
/// is why rustls marks it deprecated.
#[allow(deprecated)]
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// rustls speaks TLS 1.2 and 1.3: an older `min_version` means 1.2.
fn versions(t: &TlsFile) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let min = t.min_version.unwrap_or(TlsVersion::TLS12);
    let max = t.max_version.unwrap_or(TlsVersion::TLS13);
    if max < TlsVersion::TLS12 || max < min {
        return Err(format!(
            "tls_server_config: versions {min:?} to {max:?}: only TLS12 and TLS13 are served"
        ));
    }
    let mut v = Vec::new();
    if min <= TlsVersion::TLS12 {
        v.push(&rustls::version::TLS12);
    }
    if max >= TlsVersion::TLS13 {
        v.push(&rustls::version::TLS13);
    }
    Ok(v)
}

fn client_verifier(
    t: &TlsFile,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
    use ClientAuth::*;
    let auth = t.client_auth_type;
    let roots = match &t.client_ca_file {
        Some(ca) if auth == NoClientCert => {
            return Err(format!(
                "client_ca_file {} is set but client_auth_type is NoClientCert",
                ca.display()
            ));
        }
        Some(ca) => Some(roots(ca)?),
        None if matches!(auth, VerifyClientCertIfGiven | RequireAndVerifyClientCert) => {
            return Err(format!("client_auth_type {auth:?} needs client_ca_file"));
        }
        None => None,
    };
    let verifying = |roots: Arc<RootCertStore>, optional: bool| {
        let b = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        let b = if optional {
            b.allow_unauthenticated()
        } else {
            b
        };
        b.build().map_err(|e| format!("client_ca_file: {e}"))
    };
    let any = |mandatory| -> Arc<dyn ClientCertVerifier> {
        Arc::new(AnyCertificate {
            mandatory,
            algorithms: provider.signature_verification_algorithms,
        })
    };
    Ok(match (auth, roots) {
        (NoClientCert, _) => None,
        (RequestClientCert, _) => Some(any(false)),
        (RequireAnyClientCert, _) => Some(any(true)),
        (VerifyClientCertIfGiven, Some(r)) => Some(verifying(r, true)?),
        (RequireAndVerifyClientCert, Some(r)) => Some(verifying(r, false)?),
        (_, None) => None, // refused above
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for c in certificates(ca)? {
        store
            .add(c)
            .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
    }
    Ok(Arc::new(store))
}

/// Go's `RequestClientCert` and `RequireAnyClientCert`: a client certificate is asked for (or
/// required) but not checked against a CA; the handshake still proves the client holds its key.
#[derive(Debug)]
struct AnyCertificate {
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyCertificate {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_exporter_toolkits_names() {
        let t = |min, max| TlsFile {
            min_version: min,
            max_version: max,
            ..TlsFile::default()
        };
        assert_eq!(versions(&t(None, None)).unwrap().len(), 2);
        let v13 = versions(&t(Some(TlsVersion::TLS13), None)).unwrap();
        assert_eq!(v13.len(), 1);
        assert_eq!(v13[0].version, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(
            versions(&t(Some(TlsVersion::TLS10), None)).unwrap().len(),
            2
        );
        assert!(versions(&t(None, Some(TlsVersion::TLS11))).is_err());
        assert!(versions(&t(Some(TlsVersion::TLS13), Some(TlsVersion::TLS12))).is_err());
    }

    #[test]
    fn verified_client_certificates_need_a_ca() {
        let t = TlsFile {
            client_auth_type: ClientAuth::RequireAndVerifyClientCert,
            ..TlsFile::default()
        };
        let provider = Arc::new(provider());
        let e = client_verifier(&t, &provider).err().unwrap();
        assert!(e.contains("needs client_ca_file"), "{e}");
        let t = TlsFile {
            client_ca_file: Some("/ca.pem".into()),
            ..TlsFile::default()
        };
        assert!(client_verifier(&t, &provider).is_err());
    }
}
