//! The node's certificates: one CA, the API server's serving cert (valid for the node IP,
//! the `kubernetes` Service IP and names, loopback), an admin client cert
//! (system:masters, used by every component and the tests) and the service-account
//! signing key. Fresh for every node: nothing is shared between runs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

use super::NodeError;

pub(crate) struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

fn pki_error(what: &str) -> impl Fn(rcgen::Error) -> NodeError + '_ {
    move |e| NodeError::Setup(format!("generating {what}: {e}"))
}

pub(crate) fn generate(dir: &Path, node_ip: Ipv4Addr, service_ip: Ipv4Addr) -> Result<Pki, NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
    let ca_key = KeyPair::generate().map_err(pki_error("the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "kmc-node-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(pki_error("the CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(pki_error("the server key"))?;
    let mut server = CertificateParams::new(
        ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
            .map(String::from)
            .to_vec(),
    )
    .map_err(pki_error("the server cert"))?;
    for ip in [IpAddr::V4(node_ip), IpAddr::V4(service_ip), IpAddr::V4(Ipv4Addr::LOCALHOST)] {
        server.subject_alt_names.push(SanType::IpAddress(ip));
    }
    server.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).map_err(pki_error("the server cert"))?;

    let admin_key = KeyPair::generate().map_err(pki_error("the admin key"))?;
    let mut admin = CertificateParams::default();
    admin.distinguished_name.push(DnType::CommonName, "kmc-node-admin");
    // system:masters is bound to cluster-admin by the bootstrap RBAC policy.
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer).map_err(pki_error("the admin cert"))?;

    // ES256 service-account tokens: the API server accepts an EC key in PKCS#8.
    let sa_key = KeyPair::generate().map_err(pki_error("the service-account key"))?;

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
        ca_pem: ca.pem(),
        admin_cert_pem: admin_cert.pem(),
        admin_key_pem: admin_key.serialize_pem(),
    };
    for (path, pem) in [
        (&pki.ca_cert, pki.ca_pem.clone()),
        (&pki.server_cert, server_cert.pem()),
        (&pki.server_key, server_key.serialize_pem()),
        (&pki.admin_cert, pki.admin_cert_pem.clone()),
        (&pki.admin_key, pki.admin_key_pem.clone()),
        (&pki.sa_key, sa_key.serialize_pem()),
        // The verifier reads public keys only (PKCS#8 private keys are not among them).
        (&pki.sa_pub, sa_key.public_key_pem()),
    ] {
        std::fs::write(path, pem).map_err(|e| NodeError::io(path, e))?;
    }
    Ok(pki)
}
