//! The gateway's event stream (`GET /api/v1/events`, `GatewayEvent` in CONTRACTS.md): one JSON
//! object per line, written by the gateway and read by the controller, typed once here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to the agent connections of a plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayEventKind {
    /// The first line of every stream: every CR with a connection, and its count.
    Snapshot,
    /// An agent connection was admitted.
    Connected,
    /// An agent connection ended.
    Disconnected,
    /// A live connection became authorised for more CRs (a CR or Secret changed).
    Authorized,
    /// A live connection lost CRs it was authorised for.
    Revoked,
    /// A newer connection of the same agent instance took over from this one.
    Replaced,
    /// A kind this reader does not know (a newer gateway): counts still apply.
    #[serde(other)]
    Unknown,
}

/// One line of the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEvent {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: GatewayEventKind,
    /// When (RFC 3339).
    #[serde(default)]
    pub time: String,
    /// The plane type (`buildplane`).
    #[serde(default)]
    pub plane_type: String,
    /// The plane (empty on a snapshot).
    #[serde(rename = "planeID", default)]
    pub plane_id: String,
    /// The connection (0 on a snapshot).
    #[serde(rename = "connectionID", default)]
    pub connection_id: u64,
    /// The CRs the event touches (`namespace/name`, or `/name` for a cluster-scoped one).
    #[serde(default)]
    pub crs: Vec<String>,
    /// Connected agents per CR after the event, for the CRs it touches; on a snapshot, for
    /// every CR with a connection.
    #[serde(default)]
    pub connected_agents_by_cr: BTreeMap<String, usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names are the contract's; an unknown kind from a newer gateway still parses.
    #[test]
    fn events_keep_their_wire_form() {
        let event = GatewayEvent {
            kind: GatewayEventKind::Connected,
            time: "2026-12-03T00:00:00.000Z".into(),
            plane_type: "buildplane".into(),
            plane_id: "p".into(),
            connection_id: 7,
            crs: vec!["org/bp".into()],
            connected_agents_by_cr: BTreeMap::from([("org/bp".into(), 1)]),
        };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(
            line,
            r#"{"type":"connected","time":"2026-12-03T00:00:00.000Z","planeType":"buildplane","planeID":"p","connectionID":7,"crs":["org/bp"],"connectedAgentsByCr":{"org/bp":1}}"#
        );
        assert_eq!(serde_json::from_str::<GatewayEvent>(&line).unwrap(), event);
        let newer: GatewayEvent =
            serde_json::from_str(r#"{"type":"rebalanced","crs":["org/bp"]}"#).unwrap();
        assert_eq!(newer.kind, GatewayEventKind::Unknown);
    }
}
