//! A scripted HTTP server standing in for an LLM provider: tests queue the
//! exact replies (JSON, error statuses with headers, SSE streams chunk by
//! chunk, hangs) a real provider sends, and read back every request it got,
//! field by field. It speaks HTTP for real, so adapters are tested through
//! their actual client, connection handling and timeouts.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST`, `GET`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Headers, names lowercase.
    pub headers: HashMap<String, String>,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
}

impl Recorded {
    /// A header's value, or empty.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// What the fake answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A JSON body with a status and extra headers.
    Json {
        /// HTTP status.
        status: u16,
        /// Extra headers (`retry-after`, …).
        headers: Vec<(String, String)>,
        /// The body.
        body: Value,
    },
    /// `text/event-stream`: each chunk written as given (include the
    /// `data: …\n\n` framing yourself), `gap` apart. With `hang_after`,
    /// the connection stays open without more bytes once the chunks are sent.
    Sse {
        /// Raw chunks.
        chunks: Vec<String>,
        /// Pause before each chunk after the first.
        gap: Duration,
        /// Keep the connection open (silent) after the last chunk.
        hang_after: bool,
    },
    /// Waits this long before answering `then`.
    Delay(Duration, Box<Reply>),
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Reply::Json {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    /// An error status with `body`.
    pub fn status(status: u16, body: Value) -> Self {
        Reply::Json {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// An SSE stream of these chunks, sent back to back.
    pub fn sse<S: Into<String>>(chunks: impl IntoIterator<Item = S>) -> Self {
        Reply::Sse {
            chunks: chunks.into_iter().map(Into::into).collect(),
            gap: Duration::ZERO,
            hang_after: false,
        }
    }

    /// Adds a header (JSON replies only).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Reply::Json { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// Frames `(event, data)` pairs as SSE text; `event` may be empty.
pub fn sse_frames<'a>(frames: impl IntoIterator<Item = (&'a str, Value)>) -> Vec<String> {
    frames
        .into_iter()
        .map(|(event, data)| {
            if event.is_empty() {
                format!("data: {data}\n\n")
            } else {
                format!("event: {event}\ndata: {data}\n\n")
            }
        })
        .collect()
}

#[derive(Default)]
struct Script {
    queued: HashMap<String, VecDeque<Reply>>,
    fallback: HashMap<String, Reply>,
    requests: Vec<Recorded>,
}

/// The running fake; stops when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: CancellationToken,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeUpstream {
    /// Starts on a random local port.
    pub async fn start() -> anyhow::Result<Self> {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new().fallback(answer).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let tasks = plinth_runtime::Tasks::new();
        tasks.spawn("fake-upstream", async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
        });
        Ok(Self { addr, script, stop })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for the next request to `path`.
    pub fn push(&self, path: &str, reply: Reply) {
        if let Ok(mut s) = self.script.lock() {
            s.queued.entry(path.to_owned()).or_default().push_back(reply);
        }
    }

    /// Answers `reply` to `path` whenever nothing is queued.
    pub fn always(&self, path: &str, reply: Reply) {
        if let Ok(mut s) = self.script.lock() {
            s.fallback.insert(path.to_owned(), reply);
        }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().map(|s| s.requests.clone()).unwrap_or_default()
    }

    /// The last request, if any.
    pub fn last(&self) -> Option<Recorded> {
        self.requests().pop()
    }
}

async fn answer(State(script): State<Arc<Mutex<Script>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let reply = {
        let Ok(mut s) = script.lock() else {
            return plain(500, "poisoned");
        };
        let path = recorded.path.clone();
        s.requests.push(recorded);
        s.queued
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .or_else(|| s.fallback.get(&path).cloned())
    };
    match reply {
        Some(r) => render(r).await,
        None => plain(599, "the fake upstream has no reply scripted for this path"),
    }
}

fn plain(status: u16, text: &str) -> Response {
    Response::builder()
        .status(status)
        .body(Body::from(text.to_owned()))
        .unwrap_or_default()
}

async fn render(reply: Reply) -> Response {
    let mut reply = reply;
    while let Reply::Delay(d, next) = reply {
        tokio::time::sleep(d).await;
        reply = *next;
    }
    match reply {
        Reply::Json { status, headers, body } => {
            let mut b = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Body::from(body.to_string())).unwrap_or_default()
        }
        Reply::Sse {
            chunks,
            gap,
            hang_after,
        } => {
            let body = futures::stream::iter(chunks.into_iter().enumerate())
                .then(move |(i, chunk)| async move {
                    if i > 0 && !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    Ok::<_, std::io::Error>(Bytes::from(chunk))
                })
                .chain(
                    futures::stream::once(async move {
                        if hang_after {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Ok(Bytes::new())
                    })
                    .filter(|b: &Result<Bytes, std::io::Error>| {
                        futures::future::ready(b.as_ref().map_or(true, |b| !b.is_empty()))
                    }),
                );
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(body))
                .unwrap_or_default()
        }
        Reply::Delay(..) => plain(500, "unreachable"),
    }
}
