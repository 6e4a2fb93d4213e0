//! The mesh as its users run it: real `plinthd` processes (the
//! `plinthd-e2e` binary of this crate is the same program), in either shape
//! the product supports. [`Shape::Embedded`] is one process with every
//! component on the embedded defaults; [`Shape::Production`] is one process
//! per component on PostgreSQL, Redis and NATS JetStream, the gateway
//! dialling the others over gRPC. In the production shape every process
//! reaches NATS through a [`ToggleProxy`], so a test can take NATS away.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plinth_runtime::testing::{Backend, ToggleProxy, backend_url, host_port};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::{ADMIN_PASSWORD, unique};

/// The path of the `plinthd-e2e` binary, for [`Mesh::start`]; only
/// integration tests of this crate know it.
#[macro_export]
macro_rules! plinthd_binary {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_plinthd-e2e"))
    };
}

/// How the mesh is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One `plinthd` with every component, SQLite and the in-process bus and cache.
    Embedded,
    /// One `plinthd --only <component>` per component on PostgreSQL, Redis and NATS.
    Production,
}

/// The components, in the order the production shape starts them (auth
/// first: the others fetch its keys; the gateway last: it dials them all).
const COMPONENTS: [&str; 6] = ["auth", "config", "queue", "audit", "ai", "gateway"];

/// One running `plinthd` process; killed when dropped.
pub struct Node {
    /// What it is called in this mesh (`plinthd`, `auth`, `config-2`, …).
    pub name: String,
    /// The components it runs.
    pub components: Vec<String>,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address (health, metrics; the gateway's routes on the gateway node).
    pub http: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    async fn start(
        binary: &Path,
        name: &str,
        only: Option<&str>,
        dir: &Path,
        env: &[(String, String)],
        args: &[String],
    ) -> anyhow::Result<Node> {
        let data = dir.join(name);
        let mut command = Command::new(binary);
        for (k, _) in std::env::vars() {
            if k.starts_with("PLINTH_") || k.starts_with("OTEL_") {
                command.env_remove(k);
            }
        }
        command
            .arg("--config")
            .arg(dir.join("plinth.toml"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(only) = only {
            command.arg("--only").arg(only);
        }
        let mut child = command.spawn()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone(), Some(tx));
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone(), None);
        }
        let listening = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.recv().await {
                if line.contains("plinthd listening") {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(line) = listening else {
            let _ = child.kill();
            let _ = child.wait();
            let tail = log.lock().map(|l| l.join("\n")).unwrap_or_default();
            anyhow::bail!("plinthd {name} did not start:\n{tail}");
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let addr = |field: &str| -> anyhow::Result<SocketAddr> {
            Ok(v.pointer(&format!("/fields/{field}"))
                .or_else(|| v.get(field))
                .and_then(|a| a.as_str())
                .ok_or_else(|| anyhow::anyhow!("no {field} in {line}"))?
                .parse()?)
        };
        Ok(Node {
            name: name.to_owned(),
            components: only.map_or_else(
                || COMPONENTS.iter().map(|c| (*c).to_owned()).collect(),
                |o| o.split(',').map(str::to_owned).collect(),
            ),
            grpc: addr("grpc_addr")?,
            http: addr("http_addr")?,
            child,
            log,
        })
    }

    /// Stops the process at once (SIGKILL: no goodbye, as a crash).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log so far, one line per entry.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(60)..];
            eprintln!("---- last log lines of plinthd {} ----\n{}", self.name, tail.join("\n"));
        }
    }
}

/// Copies a child's output lines into `log` (and to `tx`) on a thread of its own.
fn collect(out: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>, tx: Option<mpsc::UnboundedSender<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            if let Ok(mut log) = log.lock() {
                log.push(line);
            }
        }
    });
}

/// A running mesh; [`Mesh::stop`] ends it and removes its data.
pub struct Mesh {
    /// Its shape.
    pub shape: Shape,
    binary: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    nodes: Vec<Node>,
    nats: Option<ToggleProxy>,
    postgres: Option<(String, String)>,
}

impl Mesh {
    /// Starts a mesh of `shape` from `binary` ([`plinthd_binary!`]); every
    /// process also reads `toml` (e.g. AI providers). The production shape
    /// needs `PLINTH_TEST_*` backends: without them this is `None` (and an
    /// error when `PLINTH_TEST_REQUIRE_BACKENDS` is set).
    pub async fn start(binary: &Path, shape: Shape, test: &str, toml: &str) -> anyhow::Result<Option<Mesh>> {
        Self::start_with_args(binary, shape, test, toml, &[]).await
    }

    /// [`Mesh::start`], passing `args` to every process (e.g. fixed
    /// `--grpc-listen`/`--http-listen` addresses for an embedded mesh).
    pub async fn start_with_args(
        binary: &Path,
        shape: Shape,
        test: &str,
        toml: &str,
        args: &[String],
    ) -> anyhow::Result<Option<Mesh>> {
        let id = unique();
        let dir = std::env::temp_dir().join(format!("plinth-mesh-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut settings = String::new();
        let mut nats = None;
        let mut postgres = None;
        if shape == Shape::Production {
            let (Some(pg), Some(redis), Some(nats_url)) = (
                backend_url(Backend::Postgres, test)?,
                backend_url(Backend::Redis, test)?,
                backend_url(Backend::Nats, test)?,
            ) else {
                return Ok(None);
            };
            let proxy = nats_proxy(&host_port(&nats_url)).await?;
            let prefix = format!("plinth_m{}_", id.replace('-', "_"));
            settings.push_str(&format!(
                "database_url = {pg:?}\nredis_url = {redis:?}\nnats_url = \"nats://{}\"\nredis_key_prefix = \"plinth-mesh-{id}:\"\n\
                 [storage]\nschema_prefix = {prefix:?}\n[audit]\nconsumer = \"plinth-audit-mesh-{id}\"\nreplay = false\n",
                proxy.addr()
            ));
            nats = Some(proxy);
            postgres = Some((pg, prefix));
        }
        settings.push_str(&format!("[log]\nlevel = \"info\"\n{toml}\n"));
        std::fs::write(dir.join("plinth.toml"), settings)?;
        // The bootstrap password goes by variable, so it may sit beside a
        // caller's own [auth] table.
        let env = vec![(
            "PLINTH_AUTH__BOOTSTRAP_ADMIN_PASSWORD".to_owned(),
            ADMIN_PASSWORD.to_owned(),
        )];
        let mut mesh = Mesh {
            shape,
            binary: binary.to_owned(),
            dir,
            env,
            args: args.to_vec(),
            nodes: Vec::new(),
            nats,
            postgres,
        };
        match shape {
            Shape::Embedded => {
                let node = Node::start(&mesh.binary, "plinthd", None, &mesh.dir, &mesh.env, &mesh.args).await?;
                mesh.nodes.push(node);
            }
            Shape::Production => {
                for component in COMPONENTS {
                    mesh.add(component, component).await?;
                }
            }
        }
        Ok(Some(mesh))
    }

    /// Starts one more process named `name` running `only`, wired to the
    /// running ones (their auth for keys; as the gateway, all of them).
    pub async fn add(&mut self, name: &str, only: &str) -> anyhow::Result<&Node> {
        let mut env = self.env.clone();
        if let Some(auth) = self.nodes.iter().find(|n| n.components.iter().any(|c| c == "auth")) {
            env.push(("PLINTH_AUTH__URL".into(), format!("http://{}", auth.grpc)));
        }
        if only.split(',').any(|c| c == "gateway") {
            for node in &self.nodes {
                for c in &node.components {
                    env.push((
                        format!("PLINTH_GATEWAY__UPSTREAMS__{}", c.to_uppercase()),
                        format!("http://{}", node.grpc),
                    ));
                }
            }
        }
        let node = Node::start(&self.binary, name, Some(only), &self.dir, &env, &self.args).await?;
        self.nodes.push(node);
        Ok(&self.nodes[self.nodes.len() - 1])
    }

    /// The process called `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow::anyhow!("no process {name} in the mesh"))
    }

    /// The first process running `component`.
    pub fn serving(&self, component: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.components.iter().any(|c| c == component))
            .ok_or_else(|| anyhow::anyhow!("no process runs {component}"))
    }

    /// The gateway's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn gateway(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.serving("gateway")?.http))
    }

    /// The directory holding the mesh's configuration and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A gRPC channel to the process running `component`.
    pub async fn channel(&self, component: &str) -> anyhow::Result<Channel> {
        channel_to(self.serving(component)?.grpc).await
    }

    /// The proxy every process reaches NATS through (production shape only).
    pub fn nats(&mut self) -> Option<&mut ToggleProxy> {
        self.nats.as_mut()
    }

    /// Kills every process and removes the mesh's data.
    pub async fn stop(mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if let Some(nats) = self.nats.as_mut() {
            nats.down().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((url, prefix)) = self.postgres.take() {
            crate::drop_schemas(&url, &prefix).await;
        }
    }
}

/// A running proxy to NATS at `upstream`. Its port is reserved, released
/// and bound again, so another socket may take it in between: try again then.
async fn nats_proxy(upstream: &str) -> anyhow::Result<ToggleProxy> {
    let mut attempts = 0;
    loop {
        let mut proxy = ToggleProxy::reserve(upstream).await?;
        match proxy.up().await {
            Ok(()) => return Ok(proxy),
            Err(e) if attempts < 5 && e.kind() == std::io::ErrorKind::AddrInUse => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A gRPC channel to `addr`.
pub async fn channel_to(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}
