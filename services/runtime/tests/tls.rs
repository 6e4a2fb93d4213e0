//! The gRPC listener serves TLS from PEM files, and with a client CA it
//! requires client certificates (mTLS). Certificates are minted per test.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use plinth_runtime::Tasks;
use plinth_runtime::config::TlsConfig;
use plinth_runtime::server::ServerBuilder;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Pki {
    dir: PathBuf,
    ca_pem: String,
    client_cert: String,
    client_key: String,
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn mint() -> Pki {
    let dir = std::env::temp_dir().join(format!("plinth-tls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["worker".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    write(&dir, "server.pem", &server.pem());
    write(&dir, "server.key", &server_key.serialize_pem());
    write(&dir, "ca.pem", &ca.pem());
    Pki {
        dir,
        ca_pem: ca.pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn serve(tls: TlsConfig) -> (std::net::SocketAddr, Tasks) {
    let (builder, health) = ServerBuilder::new();
    health.register("queue", &[]).await;
    let loopback = "127.0.0.1:0".parse().unwrap();
    let bound = builder.bind(loopback, loopback, Some(&tls)).await.unwrap();
    let addr = bound.grpc_addr;
    let tasks = Tasks::new();
    tasks.spawn("server", bound.serve(tasks.token(), Duration::from_secs(2)));
    (addr, tasks)
}

async fn check(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://localhost:{}", addr.port())).unwrap();
    endpoint = endpoint
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "queue".into(),
        })
        .await
        .map(drop)
        .map_err(|e| format!("call: {e:?}"))
}

fn trusting(pki: &Pki) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost")
}

#[tokio::test]
async fn tls_listener_serves_tls_clients_only() {
    let pki = mint();
    let tls = TlsConfig {
        cert: pki.dir.join("server.pem"),
        key: pki.dir.join("server.key"),
        client_ca: None,
    };
    let (addr, tasks) = serve(tls).await;
    check(addr, Some(trusting(&pki))).await.unwrap();
    assert!(
        check(addr, None).await.is_err(),
        "plaintext must not reach a TLS listener"
    );
    tasks.shutdown(Duration::from_secs(5)).await;
    std::fs::remove_dir_all(&pki.dir).unwrap();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = mint();
    let tls = TlsConfig {
        cert: pki.dir.join("server.pem"),
        key: pki.dir.join("server.key"),
        client_ca: Some(pki.dir.join("ca.pem")),
    };
    let (addr, tasks) = serve(tls).await;
    let err = check(addr, Some(trusting(&pki))).await.unwrap_err();
    assert!(!err.is_empty());
    let with_cert = trusting(&pki).identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    check(addr, Some(with_cert)).await.unwrap();

    // A certificate from another CA is refused too.
    let other = mint();
    let stranger = trusting(&pki).identity(Identity::from_pem(&other.client_cert, &other.client_key));
    assert!(check(addr, Some(stranger)).await.is_err());
    tasks.shutdown(Duration::from_secs(5)).await;
    std::fs::remove_dir_all(&pki.dir).unwrap();
    std::fs::remove_dir_all(&other.dir).unwrap();
}

#[tokio::test]
async fn missing_tls_files_fail_startup_naming_the_setting() {
    let tls = TlsConfig {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
        client_ca: None,
    };
    let (builder, _health) = ServerBuilder::new();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let err = builder.bind(loopback, loopback, Some(&tls)).await.err().unwrap();
    assert!(err.to_string().contains("PLINTH_TLS__CERT"), "{err}");
}
