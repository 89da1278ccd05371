//! One device connection after the upgrade: one task, one small state, one
//! `select!` over the next device frame, the outbound queue, the shared
//! heartbeat tick and (only near the token's end) an expiry timer.
//! Generic over the stream so the same code runs over TCP, TLS, and the
//! in-memory pipes of the scale bench.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::dispatch::now_ms;
use crate::hub::{ConnHandle, Frame, Out};
use crate::metrics::DropReason;
use crate::protocol::{self, CloseReason, DeviceFrame, FrameError};

use super::handshake::Admitted;
use super::ticker::unix_secs;
use super::ws::Ws;
use super::DeviceCtx;

/// Refused frames (`bad_frame`, `unknown_type`) tolerated on one connection;
/// the next closes it with 1008.
const MAX_FRAME_ERRORS: u8 = 10;
/// Pending messages read from the store per page when catching up.
const CATCH_UP_PAGE: usize = 128;
/// Most bytes of frames taken from the queue that go to the socket in one
/// write (frames are copied together up to this; a single frame is not).
const GATHER_BYTES: usize = 16 * 1024;
/// How long the closing handshake may take before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The per-connection state that lives as long as the connection (besides
/// the socket and tungstenite's own): its size is asserted in a test.
pub(crate) struct Session {
    pub(crate) conn: ConnHandle,
    ctx: Arc<DeviceCtx>,
    /// The token's `topics` claim.
    allowed: Box<[String]>,
    /// The token's `exp` (unix seconds).
    exp: u64,
    /// Highest device-directed seq written to this socket.
    last_sent: u64,
    /// A frame whose write was abandoned part way; the close writes the
    /// rest before anything else.
    unfinished: Option<Box<Unfinished>>,
    /// Coarse unix seconds of the last frame or pong from the device
    /// (`u32`, like `Session`'s other small fields, keeps it in 64 bytes).
    last_rx: u32,
    /// The last heartbeat tick this connection handled.
    seen_tick: u16,
    /// Refused frames so far.
    errors: u8,
}

/// Frame opcodes (RFC 6455 §5.2) of the frames written directly.
const OP_TEXT: u8 = 0x1;
const OP_PING: u8 = 0x9;

/// The header of an unmasked final frame, as a server sends it.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    bytes: [u8; 10],
    len: u8,
}

impl FrameHead {
    /// No header: the payload is already whole frames (`on_queue`'s
    /// gathered writes).
    const NONE: FrameHead = FrameHead {
        bytes: [0; 10],
        len: 0,
    };

    fn new(opcode: u8, payload_len: usize) -> FrameHead {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode;
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if let Ok(n) = u16::try_from(payload_len) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&n.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        FrameHead { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// What is left of a frame whose write stopped part way (a timeout or a
/// close request while the socket was full): without it the next bytes on
/// the socket would land inside that frame.
struct Unfinished {
    head: FrameHead,
    payload: Bytes,
    sent: usize,
}

/// Write `head` and `payload` from byte `*sent` on, counting progress in
/// `*sent`, so that a write dropped part way can be finished later.
async fn write_frame<S>(
    stream: &mut S,
    head: &FrameHead,
    payload: &[u8],
    sent: &mut usize,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let head = head.as_slice();
    let total = head.len() + payload.len();
    while *sent < total {
        let n = match head.get(*sent..) {
            Some(rest) if !rest.is_empty() => {
                let bufs = [IoSlice::new(rest), IoSlice::new(payload)];
                stream.write_vectored(&bufs).await?
            }
            _ => stream.write(&payload[*sent - head.len()..]).await?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        *sent += n;
    }
    Ok(())
}

enum Flow {
    Continue,
    Close(CloseReason, u64),
    /// The socket is gone (closed by the device or failed).
    Gone,
}

/// Why a write did not finish.
enum WriteFail {
    /// The device did not take the bytes within the write timeout.
    Timeout,
    /// The socket is gone.
    Socket,
    /// A close was requested while the write waited (a slow consumer is
    /// told so by the hub while its socket is still full).
    Closing,
}

/// A device connection after the upgrade: the socket and the session
/// state. Built once, then driven by [`Connection::run`] through
/// `&mut self`, so no async layer holds a second copy of it.
pub struct Connection<S> {
    ws: Ws<S>,
    session: Session,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Take over an upgraded stream (`admitted.leftover` are early bytes
    /// the device sent after its request head).
    pub async fn open(ctx: Arc<DeviceCtx>, stream: S, admitted: Admitted) -> Connection<S> {
        let ws = Ws::new(stream, admitted.leftover, ctx.ws_config);
        let app = ctx.hub.app_id(admitted.conn.app);
        ctx.metrics.connections.with_label_values(&[&**app]).inc();
        ctx.metrics
            .connections_opened
            .with_label_values(&[&**app])
            .inc();
        record_session(&ctx, &admitted.conn);
        Connection {
            ws,
            session: Session {
                seen_tick: ctx.ticker.current(admitted.conn.id),
                last_rx: ctx.ticker.now_secs() as u32,
                conn: admitted.conn,
                ctx,
                allowed: admitted.allowed,
                exp: admitted.exp,
                last_sent: 0,
                unfinished: None,
                errors: 0,
            },
        }
    }

    /// Serve the connection to its end; unregisters it on the way out.
    pub async fn run(&mut self) {
        let reason = self.session.serve(&mut self.ws).await;
        let s = &self.session;
        let app = s.ctx.hub.app_id(s.conn.app);
        s.ctx.hub.unregister(&s.conn);
        s.ctx.metrics.connections.with_label_values(&[&**app]).dec();
        s.ctx
            .metrics
            .connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
        tracing::debug!(app = %app, device = %s.conn.device, reason = reason.as_str(), "connection closed");
    }
}

/// Count the session in the registry without holding up the hello: a
/// durable store may batch it with the next commit.
fn record_session(ctx: &Arc<DeviceCtx>, conn: &ConnHandle) {
    let store = ctx.store.clone();
    let app = ctx.hub.app_id(conn.app).clone();
    let device = conn.device.clone();
    tokio::spawn(async move {
        if let Err(e) = store.record_session(&app, &device, now_ms()).await {
            tracing::warn!(%app, %device, error = %e, "could not record the session");
        }
    });
}

/// Wait on an optional timer; never resolves when there is none.
async fn maybe_sleep(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn serve<S>(&mut self, ws: &mut Ws<S>) -> CloseReason
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let hb = self.ctx.cfg.heartbeat_secs;
        let hello = protocol::hello_frame(&self.conn.device, hb);
        let start = async {
            self.send_text(ws, Utf8Bytes::from(hello)).await?;
            self.catch_up(ws, true).await?;
            self.flush(ws).await
        };
        if let Err(fail) = Box::pin(start).await {
            match self.fail_flow(fail) {
                Flow::Continue => {} // the close request is handled below
                Flow::Close(reason, retry_ms) => {
                    Box::pin(self.close(ws, reason, retry_ms)).await;
                    return reason;
                }
                Flow::Gone => return CloseReason::Remote,
            }
        }
        let mut expiry: Option<Pin<Box<Sleep>>> = None;
        self.arm_expiry(&mut expiry, unix_secs());

        loop {
            let flow = tokio::select! {
                biased;
                // The handlers are boxed: their futures (writes under
                // timeouts, store calls) exist only while they run, so the
                // task at rest keeps just this select's small futures.
                _ = self.conn.wait() => Box::pin(self.on_queue(ws)).await,
                msg = ws.next() => Box::pin(self.on_device(ws, msg)).await,
                _ = self.ctx.ticker.tick(self.conn.id, &mut self.seen_tick) => {
                    Box::pin(self.on_tick(ws, &mut expiry)).await
                }
                _ = maybe_sleep(&mut expiry) => Flow::Close(CloseReason::TokenExpired, 0),
            };
            match flow {
                Flow::Continue => {}
                Flow::Close(reason, retry_ms) => {
                    Box::pin(self.close(ws, reason, retry_ms)).await;
                    return reason;
                }
                Flow::Gone => return CloseReason::Remote,
            }
        }
    }

    /// Arm the precise expiry timer once the token's end is within the next
    /// heartbeat (so an idle connection holds no timer until then).
    fn arm_expiry(&self, expiry: &mut Option<Pin<Box<Sleep>>>, now: u64) {
        if expiry.is_none() && self.exp <= now + self.ctx.cfg.heartbeat_secs + 1 {
            let left = Duration::from_secs(self.exp.saturating_sub(now));
            *expiry = Some(Box::pin(tokio::time::sleep(left)));
        }
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.ctx.cfg.heartbeat_secs.max(5))
    }

    /// Run one write under the write timeout, abandoning it if a close is
    /// requested meanwhile (a full socket must not keep a slow consumer
    /// open until the timeout).
    async fn write_op<E>(
        &self,
        op: impl std::future::Future<Output = Result<(), E>>,
    ) -> Result<(), WriteFail> {
        let result = tokio::select! {
            r = tokio::time::timeout(self.write_timeout(), op) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(WriteFail::Socket),
                Err(_) => Err(WriteFail::Timeout),
            },
            _ = self.conn.closed() => Err(WriteFail::Closing),
        };
        self.conn.rearm();
        result
    }

    async fn send_text<S>(&mut self, ws: &mut Ws<S>, text: Utf8Bytes) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.send_frame(ws, OP_TEXT, text).await
    }

    /// Write one frame straight to the socket, not through tungstenite's
    /// out buffer: that buffer keeps the capacity of the largest frame it
    /// ever held for the connection's life (measured: 264 bytes more per
    /// connection after a burst of broadcasts), and a broadcast's frame,
    /// shared by every connection, would be copied into it each time.
    /// Whatever tungstenite still holds (a pong it queued while reading)
    /// is flushed first, so frames never interleave.
    async fn send_frame<S>(
        &mut self,
        ws: &mut Ws<S>,
        opcode: u8,
        payload: Utf8Bytes,
    ) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let head = FrameHead::new(opcode, payload.len());
        self.send_raw(ws, head, Bytes::from(payload)).await
    }

    /// Write `head` and `payload` under the write timeout, keeping what is
    /// left of them if the write stops part way.
    async fn send_raw<S>(
        &mut self,
        ws: &mut Ws<S>,
        head: FrameHead,
        payload: Bytes,
    ) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut sent = 0;
        let op = async {
            ws.flush().await.map_err(|_| ())?;
            write_frame(ws.get_mut(), &head, &payload, &mut sent)
                .await
                .map_err(|_| ())
        };
        let result = self.write_op(op).await;
        if result.is_err() && sent > 0 && sent < head.as_slice().len() + payload.len() {
            self.unfinished = Some(Box::new(Unfinished {
                head,
                payload,
                sent,
            }));
        }
        result
    }

    async fn flush<S>(&self, ws: &mut Ws<S>) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.write_op(ws.flush()).await
    }

    /// Send the `dropped` notice if the store has one for this device.
    async fn tell_dropped<S>(&mut self, ws: &mut Ws<S>) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let app = self.ctx.hub.app_id(self.conn.app);
        match self.ctx.store.take_dropped(app, &self.conn.device).await {
            Ok(0) => Ok(()),
            Ok(n) => {
                self.send_text(ws, Utf8Bytes::from(protocol::dropped_frame(n)))
                    .await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the dropped count");
                Ok(())
            }
        }
    }

    /// Send every pending message after `last_sent`, in seq order, reading
    /// the store. Used on connect and whenever the queue shows a gap.
    async fn catch_up<S>(&mut self, ws: &mut Ws<S>, dropped: bool) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if dropped {
            self.tell_dropped(ws).await?;
        }
        let app = self.ctx.hub.app_id(self.conn.app).clone();
        loop {
            let page = match self
                .ctx
                .store
                .pending(
                    &app,
                    &self.conn.device,
                    self.last_sent,
                    now_ms(),
                    CATCH_UP_PAGE,
                )
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    // The messages stay pending: the next reconnect retries.
                    tracing::warn!(error = %e, "could not read pending messages");
                    return Ok(());
                }
            };
            let full = page.len() == CATCH_UP_PAGE;
            let now = now_ms();
            for m in page {
                let data = std::str::from_utf8(&m.data).unwrap_or("null");
                let text =
                    protocol::msg_frame(&m.id, protocol::MsgTarget::Device { seq: m.seq }, data);
                self.send_text(ws, Utf8Bytes::from(text)).await?;
                self.last_sent = m.seq;
                self.ctx.metrics.sent(crate::hub::MsgKind::Device).inc();
                self.ctx
                    .metrics
                    .delivery_seconds
                    .observe(now.saturating_sub(m.created_ms) as f64 / 1000.0);
            }
            if !full {
                return Ok(());
            }
        }
    }

    async fn on_queue<S>(&mut self, ws: &mut Ws<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (queue, close) = self.conn.take();
        if let Some((reason, retry_ms)) = close {
            if reason == CloseReason::SlowConsumer {
                self.ctx
                    .metrics
                    .dropped(DropReason::SlowConsumer)
                    .inc_by(queue.iter().filter(|o| o.seq == 0).count() as u64);
            }
            return Flow::Close(reason, retry_ms);
        }
        let mut queue = queue;
        in_seq_order(&mut queue);
        // Frames that follow on from what was sent are gathered and written
        // together: one write per wake-up, not one per frame (a loopback
        // write per frame was a fifth of the gateway's CPU at saturation).
        let mut gathered: Vec<Arc<Frame>> = Vec::new();
        let mut bytes = 0;
        for out in queue {
            let mut gap = false;
            if out.seq > 0 {
                if out.seq <= self.last_sent {
                    continue; // already sent by a catch-up
                }
                // A gap (a frame handed over after a later one) or drops
                // to report: read the store, which has this message too
                // unless it was collapsed or dropped.
                gap = out.seq != self.last_sent + 1 || out.frame.check_dropped;
            }
            if gap || bytes + out.frame.text.len() > GATHER_BYTES {
                if let Err(fail) = self.send_gathered(ws, &mut gathered).await {
                    return self.fail_flow(fail);
                }
                bytes = 0;
            }
            if gap {
                if let Err(fail) = self.catch_up(ws, out.frame.check_dropped).await {
                    return self.fail_flow(fail);
                }
                continue;
            }
            if out.seq > 0 {
                self.last_sent = out.seq;
            }
            bytes += out.frame.text.len() + 10;
            gathered.push(out.frame);
        }
        if let Err(fail) = self.send_gathered(ws, &mut gathered).await {
            return self.fail_flow(fail);
        }
        match self.flush(ws).await {
            Ok(()) => Flow::Continue,
            Err(fail) => self.fail_flow(fail),
        }
    }

    /// Write the gathered frames (one write, or the frame itself when there
    /// is one) and count them as sent.
    async fn send_gathered<S>(
        &mut self,
        ws: &mut Ws<S>,
        gathered: &mut Vec<Arc<Frame>>,
    ) -> Result<(), WriteFail>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match gathered.as_slice() {
            [] => return Ok(()),
            [one] => self.send_text(ws, one.text.clone()).await?,
            several => {
                let whole = gather(several);
                self.send_raw(ws, FrameHead::NONE, whole).await?
            }
        }
        let m = &self.ctx.metrics;
        for frame in gathered.drain(..) {
            m.sent(frame.kind).inc();
            m.delivery_seconds
                .observe(frame.accepted.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn fail_flow(&self, fail: WriteFail) -> Flow {
        match fail {
            // Still connected but not reading: close as a slow consumer
            // (best effort: the bye may not get through).
            WriteFail::Timeout => Flow::Close(CloseReason::SlowConsumer, retry_jitter()),
            WriteFail::Socket => Flow::Gone,
            // The main loop picks the close request up next.
            WriteFail::Closing => Flow::Continue,
        }
    }

    async fn on_device<S>(&mut self, ws: &mut Ws<S>, msg: Option<Result<Message, WsError>>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let msg = match msg {
            None => return Flow::Gone,
            Some(Ok(m)) => m,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                return Flow::Close(CloseReason::FrameTooLarge, 0)
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "device socket error");
                return Flow::Gone;
            }
        };
        self.last_rx = self.ctx.ticker.now_secs() as u32;
        let answer = match msg {
            Message::Text(text) => match protocol::parse_device_frame(&text) {
                Ok(frame) => self.on_frame(frame).await,
                Err(refusal) => self.refuse(refusal.code, &refusal.message),
            },
            Message::Binary(_) => self.refuse(
                FrameError::BadFrame,
                "binary frames are not accepted; send JSON text frames",
            ),
            // tungstenite queued the pong; it goes out with the flush below.
            Message::Ping(_) => Answer::None,
            Message::Pong(_) | Message::Frame(_) => return Flow::Continue,
            Message::Close(_) => {
                // tungstenite answered the close; let it reach the device.
                let _ = tokio::time::timeout(CLOSE_WAIT, ws.flush()).await;
                return Flow::Gone;
            }
        };
        let close_after = match answer {
            Answer::None => None,
            Answer::Frame(text) => {
                if let Err(fail) = self.send_text(ws, Utf8Bytes::from(text)).await {
                    return self.fail_flow(fail);
                }
                None
            }
            Answer::FrameThenClose(text) => {
                if let Err(fail) = self.send_text(ws, Utf8Bytes::from(text)).await {
                    return self.fail_flow(fail);
                }
                Some(CloseReason::PolicyViolation)
            }
        };
        if let Err(fail) = self.flush(ws).await {
            return self.fail_flow(fail);
        }
        match close_after {
            Some(reason) => Flow::Close(reason, 0),
            None => Flow::Continue,
        }
    }

    /// Answer a refused frame; the tenth closes the connection.
    fn refuse(&mut self, code: FrameError, message: &str) -> Answer {
        let text = protocol::error_frame(code, message);
        if matches!(code, FrameError::BadFrame | FrameError::UnknownType) {
            self.errors = self.errors.saturating_add(1);
            if self.errors >= MAX_FRAME_ERRORS {
                return Answer::FrameThenClose(text);
            }
        }
        Answer::Frame(text)
    }

    async fn on_frame(&mut self, frame: DeviceFrame) -> Answer {
        match frame {
            DeviceFrame::Ack { seq } => {
                // Only what this connection has sent can be acked: a device
                // acking ahead must not delete messages it never saw.
                let upto = seq.min(self.last_sent);
                if upto > 0 {
                    let app = self.ctx.hub.app_id(self.conn.app);
                    // Not awaited: the store merges a device's queued
                    // acks, so a device acking every message costs the
                    // writer one removal per commit, not one per ack.
                    self.ctx.store.ack_queued(app, &self.conn.device, upto);
                }
                Answer::None
            }
            DeviceFrame::Sub { topic } => {
                if !protocol::topic_allowed(&self.allowed, &topic) {
                    return Answer::Frame(protocol::error_frame(
                        FrameError::Forbidden,
                        &format!("the token does not allow topic `{topic}`"),
                    ));
                }
                let max = self.ctx.cfg.max_topics_per_device;
                if !self.ctx.hub.subscribe(&self.conn, &topic, max) {
                    return Answer::Frame(protocol::error_frame(
                        FrameError::TooManyTopics,
                        &format!("at most {max} subscriptions per connection"),
                    ));
                }
                Answer::Frame(protocol::sub_frame(true, &topic))
            }
            DeviceFrame::Unsub { topic } => {
                self.ctx.hub.unsubscribe(&self.conn, &topic);
                Answer::Frame(protocol::sub_frame(false, &topic))
            }
        }
    }

    async fn on_tick<S>(&mut self, ws: &mut Ws<S>, expiry: &mut Option<Pin<Box<Sleep>>>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let now = self.ctx.ticker.now_secs();
        let hb = self.ctx.cfg.heartbeat_secs;
        if now >= u64::from(self.last_rx) + 2 * hb + 5 {
            return Flow::Close(CloseReason::Idle, 0);
        }
        if self.exp <= now {
            return Flow::Close(CloseReason::TokenExpired, 0);
        }
        self.arm_expiry(expiry, now);
        let sent = match self.send_frame(ws, OP_PING, Utf8Bytes::default()).await {
            Ok(()) => self.flush(ws).await,
            Err(fail) => Err(fail),
        };
        match sent {
            Ok(()) => Flow::Continue,
            Err(fail) => self.fail_flow(fail),
        }
    }

    /// `bye` where the reason has one, then the close frame, then a short
    /// wait for the device's close; everything bounded by `CLOSE_WAIT`.
    async fn close<S>(&mut self, ws: &mut Ws<S>, reason: CloseReason, retry_ms: u64)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let retry_ms = if reason == CloseReason::SlowConsumer && retry_ms == 0 {
            retry_jitter()
        } else {
            retry_ms
        };
        let unfinished = self.unfinished.take();
        let closing = async {
            if let Some(u) = unfinished {
                let mut sent = u.sent;
                write_frame(ws.get_mut(), &u.head, &u.payload, &mut sent)
                    .await
                    .map_err(WsError::Io)?;
            }
            if reason.sends_bye() {
                ws.feed(Message::Text(Utf8Bytes::from(protocol::bye_frame(
                    reason, retry_ms,
                ))))
                .await?;
            }
            ws.send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(reason.code()),
                reason: Utf8Bytes::from_static(""),
            })))
            .await?;
            while let Some(Ok(_)) = ws.next().await {}
            Ok::<(), WsError>(())
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
    }
}

/// Text frames, head and payload each, one after the other.
fn gather(frames: &[Arc<Frame>]) -> Bytes {
    let len = frames.iter().map(|f| f.text.len() + 10).sum();
    let mut whole = Vec::with_capacity(len);
    for f in frames {
        whole.extend_from_slice(FrameHead::new(OP_TEXT, f.text.len()).as_slice());
        whole.extend_from_slice(f.text.as_bytes());
    }
    Bytes::from(whole)
}

/// Puts the device-directed frames of a taken queue in seq order, each
/// other frame keeping its place. Concurrent API calls to one device get
/// their seqs in commit order but hand their frames over in whatever order
/// their tasks run; a frame ahead of its predecessor looks like a gap, and
/// a gap sends the connection to the store (`catch_up`): at saturation that
/// read was 11 % of the runtime's samples. Frames taken together need no
/// read at all once sorted.
fn in_seq_order(queue: &mut [Out]) {
    if queue
        .iter()
        .filter(|o| o.seq > 0)
        .is_sorted_by_key(|o| o.seq)
    {
        return;
    }
    let mut seqd: Vec<Out> = queue.iter().filter(|o| o.seq > 0).cloned().collect();
    seqd.sort_by_key(|o| o.seq);
    let mut sorted = seqd.into_iter();
    for slot in queue.iter_mut().filter(|o| o.seq > 0) {
        if let Some(out) = sorted.next() {
            *slot = out;
        }
    }
}

enum Answer {
    None,
    Frame(String),
    FrameThenClose(String),
}

/// `retry_ms` for a slow consumer: 0–5 s, like draining's.
fn retry_jitter() -> u64 {
    rand::random_range(0..=5000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state kept per connection besides the socket and tungstenite's
    /// buffers. A bound, not a figure: it fails if someone adds a field that
    /// doubles it.
    /// The frames written without tungstenite parse back, with tungstenite's
    /// own parser, as final unmasked frames of the right length.
    #[test]
    fn frame_heads_parse_back() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        for len in [0, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            for (op, want) in [
                (OP_TEXT, OpCode::Data(Data::Text)),
                (OP_PING, OpCode::Control(Control::Ping)),
            ] {
                let head = FrameHead::new(op, len);
                let mut cur = std::io::Cursor::new(head.as_slice());
                let (h, n) = FrameHeader::parse(&mut cur)
                    .expect("valid header")
                    .expect("complete header");
                assert_eq!(n, len as u64);
                assert_eq!(cur.position() as usize, head.as_slice().len());
                assert!(h.is_final && h.mask.is_none());
                assert_eq!(h.opcode, want);
            }
        }
    }

    #[test]
    fn taken_frames_go_out_in_seq_order_others_in_place() {
        let frame = |text: &'static str| {
            Arc::new(crate::hub::Frame {
                text: Utf8Bytes::from_static(text),
                kind: crate::hub::MsgKind::Device,
                accepted: std::time::Instant::now(),
                check_dropped: false,
            })
        };
        let out = |text: &'static str, seq| Out {
            frame: frame(text),
            seq,
        };
        let mut queue = vec![
            out("s5", 5),
            out("topic", 0),
            out("s3", 3),
            out("s4", 4),
            out("now", 0),
        ];
        in_seq_order(&mut queue);
        let got: Vec<(&str, u64)> = queue
            .iter()
            .map(|o| (o.frame.text.as_str(), o.seq))
            .collect();
        assert_eq!(
            got,
            [("s3", 3), ("topic", 0), ("s4", 4), ("s5", 5), ("now", 0)]
        );
        // In order already: untouched.
        let mut queue = vec![out("s1", 1), out("topic", 0), out("s2", 2)];
        in_seq_order(&mut queue);
        assert_eq!(queue[0].seq, 1);
        assert_eq!(queue[2].seq, 2);
    }

    /// Gathered frames read back, with tungstenite's own parser, as the
    /// same text frames in the same order.
    #[test]
    fn gathered_frames_parse_back_one_by_one() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        let texts = [
            "a".repeat(3),
            "b".repeat(125),
            "c".repeat(126),
            "d".repeat(70_000),
        ];
        let frames: Vec<Arc<Frame>> = texts
            .iter()
            .map(|t| {
                Arc::new(Frame {
                    text: Utf8Bytes::from(t.clone()),
                    kind: crate::hub::MsgKind::Device,
                    accepted: std::time::Instant::now(),
                    check_dropped: false,
                })
            })
            .collect();
        let whole = gather(&frames);
        let mut cur = std::io::Cursor::new(&whole[..]);
        for t in &texts {
            let (h, n) = FrameHeader::parse(&mut cur)
                .expect("valid header")
                .expect("complete header");
            assert!(h.is_final && h.mask.is_none());
            let at = cur.position() as usize;
            assert_eq!(&whole[at..at + n as usize], t.as_bytes());
            cur.set_position((at + n as usize) as u64);
        }
        assert_eq!(cur.position() as usize, whole.len());
    }

    #[test]
    fn session_state_is_small() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 64, "Session is {size} bytes");
    }
}
