//! tungstenite's protocol state over an async stream, driven by the one
//! task that owns the connection.
//!
//! tokio-tungstenite's `WebSocketStream` does the same, but lets its
//! `Stream` and `Sink` halves be polled from different tasks: for that it
//! allocates two waker `Arc`s per connection (2 × 64 bytes, heaptrack) that
//! route a socket's wake-up to both. A pushgate connection is read and
//! written by its own task only, so the task's waker is given to the
//! socket directly and nothing is allocated besides tungstenite's state.
//! The behaviour is tokio-tungstenite's: a message queued while the socket
//! is full is flushed before the next one, and a closed connection reads
//! as the end of the stream.

use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A server-side WebSocket over `S`.
pub struct Ws<S> {
    ctx: WebSocketContext,
    stream: S,
    /// The connection ended or failed: reads return the end of the stream.
    ended: bool,
    /// Nothing queued in tungstenite waits for the socket.
    ready: bool,
}

/// `S` as the blocking `Read + Write` tungstenite expects: "would block"
/// when the socket is not ready, with `cx`'s waker registered for it.
struct SyncIo<'a, 'b, S> {
    stream: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for SyncIo<'_, '_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(out);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<'_, '_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, data) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.stream).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// tungstenite's "would block" as `Pending` (the waker is registered).
fn pending_on_block<T>(r: Result<T, WsError>) -> Poll<Result<T, WsError>> {
    match r {
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

impl<S> Ws<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Take over an upgraded stream; `part` are bytes already read after
    /// the request head.
    pub fn new(stream: S, part: Vec<u8>, config: WebSocketConfig) -> Ws<S> {
        Ws {
            ctx: WebSocketContext::from_partially_read(part, Role::Server, Some(config)),
            stream,
            ended: false,
            ready: true,
        }
    }

    /// The socket itself, for writes that bypass tungstenite (flush first).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut io = SyncIo {
            stream: &mut self.stream,
            cx,
        };
        let r = std::task::ready!(pending_on_block(self.ctx.flush(&mut io)));
        self.ready = true;
        Poll::Ready(match r {
            // The close handshake just finished: flushing is done.
            Err(WsError::ConnectionClosed) => Ok(()),
            other => other,
        })
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut io = SyncIo {
            stream: &mut self.stream,
            cx,
        };
        match std::task::ready!(pending_on_block(self.ctx.read(&mut io))) {
            Ok(m) => Poll::Ready(Some(Ok(m))),
            Err(e) => {
                self.ended = true;
                if matches!(e, WsError::AlreadyClosed | WsError::ConnectionClosed) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }

    /// The next message; `None` once the connection is closed. Not an
    /// async fn: this future is part of every idle connection's task, and
    /// as a plain `poll_fn` it is one pointer.
    pub fn next(&mut self) -> impl Future<Output = Option<Result<Message, WsError>>> + '_ {
        poll_fn(move |cx| self.poll_next(cx))
    }

    /// Write everything tungstenite holds to the socket, and flush it.
    pub async fn flush(&mut self) -> Result<(), WsError> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Queue `msg` (written at once as far as the socket takes it); a
    /// message queued earlier while the socket was full goes first.
    pub async fn feed(&mut self, msg: Message) -> Result<(), WsError> {
        let mut msg = Some(msg);
        poll_fn(|cx| {
            if !self.ready {
                std::task::ready!(self.poll_flush(cx))?;
            }
            let Some(m) = msg.take() else {
                return Poll::Ready(Ok(()));
            };
            let mut io = SyncIo {
                stream: &mut self.stream,
                cx,
            };
            Poll::Ready(match self.ctx.write(&mut io, m) {
                Ok(()) => Ok(()),
                // Accepted and queued: the next feed or flush writes it.
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready = false;
                    Ok(())
                }
                Err(e) => Err(e),
            })
        })
        .await
    }

    /// `feed`, then `flush`.
    pub async fn send(&mut self, msg: Message) -> Result<(), WsError> {
        self.feed(msg).await?;
        self.flush().await
    }
}
