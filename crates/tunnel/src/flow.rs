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

#[cfg(test)]
mod tests {
    use super::*;

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
