//! Server streams whose messages are gRPC frames before they reach the
//! transport. When one message goes to many streams (config's `Watch`: one
//! revision, thousands of watchers), it is encoded and framed once, and every
//! stream hands the same bytes to HTTP/2: tonic's encoder would copy each
//! message into a buffer of its own per stream, and keep that buffer for the
//! stream's life.
//!
//! Only the response body differs from a tonic server stream: the request,
//! its metadata and any error before the first message go through tonic's
//! own handling, so the wire is the same.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tonic::codec::Codec;
use tonic::server::{Grpc, ServerStreamingService};
use tonic::{Request, Response, Status};

/// gRPC's message prefix: a compression flag and a 32-bit length.
const PREFIX: usize = 5;
/// Frames ready at once that go out as one piece (tonic's yield threshold).
const COALESCE: usize = 32 * 1024;

/// A stream of frames made by [`frame`], or the status that ends it.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// A message too large for one gRPC frame.
#[derive(Debug, thiserror::Error)]
#[error("a message of {0} bytes does not fit in a gRPC frame")]
pub struct FrameTooLarge(pub usize);

/// `message`, encoded, as one uncompressed gRPC frame.
pub fn frame(message: &impl prost::Message) -> Result<Bytes, FrameTooLarge> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| FrameTooLarge(len))?;
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode(&mut buf).map_err(|_| FrameTooLarge(len))?;
    Ok(Bytes::from(buf))
}

/// The message in a frame made by [`frame`].
pub fn unframe<M: prost::Message + Default>(frame: &[u8]) -> Result<M, Status> {
    let message = frame
        .get(PREFIX..)
        .ok_or_else(|| Status::internal("a gRPC frame shorter than its prefix"))?;
    M::decode(message).map_err(|e| Status::internal(format!("a gRPC frame does not decode: {e}")))
}

/// Serves one call of a server-streaming RPC whose handler answers with a
/// [`FrameStream`]. `codec` decodes the request; its encoder is never used.
pub async fn server_streaming<C, H, F, B>(
    codec: C,
    handler: H,
    request: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    C: Codec,
    C::Decode: Send + 'static,
    C::Encode: Send + 'static,
    H: FnOnce(Request<C::Decode>) -> F + Send + 'static,
    F: Future<Output = Result<Response<FrameStream>, Status>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let slot = Arc::new(Mutex::new(None));
    let capture = Capture::<C::Encode, H> {
        handler: Some(handler),
        slot: slot.clone(),
        _encode: std::marker::PhantomData,
    };
    let response = Grpc::new(codec).server_streaming(capture, request).await;
    let frames = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    match frames {
        // tonic made the headers (content type, the handler's metadata);
        // its body would have sent an empty stream.
        Some(frames) => {
            let (parts, _) = response.into_parts();
            http::Response::from_parts(parts, tonic::body::Body::new(FrameBody::new(frames)))
        }
        // Refused before the stream began: tonic's error response as it is.
        None => response,
    }
}

/// Hands tonic an empty stream with the handler's metadata, and keeps the
/// handler's frames for the body.
struct Capture<E, H> {
    handler: Option<H>,
    slot: Arc<Mutex<Option<FrameStream>>>,
    _encode: std::marker::PhantomData<fn() -> E>,
}

type Empty<E> = futures::stream::Empty<Result<E, Status>>;

impl<R, E, H, F> ServerStreamingService<R> for Capture<E, H>
where
    H: FnOnce(Request<R>) -> F,
    F: Future<Output = Result<Response<FrameStream>, Status>> + Send + 'static,
{
    type Response = E;
    type ResponseStream = Empty<E>;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Empty<E>>, Status>> + Send + 'static>>;

    fn call(&mut self, request: Request<R>) -> Self::Future {
        let Some(handler) = self.handler.take() else {
            return Box::pin(async { Err(Status::internal("a gRPC call was served twice")) });
        };
        let called = handler(request);
        let slot = self.slot.clone();
        Box::pin(async move {
            let (metadata, frames, extensions) = called.await?.into_parts();
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(frames);
            Ok(Response::from_parts(metadata, futures::stream::empty(), extensions))
        })
    }
}

/// A response body that sends frames as they are, then the status trailers.
struct FrameBody {
    frames: FrameStream,
    /// Trailers still to send, once the data before them is out.
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl FrameBody {
    fn new(frames: FrameStream) -> Self {
        Self {
            frames,
            trailers: None,
            ended: false,
        }
    }
}

fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Metadata that is no header: the code alone still ends the call.
        map = HeaderMap::new();
        map.insert(Status::GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
    map
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // One frame goes out as it is; several ready together go out as one
        // piece, as tonic's encoder sends them.
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        while self.trailers.is_none() {
            let size = joined
                .as_ref()
                .map_or(first.as_ref().map_or(0, Bytes::len), BytesMut::len);
            if size >= COALESCE {
                break;
            }
            match self.frames.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => match (&first, &mut joined) {
                    (None, _) => first = Some(frame),
                    (Some(one), None) => {
                        let mut both = BytesMut::with_capacity(one.len() + frame.len());
                        both.extend_from_slice(one);
                        both.extend_from_slice(&frame);
                        joined = Some(both);
                    }
                    (Some(_), Some(all)) => all.extend_from_slice(&frame),
                },
                Poll::Ready(Some(Err(status))) => self.trailers = Some(trailers(&status)),
                Poll::Ready(None) => self.trailers = Some(trailers(&Status::ok(""))),
                Poll::Pending => break,
            }
        }
        if let Some(all) = joined {
            return Poll::Ready(Some(Ok(Frame::data(all.freeze()))));
        }
        if let Some(one) = first {
            return Poll::Ready(Some(Ok(Frame::data(one))));
        }
        match self.trailers.take() {
            Some(trailers) => {
                self.ended = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use http_body::Body as _;
    use prost_types::Duration as Message;

    use super::*;

    fn message(seconds: i64) -> Message {
        Message { seconds, nanos: 7 }
    }

    /// A frame is tonic's: flag 0, big-endian length, the encoding.
    #[test]
    fn a_frame_is_the_prefixed_encoding() {
        let m = message(42);
        let framed = frame(&m).unwrap();
        let encoded = prost::Message::encode_to_vec(&m);
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize,
            encoded.len()
        );
        assert_eq!(&framed[PREFIX..], &encoded[..]);
        assert_eq!(unframe::<Message>(&framed).unwrap(), m);
        assert_eq!(
            unframe::<Message>(&framed[..3]).unwrap_err().code(),
            tonic::Code::Internal
        );
    }

    async fn next(body: &mut FrameBody) -> Option<Frame<Bytes>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .map(|f| f.unwrap())
    }

    /// Frames pass through untouched, those ready together go as one piece,
    /// and the stream's end or error becomes the status trailers.
    #[tokio::test]
    async fn the_body_sends_frames_then_the_status() {
        let (a, b, c) = (
            frame(&message(1)).unwrap(),
            frame(&message(2)).unwrap(),
            frame(&message(3)).unwrap(),
        );
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, Status>>();
        let mut body = FrameBody::new(rx.boxed());
        tx.unbounded_send(Ok(a.clone())).unwrap();
        let one = next(&mut body).await.unwrap().into_data().unwrap();
        assert_eq!(one.as_ptr(), a.as_ptr(), "a lone frame is sent without a copy");
        tx.unbounded_send(Ok(b.clone())).unwrap();
        tx.unbounded_send(Ok(c.clone())).unwrap();
        let two = next(&mut body).await.unwrap().into_data().unwrap();
        assert_eq!(two, [b, c].concat());
        tx.unbounded_send(Err(Status::not_found("environment \"e\" not found")))
            .unwrap();
        let end = next(&mut body).await.unwrap().into_trailers().unwrap();
        assert_eq!(end.get("grpc-status").unwrap(), "5");
        assert_eq!(end.get("grpc-message").unwrap(), "environment%20%22e%22%20not%20found");
        assert!(body.is_end_stream());
        assert!(next(&mut body).await.is_none());

        let mut finished = FrameBody::new(futures::stream::iter([Ok(a.clone())]).boxed());
        assert_eq!(next(&mut finished).await.unwrap().into_data().unwrap(), a);
        let end = next(&mut finished).await.unwrap().into_trailers().unwrap();
        assert_eq!(end.get("grpc-status").unwrap(), "0");
        assert!(end.get("grpc-message").is_none());
    }
}
