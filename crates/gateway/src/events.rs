//! The event bus: connection events (`connected`, `disconnected`, `replaced`, `authorized`,
//! `revoked`, and the `snapshot` a new subscriber starts from) broadcast to the controller's
//! stream (`/api/v1/events`). The registry decides what happened; the bus stamps and sends it.

use std::collections::BTreeMap;

use buildplane_api::{
    CrKey,
    events::{GatewayEvent, GatewayEventKind},
};
use tokio::sync::broadcast;

/// Events a slow subscriber may lag behind by before it misses some (it then resubscribes and
/// starts again from a snapshot).
const CAPACITY: usize = 4096;

/// Broadcasts gateway events to every subscriber.
pub struct EventBus {
    sender: broadcast::Sender<GatewayEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

/// What one connection event is about.
pub struct ConnectionEvent<'a> {
    /// What happened.
    pub kind: GatewayEventKind,
    /// The connection's planeID.
    pub plane_id: &'a str,
    /// The connection's id.
    pub connection_id: u64,
    /// The CRs the event is about.
    pub crs: &'a [CrKey],
    /// Connected agents per CR of `crs` after the event.
    pub connected_agents_by_cr: BTreeMap<String, usize>,
}

impl EventBus {
    /// A new subscriber; it sees every event sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GatewayEvent> {
        self.sender.subscribe()
    }

    /// Stamps and sends one connection event (nobody listening is fine).
    pub fn send(&self, event: ConnectionEvent<'_>) {
        let _ = self.sender.send(GatewayEvent {
            kind: event.kind,
            time: now(),
            plane_type: buildplane_api::names::PLANE_TYPE.into(),
            plane_id: event.plane_id.to_owned(),
            connection_id: event.connection_id,
            crs: event.crs.iter().map(ToString::to_string).collect(),
            connected_agents_by_cr: event.connected_agents_by_cr,
        });
    }

    /// The snapshot event of `by_cr` (connected agents per CR, every CR with a connection).
    pub fn snapshot(by_cr: BTreeMap<String, usize>) -> GatewayEvent {
        GatewayEvent {
            kind: GatewayEventKind::Snapshot,
            time: now(),
            plane_type: buildplane_api::names::PLANE_TYPE.into(),
            plane_id: String::new(),
            connection_id: 0,
            crs: by_cr.keys().cloned().collect(),
            connected_agents_by_cr: by_cr,
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subscribers get each event with its stamp; the snapshot lists every CR it counts.
    #[test]
    fn sends_stamped_events_and_snapshots() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        let cr = CrKey::namespaced("org", "bp");
        bus.send(ConnectionEvent {
            kind: GatewayEventKind::Connected,
            plane_id: "p",
            connection_id: 7,
            crs: std::slice::from_ref(&cr),
            connected_agents_by_cr: BTreeMap::from([("org/bp".to_owned(), 1)]),
        });
        let event = rx.try_recv().expect("sent");
        assert_eq!(event.kind, GatewayEventKind::Connected);
        assert_eq!((event.plane_id.as_str(), event.connection_id), ("p", 7));
        assert_eq!(event.crs, ["org/bp"]);
        assert!(event.time.ends_with('Z'), "{}", event.time);
        let snapshot = EventBus::snapshot(BTreeMap::from([("org/bp".to_owned(), 2)]));
        assert_eq!(snapshot.kind, GatewayEventKind::Snapshot);
        assert_eq!(snapshot.crs, ["org/bp"]);
    }
}
