//! The sans-IO tunnel session, one end of either role and version, driven by an arbitrary
//! sequence of application calls, clock ticks and peer messages (raw bytes, or well-formed v2
//! frames and v1 JSON aimed at the streams the session knows). It must never panic nor loop, and
//! keeps the invariants the property tests of `session/tests.rs` check: the stream limit holds;
//! each stream reads one head first, then body, then exactly one end, and nothing after it; every
//! message it writes is one the peer can decode (one frame each unless the peer said v3); after
//! `Close` it writes nothing more; `Closed` is reported once.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arbitrary::Arbitrary;
use buildplane_tunnel::session::{
    Config, Event, Moment, Read, RequestHead, ResponseHead, Role, Session, StreamId, Transmit,
};
use buildplane_tunnel::v1::{self, HttpTunnelRequest, HttpTunnelResponse};
use buildplane_tunnel::v2::{self, Frame, Frames, Limits};
use buildplane_tunnel::version;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    gateway: bool,
    /// 1, 2 or 3 (modulo).
    version: u8,
    /// The property tests' small windows and limits, else the defaults.
    small: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Raw bytes from the peer.
    Binary(Vec<u8>),
    /// Well-formed v2 frames from the peer, in one message.
    Frames(Vec<PeerFrame>),
    /// Raw text from the peer.
    Text(String),
    /// A well-formed v1 message from the peer for a known (or new) request.
    V1 {
        stream: u8,
        status: u16,
        body: Vec<u8>,
    },
    Keepalive,
    /// Time passes (milliseconds, scaled).
    Advance(u16),
    Open {
        path: String,
        end: bool,
    },
    Respond {
        stream: u8,
        status: u16,
        end: bool,
    },
    Send {
        stream: u8,
        len: u16,
    },
    Finish {
        stream: u8,
    },
    Read {
        stream: u8,
        n: u8,
    },
    Reset {
        stream: u8,
        code: u16,
    },
    Abandon {
        stream: u8,
    },
    GoAway,
    Close,
    TransportClosed,
    /// The shell writes what is due and takes the events.
    Poll,
}

#[derive(Arbitrary, Debug)]
enum PeerFrame {
    Hello {
        version: u16,
    },
    RequestHead {
        stream: u8,
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        end: bool,
    },
    ResponseHead {
        stream: u8,
        status: u16,
        end: bool,
    },
    Data {
        stream: u8,
        len: u16,
    },
    End {
        stream: u8,
    },
    Reset {
        stream: u8,
        code: u16,
        reason: String,
    },
    WindowUpdate {
        stream: u8,
        credits: u32,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    GoAway {
        reason: String,
    },
}

/// What the application knows of one stream.
#[derive(Debug, Default)]
struct AppStream {
    head: bool,
    ended: Option<Read>,
}

struct Harness {
    session: Session,
    v2: bool,
    now: Moment,
    streams: BTreeMap<StreamId, AppStream>,
    closed_events: usize,
    close_written: bool,
    /// Streams the session reported as accepted.
    accepted: BTreeSet<StreamId>,
}

impl Harness {
    /// A stream id from a selector: mostly one the application knows, sometimes any small id.
    fn pick(&self, selector: u8) -> StreamId {
        if selector < 192 && !self.streams.is_empty() {
            let ids: Vec<StreamId> = self.streams.keys().copied().collect();
            ids[selector as usize % ids.len()]
        } else {
            StreamId(u32::from(selector % 64))
        }
    }

    fn check(&self) {
        let config = self.session.config();
        assert!(self.session.open_streams() <= config.max_streams);
        assert!(self.closed_events <= 1, "Closed reported twice");
        if self.close_written {
            assert!(self.session.is_closed());
        }
        assert_eq!(
            self.session.close_reason().is_some(),
            self.session.is_closed()
        );
        if self.session.is_closed() {
            assert!(!self.session.accepts_streams());
        }
    }

    /// Reads up to `n` items of a stream, checking their order.
    fn read(&mut self, id: StreamId, n: usize) {
        if !self.streams.contains_key(&id) && !self.session.contains(id) {
            return;
        }
        let app = self.streams.entry(id).or_default();
        for _ in 0..n {
            let Some(item) = self.session.read(id) else {
                break;
            };
            assert!(app.ended.is_none(), "{id}: {item:?} after {:?}", app.ended);
            match item {
                Read::Data(_) => assert!(app.head, "{id}: data before the head"),
                Read::Request(_) | Read::Response(_) => {
                    assert!(!app.head, "{id}: a second head");
                    app.head = true;
                }
                end => app.ended = Some(end),
            }
        }
        if app.ended.is_some() {
            assert!(self.session.read(id).is_none(), "{id}: read after its end");
        }
    }

    /// Writes what is due (bounded: a session that never stops writing is a bug) and takes
    /// the events.
    fn poll(&mut self) {
        for _ in 0..100_000 {
            let Some(transmit) = self.session.poll_transmit() else {
                break;
            };
            assert!(!self.close_written, "{transmit:?} after Close");
            match transmit {
                Transmit::Binary(message) => {
                    assert!(self.v2, "binary on v1");
                    let frames: Vec<Frame> = Frames::new(message.clone(), Limits::default())
                        .collect::<Result<_, _>>()
                        .unwrap_or_else(|err| panic!("undecodable {message:?}: {err}"));
                    assert!(!frames.is_empty());
                    for frame in &frames {
                        if let Frame::Data { chunk, .. } = frame {
                            assert!(chunk.len() <= self.session.config().max_chunk);
                        }
                    }
                }
                Transmit::Text(text) => {
                    assert!(!self.v2, "text on v2");
                    let limit = self.session.config().max_v1_message;
                    v1::decode(&text, limit)
                        .unwrap_or_else(|err| panic!("undecodable {text:?}: {err}"));
                }
                Transmit::Ping => assert!(!self.v2, "WebSocket ping on v2"),
                Transmit::Close(_) => self.close_written = true,
            }
        }
        assert!(self.session.poll_transmit().is_none() || !self.close_written);
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Accepted(id) => {
                    // The application may have read the stream before taking the event.
                    assert!(self.accepted.insert(id), "{id} accepted twice");
                    self.streams.entry(id).or_default();
                }
                Event::Closed(_) => self.closed_events += 1,
                _ => {}
            }
        }
    }

    fn peer_frame(&self, frame: PeerFrame, out: &mut Vec<u8>) {
        let frame = match frame {
            PeerFrame::Hello { version } => Frame::Hello {
                version,
                plane_id: "plane".into(),
            },
            PeerFrame::RequestHead {
                stream,
                method,
                path,
                headers,
                end,
            } => Frame::RequestHead {
                // The gateway opens odd ids.
                stream: u32::from(stream) * 2 + 1,
                method,
                target: "k8s".into(),
                path,
                query: String::new(),
                headers,
                end_stream: end,
            },
            PeerFrame::ResponseHead {
                stream,
                status,
                end,
            } => Frame::ResponseHead {
                stream: self.pick(stream).0,
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                end_stream: end,
            },
            PeerFrame::Data { stream, len } => Frame::Data {
                stream: self.pick(stream).0,
                chunk: Bytes::from(vec![7u8; usize::from(len)]),
            },
            PeerFrame::End { stream } => Frame::End {
                stream: self.pick(stream).0,
            },
            PeerFrame::Reset {
                stream,
                code,
                reason,
            } => Frame::Reset {
                stream: self.pick(stream).0,
                code,
                reason,
            },
            PeerFrame::WindowUpdate { stream, credits } => Frame::WindowUpdate {
                stream: self.pick(stream).0,
                credits,
            },
            PeerFrame::Ping { nonce } => Frame::Ping { nonce },
            PeerFrame::Pong { nonce } => Frame::Pong { nonce },
            PeerFrame::GoAway { reason } => Frame::GoAway { reason },
        };
        v2::encode(&frame, out);
    }

    fn v1_message(&self, stream: u8, status: u16, body: Vec<u8>) -> String {
        let id = self.pick(stream).0.to_string();
        let body = (!body.is_empty()).then_some(body);
        let message = if self.session.config().role == Role::Gateway {
            v1::Message::Response(HttpTunnelResponse {
                request_id: id,
                status_code: status,
                headers: None,
                body,
                error: None,
            })
        } else {
            v1::Message::Request(HttpTunnelRequest {
                request_id: id,
                gateway_request_id: None,
                target: "k8s".into(),
                method: "GET".into(),
                path: "/api".into(),
                query: None,
                headers: None,
                body,
            })
        };
        v1::encode(&message)
    }

    fn run(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Binary(bytes) => self.session.handle_binary(Bytes::from(bytes), now),
            Op::Frames(frames) => {
                let mut message = Vec::new();
                for frame in frames {
                    self.peer_frame(frame, &mut message);
                }
                self.session.handle_binary(Bytes::from(message), now);
            }
            Op::Text(text) => self.session.handle_text(&text, now),
            Op::V1 {
                stream,
                status,
                body,
            } => {
                let text = self.v1_message(stream, status, body);
                self.session.handle_text(&text, now);
            }
            Op::Keepalive => self.session.handle_keepalive(now),
            Op::Advance(ms) => {
                self.now = Moment(now.0 + Duration::from_millis(u64::from(ms) * 4));
                self.session.handle_timeout(self.now);
                if let Some(due) = self.session.poll_timeout() {
                    // The next deadline is never in the past of a clock that just reached it.
                    assert!(
                        due > self.now || due == self.now,
                        "{due:?} before {:?}",
                        self.now
                    );
                }
            }
            Op::Open { path, end } => {
                let head = RequestHead {
                    method: "GET".into(),
                    target: "k8s".into(),
                    path,
                    ..RequestHead::default()
                };
                if let Ok(id) = self.session.open(head, end) {
                    assert!(self.session.contains(id));
                    let previous = self.streams.insert(id, AppStream::default());
                    assert!(previous.is_none_or(|p| p.ended.is_some()), "{id} reused");
                }
            }
            Op::Respond {
                stream,
                status,
                end,
            } => {
                let id = self.pick(stream);
                let head = ResponseHead {
                    status,
                    headers: vec![],
                };
                let _ = self.session.respond(id, head, end);
            }
            Op::Send { stream, len } => {
                let id = self.pick(stream);
                let mut data = Bytes::from(vec![1u8; usize::from(len)]);
                let before = data.len();
                if let Ok(n) = self.session.send_data(id, &mut data) {
                    assert_eq!(n + data.len(), before, "taken and left add up");
                }
            }
            Op::Finish { stream } => {
                let _ = self.session.finish(self.pick(stream));
            }
            Op::Read { stream, n } => {
                let id = self.pick(stream);
                self.read(id, usize::from(n));
            }
            Op::Reset { stream, code } => {
                let id = self.pick(stream);
                self.session.reset(id, code, "fuzz");
                assert!(!self.session.contains(id));
                self.streams.remove(&id);
            }
            Op::Abandon { stream } => {
                let id = self.pick(stream);
                self.session.abandon(id);
                self.streams.remove(&id);
            }
            Op::GoAway => self.session.go_away("fuzz"),
            Op::Close => self.session.close("fuzz"),
            Op::TransportClosed => self.session.handle_transport_closed("fuzz"),
            Op::Poll => self.poll(),
        }
        self.check();
    }
}

fuzz_target!(|input: Input| {
    let role = if input.gateway {
        Role::Gateway
    } else {
        Role::Agent
    };
    let version = [version::V1, version::V2, version::V3][usize::from(input.version % 3)];
    let mut config = Config::new(role, version);
    if input.small {
        config = Config {
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            initial_window: 4096,
            max_chunk: 1024,
            max_batch: 4096,
            max_streams: 8,
            ..config
        };
    }
    let mut harness = Harness {
        v2: version >= version::V2,
        session: Session::new(config, Moment::default()),
        now: Moment::default(),
        streams: BTreeMap::new(),
        closed_events: 0,
        close_written: false,
        accepted: BTreeSet::new(),
    };
    for op in input.ops {
        harness.run(op);
    }
    // Every stream the application still holds ends once the connection is gone.
    harness.session.close("done");
    harness.poll();
    let ids: Vec<StreamId> = harness.streams.keys().copied().collect();
    for id in ids {
        harness.read(id, usize::MAX);
        let app = &harness.streams[&id];
        if harness.session.contains(id) {
            assert!(app.ended.is_some(), "{id} never ended: {app:?}");
        }
    }
    assert!(harness.session.is_closed());
});
