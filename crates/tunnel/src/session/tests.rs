//! Two sessions connected through an in-memory pipe: unit cases for each rule, and property
//! tests over random interleavings of the two applications, the pipe, the clock, resets,
//! drains and lost connections.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;

const MS: Duration = Duration::from_millis(1);

fn config(role: Role, version: u16) -> Config {
    Config {
        heartbeat_interval: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(15),
        stall_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(10),
        initial_window: 4096,
        max_chunk: 1024,
        max_batch: 4096,
        max_streams: 8,
        ..Config::new(role, version)
    }
}

/// A gateway and an agent session and the messages between them, in order (as TCP keeps them).
struct Pair {
    gateway: Session,
    agent: Session,
    to_agent: VecDeque<Transmit>,
    to_gateway: VecDeque<Transmit>,
    now: Moment,
    gateway_closed: bool,
    agent_closed: bool,
}

impl Pair {
    fn new(version: u16) -> Self {
        Self::with(config(Role::Gateway, version), config(Role::Agent, version))
    }

    fn with(gateway: Config, agent: Config) -> Self {
        Self {
            gateway: Session::new(gateway, Moment::default()),
            agent: Session::new(agent, Moment::default()),
            to_agent: VecDeque::new(),
            to_gateway: VecDeque::new(),
            now: Moment::default(),
            gateway_closed: false,
            agent_closed: false,
        }
    }

    /// Moves what each side wants to send into the pipe.
    fn flush(&mut self) {
        while let Some(t) = self.gateway.poll_transmit() {
            self.to_agent.push_back(t);
        }
        while let Some(t) = self.agent.poll_transmit() {
            self.to_gateway.push_back(t);
        }
    }

    /// Delivers up to `n` messages each way; false when nothing moved.
    fn deliver(&mut self, n: usize) -> bool {
        let mut moved = false;
        for _ in 0..n {
            if self.to_agent.is_empty() && self.to_gateway.is_empty() {
                break;
            }
            if let Some(t) = self.to_agent.pop_front() {
                moved = true;
                deliver(&mut self.agent, t, self.now, &mut self.agent_closed);
            }
            if let Some(t) = self.to_gateway.pop_front() {
                moved = true;
                deliver(&mut self.gateway, t, self.now, &mut self.gateway_closed);
            }
        }
        moved
    }

    /// Flushes and delivers until the pipe is empty.
    fn pump(&mut self) {
        loop {
            self.flush();
            if !self.deliver(usize::MAX) {
                break;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now.after(by);
        self.gateway.handle_timeout(self.now);
        self.agent.handle_timeout(self.now);
    }
}

fn deliver(session: &mut Session, transmit: Transmit, now: Moment, closed: &mut bool) {
    if *closed {
        return;
    }
    match transmit {
        Transmit::Binary(bytes) => session.handle_binary(bytes, now),
        Transmit::Text(text) => session.handle_text(&text, now),
        Transmit::Ping => session.handle_keepalive(now),
        Transmit::Close(reason) => {
            *closed = true;
            session.handle_transport_closed(&reason);
        }
    }
}

fn get(path: &str) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        target: "k8s".into(),
        path: path.into(),
        ..RequestHead::default()
    }
}

fn accepted(session: &mut Session) -> Vec<StreamId> {
    std::iter::from_fn(|| session.poll_event())
        .filter_map(|e| match e {
            Event::Accepted(id) => Some(id),
            _ => None,
        })
        .collect()
}

fn drain_reads(session: &mut Session, id: StreamId) -> Vec<Read> {
    std::iter::from_fn(|| session.read(id)).collect()
}

/// A small GET: head, body and end of the answer reach the gateway, both sides forget the
/// stream, and the response travels as one message (head, data and end batched).
#[test]
fn a_small_get_round_trips_and_both_sides_forget_it() {
    let mut pair = Pair::new(version::V2);
    pair.pump(); // Hellos: both sides may batch from now on.
    let id = pair.gateway.open(get("/api"), true).unwrap();
    pair.pump();
    let ids = accepted(&mut pair.agent);
    assert_eq!(ids, [id]);
    assert_eq!(
        drain_reads(&mut pair.agent, id),
        [Read::Request(get("/api")), Read::End]
    );
    pair.agent
        .respond(
            id,
            ResponseHead {
                status: 200,
                headers: vec![],
            },
            false,
        )
        .unwrap();
    let mut body = Bytes::from_static(b"{}");
    assert_eq!(pair.agent.send_data(id, &mut body).unwrap(), 2);
    pair.agent.finish(id).unwrap();
    pair.flush();
    assert_eq!(
        pair.to_gateway.len(),
        1,
        "head, data and end in one message"
    );
    pair.pump();
    assert_eq!(
        drain_reads(&mut pair.gateway, id),
        [
            Read::Response(ResponseHead {
                status: 200,
                headers: vec![]
            }),
            Read::Data(Bytes::from_static(b"{}")),
            Read::End
        ]
    );
    assert_eq!(pair.gateway.open_streams(), 0);
    assert_eq!(pair.agent.open_streams(), 0);
}

/// A body that has arrived whole (one chunk, then the end) is taken in one step and the stream
/// is forgotten; one still arriving, or in several chunks, is left as it was, to be read item
/// by item.
#[test]
fn a_whole_body_is_taken_at_once_and_a_partial_one_is_left() {
    let mut pair = Pair::new(version::V2);
    pair.pump();
    let answer = |pair: &mut Pair, chunks: &[&'static [u8]], end: bool| {
        let id = pair.gateway.open(get("/api"), true).unwrap();
        pair.pump();
        drain_reads(&mut pair.agent, id);
        let head = ResponseHead {
            status: 200,
            headers: vec![],
        };
        pair.agent.respond(id, head, false).unwrap();
        for chunk in chunks {
            let mut chunk = Bytes::from_static(chunk);
            pair.agent.send_data(id, &mut chunk).unwrap();
            pair.pump();
        }
        if end {
            pair.agent.finish(id).unwrap();
        }
        pair.pump();
        assert!(matches!(pair.gateway.read(id), Some(Read::Response(_))));
        id
    };

    let whole = answer(&mut pair, &[b"{}"], true);
    assert_eq!(
        pair.gateway.take_whole_body(whole),
        Some(Bytes::from_static(b"{}"))
    );
    assert!(!pair.gateway.contains(whole), "the stream ended here");

    let empty = answer(&mut pair, &[], true);
    assert_eq!(pair.gateway.take_whole_body(empty), Some(Bytes::new()));
    assert!(!pair.gateway.contains(empty));

    let open = answer(&mut pair, &[b"{"], false);
    assert_eq!(pair.gateway.take_whole_body(open), None);
    assert_eq!(
        drain_reads(&mut pair.gateway, open),
        [Read::Data(Bytes::from_static(b"{"))],
        "nothing was taken"
    );

    let unfinished = answer(&mut pair, &[b"{", b"}"], false);
    assert_eq!(pair.gateway.take_whole_body(unfinished), None);
    assert_eq!(
        drain_reads(&mut pair.gateway, unfinished),
        [
            Read::Data(Bytes::from_static(b"{")),
            Read::Data(Bytes::from_static(b"}"))
        ],
        "nothing was taken"
    );

    let two = answer(&mut pair, &[b"{", b"}"], true);
    assert_eq!(pair.gateway.take_whole_body(two), None);
    assert_eq!(
        drain_reads(&mut pair.gateway, two),
        [
            Read::Data(Bytes::from_static(b"{")),
            Read::Data(Bytes::from_static(b"}")),
            Read::End
        ]
    );
    assert_eq!(
        pair.gateway.open_streams(),
        2,
        "only the unfinished ones are left"
    );
}

/// A peer that never said it reads batches (an older agent: Hello 2, or none) gets one frame
/// per message.
#[test]
fn a_peer_without_batching_gets_one_frame_per_message() {
    let mut gateway = Session::new(config(Role::Gateway, version::V2), Moment::default());
    let _ = gateway.open(get("/a"), true).unwrap();
    let _ = gateway.open(get("/b"), true).unwrap();
    let messages: Vec<Transmit> = std::iter::from_fn(|| gateway.poll_transmit()).collect();
    assert_eq!(
        messages.len(),
        3,
        "hello and two heads, one each: {messages:?}"
    );
}

/// Credits are never lost: a body of many windows crosses while the reader consumes in small
/// steps, the sender never overruns, and the grants go out ahead of queued data.
#[test]
fn a_large_body_crosses_under_credits_without_overrun() {
    let mut pair = Pair::new(version::V2);
    let id = pair.gateway.open(get("/big"), true).unwrap();
    pair.pump();
    accepted(&mut pair.agent);
    drain_reads(&mut pair.agent, id);
    pair.agent
        .respond(id, ResponseHead::default(), false)
        .unwrap();
    let total = 20 * 4096 + 17;
    let mut left = Bytes::from(vec![7u8; total]);
    let mut received = 0;
    let mut rounds = 0;
    while received < total {
        rounds += 1;
        assert!(rounds < 10_000, "no progress at {received} of {total}");
        if !left.is_empty() {
            pair.agent.send_data(id, &mut left).unwrap();
            if left.is_empty() {
                pair.agent.finish(id).unwrap();
            }
        }
        pair.pump();
        // The caller reads one item per round.
        if let Some(Read::Data(bytes)) = pair.gateway.read(id) {
            received += bytes.len();
        }
    }
    assert_eq!(pair.agent.stats().resets_sent, 0);
    assert_eq!(pair.gateway.stats().resets_sent, 0, "no overrun");
    assert_eq!(drain_reads(&mut pair.gateway, id), [Read::End]);
}

/// An agent that answers before reading the whole request body (an early 413, say) and drops
/// the stream: its queued answer reaches the gateway whole, then a reset stops the body.
#[test]
fn an_early_answer_goes_out_whole_before_the_reset() {
    let mut pair = Pair::new(version::V2);
    pair.pump();
    let id = pair.gateway.open(get("/upload"), false).unwrap();
    let mut body = Bytes::from(vec![7u8; 1000]);
    pair.gateway.send_data(id, &mut body).unwrap();
    pair.pump();
    let agent_id = accepted(&mut pair.agent)[0];
    assert!(matches!(pair.agent.read(agent_id), Some(Read::Request(_))));
    let head = ResponseHead {
        status: 413,
        headers: vec![],
    };
    pair.agent.respond(agent_id, head, false).unwrap();
    let mut answer = Bytes::from_static(b"too large");
    pair.agent.send_data(agent_id, &mut answer).unwrap();
    pair.agent.finish(agent_id).unwrap();
    pair.agent.abandon(agent_id);
    pair.pump();
    let reads = drain_reads(&mut pair.gateway, id);
    assert!(
        matches!(
            reads.as_slice(),
            [
                Read::Response(ResponseHead { status: 413, .. }),
                Read::Data(_),
                Read::End
            ]
        ),
        "{reads:?}"
    );
    let mut more = Bytes::from(vec![7u8; 10]);
    assert!(
        pair.gateway.send_data(id, &mut more).is_err(),
        "the reset stops the body"
    );
    assert_eq!(pair.gateway.open_streams(), 0);
    assert_eq!(pair.agent.open_streams(), 0);
}

/// A stream waiting for credit that never comes (its reader stopped) is reset on both sides
/// after the stall timeout, with a reason; the connection stays up for the others.
#[test]
fn a_stalled_stream_is_reset_after_the_stall_timeout() {
    let mut pair = Pair::new(version::V2);
    let id = pair.gateway.open(get("/stuck"), true).unwrap();
    pair.pump();
    accepted(&mut pair.agent);
    drain_reads(&mut pair.agent, id);
    pair.agent
        .respond(id, ResponseHead::default(), false)
        .unwrap();
    let mut body = Bytes::from(vec![0u8; 3 * 4096]);
    pair.agent.send_data(id, &mut body).unwrap();
    pair.pump();
    assert_eq!(pair.agent.send_data(id, &mut body).unwrap(), 0, "blocked");
    for _ in 0..30 {
        pair.advance(100 * MS);
        pair.pump();
    }
    // The agent read its request's end already: it learns through its writes, which fail.
    assert_eq!(drain_reads(&mut pair.agent, id), vec![]);
    assert_eq!(
        pair.agent.send_data(id, &mut body),
        Err(StreamError::NotWritable(id))
    );
    let gateway_reads = drain_reads(&mut pair.gateway, id);
    assert!(
        matches!(gateway_reads.last(), Some(Read::Reset { .. })),
        "{gateway_reads:?}"
    );
    assert!(!pair.gateway.is_closed() && !pair.agent.is_closed());
    assert_eq!(pair.agent.open_streams(), 0);
    assert_eq!(pair.gateway.open_streams(), 0);
}

/// GoAway drains: the stream in flight finishes, new streams are refused at once, and both
/// sides close afterwards with `Drained`.
#[test]
fn go_away_drains_in_flight_streams_then_closes() {
    let mut pair = Pair::new(version::V2);
    let id = pair.gateway.open(get("/slow"), true).unwrap();
    pair.pump();
    accepted(&mut pair.agent);
    drain_reads(&mut pair.agent, id);
    pair.agent.go_away("renewing the certificate");
    pair.pump();
    assert!(
        std::iter::from_fn(|| pair.gateway.poll_event()).any(|e| matches!(e, Event::GoAway(_)))
    );
    assert_eq!(
        pair.gateway.open(get("/new"), true),
        Err(StreamError::Draining)
    );
    assert!(!pair.agent.is_closed(), "a stream is still in flight");
    pair.agent
        .respond(id, ResponseHead::default(), true)
        .unwrap();
    pair.pump();
    let reads = drain_reads(&mut pair.gateway, id);
    assert!(
        matches!(reads.as_slice(), [Read::Response(_), Read::End]),
        "{reads:?}"
    );
    pair.pump();
    assert_eq!(pair.agent.close_reason(), Some(&CloseReason::Drained));
    assert_eq!(pair.gateway.close_reason(), Some(&CloseReason::Drained));
}

/// A drain started right after a stream was opened (its head still queued): the peer learns of
/// the stream before the drain, answers it, and only then do both sides close. (Failed when
/// `GoAway`, as a control frame, overtook the queued head: the agent closed at once and the
/// request was lost.)
#[test]
fn go_away_never_overtakes_a_queued_head() {
    let mut pair = Pair::new(version::V2);
    pair.pump();
    let id = pair.gateway.open(get("/just-opened"), true).unwrap();
    pair.gateway.go_away("reconnect requested");
    pair.pump();
    let agent_id = accepted(&mut pair.agent)
        .first()
        .copied()
        .expect("the agent got the stream");
    drain_reads(&mut pair.agent, agent_id);
    pair.agent
        .respond(agent_id, ResponseHead::default(), true)
        .unwrap();
    pair.pump();
    let reads = drain_reads(&mut pair.gateway, id);
    assert!(
        matches!(reads.as_slice(), [Read::Response(_), Read::End]),
        "{reads:?}"
    );
    pair.pump();
    assert_eq!(pair.gateway.close_reason(), Some(&CloseReason::Drained));
}

/// A drain that does not finish in time closes with the streams told `Lost`.
#[test]
fn a_drain_past_its_deadline_closes_and_loses_the_rest() {
    let mut pair = Pair::new(version::V2);
    let id = pair.gateway.open(get("/forever"), true).unwrap();
    pair.pump();
    pair.gateway.go_away("shutting down");
    pair.pump();
    for _ in 0..12 {
        pair.advance(Duration::from_secs(1));
        pair.pump();
    }
    assert!(pair.gateway.is_closed());
    assert!(matches!(
        drain_reads(&mut pair.gateway, id).as_slice(),
        [Read::Lost {
            before_head: true,
            ..
        }]
    ));
}

/// A drain whose streams outlast the `GoAway` grace asks for no timer in the past: the shell
/// sleeps until `poll_timeout`, and one already passed would wake it at once, again and again,
/// until the drain ends (found by fuzzing).
#[test]
fn a_drain_past_its_grace_sets_no_timer_in_the_past() {
    let mut pair = Pair::new(version::V2);
    let _id = pair.gateway.open(get("/slow"), true).unwrap();
    pair.pump();
    pair.gateway.go_away("shutting down");
    pair.pump();
    for _ in 0..4 {
        pair.advance(Duration::from_secs(1));
        pair.pump();
        let due = pair.gateway.poll_timeout().expect("still draining");
        assert!(due > pair.now, "timer at {due:?}, clock at {:?}", pair.now);
    }
}

/// Past the stream limit the agent refuses a stream with 503 before any work; the others go on.
#[test]
fn the_agent_refuses_streams_past_its_limit() {
    let mut agent_config = config(Role::Agent, version::V2);
    agent_config.max_streams = 2;
    let mut pair = Pair::with(config(Role::Gateway, version::V2), agent_config);
    let ids: Vec<StreamId> = (0..3)
        .map(|i| pair.gateway.open(get(&format!("/{i}")), true).unwrap())
        .collect();
    pair.pump();
    assert_eq!(accepted(&mut pair.agent).len(), 2);
    assert!(matches!(
        drain_reads(&mut pair.gateway, ids[2]).as_slice(),
        [Read::Reset { code: 503, .. }]
    ));
    assert_eq!(pair.agent.stats().refused, 1);
}

/// A peer that ignores its window gets that stream reset; the connection survives.
#[test]
fn a_peer_overrunning_the_window_gets_the_stream_reset() {
    let mut gateway = Session::new(config(Role::Gateway, version::V2), Moment::default());
    let id = gateway.open(get("/"), true).unwrap();
    let head = v2::to_vec(&Frame::ResponseHead {
        stream: id.0,
        status: 200,
        headers: vec![],
        end_stream: false,
    });
    gateway.handle_binary(Bytes::from(head), Moment::default());
    let data = v2::to_vec(&Frame::Data {
        stream: id.0,
        chunk: Bytes::from(vec![0; 4097]),
    });
    gateway.handle_binary(Bytes::from(data), Moment::default());
    assert!(!gateway.is_closed());
    let reads = drain_reads(&mut gateway, id);
    assert!(
        matches!(reads.last(), Some(Read::Reset { .. })),
        "{reads:?}"
    );
    let sent: Vec<Transmit> = std::iter::from_fn(|| gateway.poll_transmit()).collect();
    let frames: Vec<Frame> = sent
        .into_iter()
        .filter_map(|t| match t {
            Transmit::Binary(b) => Some(b),
            _ => None,
        })
        .flat_map(|b| Frames::new(b, Limits::default()).map(Result::unwrap))
        .collect();
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::Reset { code: 400, .. }))
    );
}

/// A head larger than the head limit closes the connection as a protocol error, before the
/// head is kept anywhere.
#[test]
fn an_oversized_head_is_a_protocol_error() {
    let mut agent = Session::new(config(Role::Agent, version::V2), Moment::default());
    let head = v2::to_vec(&Frame::RequestHead {
        stream: 1,
        method: "GET".into(),
        target: "k8s".into(),
        path: "/".into(),
        query: String::new(),
        headers: (0..200)
            .map(|i| (format!("x-{i}"), "v".repeat(2000)))
            .collect(),
        end_stream: true,
    });
    agent.handle_binary(Bytes::from(head), Moment::default());
    assert!(matches!(
        agent.close_reason(),
        Some(CloseReason::Protocol(_))
    ));
}

/// Control frames are never behind data: with a full data backlog, a pong goes out first.
#[test]
fn control_frames_go_before_queued_data() {
    let mut pair = Pair::new(version::V2);
    let id = pair.gateway.open(get("/"), true).unwrap();
    pair.pump();
    accepted(&mut pair.agent);
    drain_reads(&mut pair.agent, id);
    pair.agent
        .respond(id, ResponseHead::default(), false)
        .unwrap();
    let mut body = Bytes::from(vec![0u8; 4096]);
    pair.agent.send_data(id, &mut body).unwrap();
    pair.agent
        .handle_binary(Bytes::from(v2::to_vec(&Frame::Ping { nonce: 9 })), pair.now);
    let Some(Transmit::Binary(first)) = pair.agent.poll_transmit() else {
        panic!("nothing to send")
    };
    let first = Frames::new(first, Limits::default())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first, Frame::Pong { nonce: 9 });
}

/// A silent peer is gone after the idle timeout; every stream learns `Lost`.
#[test]
fn a_silent_peer_closes_the_session_after_the_idle_timeout() {
    let mut gateway = Session::new(config(Role::Gateway, version::V2), Moment::default());
    let id = gateway.open(get("/"), true).unwrap();
    gateway.handle_timeout(Moment(Duration::from_secs(16)));
    assert_eq!(gateway.close_reason(), Some(&CloseReason::Idle));
    assert!(matches!(gateway.read(id), Some(Read::Lost { .. })));
    assert_eq!(gateway.open_streams(), 0);
}

fn liveness_config(role: Role, version: u16) -> Config {
    Config {
        probe_after: Duration::from_secs(1),
        liveness_timeout: Some(Duration::from_secs(3)),
        ..config(role, version)
    }
}

fn liveness_events(session: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event())
        .filter(|e| matches!(e, Event::Silent | Event::Heard))
        .collect()
}

/// A stream waiting for its head on a connection quiet for `probe_after` sends a probe; an
/// answered probe keeps the session live; one that nothing answers for the liveness timeout
/// makes it silent (once), and the peer heard again makes it live.
#[test]
fn an_unanswered_probe_makes_the_session_silent_until_the_peer_is_heard() {
    let mut pair = Pair::with(
        liveness_config(Role::Gateway, version::V2),
        config(Role::Agent, version::V2),
    );
    pair.pump();
    pair.advance(Duration::from_millis(1500));
    assert_eq!(
        pair.gateway.poll_transmit(),
        None,
        "no probe without a waiting stream"
    );
    // The agent answers the probe: live.
    let a = pair.gateway.open(get("/a"), true).unwrap();
    pair.advance(MS);
    pair.pump();
    assert_eq!(accepted(&mut pair.agent), [a]);
    drain_reads(&mut pair.agent, a);
    pair.agent
        .respond(a, ResponseHead::default(), true)
        .unwrap();
    pair.pump();
    drain_reads(&mut pair.gateway, a);
    pair.advance(Duration::from_secs(4));
    assert!(!pair.gateway.is_silent(), "the probe was answered");
    // A partition: nothing crosses any more.
    pair.gateway.open(get("/b"), true).unwrap();
    pair.advance(Duration::from_millis(1100));
    assert!(
        pair.gateway.poll_timeout().unwrap() <= pair.now.after(Duration::from_secs(3)),
        "the probe's deadline is a timer"
    );
    pair.flush();
    pair.to_agent.clear();
    pair.advance(Duration::from_millis(2900));
    assert!(!pair.gateway.is_silent(), "not before the liveness timeout");
    pair.advance(Duration::from_millis(200));
    assert!(pair.gateway.is_silent());
    assert_eq!(liveness_events(&mut pair.gateway), [Event::Silent]);
    assert!(
        pair.gateway.poll_timeout().unwrap() > pair.now,
        "no timer in the past once silent"
    );
    pair.advance(Duration::from_secs(1));
    assert_eq!(liveness_events(&mut pair.gateway), [], "silent once");
    assert_eq!(pair.gateway.close_reason(), None, "silent is not closed");
    // Healed: the agent's next message makes the session live again.
    pair.agent
        .handle_timeout(pair.now.after(Duration::from_secs(5)));
    pair.pump();
    assert!(!pair.gateway.is_silent());
    assert_eq!(liveness_events(&mut pair.gateway), [Event::Heard]);
}

/// v1 probes with a WebSocket ping (the peer's WebSocket answers it with a pong).
#[test]
fn v1_probes_with_a_websocket_ping() {
    let mut gateway = Session::new(
        liveness_config(Role::Gateway, version::V1),
        Moment::default(),
    );
    gateway.open(get("/"), true).unwrap();
    while gateway.poll_transmit().is_some() {}
    gateway.handle_timeout(Moment(Duration::from_millis(1100)));
    assert_eq!(gateway.poll_transmit(), Some(Transmit::Ping));
    gateway.handle_keepalive(Moment(Duration::from_millis(1200)));
    gateway.handle_timeout(Moment(Duration::from_secs(5)));
    assert!(!gateway.is_silent());
    gateway.handle_timeout(Moment(Duration::from_millis(6300)));
    assert_eq!(gateway.poll_transmit(), Some(Transmit::Ping));
    gateway.handle_timeout(Moment(Duration::from_millis(9400)));
    assert!(gateway.is_silent());
}

/// v1: one message each way per request, bodies whole; an answer too large for one v1
/// message fails its own request and the connection goes on; unknown text is ignored.
#[test]
fn v1_is_one_message_per_request_and_fails_alone() {
    let mut agent_config = config(Role::Agent, version::V1);
    agent_config.max_v1_message = 64 * 1024;
    let mut pair = Pair::with(config(Role::Gateway, version::V1), agent_config);
    let mut post = get("/api/v1/namespaces");
    post.method = "POST".into();
    let id = pair.gateway.open(post.clone(), false).unwrap();
    let mut body = Bytes::from_static(b"{\"kind\":\"Namespace\"}");
    pair.gateway.send_data(id, &mut body).unwrap();
    pair.gateway.finish(id).unwrap();
    pair.flush();
    assert_eq!(pair.to_agent.len(), 1);
    pair.pump();
    let agent_id = accepted(&mut pair.agent)[0];
    let reads = drain_reads(&mut pair.agent, agent_id);
    assert_eq!(reads[0], Read::Request(post));
    assert_eq!(
        reads[1],
        Read::Data(Bytes::from_static(b"{\"kind\":\"Namespace\"}"))
    );
    pair.agent
        .respond(
            agent_id,
            ResponseHead {
                status: 201,
                headers: vec![],
            },
            false,
        )
        .unwrap();
    let mut huge = Bytes::from(vec![b'x'; 100 * 1024]);
    assert!(pair.agent.send_data(agent_id, &mut huge).is_err());
    pair.pump();
    let reads = drain_reads(&mut pair.gateway, id);
    assert!(
        matches!(&reads[0], Read::Response(ResponseHead { status: 502, .. })),
        "{reads:?}"
    );
    pair.agent
        .handle_text("{\"type\":\"HTTPTunnelStreamChunk\"}", pair.now);
    assert!(!pair.agent.is_closed());
    assert_eq!(pair.agent.stats().ignored, 1);
    let again = pair.gateway.open(get("/api"), true).unwrap();
    pair.pump();
    let agent_id = accepted(&mut pair.agent)[0];
    drain_reads(&mut pair.agent, agent_id);
    pair.agent
        .respond(
            agent_id,
            ResponseHead {
                status: 200,
                headers: vec![],
            },
            true,
        )
        .unwrap();
    pair.pump();
    assert!(matches!(
        drain_reads(&mut pair.gateway, again).as_slice(),
        [Read::Response(ResponseHead { status: 200, .. }), Read::End]
    ));
}

// ---- property tests ----

/// The golden OpenChoreo v1.2.3 message `name` (`test_data/openchoreo-v1.2.3`).
fn golden(name: &str) -> String {
    let path = format!(
        "{}/test_data/openchoreo-v1.2.3/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim_end()
        .to_owned()
}

/// The request id the gateway session gave its v1 request (from the text it sends).
fn v1_request_id(pair: &mut Pair) -> String {
    pair.flush();
    match pair.to_agent.pop_back() {
        Some(Transmit::Text(text)) => match v1::decode(&text, usize::MAX) {
            Ok(v1::Message::Request(request)) => request.request_id,
            other => panic!("not a request: {other:?}"),
        },
        other => panic!("no request sent: {other:?}"),
    }
}

/// OpenChoreo v1.x gateways open exec and Hubble streams with `HTTPTunnelStreamInit`: the
/// agent never runs one as a request; it answers as OpenChoreo's agent does when it cannot serve
/// one (a closing chunk whose data is the reason), ignores the chunks that follow, and goes on.
#[test]
fn v1_stream_inits_are_refused_with_a_closing_chunk() {
    let mut agent = Session::new(config(Role::Agent, version::V1), Moment::default());
    for name in ["gateway-stream-init-exec", "gateway-stream-init-hubble"] {
        agent.handle_text(&golden(name), Moment::default());
        assert!(accepted(&mut agent).is_empty(), "{name} ran as a request");
        let Some(Transmit::Text(answer)) = agent.poll_transmit() else {
            panic!("{name}: no answer")
        };
        let Ok(v1::Message::StreamChunk(chunk)) = v1::decode(&answer, usize::MAX) else {
            panic!("{name}: not a stream chunk: {answer}")
        };
        assert_eq!(chunk.request_id, "gw-5a1b2c3d4e5f6a7b");
        assert!(chunk.is_close, "{answer}");
        insta::assert_snapshot!(name, answer);
    }
    for name in ["gateway-stream-chunk-stdin", "gateway-stream-chunk-close"] {
        agent.handle_text(&golden(name), Moment::default());
        assert_eq!(agent.poll_transmit(), None, "{name} is not answered");
    }
    assert!(!agent.is_closed());
    assert_eq!(agent.stats().ignored, 4);
    agent.handle_text(&golden("gateway-request-get"), Moment::default());
    assert_eq!(accepted(&mut agent).len(), 1, "requests still run");
}

/// Text this end cannot use (not JSON, a message for the other end, a stream chunk, a shape
/// from a newer peer) is counted and skipped on both ends, as OpenChoreo's receivers do; the
/// connection and the streams on it go on.
#[test]
fn v1_messages_this_end_cannot_use_are_ignored_not_fatal() {
    let mut pair = Pair::new(version::V1);
    let id = pair.gateway.open(get("/api"), true).unwrap();
    let request_id = v1_request_id(&mut pair);
    let foreign = [
        "not json".to_owned(),
        "[1,2]".to_owned(),
        r#"{"type":"SomethingNew","requestID":"x"}"#.to_owned(),
        golden("agent-stream-chunk-stdout"),
        golden("agent-stream-chunk-close-error"),
        golden("gateway-request-get"),
    ];
    for text in &foreign {
        pair.gateway.handle_text(text, pair.now);
        pair.agent.handle_text(text, pair.now);
    }
    assert!(!pair.gateway.is_closed() && !pair.agent.is_closed());
    assert_eq!(pair.gateway.stats().ignored, 6);
    // The agent runs the request it was meant to get; the rest is ignored.
    assert_eq!(pair.agent.stats().ignored, 5);
    pair.gateway.handle_text(
        &format!(r#"{{"requestID":"{request_id}","statusCode":200}}"#),
        pair.now,
    );
    assert!(matches!(
        drain_reads(&mut pair.gateway, id).as_slice(),
        [Read::Response(ResponseHead { status: 200, .. }), Read::End]
    ));
}

/// A v1 message over the limit fails its own request, never the connection: a response the
/// gateway cannot take is a 502 for that stream while the next is answered; a request the agent
/// cannot take is answered 413.
#[test]
fn v1_an_oversized_message_fails_its_request_only() {
    let mut gateway_config = config(Role::Gateway, version::V1);
    gateway_config.max_v1_message = 1024;
    let mut pair = Pair::with(gateway_config, config(Role::Agent, version::V1));
    let big = pair.gateway.open(get("/big"), true).unwrap();
    let big_id = v1_request_id(&mut pair);
    let small = pair.gateway.open(get("/small"), true).unwrap();
    let small_id = v1_request_id(&mut pair);
    let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b'x'; 2048]);
    pair.gateway.handle_text(
        &format!(r#"{{"requestID":"{big_id}","statusCode":200,"body":"{body}"}}"#),
        pair.now,
    );
    pair.gateway.handle_text(
        &format!(r#"{{"requestID":"{small_id}","statusCode":200}}"#),
        pair.now,
    );
    assert!(!pair.gateway.is_closed());
    assert!(
        matches!(
            drain_reads(&mut pair.gateway, big).as_slice(),
            [Read::Reset { code: 502, reason }] if reason.contains("too large")
        ),
        "the oversized answer fails its stream"
    );
    assert!(matches!(
        drain_reads(&mut pair.gateway, small).as_slice(),
        [Read::Response(ResponseHead { status: 200, .. }), Read::End]
    ));

    let mut agent_config = config(Role::Agent, version::V1);
    agent_config.max_v1_message = 1024;
    let mut agent = Session::new(agent_config, Moment::default());
    agent.handle_text(
        &format!(
            r#"{{"requestID":"r1","target":"k8s","method":"POST","path":"/","body":"{body}"}}"#
        ),
        Moment::default(),
    );
    assert!(!agent.is_closed());
    let Some(Transmit::Text(answer)) = agent.poll_transmit() else {
        panic!("no answer")
    };
    let Ok(v1::Message::Response(response)) = v1::decode(&answer, usize::MAX) else {
        panic!("not a response: {answer}")
    };
    assert_eq!(
        (response.request_id.as_str(), response.status_code),
        ("r1", 413)
    );
}

/// `error.details` of any JSON shape (OpenChoreo's is an object) reaches the caller in the
/// error body, and the connection goes on.
#[test]
fn v1_error_details_of_any_shape_reach_the_caller() {
    for details in [r#"{"attempts":1,"retryable":false}"#, r#""text""#, "[1]"] {
        let mut pair = Pair::new(version::V1);
        let id = pair.gateway.open(get("/api"), true).unwrap();
        let request_id = v1_request_id(&mut pair);
        pair.gateway.handle_text(
            &format!(
                r#"{{"requestID":"{request_id}","statusCode":500,"error":{{"code":500,"message":"m","details":{details}}}}}"#
            ),
            pair.now,
        );
        assert!(!pair.gateway.is_closed(), "{details}");
        let reads = drain_reads(&mut pair.gateway, id);
        let [
            Read::Response(ResponseHead { status: 500, .. }),
            Read::Data(body),
            Read::End,
        ] = reads.as_slice()
        else {
            panic!("{details}: {reads:?}")
        };
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            body["details"],
            serde_json::from_str::<serde_json::Value>(details).unwrap()
        );
    }
}

/// v1 messages name headers as Go does (`Content-Type`), so OpenChoreo's `http.Header.Get`
/// finds them.
#[test]
fn v1_header_names_are_canonical() {
    let mut pair = Pair::new(version::V1);
    let mut head = get("/api");
    head.headers = vec![
        ("content-type".into(), "application/json".into()),
        ("x-request-id".into(), "a".into()),
    ];
    pair.gateway.open(head, true).unwrap();
    pair.flush();
    let Some(Transmit::Text(text)) = pair.to_agent.pop_back() else {
        panic!("no request")
    };
    assert!(
        text.contains(r#""headers":{"Content-Type":["application/json"],"X-Request-Id":["a"]}"#),
        "{text}"
    );
}

#[derive(Debug, Clone)]
enum Op {
    /// The gateway opens a request with a body of this many bytes.
    Open(usize),
    /// The agent's application runs one step on every stream.
    AgentStep,
    /// The gateway's application reads up to n items per stream and writes bodies.
    GatewayStep(usize),
    /// Deliver up to n messages each way.
    Deliver(usize),
    /// Reset a stream (by index among the open ones) from the gateway or the agent.
    Reset(bool, usize),
    /// Drop a stream's handle (the caller went away).
    Abandon(usize),
    /// One side starts a drain.
    GoAway(bool),
    /// Time passes.
    Advance(u64),
    /// The connection breaks.
    Break,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..20_000).prop_map(Op::Open),
        4 => Just(Op::AgentStep),
        4 => (1usize..4).prop_map(Op::GatewayStep),
        4 => (1usize..6).prop_map(Op::Deliver),
        1 => (any::<bool>(), 0usize..8).prop_map(|(g, i)| Op::Reset(g, i)),
        1 => (0usize..8).prop_map(Op::Abandon),
        1 => any::<bool>().prop_map(Op::GoAway),
        2 => (1u64..1500).prop_map(Op::Advance),
        1 => Just(Op::Break),
    ]
}

/// What a side's application knows of one stream.
#[derive(Debug, Default)]
struct AppStream {
    to_send: usize,
    sent: usize,
    received: usize,
    finished_sending: bool,
    head: bool,
    ended: Option<Read>,
    gone: bool,
    /// The body length the answer must have (gateway), from the request path (agent).
    expected: usize,
    /// The response status (gateway).
    status: u16,
}

/// The body length the agent answers a request for `/x/{k}` with.
fn answer_len(k: usize) -> usize {
    1 + (k * 7919) % 12_000
}

#[derive(Default)]
struct App {
    streams: BTreeMap<StreamId, AppStream>,
}

impl App {
    /// Reads up to `n` items of every stream, checking that each stream ends exactly once and
    /// that nothing follows its end.
    fn read(&mut self, session: &mut Session, n: usize) -> Result<(), TestCaseError> {
        for (id, app) in self.streams.iter_mut().filter(|(_, a)| !a.gone) {
            for _ in 0..n {
                let Some(item) = session.read(*id) else { break };
                prop_assert!(app.ended.is_none(), "{id}: {item:?} after {:?}", app.ended);
                match item {
                    Read::Data(bytes) => {
                        prop_assert!(app.head, "data before head");
                        app.received += bytes.len();
                    }
                    Read::Request(head) => {
                        prop_assert!(!app.head, "second head");
                        app.head = true;
                        let k = head.path.trim_start_matches("/x/").parse().unwrap_or(0);
                        app.expected = answer_len(k);
                    }
                    Read::Response(head) => {
                        prop_assert!(!app.head, "second head");
                        app.head = true;
                        app.status = head.status;
                    }
                    end => app.ended = Some(end),
                }
            }
            if app.ended.is_some() {
                prop_assert!(session.read(*id).is_none(), "{id}: read after its end");
            }
        }
        Ok(())
    }

    /// Writes what credit allows of each stream's body, finishing when all is sent.
    fn write(&mut self, session: &mut Session) {
        for (id, app) in self.streams.iter_mut().filter(|(_, a)| !a.gone) {
            if app.finished_sending || app.ended.is_some() {
                continue;
            }
            let mut chunk = Bytes::from(vec![1u8; app.to_send - app.sent]);
            match session.send_data(*id, &mut chunk) {
                Ok(n) => app.sent += n,
                Err(_) => {
                    app.finished_sending = true;
                    continue;
                }
            }
            if app.sent == app.to_send {
                let _ = session.finish(*id);
                app.finished_sending = true;
            }
        }
    }

    fn nth_open(&self, i: usize) -> Option<StreamId> {
        let open: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, a)| !a.gone && a.ended.is_none())
            .map(|(id, _)| *id)
            .collect();
        (!open.is_empty()).then(|| open[i % open.len()])
    }
}

fn run(ops: &[Op], version: u16) -> Result<(), TestCaseError> {
    // The gateway probes as cluster-gateway does: silence never ends a stream by itself.
    let mut pair = Pair::with(
        liveness_config(Role::Gateway, version),
        config(Role::Agent, version),
    );
    let mut gateway_app = App::default();
    let mut agent_app = App::default();
    let step_agent = |pair: &mut Pair, agent_app: &mut App| -> Result<(), TestCaseError> {
        for id in accepted(&mut pair.agent) {
            agent_app.streams.insert(id, AppStream::default());
        }
        agent_app.read(&mut pair.agent, usize::MAX)?;
        // Answer every stream whose request ended: a body as long as the path says.
        for (id, app) in agent_app.streams.iter_mut() {
            if matches!(app.ended, Some(Read::End)) && app.to_send == 0 && !app.finished_sending {
                app.to_send = app.expected;
                let head = ResponseHead {
                    status: 200,
                    headers: vec![],
                };
                let _ = pair.agent.respond(*id, head, false);
            }
        }
        // A stream counts as ended for writing once its request ended; keep writing those.
        for (id, app) in agent_app.streams.iter_mut() {
            if app.gone || app.finished_sending || app.to_send == 0 {
                continue;
            }
            let mut chunk = Bytes::from(vec![2u8; app.to_send - app.sent]);
            match pair.agent.send_data(*id, &mut chunk) {
                Ok(n) => app.sent += n,
                Err(_) => app.finished_sending = true,
            }
            if app.sent == app.to_send && !app.finished_sending {
                let _ = pair.agent.finish(*id);
                app.finished_sending = true;
            }
        }
        Ok(())
    };
    for op in ops {
        match op {
            Op::Open(n) => {
                let k = gateway_app.streams.len();
                if let Ok(id) = pair.gateway.open(get(&format!("/x/{k}")), *n == 0) {
                    prop_assert!(pair.gateway.open_streams() <= pair.gateway.config().max_streams);
                    gateway_app.streams.insert(
                        id,
                        AppStream {
                            to_send: *n,
                            finished_sending: *n == 0,
                            expected: answer_len(k),
                            ..AppStream::default()
                        },
                    );
                }
            }
            Op::AgentStep => step_agent(&mut pair, &mut agent_app)?,
            Op::GatewayStep(n) => {
                gateway_app.write(&mut pair.gateway);
                gateway_app.read(&mut pair.gateway, *n)?;
            }
            Op::Deliver(n) => {
                pair.flush();
                pair.deliver(*n);
            }
            Op::Reset(from_gateway, i) => {
                let (session, app) = if *from_gateway {
                    (&mut pair.gateway, &mut gateway_app)
                } else {
                    (&mut pair.agent, &mut agent_app)
                };
                if let Some(id) = app.nth_open(*i) {
                    session.reset(id, 400, "test");
                    app.streams.get_mut(&id).unwrap().gone = true;
                    prop_assert!(!session.contains(id));
                }
            }
            Op::Abandon(i) => {
                if let Some(id) = gateway_app.nth_open(*i) {
                    pair.gateway.abandon(id);
                    gateway_app.streams.get_mut(&id).unwrap().gone = true;
                }
            }
            Op::GoAway(gateway) => {
                if *gateway {
                    pair.gateway.go_away("test")
                } else {
                    pair.agent.go_away("test")
                }
            }
            Op::Advance(ms) => pair.advance(Duration::from_millis(*ms)),
            Op::Break => {
                pair.gateway.handle_transport_closed("test");
                pair.agent.handle_transport_closed("test");
                pair.gateway_closed = true;
                pair.agent_closed = true;
            }
        }
        prop_assert!(pair.agent.open_streams() <= pair.agent.config().max_streams);
    }
    // Settle: both applications keep going and time passes; every stream must end.
    for _ in 0..400 {
        step_agent(&mut pair, &mut agent_app)?;
        gateway_app.write(&mut pair.gateway);
        gateway_app.read(&mut pair.gateway, usize::MAX)?;
        pair.pump();
        pair.advance(Duration::from_millis(50));
    }
    for (side, app, session) in [
        ("gateway", &gateway_app, &pair.gateway),
        ("agent", &agent_app, &pair.agent),
    ] {
        for (id, stream) in &app.streams {
            if stream.gone {
                continue;
            }
            prop_assert!(
                stream.ended.is_some(),
                "{side} stream {id} never ended: {stream:?}"
            );
            if let Some(Read::End) = stream.ended
                && side == "gateway"
                && stream.status == 200
            {
                prop_assert_eq!(
                    stream.received,
                    stream.expected,
                    "{} body of stream {}",
                    side,
                    id
                );
            }
        }
        prop_assert_eq!(
            session.open_streams(),
            0,
            "{} still holds streams after every app stream ended",
            side
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random interleavings over v2: every stream ends exactly once on both sides, bodies arrive
    /// whole when they end with End, no limit is exceeded, no input panics, and nothing is left.
    #[test]
    fn v2_sessions_keep_their_invariants(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops, version::V2)?;
    }

    /// The same over v1's one-message-per-request mode.
    #[test]
    fn v1_sessions_keep_their_invariants(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops, version::V1)?;
    }

    /// Arbitrary bytes and text never panic a session of either role or version.
    #[test]
    fn arbitrary_input_never_panics(
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
        gateway in any::<bool>(),
        v2 in any::<bool>(),
    ) {
        let role = if gateway { Role::Gateway } else { Role::Agent };
        let mut session = Session::new(config(role, if v2 { 2 } else { 1 }), Moment::default());
        for message in messages {
            session.handle_text(&String::from_utf8_lossy(&message), Moment::default());
            session.handle_binary(Bytes::from(message), Moment::default());
            while session.poll_transmit().is_some() {}
        }
    }
}
