//! Write coalescing for HTTP/2 connections.
//!
//! h2 flushes a connection as soon as a frame is queued on it, and tokio runs
//! the woken connection task right after the task that queued the frame. So
//! under load every gRPC response, and every message of every watch stream,
//! went out in its own `writev`, each paying the system call and the
//! loopback or network delivery: measured at 0.7–0.9 writes per message on a
//! busy server. [`CoalescedWrites`] lets a connection's flush wait for one
//! turn of the scheduler: the other streams that are ready meanwhile queue
//! their frames, and all of them leave in one write. An idle connection
//! pays one extra poll of its task, not a timer.
//!
//! Servers get it through [`crate::server::incoming`]; clients (the gateway's
//! upstreams, the benchmarks' load) through [`connect`] and [`connect_lazy`].

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// Bytes held before writes go through without waiting for a flush; also
/// the buffer kept between flushes (a larger one, left by growth past the
/// limit, is freed). Freeing anything above 4 KiB made each watch fan-out (a
/// burst of ~20 KiB per connection) grow it again, and the 10,000-watcher
/// p99 went from 43 ms to 50–66 ms.
const HOLD_LIMIT: usize = 64 * 1024;

/// A stream that can take bytes without waiting, for what is still held when
/// a connection is dropped (e.g. the TLS alert rustls writes just before a
/// failed handshake ends the connection).
pub trait WriteNow {
    /// Writes what it can of `buf` at once, best effort.
    fn write_now(&self, buf: &[u8]);
}

impl WriteNow for TcpStream {
    fn write_now(&self, buf: &[u8]) {
        // Best effort: the connection is going away either way.
        let _ = self.try_write(buf);
    }
}

/// An I/O stream whose writes are held until a flush, and whose flush yields
/// once to the scheduler before it writes them out.
#[derive(Debug)]
pub struct CoalescedWrites<T: WriteNow> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` was already written.
    sent: usize,
    /// The pending flush has yielded once.
    yielded: bool,
}

impl<T: WriteNow> Drop for CoalescedWrites<T> {
    fn drop(&mut self) {
        if self.sent < self.held.len() {
            self.inner.write_now(&self.held[self.sent..]);
        }
    }
}

impl<T: WriteNow> CoalescedWrites<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + WriteNow + Unpin> CoalescedWrites<T> {
    /// Writes out what is held; ready when nothing is left.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.yielded = false;
        if self.held.capacity() > HOLD_LIMIT {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `incoming` more bytes: writes out what is held once the
    /// limit would be passed.
    fn poll_room(&mut self, cx: &mut Context<'_>, incoming: usize) -> Poll<io::Result<()>> {
        if self.held.len() + incoming > HOLD_LIMIT {
            ready!(self.poll_write_held(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + WriteNow + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + WriteNow + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, buf.len()))?;
        if buf.len() > HOLD_LIMIT {
            // Nothing is held now (room was made); a large write goes through.
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, total))?;
        if total > HOLD_LIMIT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.yielded {
            // Let the other ready tasks run (and queue their frames) first;
            // a task that wakes itself goes to the back of the run queue.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T> tonic::transport::server::Connected for CoalescedWrites<T>
where
    T: tonic::transport::server::Connected + WriteNow,
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A channel to `endpoint` whose connections coalesce their writes the same
/// way, connected on first use.
pub fn connect_lazy(endpoint: &Endpoint) -> Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(dial))
}

/// A channel to `endpoint` whose connections coalesce their writes the same
/// way, connected now.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(tower::service_fn(dial)).await
}

/// Opens the TCP connection of `uri` (Nagle off); TLS, when the endpoint
/// has it, is added above this by tonic.
async fn dial(uri: Uri) -> io::Result<TokioIo<CoalescedWrites<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} names no host")))?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
    tcp.set_nodelay(true)?;
    Ok(TokioIo::new(CoalescedWrites::new(tcp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl WriteNow for DuplexStream {
        fn write_now(&self, _buf: &[u8]) {}
    }

    /// Bytes still held when a connection is dropped are written out then,
    /// as far as the socket takes them at once.
    #[tokio::test]
    async fn held_bytes_go_out_when_the_connection_is_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut w = CoalescedWrites::new(client.unwrap());
        w.write_all(b"last words").await.unwrap();
        drop(w);
        let (mut peer, _) = accepted.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    /// Writes are held until a flush, and the flush delivers all of them,
    /// in order, in as few writes as it can.
    #[tokio::test]
    async fn held_writes_leave_together_at_the_flush() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = CoalescedWrites::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two ").await.unwrap();
        let mut probe = [0u8; 16];
        let early = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut probe)).await;
        assert!(early.is_err(), "bytes left before the flush: {early:?}");
        w.flush().await.unwrap();
        w.write_all(b"three").await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; 13];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"one two three");
    }

    /// A gRPC server and client both on coalesced connections answer many
    /// concurrent calls, each with its own reply.
    #[tokio::test]
    async fn grpc_calls_cross_coalesced_connections() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("plinth.up", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("plinth.down", tonic_health::ServingStatus::NotServing)
            .await;
        let server = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(crate::server::incoming(listener));
        let calls = async {
            let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
            let client = HealthClient::new(connect(&endpoint).await.unwrap());
            futures::future::join_all((0..300).map(|i| {
                let mut client = client.clone();
                let service = if i % 3 == 0 { "plinth.down" } else { "plinth.up" };
                async move {
                    let reply = client
                        .check(HealthCheckRequest {
                            service: service.into(),
                        })
                        .await;
                    (i, reply.map(|r| r.into_inner().status))
                }
            }))
            .await
        };
        let replies = tokio::select! {
            replies = calls => replies,
            stopped = server => panic!("the server stopped: {stopped:?}"),
        };
        for (i, status) in replies {
            let expected = if i % 3 == 0 { 2 } else { 1 };
            assert_eq!(status.unwrap(), expected, "call {i}");
        }
    }

    /// More than the hold limit goes through without waiting for a flush,
    /// and a shutdown writes out what is held first.
    #[tokio::test]
    async fn large_writes_go_through_and_shutdown_writes_what_is_held() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = CoalescedWrites::new(a);
        let big = vec![7u8; HOLD_LIMIT + 1];
        w.write_all(&big).await.unwrap();
        let mut got = vec![0u8; big.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        w.write_all(b"tail").await.unwrap();
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    }
}
