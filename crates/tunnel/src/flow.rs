//! Per-stream flow control. The state (credits each side may still send, bytes read but not yet
//! granted back) lives in each stream of the [`crate::session::Session`]; this module holds the
//! constant both ends agree on without negotiating it.

/// Credits each stream starts with, each way (256 KiB, yamux's default): a sender may have at
/// most this many unacknowledged body bytes on one stream. The receiver grants credits back once
/// its application has read half a window, so one slow stream never fills the shared connection
/// and stalls the others.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
