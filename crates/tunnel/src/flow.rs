//! Per-stream flow control: a sender spends credits on body bytes and stops at zero; the
//! receiver grants credits back once it has consumed half a window, so one slow stream never
//! fills the shared connection and stalls the others.

/// Credits each stream starts with (256 KiB, yamux's default).
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// The sending side of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    credits: u32,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self {
            credits: INITIAL_WINDOW,
        }
    }
}

impl SendWindow {
    /// Bytes that may be sent now.
    pub fn available(&self) -> u32 {
        self.credits
    }

    /// Takes up to `want` bytes of credit; returns how many may be sent.
    pub fn take(&mut self, want: usize) -> usize {
        let n = want.min(self.credits as usize);
        self.credits -= n as u32;
        n
    }

    /// Applies a `WindowUpdate`; saturates rather than overflowing on a misbehaving peer.
    pub fn grant(&mut self, credits: u32) {
        self.credits = self.credits.saturating_add(credits);
    }
}

/// The receiving side of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceiveWindow {
    consumed: u32,
    outstanding: u32,
}

/// What the receiver must do after data arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receive {
    /// Within the window.
    Accepted,
    /// The peer sent more than it was granted: reset the stream.
    Overrun,
}

impl ReceiveWindow {
    /// Records `n` bytes received.
    pub fn receive(&mut self, n: usize) -> Receive {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match self.outstanding.checked_add(n) {
            Some(total) if total <= INITIAL_WINDOW => {
                self.outstanding = total;
                Receive::Accepted
            }
            _ => Receive::Overrun,
        }
    }

    /// Records `n` bytes handed to the consumer; returns credits to grant, if it is time.
    pub fn consume(&mut self, n: usize) -> Option<u32> {
        let n = u32::try_from(n).unwrap_or(u32::MAX).min(self.outstanding);
        self.outstanding -= n;
        self.consumed += n;
        if self.consumed >= INITIAL_WINDOW / 2 {
            Some(std::mem::take(&mut self.consumed))
        } else {
            None
        }
    }
}

/// Both directions of one stream's flow control, for a peer that sends and receives bodies on
/// the same stream (the gateway sends request bodies and receives response bodies; the agent
/// the other way round). Sans-IO: the caller sends the frames this returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamWindow {
    send: SendWindow,
    receive: ReceiveWindow,
}

impl StreamWindow {
    /// A stream with [`INITIAL_WINDOW`] credits each way.
    pub fn new() -> Self {
        Self::default()
    }

    /// Body bytes this side may send now.
    pub fn send_credits(&self) -> u32 {
        self.send.available()
    }

    /// Spends credits for up to `want` body bytes; returns how many may go in the next `Data`
    /// frame (0: wait for a `WindowUpdate`).
    pub fn consume_send(&mut self, want: usize) -> usize {
        self.send.take(want)
    }

    /// Applies a `WindowUpdate` from the peer.
    pub fn on_window_update(&mut self, credits: u32) {
        self.send.grant(credits);
    }

    /// Records a `Data` frame of `n` bytes from the peer; `Overrun` means the peer ignored its
    /// credits and the stream must be reset.
    pub fn on_data(&mut self, n: usize) -> Receive {
        self.receive.receive(n)
    }

    /// Records `n` received bytes handed on (written to the caller or the backend); returns
    /// the credits of the `WindowUpdate` to send, once half a window has been consumed.
    pub fn on_consumed(&mut self, n: usize) -> Option<u32> {
        self.receive.consume(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = INITIAL_WINDOW as usize;

    /// Two peers move a body far larger than the window through `StreamWindow`: the sender
    /// never exceeds its credits, the receiver never overruns, and everything arrives. Without
    /// grants the sender would stall at one window; with a receiver that never checks, the
    /// overrun assertion fires.
    #[test]
    fn stream_window_moves_a_large_body_without_overrun() {
        let mut sender = StreamWindow::new();
        let mut receiver = StreamWindow::new();
        let total = 10 * W + 12_345;
        let (mut sent, mut delivered, mut updates) = (0usize, 0usize, 0u32);
        while delivered < total {
            let n = sender.consume_send((total - sent).min(16 * 1024));
            if n == 0 {
                panic!("sender stalled at {sent} of {total}: no grant arrived");
            }
            sent += n;
            assert_eq!(receiver.on_data(n), Receive::Accepted, "overrun at {sent}");
            // The consumer drains everything it received.
            delivered += n;
            if let Some(credits) = receiver.on_consumed(n) {
                updates += 1;
                sender.on_window_update(credits);
            }
        }
        assert_eq!(sent, total);
        assert!(updates >= 10, "grants came every half window: {updates}");
        assert!(sender.send_credits() as usize <= W);
    }

    /// A receiver whose consumer is slow grants nothing, so the sender stops at one window.
    #[test]
    fn stream_window_sender_stops_when_the_consumer_stalls() {
        let mut sender = StreamWindow::new();
        let mut receiver = StreamWindow::new();
        assert_eq!(sender.consume_send(W + 1), W);
        assert_eq!(receiver.on_data(W), Receive::Accepted);
        assert_eq!(sender.consume_send(1), 0, "no credits left");
        assert_eq!(
            receiver.on_data(1),
            Receive::Overrun,
            "peer ignoring credits"
        );
        assert_eq!(receiver.on_consumed(W / 2 - 1), None, "below half a window");
        let grant = receiver.on_consumed(1).expect("half a window consumed");
        assert_eq!(grant as usize, W / 2);
        sender.on_window_update(grant);
        assert_eq!(sender.consume_send(W), W / 2);
    }

    /// A sender stops at zero credits and resumes after a grant.
    #[test]
    fn sender_stops_at_zero_and_resumes() {
        let mut window = SendWindow::default();
        assert_eq!(
            window.take(INITIAL_WINDOW as usize + 10),
            INITIAL_WINDOW as usize
        );
        assert_eq!(window.take(1), 0);
        window.grant(100);
        assert_eq!(window.take(1000), 100);
        window.grant(u32::MAX);
        window.grant(u32::MAX);
        assert_eq!(window.available(), u32::MAX, "grants saturate");
    }

    /// The receiver grants back after half a window and detects overruns.
    #[test]
    fn receiver_grants_after_half_a_window() {
        let mut window = ReceiveWindow::default();
        assert_eq!(window.receive(INITIAL_WINDOW as usize), Receive::Accepted);
        assert_eq!(window.receive(1), Receive::Overrun);
        assert_eq!(window.consume(1000), None);
        assert_eq!(
            window.consume(INITIAL_WINDOW as usize / 2),
            Some(1000 + INITIAL_WINDOW / 2)
        );
        assert_eq!(
            window.receive(INITIAL_WINDOW as usize / 2),
            Receive::Accepted
        );
    }
}
