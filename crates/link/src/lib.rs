//! The async shell around the tunnel [`Session`]: one WebSocket, a reader task and a writer task,
//! and stream handles the gateway and the agent use to move bodies. The session decides
//! everything (credits, limits, drains, timeouts); this crate only moves bytes between it and the
//! socket and wakes the tasks that wait on a stream.
//!
//! Task hand-offs: an application task writes into the session under its lock and wakes the
//! writer; the reader decodes a message, updates the session and wakes the stream's task (or, on
//! the agent, hands a new stream to the acceptor, which spawns its request task). There is no
//! queue between the session and the socket that could fill up and drop a control frame.

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

pub use buildplane_tunnel::session::{
    CloseReason, Config, Event, Moment, Read, RequestHead, ResponseHead, Role, Session, Stats,
    StreamError, StreamId,
};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Notify,
    time::Instant,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// WebSocket read buffer. tungstenite zero-fills the whole buffer before every read, so its
/// default (128 KiB) is resident memory per idle connection; one TLS record (16 KiB) is enough.
pub const READ_BUFFER: usize = 16 * 1024;
/// Bytes of messages written before one flush.
pub const MAX_BATCH: usize = 256 * 1024;

/// The WebSocket settings of both ends: [`READ_BUFFER`], messages and frames up to
/// [`buildplane_tunnel::MAX_MESSAGE`].
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(buildplane_tunnel::MAX_MESSAGE))
        .max_frame_size(Some(buildplane_tunnel::MAX_MESSAGE))
}

/// The WebSocket settings of a v1 connection: messages up to
/// [`buildplane_tunnel::v1::DEFAULT_MAX_MESSAGE`]. A v1 body travels whole in one message, and
/// a message the session refuses (over [`Config::max_v1_message`]) fails its own request only;
/// one over this limit cannot be read at all, and tungstenite ends the connection.
pub fn websocket_config_v1() -> WebSocketConfig {
    websocket_config()
        .max_message_size(Some(buildplane_tunnel::v1::DEFAULT_MAX_MESSAGE))
        .max_frame_size(Some(buildplane_tunnel::v1::DEFAULT_MAX_MESSAGE))
}

/// Called with each stream the peer opens (agent), from the reader task: spawn a task for it.
pub type Acceptor = Box<dyn Fn(StreamHandle) + Send + Sync>;

/// Called with the reason for each message the session ignored (one it cannot decode or does
/// not serve), under the link's lock: count it, nothing slow.
pub type OnIgnored = Arc<dyn Fn(&str) + Send + Sync>;

struct Inner {
    session: Session,
    readers: HashMap<StreamId, Waker>,
    writers: HashMap<StreamId, Waker>,
    /// Tasks waiting for a stream to be abandoned (see [`StreamHandle::abandoned`]).
    watchers: HashMap<StreamId, Waker>,
}

/// One tunnel connection: its session, and the tasks that run its socket.
pub struct Link {
    inner: Mutex<Inner>,
    origin: Instant,
    wake_writer: Notify,
    accepts_streams: AtomicBool,
    /// The session's liveness: true from [`Event::Silent`] to [`Event::Heard`].
    silent: tokio::sync::watch::Sender<bool>,
    last_heard_ms: AtomicU64,
    closed: CancellationToken,
    going_away: CancellationToken,
    finished: CancellationToken,
    acceptor: Option<Acceptor>,
    on_ignored: Option<OnIgnored>,
    version: u16,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("version", &self.version)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Runs `session` over `ws` on two tasks; `acceptor` gets the streams the peer opens.
    pub fn spawn<S>(
        ws: WebSocketStream<S>,
        session: Session,
        acceptor: Option<Acceptor>,
    ) -> Arc<Link>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::spawn_with(ws, session, acceptor, None)
    }

    /// [`Link::spawn`], with `on_ignored` told of each message the session ignored.
    pub fn spawn_with<S>(
        ws: WebSocketStream<S>,
        session: Session,
        acceptor: Option<Acceptor>,
        on_ignored: Option<OnIgnored>,
    ) -> Arc<Link>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let version = session.config().version;
        let link = Arc::new(Link {
            accepts_streams: AtomicBool::new(session.accepts_streams()),
            silent: tokio::sync::watch::Sender::new(false),
            inner: Mutex::new(Inner {
                session,
                readers: HashMap::new(),
                writers: HashMap::new(),
                watchers: HashMap::new(),
            }),
            origin: Instant::now(),
            wake_writer: Notify::new(),
            last_heard_ms: AtomicU64::new(wall_ms()),
            closed: CancellationToken::new(),
            going_away: CancellationToken::new(),
            finished: CancellationToken::new(),
            acceptor,
            on_ignored,
            version,
        });
        let (sink, stream) = ws.split();
        tokio::spawn(write_loop(link.clone(), sink));
        tokio::spawn(read_loop(link.clone(), stream));
        link
    }

    /// The protocol version of the session.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The session's clock now.
    pub fn now(&self) -> Moment {
        Moment(self.origin.elapsed())
    }

    /// Runs `f` on the session, then wakes whoever its events concern.
    pub fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut Session) -> R) -> R {
        let mut accepted = Vec::new();
        let mut wake = Vec::new();
        let (result, transmit) = {
            let mut inner = self.inner.lock();
            let result = f(&mut inner.session);
            self.dispatch(&mut inner, &mut wake, &mut accepted);
            (result, inner.session.wants_transmit())
        };
        self.after(wake, accepted, transmit);
        result
    }

    fn dispatch(&self, inner: &mut Inner, wake: &mut Vec<Waker>, accepted: &mut Vec<StreamId>) {
        while let Some(event) = inner.session.poll_event() {
            match event {
                Event::Accepted(id) => accepted.push(id),
                Event::Readable(id) => {
                    wake.extend(inner.readers.remove(&id));
                    wake.extend(inner.watchers.remove(&id));
                }
                Event::Writable(id) => {
                    wake.extend(inner.writers.remove(&id));
                    wake.extend(inner.watchers.remove(&id));
                }
                Event::GoAway(reason) => {
                    debug!(%reason, "the peer is draining this connection");
                    self.going_away.cancel();
                }
                Event::Silent => {
                    warn!("the peer has not answered a probe: silent connection");
                    self.silent.send_replace(true);
                }
                Event::Heard => {
                    debug!("the silent peer was heard again");
                    self.silent.send_replace(false);
                }
                Event::Ignored(what) => {
                    // OpenChoreo logs these and carries on; so do we, and count them.
                    warn!(%what, "ignored a tunnel message");
                    if let Some(on_ignored) = &self.on_ignored {
                        on_ignored(&what);
                    }
                }
                Event::Closed(reason) => {
                    debug!(%reason, "tunnel session closed");
                    wake.extend(inner.readers.drain().map(|(_, w)| w));
                    wake.extend(inner.writers.drain().map(|(_, w)| w));
                    wake.extend(inner.watchers.drain().map(|(_, w)| w));
                    self.closed.cancel();
                }
            }
        }
        self.accepts_streams
            .store(inner.session.accepts_streams(), Ordering::Relaxed);
    }

    fn after(self: &Arc<Self>, wake: Vec<Waker>, accepted: Vec<StreamId>, transmit: bool) {
        if transmit {
            self.wake_writer.notify_one();
        }
        for waker in wake {
            waker.wake();
        }
        for id in accepted {
            let handle = StreamHandle {
                link: self.clone(),
                id,
            };
            match &self.acceptor {
                Some(acceptor) => acceptor(handle),
                None => drop(handle),
            }
        }
    }

    /// Whether new streams can be opened here (open, not draining).
    pub fn accepts_streams(&self) -> bool {
        self.accepts_streams.load(Ordering::Relaxed)
    }

    /// Whether the peer has gone silent: a probe went unanswered past the session's liveness
    /// timeout and nothing has arrived since (see [`Config::liveness_timeout`]).
    pub fn is_silent(&self) -> bool {
        *self.silent.borrow()
    }

    /// Resolves when the peer is silent (at once if it is now) or the session has ended.
    pub async fn silent(&self) {
        let mut silent = self.silent.subscribe();
        tokio::select! {
            _ = silent.wait_for(|silent| *silent) => {}
            () = self.closed.cancelled() => {}
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.inner.lock().session.open_streams()
    }

    /// The session's counters.
    pub fn stats(&self) -> Stats {
        self.inner.lock().session.stats()
    }

    /// When the peer was last heard from (Unix milliseconds).
    pub fn last_heard_ms(&self) -> u64 {
        self.last_heard_ms.load(Ordering::Relaxed)
    }

    /// Opens a stream (gateway).
    pub fn open(
        self: &Arc<Self>,
        head: RequestHead,
        end: bool,
    ) -> Result<StreamHandle, StreamError> {
        let id = self.with(|s| s.open(head, end))?;
        Ok(StreamHandle {
            link: self.clone(),
            id,
        })
    }

    /// Starts a drain (`GoAway`): no new streams; the session closes when the ones in flight end.
    pub fn go_away(self: &Arc<Self>, reason: &str) {
        self.with(|s| s.go_away(reason));
    }

    /// Closes now: every stream in flight ends with `Lost`.
    pub fn close(self: &Arc<Self>, reason: &str) {
        self.with(|s| s.close(reason));
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Resolves when the socket is done (the `Close` written, or the write side failed).
    pub async fn finished(&self) {
        self.finished.cancelled().await
    }

    /// Resolves when the peer says `GoAway` (or the session ends).
    pub async fn going_away(&self) {
        tokio::select! {
            () = self.going_away.cancelled() => {}
            () = self.closed.cancelled() => {}
        }
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.lock().session.close_reason().cloned()
    }
}

async fn read_loop<S>(link: Arc<Link>, mut stream: futures::stream::SplitStream<WebSocketStream<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = link.closed.cancelled() => return,
        };
        link.last_heard_ms.store(wall_ms(), Ordering::Relaxed);
        let now = link.now();
        match message {
            Some(Ok(Message::Binary(bytes))) => link.with(|s| s.handle_binary(bytes, now)),
            Some(Ok(Message::Text(text))) => link.with(|s| s.handle_text(text.as_str(), now)),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                link.with(|s| s.handle_keepalive(now))
            }
            Some(Ok(Message::Close(frame))) => {
                let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                link.with(|s| s.handle_transport_closed(&format!("closed by the peer: {reason}")));
                return;
            }
            Some(Err(err)) => {
                link.with(|s| s.handle_transport_closed(&err.to_string()));
                return;
            }
            None => {
                link.with(|s| s.handle_transport_closed("the peer closed the connection"));
                return;
            }
        }
    }
}

async fn write_loop<S>(
    link: Arc<Link>,
    mut sink: futures::stream::SplitSink<WebSocketStream<S>, Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut batch = Vec::new();
    loop {
        // Timers first, so a busy writer still sends pings and resets stalled streams.
        let due = link.inner.lock().session.poll_timeout();
        let now = link.now();
        if due.is_some_and(|due| now >= due) {
            link.with(|s| s.handle_timeout(now));
        }
        let (closed, deadline) = {
            let mut inner = link.inner.lock();
            let mut bytes = 0;
            while bytes < MAX_BATCH {
                let Some(transmit) = inner.session.poll_transmit() else {
                    break;
                };
                bytes += match &transmit {
                    buildplane_tunnel::session::Transmit::Binary(b) => b.len(),
                    buildplane_tunnel::session::Transmit::Text(t) => t.len(),
                    _ => 0,
                };
                batch.push(transmit);
            }
            (inner.session.is_closed(), inner.session.poll_timeout())
        };
        let mut ended = false;
        for transmit in batch.drain(..) {
            let message = match transmit {
                buildplane_tunnel::session::Transmit::Binary(bytes) => Message::Binary(bytes),
                buildplane_tunnel::session::Transmit::Text(text) => Message::Text(text.into()),
                buildplane_tunnel::session::Transmit::Ping => Message::Ping(Bytes::new()),
                buildplane_tunnel::session::Transmit::Close(reason) => {
                    ended = true;
                    let code = if reason == CloseReason::Drained.to_string() {
                        CloseCode::Normal
                    } else {
                        CloseCode::Policy
                    };
                    Message::Close(Some(CloseFrame {
                        code,
                        reason: truncate(&reason, 120).into(),
                    }))
                }
            };
            if let Err(err) = sink.feed(message).await {
                link.with(|s| s.handle_transport_closed(&format!("write failed: {err}")));
                ended = true;
                break;
            }
        }
        if sink.flush().await.is_err() {
            link.with(|s| s.handle_transport_closed("flush failed"));
            ended = true;
        }
        if ended || (closed && batch.is_empty() && link.is_closed()) {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            link.finished.cancel();
            return;
        }
        if link.inner.lock().session.wants_transmit() {
            continue;
        }
        match deadline {
            Some(deadline) => {
                let at = link.origin + deadline.0;
                tokio::select! {
                    () = link.wake_writer.notified() => {}
                    () = link.closed.cancelled() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => tokio::select! {
                () = link.wake_writer.notified() => {}
                () = link.closed.cancelled() => {}
            },
        }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One stream of a [`Link`]: read what the peer sends, write a body under credits, finish or
/// reset. Dropping it before the stream ended resets the stream (the peer stops working).
pub struct StreamHandle {
    link: Arc<Link>,
    id: StreamId,
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamHandle {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The link it belongs to.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Polls for the next item; a stream the session no longer knows has ended (`Lost`).
    pub fn poll_read(&self, cx: &mut Context<'_>) -> Poll<Read> {
        poll_read(&self.link, self.id, cx)
    }

    /// The next item: a head, a body chunk, or the end (`End`, `Reset`, `Lost`).
    pub async fn read(&self) -> Read {
        poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Sends the response head (agent).
    pub fn respond(&self, head: ResponseHead, end: bool) -> Result<(), StreamError> {
        self.link.with(|s| s.respond(self.id, head, end))
    }

    /// Sends the response head with the body's first bytes, and its end when `end`, in one step,
    /// so a small response leaves in one message (head, data and end batched). Returns the
    /// bytes the stream's credit did not take: [`StreamHandle::write`] them, then finish.
    pub fn respond_with(
        &self,
        head: ResponseHead,
        mut first: Bytes,
        end: bool,
    ) -> Result<Bytes, StreamError> {
        self.link.with(|s| {
            if first.is_empty() {
                return s.respond(self.id, head, end).map(|()| first);
            }
            s.respond(self.id, head, false)?;
            s.send_data(self.id, &mut first)?;
            if end && first.is_empty() {
                s.finish(self.id)?;
            }
            Ok(first)
        })
    }

    /// Writes body bytes, waiting for credit as needed.
    pub async fn write(&self, mut data: Bytes) -> Result<(), StreamError> {
        poll_fn(|cx| {
            let mut inner = self.link.inner.lock();
            while !data.is_empty() {
                match inner.session.send_data(self.id, &mut data) {
                    Ok(0) => {
                        inner.writers.insert(self.id, cx.waker().clone());
                        self.flush_events(inner);
                        return Poll::Pending;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        self.flush_events(inner);
                        return Poll::Ready(Err(err));
                    }
                }
            }
            self.flush_events(inner);
            Poll::Ready(Ok(()))
        })
        .await
    }

    fn flush_events(&self, mut inner: parking_lot::MutexGuard<'_, Inner>) {
        let mut wake = Vec::new();
        let mut accepted = Vec::new();
        self.link.dispatch(&mut inner, &mut wake, &mut accepted);
        let transmit = inner.session.wants_transmit();
        drop(inner);
        self.link.after(wake, accepted, transmit);
    }

    /// Ends this side's body.
    pub fn finish(&self) -> Result<(), StreamError> {
        self.link.with(|s| s.finish(self.id))
    }

    /// Abandons the stream with `code` and `reason`: the peer is told, reads end, writes fail.
    pub fn reset(&self, code: u16, reason: &str) {
        self.link.with(|s| s.reset(self.id, code, reason));
    }

    /// Resolves when the stream has been abandoned (the peer reset it, the connection ended) or
    /// has ended both ways. Reads nothing: the body stays for its reader.
    pub async fn abandoned(&self) {
        poll_fn(|cx| {
            let mut inner = self.link.inner.lock();
            if inner.session.is_abandoned(self.id) {
                return Poll::Ready(());
            }
            inner.watchers.insert(self.id, cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The rest of the peer's body when it has all arrived in one chunk (or none) and its end:
    /// the stream has then ended. `None` when it is still arriving or came in several chunks
    /// (read it as a [`BodyStream`]).
    pub fn take_whole_body(&self) -> Option<Bytes> {
        self.link.with(|s| s.take_whole_body(self.id))
    }

    /// Whether the next item is the end of the peer's body (a response with no body).
    pub fn at_end(&self) -> bool {
        self.link.inner.lock().session.next_is_end(self.id)
    }

    /// The rest of the peer's body as a stream of chunks for an HTTP body: ends at `End`, fails
    /// with the reason at `Reset` or `Lost`. Dropping it drops the stream (a reset unless the
    /// stream had ended).
    pub fn into_body(self) -> BodyStream {
        BodyStream {
            link: self.link.clone(),
            id: self.id,
            _owner: Some(self),
            done: false,
        }
    }

    /// The rest of the peer's body, read while this handle stays with the caller (the agent
    /// streams a request body into the build cluster's API server and answers on the handle).
    pub fn body(&self) -> BodyStream {
        BodyStream {
            link: self.link.clone(),
            id: self.id,
            _owner: None,
            done: false,
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let id = self.id;
        let mut inner = self.link.inner.lock();
        inner.readers.remove(&id);
        inner.writers.remove(&id);
        inner.watchers.remove(&id);
        if inner.session.contains(id) {
            inner.session.abandon(id);
        }
        self.flush_events(inner);
    }
}

/// The next item of stream `id`, or `Lost` once the session no longer knows it.
fn poll_read(link: &Arc<Link>, id: StreamId, cx: &mut Context<'_>) -> Poll<Read> {
    let mut inner = link.inner.lock();
    if let Some(item) = inner.session.read(id) {
        let mut wake = Vec::new();
        let mut accepted = Vec::new();
        link.dispatch(&mut inner, &mut wake, &mut accepted);
        let transmit = inner.session.wants_transmit();
        drop(inner);
        link.after(wake, accepted, transmit);
        return Poll::Ready(item);
    }
    if !inner.session.contains(id) {
        let reason = inner
            .session
            .close_reason()
            .map_or_else(|| "the stream has ended".to_owned(), ToString::to_string);
        return Poll::Ready(Read::Lost {
            reason,
            before_head: false,
        });
    }
    inner.readers.insert(id, cx.waker().clone());
    Poll::Pending
}

/// A stream's body as `futures::Stream` of chunks (see [`StreamHandle::into_body`] and
/// [`StreamHandle::body`]).
pub struct BodyStream {
    link: Arc<Link>,
    id: StreamId,
    _owner: Option<StreamHandle>,
    done: bool,
}

impl futures::Stream for BodyStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match poll_read(&self.link, self.id, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        if !matches!(item, Read::Data(_)) {
            self.done = true;
        }
        Poll::Ready(match item {
            Read::Data(bytes) => Some(Ok(bytes)),
            Read::End => None,
            Read::Reset { code, reason } => Some(Err(std::io::Error::other(format!(
                "the peer reset the stream ({code}): {reason}"
            )))),
            Read::Lost { reason, .. } => Some(Err(std::io::Error::other(format!(
                "the tunnel connection ended mid-body: {reason}"
            )))),
            Read::Request(_) | Read::Response(_) => {
                Some(Err(std::io::Error::other("a second head in one stream")))
            }
        })
    }
}

#[cfg(test)]
mod tests;

/// Two links over an in-memory socket with real WebSocket framing, for tests of the shells
/// (the gateway's registry, the agent's request path, benches of the session alone).
pub async fn loopback_pair(
    gateway: Config,
    agent: Config,
    acceptor: Option<Acceptor>,
) -> (Arc<Link>, Arc<Link>) {
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
    let (a, b) = tokio::io::duplex(256 * 1024);
    let gateway_ws =
        WebSocketStream::from_raw_socket(a, WsRole::Server, Some(websocket_config())).await;
    let agent_ws =
        WebSocketStream::from_raw_socket(b, WsRole::Client, Some(websocket_config())).await;
    let gateway = Link::spawn(gateway_ws, Session::new(gateway, Moment::default()), None);
    let agent = Link::spawn(agent_ws, Session::new(agent, Moment::default()), acceptor);
    (gateway, agent)
}
