//! The tunnel session: the one owner of a connection's protocol state, for both ends and both
//! versions. Sans-IO, in the manner of h2's `proto` and quinn-proto: the shell feeds it the
//! messages it reads ([`Session::handle_binary`], [`Session::handle_text`]) and the time
//! ([`Session::handle_timeout`]), writes what [`Session::poll_transmit`] returns, and wakes the
//! tasks [`Session::poll_event`] names. The application opens, reads, writes, finishes and
//! resets streams through the same value.
//!
//! What it guarantees by construction:
//! - Control frames (credits, resets, pongs, `GoAway`) are state, not messages in a queue that
//!   can be full: a credit owed is a number on its stream, sent before any data, so a grant is
//!   never lost and no stream waits for one that was given.
//! - Every stream ends exactly once for the application: with `End`, `Reset` or `Lost` (the
//!   connection ended first), then it is forgotten. A stream the application drops is reset.
//! - Memory a peer controls is bounded: streams by [`Config::max_streams`] (excess `RequestHead`s
//!   are refused with 503 before any work), body bytes by each stream's window, heads and
//!   control frames by their own frame limits, owed resets by the stream limit.
//! - `GoAway` is a drain: no new streams either way once it is sent or received, streams in
//!   flight finish until [`Config::drain_timeout`], then the session closes.
//! - A stream whose body makes no progress (no credit from the peer, or bytes its own reader
//!   leaves unread) for [`Config::stall_timeout`] is reset with a reason.
//!
//! v1 (OpenChoreo's JSON) runs as a degenerate mode of the same streams: a request is one
//! message, so the session gathers the head, the body and the end, then sends one
//! `HTTPTunnelRequest` (or `HTTPTunnelResponse`); there are no credits.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use bytes::{Bytes, BytesMut};

use crate::{
    v1,
    v2::{self, Frame, Frames, Limits},
    version,
};

/// A point on the shell's monotonic clock: the time since an origin the shell chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moment(pub Duration);

impl Moment {
    fn after(self, duration: Duration) -> Moment {
        Moment(self.0.saturating_add(duration))
    }
}

/// A stream of the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which end of the tunnel this session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts streams and answers them (the cluster agent).
    Agent,
    /// Opens streams (the cluster gateway).
    Gateway,
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which end this is.
    pub role: Role,
    /// The negotiated protocol: [`version::V1`] or [`version::V2`].
    pub version: u16,
    /// The agent's planeID, sent in `Hello`.
    pub plane_id: String,
    /// Body bytes a peer may send on one stream before a credit (v2).
    pub initial_window: u32,
    /// Streams open at once: beyond it an agent refuses a `RequestHead` with 503, a gateway
    /// refuses to open one.
    pub max_streams: usize,
    /// Frame limits for what the peer sends.
    pub limits: Limits,
    /// Largest `Data` chunk this side sends.
    pub max_chunk: usize,
    /// Largest message this side builds from several frames (when the peer reads them).
    pub max_batch: usize,
    /// Largest v1 message either way: a body (base64 in JSON) that would exceed it fails its
    /// own request, never the connection.
    pub max_v1_message: usize,
    /// Time between pings.
    pub heartbeat_interval: Duration,
    /// A peer silent this long is gone: the session closes.
    pub idle_timeout: Duration,
    /// A gateway stream waiting for its response head on a connection that has received
    /// nothing for this long sends a probe: a ping the peer answers at once (v2 `Ping`, v1 a
    /// WebSocket ping).
    pub probe_after: Duration,
    /// A probe that nothing answers for this long (no message at all arrives) makes the session
    /// silent ([`Session::is_silent`], [`Event::Silent`]) until the peer is heard again
    /// ([`Event::Heard`]): a partition shows in seconds, not at the idle timeout. `None`: no
    /// probes (the agent's end).
    pub liveness_timeout: Option<Duration>,
    /// A stream whose body makes no progress this long is reset.
    pub stall_timeout: Duration,
    /// Streams in flight when a drain starts get this long to finish.
    pub drain_timeout: Duration,
    /// Prefix of the v1 request ids this gateway session makes (unique per connection).
    pub v1_request_prefix: String,
}

impl Config {
    /// Defaults for `role` speaking `version`.
    pub fn new(role: Role, version: u16) -> Self {
        Self {
            role,
            version,
            plane_id: String::new(),
            initial_window: crate::flow::INITIAL_WINDOW,
            max_streams: 1024,
            limits: Limits::with_max_frame(crate::MAX_MESSAGE),
            max_chunk: 64 * 1024,
            max_batch: 64 * 1024,
            max_v1_message: crate::MAX_MESSAGE,
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            probe_after: Duration::from_secs(1),
            liveness_timeout: None,
            stall_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            v1_request_prefix: String::new(),
        }
    }
}

/// A request head (what the gateway opens a stream with).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestHead {
    /// HTTP method.
    pub method: String,
    /// Backend on the agent side (`k8s`).
    pub target: String,
    /// Path on the backend.
    pub path: String,
    /// Raw query, without `?`.
    pub query: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// What the application reads from a stream, in order: a head, body chunks, then exactly one of
/// `End`, `Reset` or `Lost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The connection ended before the stream did.
    Lost {
        /// Why it ended.
        reason: String,
        /// The peer had sent no head yet (a request may not have run).
        before_head: bool,
    },
    /// A chunk of body.
    Data(Bytes),
    /// The peer's half is complete.
    End,
    /// The request head (agent).
    Request(RequestHead),
    /// The stream was abandoned, by the peer or by this session (stall, overrun, limit).
    Reset {
        /// An HTTP-like code.
        code: u16,
        /// Why.
        reason: String,
    },
    /// The response head (gateway).
    Response(ResponseHead),
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream (agent): its head is the first thing to read.
    Accepted(StreamId),
    /// The session ended; every stream has been told.
    Closed(CloseReason),
    /// The peer announced a drain: open no new streams here; connect anew.
    GoAway(String),
    /// A message was ignored (unknown v1 message, binary in v1); the session goes on.
    Ignored(String),
    /// A stream has something to read.
    Readable(StreamId),
    /// A probe went unanswered for [`Config::liveness_timeout`]: the peer (or the path to it) is
    /// silent; open no new stream here until [`Event::Heard`].
    Silent,
    /// The peer of a silent session was heard again.
    Heard,
    /// A stream may take more body bytes (or can no longer: the write fails).
    Writable(StreamId),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A drain completed.
    Drained,
    /// The peer sent nothing for the idle timeout.
    Idle,
    /// Closed by this side's application.
    Local(String),
    /// The peer broke the protocol.
    Protocol(String),
    /// The transport ended (the peer closed, or the socket failed).
    Transport(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Drained => f.write_str("drained"),
            CloseReason::Idle => f.write_str("peer silent past the idle timeout"),
            CloseReason::Local(reason) => write!(f, "closed: {reason}"),
            CloseReason::Protocol(reason) => write!(f, "protocol error: {reason}"),
            CloseReason::Transport(reason) => write!(f, "connection lost: {reason}"),
        }
    }
}

/// A message for the shell to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A binary WebSocket message (v2 frames).
    Binary(Bytes),
    /// Close the WebSocket with this reason; nothing follows.
    Close(String),
    /// A WebSocket ping (v1 keepalive).
    Ping,
    /// A text WebSocket message (v1 JSON).
    Text(String),
}

/// Why a stream cannot be opened or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The session has closed.
    #[error("the connection has closed: {0}")]
    Closed(String),
    /// A drain is in progress: no new streams.
    #[error("the connection is draining")]
    Draining,
    /// The head cannot be encoded for the peer.
    #[error("the head cannot be sent: {0}")]
    Head(String),
    /// The session has [`Config::max_streams`] streams open.
    #[error("the connection has {0} streams open")]
    Limit(usize),
    /// The stream is not (or no longer) open for writing.
    #[error("stream {0} is not open for writing")]
    NotWritable(StreamId),
    /// This end does not do that (an agent opening a stream, a gateway answering one).
    #[error("{0}")]
    Role(&'static str),
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Streams opened (gateway) or accepted (agent).
    pub streams: u64,
    /// `RequestHead`s refused at the stream limit or during a drain.
    pub refused: u64,
    /// Streams reset by this side (application, stall, overrun).
    pub resets_sent: u64,
    /// Streams reset by the peer.
    pub resets_received: u64,
    /// Messages ignored.
    pub ignored: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    /// Body may follow.
    Open,
    /// `End` queued behind the outbox.
    Ending,
    /// `End` (or a reset) is on its way: nothing more.
    Done,
}

#[derive(Debug)]
struct Stream {
    inbox: VecDeque<Read>,
    /// Body bytes received and not yet read, plus those read but not yet granted back.
    unacked: u32,
    /// Read but not yet granted back.
    credit: u32,
    recv_done: bool,
    head_seen: bool,
    credits: u32,
    head_out: Option<Frame>,
    /// This side's head is given (opened, or answered).
    head_sent: bool,
    outbox: VecDeque<Bytes>,
    send: Send,
    scheduled: bool,
    credit_scheduled: bool,
    /// Since when the application has had to wait for credit.
    blocked_since: Option<Moment>,
    /// Since when received bytes wait for the application.
    unread_since: Option<Moment>,
    /// A reset to send once the queued answer is out (an abandoned stream whose answer was
    /// complete).
    reset_after: Option<(u16, String)>,
    v1: Option<V1Stream>,
}

/// A v1 stream: the message being gathered, and the request id it answers or asks.
#[derive(Debug, Default)]
struct V1Stream {
    request_id: String,
    request: Option<RequestHead>,
    response: Option<ResponseHead>,
    body: Vec<u8>,
}

impl Stream {
    fn new(credits: u32) -> Self {
        Self {
            inbox: VecDeque::new(),
            unacked: 0,
            credit: 0,
            recv_done: false,
            head_seen: false,
            credits,
            head_out: None,
            head_sent: false,
            outbox: VecDeque::new(),
            send: Send::Open,
            scheduled: false,
            credit_scheduled: false,
            blocked_since: None,
            unread_since: None,
            reset_after: None,
            v1: None,
        }
    }

    fn finished(&self) -> bool {
        self.send == Send::Done
            && self.recv_done
            && self.inbox.is_empty()
            && self.head_out.is_none()
            && self.outbox.is_empty()
    }

    fn has_output(&self) -> bool {
        self.head_out.is_some()
            || !self.outbox.is_empty()
            || (self.send == Send::Ending && self.outbox.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// Closing: the `Close` message is still to be written.
    Closing(CloseReason),
    Closed(CloseReason),
}

/// One tunnel connection's protocol state. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: Config,
    state: State,
    now: Moment,
    streams: HashMap<StreamId, Stream>,
    next_local: u32,
    last_inbound: u32,
    v1_ids: HashMap<String, StreamId>,
    hello_due: bool,
    peer_version: u16,
    pong_due: Option<u64>,
    ping_nonce: u64,
    ping_due: bool,
    next_ping: Moment,
    last_received: Moment,
    /// When the probe nothing has answered yet was sent.
    probe_sent: Option<Moment>,
    /// A probe went unanswered past the liveness timeout, and nothing was heard since.
    silent: bool,
    next_stall_check: Moment,
    credit_due: VecDeque<StreamId>,
    reset_due: VecDeque<(StreamId, u16, String)>,
    text_due: VecDeque<String>,
    ready: VecDeque<StreamId>,
    go_away_due: Option<String>,
    go_away_sent: Option<Moment>,
    peer_going_away: bool,
    events: VecDeque<Event>,
    stats: Stats,
}

/// The reset code of a stream refused, before any work, because its connection is draining
/// (HTTP's 421 Misdirected Request): the gateway sends it again on another connection, whatever
/// its method.
pub const RESET_DRAINING: u16 = 421;

/// How long after its own `GoAway` a draining session waits for the peer's before it treats
/// the peer as one that never answers (an older or foreign peer) and closes once idle.
const GO_AWAY_ACK_GRACE: Duration = Duration::from_millis(500);

impl Session {
    /// A new session at `now`.
    pub fn new(config: Config, now: Moment) -> Self {
        let v2 = config.version >= version::V2;
        Self {
            next_local: match config.role {
                Role::Gateway => 1,
                Role::Agent => 2,
            },
            state: State::Open,
            now,
            streams: HashMap::new(),
            last_inbound: 0,
            v1_ids: HashMap::new(),
            hello_due: v2,
            peer_version: 0,
            pong_due: None,
            ping_nonce: 0,
            ping_due: false,
            next_ping: now.after(config.heartbeat_interval),
            last_received: now,
            probe_sent: None,
            silent: false,
            next_stall_check: now.after(stall_check_period(&config)),
            credit_due: VecDeque::new(),
            reset_due: VecDeque::new(),
            text_due: VecDeque::new(),
            ready: VecDeque::new(),
            go_away_due: None,
            go_away_sent: None,
            peer_going_away: false,
            events: VecDeque::new(),
            stats: Stats::default(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether the session has ended (the shell stops once it has written the `Close`).
    pub fn is_closed(&self) -> bool {
        !matches!(self.state, State::Open)
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Open => None,
            State::Closing(reason) | State::Closed(reason) => Some(reason),
        }
    }

    /// Whether a drain has started (either side said `GoAway`): no new streams.
    pub fn is_draining(&self) -> bool {
        self.go_away_sent.is_some() || self.go_away_due.is_some() || self.peer_going_away
    }

    /// Whether a probe went unanswered past [`Config::liveness_timeout`] and nothing has been
    /// heard from the peer since: streams opened here would wait on a path that carries nothing.
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// Whether new streams can be opened here now.
    pub fn accepts_streams(&self) -> bool {
        !self.is_closed() && !self.is_draining()
    }

    fn v2(&self) -> bool {
        self.config.version >= version::V2
    }

    // ---- the application's side ----

    /// Opens a stream with `head` (gateway). With `end`, no body follows.
    pub fn open(&mut self, head: RequestHead, end: bool) -> Result<StreamId, StreamError> {
        if self.config.role != Role::Gateway {
            return Err(StreamError::Role("only the gateway opens streams"));
        }
        self.check_open()?;
        if self.streams.len() >= self.config.max_streams {
            return Err(StreamError::Limit(self.streams.len()));
        }
        let id = StreamId(self.next_local);
        let mut stream = Stream::new(self.config.initial_window);
        stream.head_sent = true;
        if self.v2() {
            let frame = Frame::RequestHead {
                stream: id.0,
                method: head.method,
                target: head.target,
                path: head.path,
                query: head.query,
                headers: head.headers,
                end_stream: end,
            };
            let mut probe = Vec::new();
            v2::try_encode(&frame, &mut probe, self.config.limits)
                .map_err(|err| StreamError::Head(err.to_string()))?;
            stream.head_out = Some(frame);
            stream.send = if end { Send::Done } else { Send::Open };
        } else {
            let request_id = format!("{}{}", self.config.v1_request_prefix, id.0);
            self.v1_ids.insert(request_id.clone(), id);
            stream.credits = u32::try_from(self.config.max_v1_message).unwrap_or(u32::MAX);
            stream.v1 = Some(V1Stream {
                request_id,
                request: Some(head),
                ..V1Stream::default()
            });
            if end {
                self.v1_flush(id, &mut stream);
            }
        }
        self.next_local = self.next_local.wrapping_add(2);
        self.stats.streams += 1;
        self.streams.insert(id, stream);
        self.schedule(id);
        Ok(id)
    }

    /// Sends the response head of an accepted stream (agent). With `end`, no body follows.
    pub fn respond(
        &mut self,
        id: StreamId,
        head: ResponseHead,
        end: bool,
    ) -> Result<(), StreamError> {
        if self.config.role != Role::Agent {
            return Err(StreamError::Role("only the agent answers streams"));
        }
        if let State::Closing(reason) | State::Closed(reason) = &self.state {
            return Err(StreamError::Closed(reason.to_string()));
        }
        let v2 = self.v2();
        let limits = self.config.limits;
        let Some(mut stream) = self.streams.remove(&id) else {
            return Err(StreamError::NotWritable(id));
        };
        if stream.send != Send::Open || stream.head_sent {
            self.streams.insert(id, stream);
            return Err(StreamError::NotWritable(id));
        }
        stream.head_sent = true;
        if v2 {
            let frame = Frame::ResponseHead {
                stream: id.0,
                status: head.status,
                headers: head.headers,
                end_stream: end,
            };
            let mut probe = Vec::new();
            if let Err(err) = v2::try_encode(&frame, &mut probe, limits) {
                self.streams.insert(id, stream);
                return Err(StreamError::Head(err.to_string()));
            }
            stream.head_out = Some(frame);
            if end {
                stream.send = Send::Done;
            }
        } else if let Some(v1) = stream.v1.as_mut() {
            v1.response = Some(head);
            if end {
                self.v1_flush(id, &mut stream);
            }
        }
        self.put_back(id, stream);
        self.schedule(id);
        Ok(())
    }

    /// Queues body bytes within the stream's credit; returns how many were taken (0: wait for
    /// [`Event::Writable`]). Never copies: the chunk is split, not duplicated.
    pub fn send_data(&mut self, id: StreamId, data: &mut Bytes) -> Result<usize, StreamError> {
        if let State::Closing(reason) | State::Closed(reason) = &self.state {
            return Err(StreamError::Closed(reason.to_string()));
        }
        let now = self.now;
        let v2 = self.v2();
        let max_v1 = self.config.max_v1_message;
        let Some(stream) = self.streams.get_mut(&id) else {
            return Err(StreamError::NotWritable(id));
        };
        if stream.send != Send::Open {
            return Err(StreamError::NotWritable(id));
        }
        if !v2 {
            let v1 = stream.v1.as_mut().ok_or(StreamError::NotWritable(id))?;
            // base64 grows a body by 4/3; the JSON around it is small.
            if (v1.body.len() + data.len()) / 3 * 4 + 4096 > max_v1 {
                let reason = format!(
                    "the body exceeds what one v1 message carries ({max_v1} bytes with base64)"
                );
                self.reset(id, 502, &reason);
                return Err(StreamError::NotWritable(id));
            }
            v1.body.extend_from_slice(data);
            let n = data.len();
            data.clear();
            return Ok(n);
        }
        let n = data.len().min(stream.credits as usize);
        if n == 0 {
            if !data.is_empty() {
                stream.blocked_since.get_or_insert(now);
            }
            return Ok(0);
        }
        stream.credits -= n as u32;
        stream.blocked_since = None;
        stream.outbox.push_back(data.split_to(n));
        self.schedule(id);
        Ok(n)
    }

    /// Ends this side's half of the stream: `End` follows the queued body.
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        if let State::Closing(reason) | State::Closed(reason) = &self.state {
            return Err(StreamError::Closed(reason.to_string()));
        }
        let v2 = self.v2();
        let Some(mut stream) = self.streams.remove(&id) else {
            return Err(StreamError::NotWritable(id));
        };
        if stream.send != Send::Open {
            self.streams.insert(id, stream);
            return Err(StreamError::NotWritable(id));
        }
        if v2 {
            stream.send = Send::Ending;
        } else {
            self.v1_flush(id, &mut stream);
        }
        self.put_back(id, stream);
        self.schedule(id);
        Ok(())
    }

    /// The next thing to read from a stream, if any. Reading body bytes returns credit to the
    /// peer. After the last item (`End`, `Reset`, `Lost`) the stream is forgotten once this side
    /// has finished too.
    pub fn read(&mut self, id: StreamId) -> Option<Read> {
        let window = self.config.initial_window;
        let v2 = self.v2();
        let stream = self.streams.get_mut(&id)?;
        let item = stream.inbox.pop_front()?;
        if let Read::Data(bytes) = &item {
            let n = bytes.len() as u32;
            stream.credit = stream.credit.saturating_add(n);
            if !stream.inbox.iter().any(|r| matches!(r, Read::Data(_))) {
                stream.unread_since = None;
            }
            if v2 && !stream.recv_done && stream.credit >= window / 2 && !stream.credit_scheduled {
                stream.credit_scheduled = true;
                self.credit_due.push_back(id);
            }
        }
        if matches!(item, Read::Reset { .. } | Read::Lost { .. }) {
            // Nothing more is sent on a stream the peer (or the connection) abandoned.
            stream.send = Send::Done;
            stream.outbox.clear();
            stream.head_out = None;
        }
        if stream.finished() {
            self.forget(id);
        }
        Some(item)
    }

    /// Whether a stream was abandoned (reset either way, or its connection lost) or has ended
    /// both ways: nothing more will be accepted from this side. Reads nothing.
    pub fn is_abandoned(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_none_or(|s| {
            s.inbox
                .iter()
                .any(|r| matches!(r, Read::Reset { .. } | Read::Lost { .. }))
        })
    }

    /// Whether the next item of a stream is its `End` (nothing else to read).
    pub fn next_is_end(&self, id: StreamId) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|s| matches!(s.inbox.front(), Some(Read::End)))
    }

    /// The rest of a stream's body when all of it has arrived as at most one chunk and the end
    /// (a small response: head, data and end in one message), read at once: the stream has
    /// ended this way as if each item had been read. `None` (nothing read) while more may come,
    /// when it arrived in several chunks, or when the stream was reset or lost.
    pub fn take_whole_body(&mut self, id: StreamId) -> Option<Bytes> {
        let inbox = &self.streams.get(&id)?.inbox;
        match (inbox.len(), inbox.front(), inbox.back()) {
            (1, Some(Read::End), _) => {
                self.read(id);
                Some(Bytes::new())
            }
            (2, Some(Read::Data(_)), Some(Read::End)) => match (self.read(id), self.read(id)) {
                (Some(Read::Data(body)), Some(Read::End)) => Some(body),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether a stream may take body bytes now (credit left, or v1).
    pub fn writable(&self, id: StreamId) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|s| s.send == Send::Open && (!self.v2() || s.credits > 0))
    }

    /// Abandons a stream: the peer is told (`Reset` with `code`) unless the stream already
    /// ended both ways, and the stream is forgotten. Reading it afterwards returns nothing.
    pub fn reset(&mut self, id: StreamId, code: u16, reason: &str) {
        let Some(stream) = self.streams.remove(&id) else {
            return;
        };
        self.forget_v1(&stream);
        let peer_done = stream.recv_done && stream.send == Send::Done && !stream.has_output();
        if peer_done || self.is_closed() {
            return;
        }
        self.stats.resets_sent += 1;
        if self.v2() {
            self.reset_due.push_back((id, code, reason.to_owned()));
        } else if self.config.role == Role::Agent
            && let Some(v1) = &stream.v1
        {
            // v1 has no reset: the request is answered with the failure.
            self.text_due
                .push_back(v1_failure(&v1.request_id, code, reason));
        }
        self.maybe_drained();
    }

    /// The application dropped its end of a stream. A stream whose peer has finished and whose
    /// own answer is complete (perhaps still queued) goes out as it is; anything else is reset
    /// (499), so the peer stops working for nobody.
    pub fn abandon(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.send != Send::Open && stream.recv_done {
            stream.inbox.clear();
            if stream.finished() {
                self.forget(id);
            }
            return;
        }
        if stream.send == Send::Ending || (stream.send == Send::Done && stream.has_output()) {
            // The answer is complete but still queued (an agent that answered before reading
            // the whole request, say): it goes out whole, then the reset stops the peer's body.
            stream.inbox.clear();
            stream.recv_done = true;
            stream.unread_since = None;
            stream.reset_after = Some((499, "the stream's reader went away".into()));
            return;
        }
        self.reset(id, 499, "the stream's reader went away");
    }

    /// Whether the session still knows a stream (a forgotten stream has ended for good).
    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    /// Starts a drain: `GoAway` to the peer, no new streams, close once in-flight streams end
    /// (or at the drain deadline).
    pub fn go_away(&mut self, reason: &str) {
        if self.is_closed() || self.go_away_sent.is_some() || self.go_away_due.is_some() {
            return;
        }
        if self.v2() {
            self.go_away_due = Some(reason.to_owned());
        } else {
            // v1 cannot say it: stop taking streams and close once idle.
            self.go_away_sent = Some(self.now);
            self.peer_going_away = true;
        }
        self.maybe_drained();
    }

    /// Closes the session now: every stream is told `Lost`.
    pub fn close(&mut self, reason: &str) {
        self.end(CloseReason::Local(reason.to_owned()), true);
    }

    // ---- the shell's side ----

    /// The transport ended (the peer closed, a read failed).
    pub fn handle_transport_closed(&mut self, reason: &str) {
        // A peer that closes after both sides said GoAway, with every stream's answer in,
        // completed a drain; anything else is a loss.
        let drained = self.peer_going_away
            && self.go_away_sent.is_some()
            && self.streams.values().all(|s| s.recv_done);
        let reason = if drained {
            CloseReason::Drained
        } else {
            CloseReason::Transport(reason.to_owned())
        };
        self.end(reason, false);
    }

    /// A binary message arrived.
    pub fn handle_binary(&mut self, message: Bytes, now: Moment) {
        self.touch(now);
        if self.is_closed() {
            return;
        }
        if !self.v2() {
            self.ignore("a binary message on a v1 connection".into());
            return;
        }
        for frame in Frames::new(message, self.config.limits) {
            match frame {
                Ok(frame) => self.on_frame(frame),
                Err(err) => {
                    self.end(
                        CloseReason::Protocol(format!("malformed frame: {err}")),
                        true,
                    );
                }
            }
            if self.is_closed() {
                return;
            }
        }
    }

    /// A text message arrived (v1 JSON).
    pub fn handle_text(&mut self, text: &str, now: Moment) {
        self.touch(now);
        if self.is_closed() {
            return;
        }
        if self.v2() {
            self.ignore("a text message on a v2 connection".into());
            return;
        }
        // As OpenChoreo's receivers do, a message this end cannot use is skipped (and counted),
        // never a reason to close: newer gateways send stream messages we do not serve.
        match v1::decode(text, self.config.max_v1_message) {
            Ok(v1::Message::Request(request)) if self.config.role == Role::Agent => {
                self.on_v1_request(request)
            }
            Ok(v1::Message::Response(response)) if self.config.role == Role::Gateway => {
                self.on_v1_response(response)
            }
            Ok(v1::Message::StreamInit(init)) if self.config.role == Role::Agent => {
                self.on_v1_stream_init(init)
            }
            Ok(v1::Message::StreamChunk(chunk)) => self.ignore(format!(
                "a stream chunk for {:?} (no streamed exchange is open here)",
                chunk.request_id
            )),
            Ok(_) => self.ignore("a v1 message meant for the other end".into()),
            Err(v1::DecodeError::TooLarge { len, limit }) => self.on_v1_too_large(text, len, limit),
            Err(err) => self.ignore(format!("an undecodable v1 message: {err}")),
        }
    }

    /// Any other sign of life from the peer (a WebSocket ping or pong).
    pub fn handle_keepalive(&mut self, now: Moment) {
        self.touch(now);
    }

    /// The clock reached `now`: pings, the idle timeout, stalled streams, the drain deadline.
    pub fn handle_timeout(&mut self, now: Moment) {
        self.now = self.now.max(now);
        if self.is_closed() {
            return;
        }
        if now >= self.last_received.after(self.config.idle_timeout) {
            self.end(CloseReason::Idle, true);
            return;
        }
        if now >= self.next_ping {
            self.ping_due = true;
            self.next_ping = now.after(self.config.heartbeat_interval);
        }
        self.check_liveness(now);
        if now >= self.next_stall_check {
            self.next_stall_check = now.after(stall_check_period(&self.config));
            self.reset_stalled(now);
        }
        if let Some(sent) = self.go_away_sent
            && now >= sent.after(self.config.drain_timeout)
        {
            let n = self.streams.len();
            self.end(
                CloseReason::Local(format!("drain deadline passed with {n} streams in flight")),
                true,
            );
            return;
        }
        self.maybe_drained();
    }

    /// When [`Session::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Moment> {
        if self.is_closed() {
            return None;
        }
        let mut next = self
            .next_ping
            .min(self.last_received.after(self.config.idle_timeout))
            .min(self.next_stall_check);
        if let Some(due) = self.liveness_due() {
            next = next.min(due);
        }
        if let Some(sent) = self.go_away_sent {
            next = next.min(sent.after(self.config.drain_timeout));
            // The grace is a deadline only until it has passed: once past, streams ending
            // close the drain, and a timer in the past would wake the shell at once, forever.
            let grace = sent.after(GO_AWAY_ACK_GRACE);
            if grace > self.now {
                next = next.min(grace);
            }
        }
        Some(next)
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Session::poll_transmit`] has something (the shell wakes its writer only then).
    pub fn wants_transmit(&self) -> bool {
        match &self.state {
            State::Closing(_) => true,
            State::Closed(_) => false,
            State::Open => {
                self.hello_due
                    || self.ping_due
                    || self.pong_due.is_some()
                    || self.go_away_due.is_some()
                    || !self.text_due.is_empty()
                    || !self.reset_due.is_empty()
                    || !self.credit_due.is_empty()
                    || !self.ready.is_empty()
            }
        }
    }

    /// The next message to write, if any: connection and control frames first (never dropped,
    /// never behind data), then the streams' heads and bodies round-robin; several frames share
    /// one message when the peer reads them so.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        match &self.state {
            State::Closed(_) => return None,
            State::Closing(reason) => {
                let reason = reason.to_string();
                let state = std::mem::replace(&mut self.state, State::Open);
                self.state = match state {
                    State::Closing(reason) => State::Closed(reason),
                    other => other,
                };
                return Some(Transmit::Close(reason));
            }
            State::Open => {}
        }
        if let Some(text) = self.text_due.pop_front() {
            return Some(Transmit::Text(text));
        }
        if !self.v2() {
            if std::mem::take(&mut self.ping_due) {
                return Some(Transmit::Ping);
            }
            return None;
        }
        let batch = self.peer_version >= version::V3;
        let mut out = BytesMut::new();
        while out.len() < self.config.max_batch {
            let before = out.len();
            if !self.next_frame(&mut out) {
                break;
            }
            if !batch && out.len() > before {
                break;
            }
        }
        if out.is_empty() {
            None
        } else {
            Some(Transmit::Binary(out.freeze()))
        }
    }

    // ---- internals ----

    fn check_open(&self) -> Result<(), StreamError> {
        match &self.state {
            State::Open if self.is_draining() => Err(StreamError::Draining),
            State::Open => Ok(()),
            State::Closing(reason) | State::Closed(reason) => {
                Err(StreamError::Closed(reason.to_string()))
            }
        }
    }

    fn touch(&mut self, now: Moment) {
        self.now = self.now.max(now);
        self.last_received = self.now;
        self.probe_sent = None;
        if std::mem::take(&mut self.silent) {
            self.events.push_back(Event::Heard);
        }
    }

    /// Whether a gateway stream waits for its response head (what a probe is sent for).
    fn awaits_head(&self) -> bool {
        self.config.role == Role::Gateway
            && self.streams.values().any(|s| !s.head_seen && !s.recv_done)
    }

    /// When the liveness check is next due: the unanswered probe's deadline, or the moment a
    /// stream waiting for its head on a quiet connection calls for a probe.
    fn liveness_due(&self) -> Option<Moment> {
        let timeout = self.config.liveness_timeout?;
        if let Some(sent) = self.probe_sent {
            return (!self.silent).then(|| sent.after(timeout));
        }
        self.awaits_head()
            .then(|| self.last_received.after(self.config.probe_after))
    }

    /// Sends a probe when a stream waits for its head and nothing has arrived for
    /// [`Config::probe_after`]; declares the session silent when a probe has gone unanswered for
    /// [`Config::liveness_timeout`].
    fn check_liveness(&mut self, now: Moment) {
        let Some(timeout) = self.config.liveness_timeout else {
            return;
        };
        match self.probe_sent {
            Some(sent) if !self.silent && now >= sent.after(timeout) => {
                self.silent = true;
                self.events.push_back(Event::Silent);
            }
            Some(_) => {}
            None if now >= self.last_received.after(self.config.probe_after)
                && self.awaits_head() =>
            {
                self.probe_sent = Some(now);
                self.ping_due = true;
            }
            None => {}
        }
    }

    fn ignore(&mut self, what: String) {
        self.stats.ignored += 1;
        self.events.push_back(Event::Ignored(what));
    }

    fn schedule(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id)
            && !stream.scheduled
            && stream.has_output()
        {
            stream.scheduled = true;
            self.ready.push_back(id);
        }
    }

    fn put_back(&mut self, id: StreamId, stream: Stream) {
        if stream.finished() {
            self.forget_v1(&stream);
            self.maybe_drained();
        } else {
            self.streams.insert(id, stream);
        }
    }

    fn forget(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.remove(&id) {
            self.forget_v1(&stream);
        }
        self.maybe_drained();
    }

    fn forget_v1(&mut self, stream: &Stream) {
        if let Some(v1) = &stream.v1 {
            self.v1_ids.remove(&v1.request_id);
        }
    }

    /// Writes the next frame into `out`; false when there is nothing to send.
    fn next_frame(&mut self, out: &mut BytesMut) -> bool {
        let encode = |frame: &Frame, out: &mut BytesMut| {
            let mut bytes = Vec::new();
            v2::encode(frame, &mut bytes);
            out.extend_from_slice(&bytes);
        };
        if std::mem::take(&mut self.hello_due) {
            encode(
                &Frame::Hello {
                    version: version::V3,
                    plane_id: self.config.plane_id.clone(),
                },
                out,
            );
            return true;
        }
        if let Some(nonce) = self.pong_due.take() {
            encode(&Frame::Pong { nonce }, out);
            return true;
        }
        if std::mem::take(&mut self.ping_due) {
            self.ping_nonce += 1;
            encode(
                &Frame::Ping {
                    nonce: self.ping_nonce,
                },
                out,
            );
            return true;
        }
        if let Some((id, code, reason)) = self.reset_due.pop_front() {
            encode(
                &Frame::Reset {
                    stream: id.0,
                    code,
                    reason,
                },
                out,
            );
            return true;
        }
        while let Some(id) = self.credit_due.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            stream.credit_scheduled = false;
            let credits = std::mem::take(&mut stream.credit);
            stream.unacked = stream.unacked.saturating_sub(credits);
            if credits == 0 || stream.recv_done {
                continue;
            }
            encode(
                &Frame::WindowUpdate {
                    stream: id.0,
                    credits,
                },
                out,
            );
            return true;
        }
        // `GoAway` follows every head already queued: the peer learns of each stream opened
        // before the drain before it learns of the drain (else it could close first).
        let heads_queued =
            self.go_away_due.is_some() && self.streams.values().any(|s| s.head_out.is_some());
        if !heads_queued && let Some(reason) = self.go_away_due.take() {
            self.go_away_sent = Some(self.now);
            encode(&Frame::GoAway { reason }, out);
            self.maybe_drained();
            return true;
        }
        while let Some(id) = self.ready.pop_front() {
            let max_chunk = self.config.max_chunk;
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            stream.scheduled = false;
            if let Some(head) = stream.head_out.take() {
                encode(&head, out);
            } else if let Some(mut chunk) = stream.outbox.pop_front() {
                if chunk.len() > max_chunk {
                    let rest = chunk.split_off(max_chunk);
                    stream.outbox.push_front(rest);
                }
                v2::encode_data(id.0, &chunk, out);
            } else if stream.send == Send::Ending {
                stream.send = Send::Done;
                encode(&Frame::End { stream: id.0 }, out);
            } else {
                continue;
            }
            if !stream.has_output()
                && let Some((code, reason)) = stream.reset_after.take()
            {
                self.stats.resets_sent += 1;
                self.reset_due.push_back((id, code, reason));
            }
            if stream.finished() {
                self.forget(id);
            } else if stream.has_output() {
                stream.scheduled = true;
                self.ready.push_back(id);
            }
            return true;
        }
        false
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Hello { version, .. } => self.peer_version = version,
            Frame::RequestHead {
                stream,
                method,
                target,
                path,
                query,
                headers,
                end_stream,
            } => {
                let head = RequestHead {
                    method,
                    target,
                    path,
                    query,
                    headers,
                };
                self.on_request_head(StreamId(stream), head, end_stream);
            }
            Frame::ResponseHead {
                stream,
                status,
                headers,
                end_stream,
            } => {
                if self.config.role != Role::Gateway {
                    return self.protocol_error("a ResponseHead sent to the agent");
                }
                let id = StreamId(stream);
                let Some(s) = self.streams.get_mut(&id) else {
                    return; // abandoned here; its reset is on the way
                };
                if s.head_seen || s.recv_done {
                    return self.protocol_error("a second ResponseHead on a stream");
                }
                s.head_seen = true;
                s.inbox
                    .push_back(Read::Response(ResponseHead { status, headers }));
                if end_stream {
                    s.recv_done = true;
                    s.inbox.push_back(Read::End);
                }
                self.events.push_back(Event::Readable(id));
            }
            Frame::Data { stream, chunk } => self.on_data(StreamId(stream), chunk),
            Frame::End { stream } => {
                let id = StreamId(stream);
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                if !s.head_seen {
                    return self.protocol_error("End before the head of its stream");
                }
                if s.recv_done {
                    return;
                }
                s.recv_done = true;
                s.inbox.push_back(Read::End);
                self.events.push_back(Event::Readable(id));
            }
            Frame::Reset {
                stream,
                code,
                reason,
            } => {
                let id = StreamId(stream);
                if !self.streams.contains_key(&id) {
                    return;
                }
                self.stats.resets_received += 1;
                // A peer that completed its half keeps it: the reader gets the whole answer.
                self.fail_stream(id, Read::Reset { code, reason }, false);
            }
            Frame::WindowUpdate { stream, credits } => {
                let id = StreamId(stream);
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                let was_blocked = s.credits == 0;
                s.credits = s.credits.saturating_add(credits);
                if was_blocked && s.send == Send::Open {
                    self.events.push_back(Event::Writable(id));
                }
            }
            Frame::Ping { nonce } => self.pong_due = Some(nonce),
            Frame::Pong { .. } => {}
            Frame::GoAway { reason } => {
                self.peer_going_away = true;
                if self.go_away_sent.is_none() && self.go_away_due.is_none() {
                    // Answer in kind: the peer learns that no stream of ours will follow.
                    self.go_away_due = Some("acknowledged".into());
                }
                self.events.push_back(Event::GoAway(reason));
                self.maybe_drained();
            }
        }
    }

    fn on_request_head(&mut self, id: StreamId, head: RequestHead, end: bool) {
        if self.config.role != Role::Agent {
            return self.protocol_error("a RequestHead sent to the gateway");
        }
        if id.0.is_multiple_of(2) || id.0 <= self.last_inbound {
            return self.protocol_error("a RequestHead with a stream id that is not new and odd");
        }
        self.last_inbound = id.0;
        let refuse = if self.is_draining() {
            Some((
                RESET_DRAINING,
                "the connection is draining; retry on another connection",
            ))
        } else if self.streams.len() >= self.config.max_streams {
            Some((503, "the agent is at its stream limit; retry later"))
        } else {
            None
        };
        if let Some((code, reason)) = refuse {
            // Refused before any work: the gateway may send it again elsewhere.
            self.stats.refused += 1;
            self.reset_due.push_back((id, code, reason.into()));
            return;
        }
        let mut stream = Stream::new(self.config.initial_window);
        stream.head_seen = true;
        stream.inbox.push_back(Read::Request(head));
        if end {
            stream.recv_done = true;
            stream.inbox.push_back(Read::End);
        }
        self.stats.streams += 1;
        self.streams.insert(id, stream);
        self.events.push_back(Event::Accepted(id));
    }

    fn on_data(&mut self, id: StreamId, chunk: Bytes) {
        let window = self.config.initial_window;
        let now = self.now;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if !s.head_seen {
            return self.protocol_error("Data before the head of its stream");
        }
        if s.recv_done {
            return; // reset here (overrun, stall); the peer had not heard yet
        }
        let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        match s.unacked.checked_add(n) {
            Some(total) if total <= window => s.unacked = total,
            _ => {
                s.recv_done = true;
                s.inbox.push_back(Read::Reset {
                    code: 502,
                    reason: "the peer sent more than its flow-control window".into(),
                });
                self.events.push_back(Event::Readable(id));
                self.stats.resets_sent += 1;
                self.reset_due
                    .push_back((id, 400, "flow-control window exceeded".into()));
                return;
            }
        }
        if chunk.is_empty() {
            return;
        }
        s.unread_since.get_or_insert(now);
        s.inbox.push_back(Read::Data(chunk));
        self.events.push_back(Event::Readable(id));
    }

    fn on_v1_request(&mut self, request: v1::HttpTunnelRequest) {
        if self.is_draining() || self.streams.len() >= self.config.max_streams {
            self.stats.refused += 1;
            self.text_due.push_back(v1_failure(
                &request.request_id,
                503,
                "the agent is at its request limit; retry later",
            ));
            return;
        }
        if self.v1_ids.contains_key(&request.request_id) {
            return self.ignore(format!(
                "a v1 request reusing the id {:?} of one in flight",
                request.request_id
            ));
        }
        let id = StreamId(self.next_local);
        self.next_local = self.next_local.wrapping_add(2);
        let mut stream = Stream::new(0);
        stream.head_seen = true;
        stream.recv_done = true;
        let headers = request
            .headers
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)))
            .collect();
        stream.inbox.push_back(Read::Request(RequestHead {
            method: request.method,
            target: request.target,
            path: request.path,
            query: request.query.unwrap_or_default(),
            headers,
        }));
        if let Some(body) = request.body.filter(|b| !b.is_empty()) {
            stream.inbox.push_back(Read::Data(Bytes::from(body)));
        }
        stream.inbox.push_back(Read::End);
        stream.v1 = Some(V1Stream {
            request_id: request.request_id.clone(),
            ..V1Stream::default()
        });
        self.v1_ids.insert(request.request_id, id);
        self.stats.streams += 1;
        self.streams.insert(id, stream);
        self.events.push_back(Event::Accepted(id));
    }

    /// An exec or Hubble stream (OpenChoreo v1.x): never run as a request. The agent answers as
    /// OpenChoreo's does when it cannot serve one: a closing chunk whose data is the reason.
    fn on_v1_stream_init(&mut self, init: v1::HttpTunnelStreamInit) {
        let reason = format!(
            "{} streams (target {:?}) are not supported by this cluster agent; it serves HTTP requests only",
            init.upgrade_proto.as_deref().unwrap_or("upgrade"),
            init.target
        );
        self.text_due
            .push_back(v1::encode(&v1::Message::StreamChunk(
                v1::HttpTunnelStreamChunk {
                    request_id: init.request_id,
                    data: Some(reason.clone().into_bytes()),
                    stream_id: 0,
                    is_close: true,
                },
            )));
        self.ignore(format!("refused a streamed exchange: {reason}"));
    }

    /// A message over [`Config::max_v1_message`]: it fails its own request (found by its id,
    /// read without building the body), never the connection.
    fn on_v1_too_large(&mut self, text: &str, len: usize, limit: usize) {
        let reason = format!("the v1 message of {len} bytes exceeds the limit of {limit} bytes");
        self.ignore(reason.clone());
        let Some(request_id) = v1::request_id(text) else {
            return;
        };
        match self.config.role {
            Role::Agent => self
                .text_due
                .push_back(v1_failure(&request_id, 413, &reason)),
            Role::Gateway => {
                let Some(&id) = self.v1_ids.get(&request_id) else {
                    return;
                };
                if self.streams.get(&id).is_some_and(|s| !s.head_seen) {
                    self.stats.resets_received += 1;
                    self.fail_stream(
                        id,
                        Read::Reset {
                            code: 502,
                            reason: format!("the agent's response is too large: {reason}"),
                        },
                        false,
                    );
                }
            }
        }
    }

    fn on_v1_response(&mut self, response: v1::HttpTunnelResponse) {
        let Some(&id) = self.v1_ids.get(&response.request_id) else {
            return; // abandoned, or never ours
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.head_seen {
            return self.ignore("a second v1 response to one request".into());
        }
        let headers = response
            .headers
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)))
            .collect();
        s.head_seen = true;
        s.recv_done = true;
        s.inbox.push_back(Read::Response(ResponseHead {
            status: response.status_code,
            headers,
        }));
        let body = match (response.body, response.error) {
            (Some(body), _) => body,
            (None, Some(error)) => serde_json::json!({
                "error": "AgentError",
                "message": error.message,
                "details": error.details,
            })
            .to_string()
            .into_bytes(),
            (None, None) => Vec::new(),
        };
        if !body.is_empty() {
            s.inbox.push_back(Read::Data(Bytes::from(body)));
        }
        s.inbox.push_back(Read::End);
        self.events.push_back(Event::Readable(id));
    }

    /// v1: the message is complete; encode it once.
    fn v1_flush(&mut self, id: StreamId, stream: &mut Stream) {
        let _ = id;
        stream.send = Send::Done;
        let Some(v1) = stream.v1.as_mut() else {
            return;
        };
        let body = std::mem::take(&mut v1.body);
        let text = match (self.config.role, v1.request.take(), v1.response.take()) {
            (Role::Gateway, Some(head), _) => {
                let gateway_request_id = head
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
                    .map(|(_, v)| v.clone());
                let mut grouped: v1::Headers = Default::default();
                for (name, value) in head.headers {
                    grouped
                        .entry(v1::canonical_header_key(&name))
                        .or_default()
                        .push(value);
                }
                v1::encode(&v1::Message::Request(v1::HttpTunnelRequest {
                    request_id: v1.request_id.clone(),
                    gateway_request_id,
                    target: head.target,
                    method: head.method,
                    path: head.path,
                    query: (!head.query.is_empty()).then_some(head.query),
                    headers: Some(grouped),
                    body: (!body.is_empty()).then_some(body),
                }))
            }
            (Role::Agent, _, Some(head)) => {
                let mut grouped: v1::Headers = Default::default();
                for (name, value) in head.headers {
                    grouped
                        .entry(v1::canonical_header_key(&name))
                        .or_default()
                        .push(value);
                }
                v1::encode(&v1::Message::Response(v1::HttpTunnelResponse {
                    request_id: v1.request_id.clone(),
                    status_code: head.status,
                    headers: Some(grouped),
                    body: Some(body),
                    error: None,
                }))
            }
            (Role::Agent, _, None) => v1_failure(
                &v1.request_id,
                502,
                "the agent ended the stream without a response",
            ),
            (Role::Gateway, None, _) => return,
        };
        if text.len() > self.config.max_v1_message {
            let failure = v1_failure(
                &v1.request_id,
                502,
                &format!(
                    "the message of {} bytes exceeds the v1 limit of {} bytes",
                    text.len(),
                    self.config.max_v1_message
                ),
            );
            match self.config.role {
                Role::Agent => self.text_due.push_back(failure),
                Role::Gateway => {
                    stream.recv_done = true;
                    stream.head_seen = true;
                    stream.inbox.push_back(Read::Reset {
                        code: 413,
                        reason: "the request is too large for one v1 message".into(),
                    });
                    self.events.push_back(Event::Readable(id));
                }
            }
            return;
        }
        self.text_due.push_back(text);
    }

    fn reset_stalled(&mut self, now: Moment) {
        let stall = self.config.stall_timeout;
        let stalled: Vec<(StreamId, &'static str)> = self
            .streams
            .iter()
            .filter_map(|(id, s)| {
                if s.blocked_since.is_some_and(|t| now >= t.after(stall)) {
                    Some((*id, "no flow-control credit from the peer"))
                } else if s.unread_since.is_some_and(|t| now >= t.after(stall)) {
                    Some((*id, "the body was not read"))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in stalled {
            let reason = format!("stalled: {why} for {}s", stall.as_secs());
            self.stats.resets_sent += 1;
            if self.v2() {
                self.reset_due.push_back((id, 504, reason.clone()));
            }
            self.fail_stream(id, Read::Reset { code: 504, reason }, true);
        }
    }

    /// Ends both halves of a stream at once (a reset, a stall). A reader that has not reached
    /// its end learns `how` in place of whatever body is still unread; one whose end is already
    /// queued or read keeps it (a stream ends exactly once), unless `replace_unread` (a stall of
    /// a reader that stopped reading: its unread end is replaced too). Writes fail from now on.
    fn fail_stream(&mut self, id: StreamId, how: Read, replace_unread: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let unread_end = s.inbox.iter().any(|r| matches!(r, Read::End));
        if !s.recv_done || (replace_unread && unread_end && s.unread_since.is_some()) {
            s.inbox.retain(|r| !matches!(r, Read::Data(_) | Read::End));
            s.inbox.push_back(how);
        }
        // A reader waiting past its end (for a reset, say) learns the stream is gone.
        self.events.push_back(Event::Readable(id));
        s.recv_done = true;
        s.send = Send::Done;
        s.outbox.clear();
        s.head_out = None;
        s.blocked_since = None;
        s.unread_since = None;
        self.events.push_back(Event::Writable(id));
        if s.finished() {
            self.forget(id);
        }
    }

    fn maybe_drained(&mut self) {
        let Some(sent) = self.go_away_sent else {
            return;
        };
        if !matches!(self.state, State::Open) || !self.streams.is_empty() {
            return;
        }
        if !self.text_due.is_empty() || !self.reset_due.is_empty() {
            return;
        }
        if self.peer_going_away || self.now >= sent.after(GO_AWAY_ACK_GRACE) {
            self.end(CloseReason::Drained, true);
        }
    }

    fn protocol_error(&mut self, what: &str) {
        self.end(CloseReason::Protocol(what.to_owned()), true);
    }

    /// Ends the session: every stream learns `Lost` (unless it already ended), the shell gets
    /// `Closed`, and a `Close` message follows when `send_close`.
    fn end(&mut self, reason: CloseReason, send_close: bool) {
        if !matches!(self.state, State::Open) {
            return;
        }
        let text = reason.to_string();
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.send = Send::Done;
            s.outbox.clear();
            s.head_out = None;
            if !s.recv_done {
                s.recv_done = true;
                s.inbox.push_back(Read::Lost {
                    reason: text.clone(),
                    before_head: !s.head_seen,
                });
            }
            self.events.push_back(Event::Readable(id));
            self.events.push_back(Event::Writable(id));
            if s.finished() {
                self.streams.remove(&id);
            }
        }
        self.ready.clear();
        self.credit_due.clear();
        self.reset_due.clear();
        self.text_due.clear();
        self.v1_ids.clear();
        self.events.push_back(Event::Closed(reason.clone()));
        self.state = if send_close {
            State::Closing(reason)
        } else {
            State::Closed(reason)
        };
    }
}

fn stall_check_period(config: &Config) -> Duration {
    (config.stall_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// A v1 response that reports a failure (OpenChoreo's shape: `statusCode` and an `error`).
fn v1_failure(request_id: &str, code: u16, message: &str) -> String {
    v1::encode(&v1::Message::Response(v1::HttpTunnelResponse {
        request_id: request_id.to_owned(),
        status_code: code,
        headers: None,
        body: None,
        error: Some(v1::TunnelError {
            code: Some(i32::from(code)),
            message: message.to_owned(),
            details: None,
        }),
    }))
}

#[cfg(test)]
mod tests;
